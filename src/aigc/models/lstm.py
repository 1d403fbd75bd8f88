"""LSTM language model: embedding -> stacked LSTM -> (projection) -> vocabulary head.

Reference: Hochreiter & Schmidhuber 1997; the layout of pytorch/examples `word_language_model`,
with weight tying (Press & Wolf 2017; Inan et al. 2017). A recurrent model carries a state
instead of attending to a context window, so generation feeds one token at a time through
`forward_state` and keeps the returned (h, c).

Notation: B batch, T time steps, E n_embd, H n_hidden, L n_layer, V vocab_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (L, B, H)


@dataclass
class LSTMConfig:
    """Shape of an LSTM LM. `vocab_size = 0` means "fill from the data" (presets); a model needs > 0."""

    vocab_size: int = 0
    block_size: int = 128  # training context (truncated back-propagation length)
    n_embd: int = 128
    n_hidden: int = 256
    n_layer: int = 2
    dropout: float = 0.0
    tie_embeddings: bool = False  # with n_hidden != n_embd a projection H -> E is added before the head
    init_range: float = 0.1  # untied head weights start in U(-init_range, init_range)

    def __post_init__(self):
        checks = [
            (
                self.vocab_size >= 0,
                f"vocab_size must be >= 0 (0 = fill from the data), got {self.vocab_size}",
            ),
            (self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}"),
            (self.n_embd >= 1, f"n_embd must be >= 1, got {self.n_embd}"),
            (self.n_hidden >= 1, f"n_hidden must be >= 1, got {self.n_hidden}"),
            (self.n_layer >= 1, f"n_layer must be >= 1, got {self.n_layer}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.init_range > 0, f"init_range must be > 0, got {self.init_range}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


class LSTMLM(nn.Module):
    def __init__(self, config: LSTMConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError(
                "LSTMConfig.vocab_size is 0: set it from the tokenizer before building the model"
            )
        self.config = config
        E, H = config.n_embd, config.n_hidden
        self.tok_emb = nn.Embedding(config.vocab_size, E)
        # nn.LSTM applies dropout between layers only; we add it on the input and output too
        self.lstm = nn.LSTM(
            E, H, config.n_layer, batch_first=True, dropout=config.dropout if config.n_layer > 1 else 0.0
        )
        # tying needs the head's input width to equal the embedding width
        self.proj = nn.Linear(H, E, bias=False) if config.tie_embeddings and H != E else None
        self.lm_head = nn.Linear(E if config.tie_embeddings else H, config.vocab_size, bias=True)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # The embedding keeps PyTorch's N(0, 1) and the LSTM its U(-1/sqrt(H), 1/sqrt(H)): on small
        # char-level runs they learned faster than word_language_model's U(-0.1, 0.1) embedding
        # and a forget-gate bias of 1. An untied head starts small so first predictions are near uniform.
        if not self.config.tie_embeddings:
            nn.init.uniform_(self.lm_head.weight, -self.config.init_range, self.config.init_range)
        nn.init.zeros_(self.lm_head.bias)

    def init_state(self, batch_size: int) -> State:
        """A zero (h, c) state on the model's device."""
        w = self.tok_emb.weight
        shape = (self.config.n_layer, batch_size, self.config.n_hidden)
        return torch.zeros(shape, device=w.device, dtype=w.dtype), torch.zeros(
            shape, device=w.device, dtype=w.dtype
        )

    def forward_state(self, idx: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """idx (B, T) -> (logits (B, T, V), new (h, c)); `state` None starts from zeros."""
        p = self.config.dropout if self.training else 0.0
        x = F.dropout(self.tok_emb(idx), p, self.training) if p else self.tok_emb(idx)  # (B, T, E)
        y, new_state = self.lstm(x, state)  # (B, T, H); (h, c) each (L, B, H)
        if p:
            y = F.dropout(y, p, self.training)
        if self.proj is not None:
            y = self.proj(y)  # (B, T, E)
        return self.lm_head(y), new_state  # (B, T, V)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, state: State | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, V), mean cross-entropy vs targets (-1 ignored) or None)."""
        logits, _ = self.forward_state(idx, state)
        loss = None
        if targets is not None:
            B, T = idx.shape
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    def num_params(self) -> int:
        """Number of parameters (a tied matrix counted once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 x the weights used in matmuls."""
        matmul = sum(p.numel() for n, p in self.lstm.named_parameters() if n.startswith("weight"))
        matmul += self.lm_head.weight.numel() + (self.proj.weight.numel() if self.proj is not None else 0)
        return 6 * matmul


__all__ = ["LSTMLM", "LSTMConfig", "State"]
