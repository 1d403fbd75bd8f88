"""Text classifiers: a fastText-style bag of n-grams, and a logistic head on sentence embeddings.

1. `NgramFeaturizer` turns a text into feature ids: lower-cased words, word bigrams (with
   sentence boundary marks) and character n-grams of each word (fastText's subwords, so "loved"
   shares features with "love" and typos still count). Its vocabulary is the features seen in
   training; it is saved as JSON beside the weights.
2. `TextClassifier` (Joulin et al. 2017, "Bag of Tricks for Efficient Text Classification"):
   mean of the feature embeddings -> linear layer -> class logits. Trains in seconds on CPU.
3. `EmbeddingClassifier`: multinomial logistic regression on fixed sentence embeddings (e.g.
   all-MiniLM-L6-v2), for when a local embedding model is available.

Notation: B batch, N total feature ids in the batch, D embedding dim, K classes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- featurizer

WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?|[!?]", re.UNICODE)  # words (with n't, 's), and ! ?


@dataclass
class FeaturizerConfig:
    lowercase: bool = True
    word_bigrams: bool = True
    char_min: int = 2  # character n-grams of "<word>", from char_min to char_max; 0 = none
    char_max: int = 5
    min_count: int = 1  # features seen in fewer training texts are dropped
    max_features: int = 500_000


class NgramFeaturizer:
    """text -> list of feature ids (0 is reserved for "no known feature")."""

    def __init__(self, config: FeaturizerConfig, vocab: dict[str, int] | None = None):
        self.config = config
        self.vocab = vocab or {}

    def features(self, text: str) -> list[str]:
        c = self.config
        words = WORD.findall(text.lower() if c.lowercase else text)
        out = ["w:" + w for w in words]
        if c.word_bigrams:
            seq = ["<s>", *words, "</s>"]
            out += ["b:" + a + " " + b for a, b in zip(seq[:-1], seq[1:], strict=True)]
        if c.char_min > 0:
            for w in words:
                w = f"<{w}>"
                for n in range(c.char_min, c.char_max + 1):
                    out += ["c:" + w[i : i + n] for i in range(len(w) - n + 1)]
        return out

    def fit(self, texts: Iterable[str]) -> NgramFeaturizer:
        """Build the vocabulary: features in >= min_count texts, most frequent first (then A-Z)."""
        df: Counter = Counter()
        for t in texts:
            df.update(set(self.features(t)))
        kept = sorted((f for f, n in df.items() if n >= self.config.min_count), key=lambda f: (-df[f], f))
        self.vocab = {f: i + 1 for i, f in enumerate(kept[: self.config.max_features])}
        return self

    def encode(self, text: str) -> list[int]:
        ids = [self.vocab[f] for f in self.features(text) if f in self.vocab]
        return ids or [0]  # an all-unknown text still gets one (padding) id

    @property
    def size(self) -> int:
        return len(self.vocab) + 1

    def to_json(self) -> dict:
        return {"config": asdict(self.config), "vocab": self.vocab}

    @classmethod
    def from_json(cls, obj: dict) -> NgramFeaturizer:
        return cls(FeaturizerConfig(**obj["config"]), {str(k): int(v) for k, v in obj["vocab"].items()})


def pack(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length id lists -> (flat ids (N,), offsets (B,)) for nn.EmbeddingBag."""
    lengths = torch.tensor([len(x) for x in batch])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    flat = torch.tensor([i for x in batch for i in x], dtype=torch.long)
    return flat, offsets


# ----------------------------------------------------------------------------- models


@dataclass
class TextClassifierConfig:
    vocab_size: int = 1
    num_classes: int = 2
    dim: int = 32

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError("num_classes must be >= 2")


class TextClassifier(nn.Module):
    """fastText: mean of feature embeddings -> linear -> logits."""

    def __init__(self, config: TextClassifierConfig):
        super().__init__()
        self.config = config
        # sparse gradients: each step touches only the features in the batch
        self.emb = nn.EmbeddingBag(config.vocab_size, config.dim, mode="mean", padding_idx=0, sparse=True)
        nn.init.uniform_(self.emb.weight, -1 / config.dim, 1 / config.dim)
        with torch.no_grad():
            self.emb.weight[0].zero_()
        self.head = nn.Linear(config.dim, config.num_classes)

    def forward(
        self, ids: torch.Tensor, offsets: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids (N,), offsets (B,) -> (logits (B, K), cross-entropy | None)."""
        h = self.emb(ids, offsets)  # (B, D)
        logits = self.head(h)  # (B, K)
        loss = F.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class EmbeddingClassifierConfig:
    input_dim: int = 384
    num_classes: int = 2


class EmbeddingClassifier(nn.Module):
    """Logistic regression on fixed sentence embeddings: one linear layer."""

    def __init__(self, config: EmbeddingClassifierConfig):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.input_dim, config.num_classes)

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """embeddings (B, D) -> (logits (B, K), cross-entropy | None)."""
        logits = self.linear(x)  # (B, K)
        loss = F.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss
