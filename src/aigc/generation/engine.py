"""The token-id engine: batched prefill + decode with per-row parameters, seeds and stop rules.

It knows token ids, not tokenizers (karpathy/nanochat `engine.py`): `TextGenerator` turns text
into `Request`s and `Completion`s back into text. One batch may mix prompts of different lengths
and requests with different parameters; each row samples from its own `torch.Generator` seeded
from the request's recorded seed, so a result can be reproduced from its seed alone.

Context policy: a prompt that does not fit the model's context (`decoder.max_len`) keeps its tail,
the last `max_len - min(max_new_tokens, max_len // 2)` tokens, so there is room to generate; a
warning is logged and recorded on the completion. When a row's context fills up during decoding it
slides (nanoGPT crops the context the same way): the row's last `max_len - max_len // 4` tokens are
run again as its whole context and decoding goes on, so `max_new_tokens` may exceed the context.
Only that row is recomputed, so its tokens never depend on its batch neighbours. Decoders without
`refill` (transformers models, whose contexts are long) end such a row with finish_reason "length".
Recurrent decoders (LSTM) have no context limit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from aigc.errors import AigcError
from aigc.generation import processors as P
from aigc.generation.beam import beam_search
from aigc.generation.params import GenerationParams
from aigc.generation.sampling import make_generator, sample_next, token_logprobs

log = logging.getLogger("aigc.generation")


@dataclass
class Request:
    """One sequence to generate: prompt token ids and resolved parameters (with a seed)."""

    prompt: list[int]
    params: GenerationParams


@dataclass
class Completion:
    """What the engine produced for one request (or one beam)."""

    tokens: list[int] = field(default_factory=list)  # generated ids (a final stop token included)
    finish_reason: str = "length"  # "stop" (stop token or string) | "length"
    logprobs: list[float] = field(default_factory=list)  # per generated token, if requested
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_tokens: int = 0  # after context truncation
    score: float | None = None  # beam search: length-penalised log-prob
    warnings: list[str] = field(default_factory=list)


class Engine:
    """Generate token ids from a decoder (see `decoders.py`)."""

    def __init__(self, decoder, eos_id: int | Sequence[int] | None = None) -> None:
        self.decoder = decoder
        self.eos_id = eos_id  # one id or several (HF models may end on any of a few)
        # False: the caller shows each completion's `warnings` itself (the CLI), so they are not
        # logged as well
        self.log_warnings = True

    # ------------------------------------------------------------------ helpers

    def stop_ids(self, params: GenerationParams) -> list[int]:
        """Token ids that end a row: the request's stop_token_ids, plus EOS unless ignore_eos."""
        ids = list(params.stop_token_ids)
        if self.eos_id is not None and not params.ignore_eos:
            ids.extend([self.eos_id] if isinstance(self.eos_id, int) else self.eos_id)
        return sorted(set(ids))

    def fit_prompt(
        self, prompt: Sequence[int], max_new_tokens: int, *, quiet: bool = False
    ) -> tuple[list[int], list[str]]:
        """Apply the context policy: keep the prompt's tail when it does not fit.

        Returns the ids to run and the warnings, which are logged too unless `quiet` (for a caller
        that only wants their text: what will happen, said before the prompt runs elsewhere).
        """
        prompt = list(prompt)
        if not prompt:
            raise AigcError("the engine needs at least one prompt token (the text layer adds a start token)")
        V = self.decoder.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise AigcError(f"prompt token id {bad[0]} is outside the model's vocabulary [0, {V})")
        ctx = self.decoder.max_len
        if ctx is None or len(prompt) < ctx:
            return prompt, []
        keep = ctx - max(1, min(max_new_tokens, ctx // 2))
        msg = (
            f"prompt has {len(prompt)} tokens but the model's context is {ctx}: kept the last {keep} tokens "
            f"(room for {ctx - keep} new ones); shorten the prompt to keep its beginning"
        )
        if not quiet and self.log_warnings:
            log.warning(msg)
        return prompt[-keep:], [msg]

    # ------------------------------------------------------------------ sampling / greedy

    def run(self, requests: Sequence[Request]) -> DecodeRun:
        """Start decoding a batch; iterate the returned run for per-step tokens."""
        return DecodeRun(self, requests)

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Decode a batch to the end; one Completion per request, in order."""
        run = self.run(requests)
        for _ in run:
            pass
        return run.completions

    # ------------------------------------------------------------------ beam search

    def beam(self, request: Request) -> list[Completion]:
        """Beam search for one request: `num_return_sequences` completions, best first."""
        p = request.params
        prompt, warns = self.fit_prompt(request.prompt, p.max_new_tokens)
        if p.max_new_tokens == 0:
            return [Completion(prompt_tokens=len(prompt), warnings=warns)]
        K = p.num_beams
        max_new = p.max_new_tokens
        if self.decoder.max_len is not None:
            max_new = min(max_new, self.decoder.max_len - len(prompt) + 1)
        dec = self.decoder
        first = dec.prefill([prompt] * K, max_len=len(prompt) + max_new)
        rp = P.RowParams.from_params([p] * K, dec.vocab_size)

        def process(log_probs: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
            seen = None
            if rp.use_rep:
                seen = torch.zeros_like(log_probs, dtype=torch.bool)
                seen.scatter_(1, torch.tensor(histories), True)
            ngrams = [P.NGramIndex(p.no_repeat_ngram_size, h) for h in histories] if rp.use_ngram else None
            return P.process(log_probs, rp, seen=seen, histories=histories, ngrams=ngrams)

        hyps = beam_search(
            first,
            dec.step,
            dec.reorder,
            prompt,
            num_beams=K,
            max_new_tokens=max_new,
            stop_ids=self.stop_ids(p),
            length_penalty=p.length_penalty,
            early_stopping=p.early_stopping,
            num_return_sequences=p.num_return_sequences,
            process=process,
        )
        return [
            Completion(
                tokens=h.tokens,
                finish_reason=h.finish_reason,
                prompt_tokens=len(prompt),
                score=h.score,
                warnings=warns,
            )
            for h in hyps
        ]


def can_slide(decoder: object) -> bool:
    """Whether rows of this decoder slide their context when it is full (see the module docstring)."""
    return getattr(decoder, "max_len", None) is not None and hasattr(decoder, "refill")


def feed(
    dec: object,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    histories: Sequence[Sequence[int]],
    cache_len: int | None,
    prompts: Sequence[Sequence[int]] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed one new token per row at its position -> (logits (B, V), next positions (B,)).

    With `cache_len`, a row whose next position is past the cache slides: it steps at a
    placeholder slot (0), then its last `cache_len - cache_len // 4` tokens of `histories[j]` are
    run again as its whole context, overwriting that slot and giving its logits. `prompts` join
    as new rows after the B in the same pass (`GPTDecoder.step_and_add`): logits and positions
    then have B + len(prompts) rows.
    """
    full = []
    if cache_len is not None and int(positions.max()) >= cache_len:  # (2 ops instead of 4: per-step cost)
        full = (positions >= cache_len).nonzero().flatten().tolist()
    if full:
        positions = positions.clone()
        positions[full] = 0
    logits = dec.step_and_add(tokens, positions, prompts) if prompts else dec.step(tokens, positions)
    if full:
        keep = cache_len - cache_len // 4
        logits = logits.clone()  # an inference tensor: copy before the in-place row updates
        for j in full:
            logits[j] = dec.refill(j, list(histories[j][-keep:]))
            positions[j] = keep - 1
    if prompts:
        return logits, torch.cat([positions + 1, torch.tensor([len(p) for p in prompts], dtype=torch.long)])
    return logits, positions + 1


class DecodeRun:
    """One batch being decoded. Iterating yields, per step, `[(request_index, token), ...]` for the
    rows still running; `stop(i)` ends request i early (a stop string found by the text layer)."""

    def __init__(self, engine: Engine, requests: Sequence[Request]) -> None:
        self.engine = engine
        self.requests = list(requests)
        self.completions = [Completion() for _ in requests]
        self._stopped: set[int] = set()

    def stop(self, i: int, reason: str = "stop") -> None:
        self._stopped.add(i)
        self.completions[i].finish_reason = reason

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        eng, dec = self.engine, self.engine.decoder
        V = dec.vocab_size
        prompts, params = [], []
        for i, r in enumerate(self.requests):
            if r.params.num_beams > 1:
                raise AigcError("num_beams > 1 runs through Engine.beam, one request at a time")
            prompt, warns = eng.fit_prompt(r.prompt, r.params.max_new_tokens, quiet=True)
            self.completions[i].prompt_tokens = len(prompt)
            self.completions[i].warnings = warns
            prompts.append(prompt)
            params.append(r.params)
        if eng.log_warnings:  # once per batch: n rows of one prompt share its warning
            for msg in dict.fromkeys(w for c in self.completions for w in c.warnings):
                log.warning(msg)
        # rows with nothing to generate are done before they start
        active = [i for i in range(len(prompts)) if params[i].max_new_tokens > 0]
        if not active:
            return
        cache_len = max(len(prompts[i]) + params[i].max_new_tokens for i in active)
        if dec.max_len is not None:
            cache_len = min(cache_len, dec.max_len)
        slide = can_slide(dec)

        # 1. prefill every prompt; per-row state for processors and sampling
        logits = dec.prefill([prompts[i] for i in active], max_len=cache_len)  # (B, V)
        rp = P.RowParams.from_params([params[i] for i in active], V)
        gens = [make_generator(params[i].seed) if params[i].sampling else None for i in active]
        stop_sets = [set(eng.stop_ids(params[i])) for i in active]
        histories = [list(prompts[i]) for i in active]
        ngrams = [
            P.NGramIndex(params[i].no_repeat_ngram_size, prompts[i]) if rp.ngram[j] else None
            for j, i in enumerate(active)
        ]
        seen = counts = None
        if rp.use_rep:
            seen = torch.zeros(len(active), V, dtype=torch.bool)
            for j, i in enumerate(active):
                seen[j, torch.tensor(prompts[i])] = True
        if rp.use_pf:
            counts = torch.zeros(len(active), V)
        want_lp = [params[i].logprobs for i in active]
        top_n = max(params[i].top_logprobs for i in active)
        plens = [len(prompts[i]) for i in active]
        positions = torch.tensor(plens, dtype=torch.long)  # where each row's next token goes

        while active:
            # 2. processors, then greedy or sampled next token per row
            scores = P.process(logits, rp, seen=seen, counts=counts, histories=histories, ngrams=ngrams)
            tokens = sample_next(scores, rp.sample, gens, rp.any_sample, rp.all_sample)  # (B,)
            tok_list = tokens.tolist()
            if any(want_lp):
                lp, top = token_logprobs(logits, tokens, top_n)
            # 3. record, and update the history structures the processors read
            done = []
            for j, (i, t) in enumerate(zip(active, tok_list, strict=True)):
                c = self.completions[i]
                c.tokens.append(t)
                histories[j].append(t)
                if ngrams[j] is not None:
                    ngrams[j].add(t)
                if want_lp[j]:
                    c.logprobs.append(lp[j])
                    c.top_logprobs.append(top[j][: params[i].top_logprobs])
                if t in stop_sets[j]:
                    c.finish_reason = "stop"
                    done.append(j)
                elif len(c.tokens) >= params[i].max_new_tokens or (
                    not slide and plens[j] + len(c.tokens) > cache_len
                ):
                    # out of new tokens, or the context is full and cannot slide
                    c.finish_reason = "length"
                    done.append(j)
            if seen is not None:
                seen[torch.arange(len(active)), tokens] = True
            if counts is not None:
                counts[torch.arange(len(active)), tokens] += 1
            yield list(zip(active, tok_list, strict=True))
            # 4. drop rows that finished (stop token, length, or a stop string seen by the caller)
            done_set = set(done) | {j for j, i in enumerate(active) if i in self._stopped}
            if done_set:
                keep = [j for j in range(len(active)) if j not in done_set]
                if not keep:
                    return
                idx = torch.tensor(keep, dtype=torch.long)
                dec.reorder(idx)
                active = [active[j] for j in keep]
                rp = rp.select(idx)
                gens = [gens[j] for j in keep]
                stop_sets = [stop_sets[j] for j in keep]
                histories = [histories[j] for j in keep]
                ngrams = [ngrams[j] for j in keep]
                want_lp = [want_lp[j] for j in keep]
                plens = [plens[j] for j in keep]
                seen = None if seen is None else seen[idx]
                counts = None if counts is None else counts[idx]
                tokens, positions = tokens[idx], positions[idx]
            # 5. feed the new tokens at each row's position (a row whose context is full slides)
            logits, positions = feed(dec, tokens, positions, histories, cache_len if slide else None)
