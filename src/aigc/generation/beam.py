"""Beam search for one prompt, step for step the algorithm of `transformers` 5.x `_beam_search`.

Kept identical on purpose (same candidate count, same -1e9 masking, same length penalty and
early-stopping heuristics) so a model exported to Hugging Face returns the very same sequences
from `model.generate(num_beams=..., ...)` as from us; the oracle test checks it. In short, with
K = num_beams:

  1. log-softmax the K beams' next-token logits, run the processors, add each beam's running score;
  2. take the best 2K (token, beam) continuations over all K x V candidates;
  3. a continuation that ends in a stop token (or reaches max length) is a finished hypothesis:
     its score is sum(logprobs) / generated_len ** length_penalty; the best K finished are kept;
  4. the best K unfinished continuations are the next running beams (the cache is reordered);
  5. stop when no running beam can beat the worst kept hypothesis (`early_stopping` picks the
     heuristic: True = as soon as K are finished, False = at the current length, "never" = at
     max length when length_penalty > 0), or at max length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

BIG_NEG = -1.0e9


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens (a final stop token included)
    score: float  # length-penalised sum of log-probs
    finish_reason: str  # "stop" | "length"


def beam_search(
    first_logits: torch.Tensor,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    reorder: Callable[[torch.Tensor], None],
    prompt: Sequence[int],
    num_beams: int,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    process: Callable[[torch.Tensor, list[list[int]]], torch.Tensor] | None = None,
) -> list[Hypothesis]:
    """Run beam search; return the best `num_return_sequences` hypotheses, best first.

    Args:
        first_logits: (K, V) logits after the prompt, one identical row per beam (the decoder
            was prefilled with the prompt K times).
        step: (tokens (K,), positions (K,)) -> (K, V) next logits, appending to the decoder state.
        reorder: index (K,) -> None; makes decoder row i a copy of row index[i].
        process: (log_probs (K, V), histories) -> processed log_probs (penalties, bans).
    """
    K = num_beams
    P = len(prompt)
    max_length = P + max_new_tokens
    n_stop = len(set(stop_ids))
    keep = max(2, 1 + n_stop) * K  # candidates per step: enough that K stay unfinished
    top_k_mask = torch.arange(keep) < K  # only the first K candidates may become final
    stop_t = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)

    # running beams: tokens so far, scores (only beam 0 live at first, so beams don't duplicate)
    running = torch.tensor([list(prompt)] * K, dtype=torch.long).reshape(K, P)  # (K, cur_len)
    running_scores = torch.full((K,), BIG_NEG)
    running_scores[0] = 0.0
    # finished hypotheses: K slots
    fin_seqs: list[list[int]] = [[] for _ in range(K)]
    fin_scores = torch.full((K,), BIG_NEG)
    fin_done = torch.zeros(K, dtype=torch.bool)
    fin_reason = ["length"] * K
    improvable = True
    cur_len = P
    logits = first_logits
    while True:
        # 1. log-probs of every continuation, processed, plus the running score
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (K, V)
        if process is not None:
            log_probs = process(log_probs, running.tolist())
        V = log_probs.shape[-1]
        acc = (log_probs + running_scores[:, None]).reshape(-1)  # (K * V,)
        # 2. best `keep` continuations over all beams
        cand_scores, cand_idx = torch.topk(acc, k=keep)  # (keep,)
        cand_beam = cand_idx // V
        cand_tok = cand_idx % V
        cand_seqs = torch.cat([running[cand_beam], cand_tok[:, None]], dim=1)  # (keep, cur_len + 1)
        # 3. which candidates finish here (stop token, or max length reached)
        is_stop = torch.isin(cand_tok, stop_t) if n_stop else torch.zeros(keep, dtype=torch.bool)
        hits = is_stop | (cur_len + 1 >= max_length)
        # 4. next running beams: the best K unfinished candidates
        run_scores_all = cand_scores + hits.float() * BIG_NEG
        nxt = torch.topk(run_scores_all, k=K).indices
        # 5. merge newly finished (among the top K candidates) into the finished slots
        just_done = hits & top_k_mask
        fin_cand = cand_scores / float(cur_len + 1 - P) ** length_penalty
        if bool(fin_done.all()) and early_stopping is True:
            fin_cand = fin_cand + BIG_NEG
        if not improvable:
            fin_cand = fin_cand + BIG_NEG
        fin_cand = fin_cand + (~just_done).float() * BIG_NEG
        merged_scores = torch.cat([fin_scores, fin_cand])
        best = torch.topk(merged_scores, k=K).indices.tolist()
        cand_list = cand_seqs[:, P:].tolist()
        old = (fin_seqs, fin_done.tolist(), fin_reason)
        fin_seqs = [old[0][i] if i < K else cand_list[i - K] for i in best]
        fin_reason = [old[2][i] if i < K else ("stop" if bool(is_stop[i - K]) else "length") for i in best]
        fin_done = torch.tensor([old[1][i] if i < K else bool(just_done[i - K]) for i in best])
        fin_scores = merged_scores[best]
        running = cand_seqs[nxt]
        running_scores = run_scores_all[nxt]
        cur_len += 1
        # early-stop heuristic: can the best running beam still beat the worst kept hypothesis?
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_length - P
        else:
            best_len = cur_len - P
        best_possible = running_scores[0] / float(best_len) ** length_penalty
        worst = torch.where(fin_done, fin_scores.min(), torch.tensor(BIG_NEG))
        improvable = improvable and bool((best_possible > worst).any())
        all_full = bool(fin_done.all()) and early_stopping is True
        if not improvable or all_full or bool(hits.all()):
            break
        # 6. feed the chosen tokens to the model, with the cache rows of their parent beams
        reorder(cand_beam[nxt])
        positions = torch.full((K,), cur_len - 1, dtype=torch.long)
        logits = step(running[:, -1], positions)
    return [
        Hypothesis(fin_seqs[i], float(fin_scores[i]), fin_reason[i])
        for i in range(num_return_sequences)
        if bool(fin_done[i])
    ]
