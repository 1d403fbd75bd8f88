"""Preference losses and the log-probabilities they need (used by `aigc.tuning.text`).

DPO (Rafailov et al. 2023, eq. 7, with cDPO label smoothing as in TRL's "sigmoid" loss), KTO
(Ethayarajh et al. 2024, eq. 7 as TRL's KTOTrainer computes it: the KL term is the detached,
clamped mean log-ratio of mismatched prompt/completion pairs), the LM loss on completion tokens
(SFT), and held-out LM loss on the original data (the tuning guard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- sequences and log-probs


@dataclass
class Seq:
    """One prompt + completion as token ids; targets from index `start` on are the completion's."""

    ids: list[int]
    start: int  # first completion token's index in `ids` (>= 1: there is always a prompt token)


def make_seq(prompt_ids: list[int], completion_ids: list[int], max_len: int) -> Seq:
    """Cut to `max_len + 1` tokens: the prompt keeps its last tokens (at most half), then the
    completion is cut at the end."""
    prompt_ids = list(prompt_ids) or [0]
    room = max(1, max_len // 2)
    if len(prompt_ids) + len(completion_ids) > max_len + 1 and len(prompt_ids) > room:
        prompt_ids = prompt_ids[-room:]
    ids = (prompt_ids + list(completion_ids))[: max_len + 1]
    return Seq(ids, len(prompt_ids))


def batch_tensors(seqs: list[Seq], device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Right-padded inputs x (B, T), targets y (B, T) (-1 outside completions) and mask (B, T)."""
    T = max(len(s.ids) for s in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids = torch.tensor(s.ids, dtype=torch.long)
        n = len(s.ids) - 1
        x[i, :n] = ids[:-1]
        y[i, s.start - 1 : n] = ids[s.start :]  # position t predicts ids[t + 1]
    return x.to(device), y.to(device), (y >= 0).to(device)


def sequence_logps(model: nn.Module, seqs: list[Seq], device: torch.device | str = "cpu") -> torch.Tensor:
    """Sum of log p(completion token) per sequence, (B,): the quantity DPO and KTO compare."""
    x, y, mask = batch_tensors(seqs, device)
    logits, _ = model(x)  # (B, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1)  # (B,)


@torch.no_grad()
def reference_logps(model: nn.Module, seqs: list[Seq], batch: int = 32) -> torch.Tensor:
    """`sequence_logps` of the starting weights for every sequence, once, (N,)."""
    was = model.training
    model.eval()
    out = [sequence_logps(model, seqs[i : i + batch]) for i in range(0, len(seqs), batch)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------- losses


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (eq. 7) with cDPO label smoothing, per pair: (losses (B,), chosen rewards, rejected rewards).

    logits = beta * ((pi_c - pi_r) - (ref_c - ref_r));
    loss = -(1 - eps) * log sigmoid(logits) - eps * log sigmoid(-logits)  (TRL's "sigmoid" loss).
    """
    logits = beta * ((policy_chosen - policy_rejected) - (ref_chosen - ref_rejected))  # (B,)
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def kto_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    labels: torch.Tensor,
    policy_kl: torch.Tensor,
    ref_kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (eq. 7) as TRL computes it: (losses (B,), rewards (B,), kl ()).

    kl = max(0, mean(policy_kl - ref_kl)) over mismatched pairs, detached (a reference point,
    not a gradient path); desirable: 1 - sigmoid(beta (r - kl)); undesirable: 1 - sigmoid(beta (kl - r)),
    with r = policy - ref the log-ratio of each output.
    """
    kl = (policy_kl - ref_kl).mean().detach().clamp(min=0)
    ratio = policy - ref  # (B,)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    losses = torch.where(labels, desirable, undesirable)
    return losses, beta * ratio.detach(), kl


# ----------------------------------------------------------------------------- held-out LM loss


@torch.no_grad()
def heldout_lm_loss(model: nn.Module, tokens: np.ndarray, block: int, batches: int, seed: int = 0) -> float:
    """Mean next-token loss on fixed random windows of `tokens` (same windows for every call)."""
    was = model.training
    model.eval()
    block = max(1, min(block, len(tokens) - 1))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(batches):
        starts = torch.randint(len(tokens) - block, (8,), generator=gen).tolist()
        rows = torch.from_numpy(np.stack([tokens[i : i + block + 1] for i in starts]).astype(np.int64))
        _, loss = model(rows[:, :-1], rows[:, 1:])
        losses.append(float(loss))
    model.train(was)
    return float(np.mean(losses))


@torch.no_grad()
def completion_lm_loss(model: nn.Module, seqs: list[Seq]) -> float:
    """Mean loss per completion token over `seqs` (the guard when no original data is at hand)."""
    if not seqs:
        return math.nan
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(seqs), 32):
        chunk = seqs[i : i + 32]
        total -= float(sequence_logps(model, chunk).sum())
        count += sum(len(s.ids) - s.start for s in chunk)
    model.train(was)
    return total / max(count, 1)
