"""Text watermark: the green-list scheme of Kirchenbauer et al., "A Watermark for Large Language
Models" (ICML 2023, arXiv:2301.10226).

At each step the previous `h` tokens (the context) and a secret key seed a random permutation of
the vocabulary; its first `gamma * V` ids are the "green list" and get `+delta` added to their
logits before sampling. Text from the marked model then holds far more green tokens than the
`gamma` share expected by chance, which a one-proportion z-test finds without the model (only the
tokenizer, the vocabulary size and the key are needed):

    z = (|s|_G - gamma * T) / sqrt(T * gamma * (1 - gamma))          (paper eq. 2)

Hashing: for h = 1 the green list is exactly transformers' `WatermarkLogitsProcessor` with
`seeding_scheme="lefthash"` (seed = key * previous token, `torch.randperm(V)` from a CPU generator
seeded with it; the oracle test checks equality), so our marks are detectable by their
`WatermarkDetector` and vice versa. For h > 1 (transformers' lefthash ignores all but the last
token) we seed with key * blake2b(context) instead.

Detection scores every token after the first h, counting repeated (context, token) pairs each time
(transformers' default); `ignore_repeated=True` counts each pair once (the paper's later advice,
it makes repetitive text less likely to look marked).

This module imports nothing above `aigc.utils`, so the generation engine can call it.

Key: one secret per deployment, from `$AIGC_WATERMARK_KEY` or else the file
`$AIGC_HOME/watermark.key` (64 hex digits, created on first use, atomic write, mode 0600). Only its
short public id (`key_id`) is ever written into outputs.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from aigc.errors import AigcError
from aigc.utils.io import atomic_write_text

GAMMA = 0.25  # green share of the vocabulary
DELTA = 2.0  # logit bonus of green tokens
CONTEXT_WIDTH = 1  # h: previous tokens that seed the green list
Z_THRESHOLD = 4.0  # paper: z > 4 gives a false-positive rate of ~3e-5
KEY_ENV = "AIGC_WATERMARK_KEY"
KEY_FILE = "watermark.key"


@dataclass(frozen=True)
class WatermarkConfig:
    """A deployment's watermark: secret key + scheme parameters (the same for marking and detection)."""

    key: str
    gamma: float = GAMMA
    delta: float = DELTA
    context_width: int = CONTEXT_WIDTH

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise AigcError("watermark key must be a non-empty string; set $AIGC_WATERMARK_KEY or remove it")
        if not 0 < self.gamma < 1:
            raise AigcError(f"watermark gamma={self.gamma} is out of range; allowed: (0, 1)")
        if not (math.isfinite(self.delta) and self.delta >= 0):
            raise AigcError(f"watermark delta={self.delta} is out of range; allowed: a number >= 0")
        if not (isinstance(self.context_width, int) and self.context_width >= 1):
            raise AigcError(
                f"watermark context_width={self.context_width} is invalid; allowed: an integer >= 1"
            )

    @functools.cached_property
    def hash_key(self) -> int:
        """The integer key of the hashing (transformers' `hashing_key`); a hex key is read as a number.

        Reduced to 61 bits, as the transformers-compatible seed is key * token mod 2**64 - 1: enough to
        keep outsiders from guessing the green lists, not a cryptographic strength claim (with h = 1
        someone holding many marked texts can estimate the lists from token statistics).
        """
        try:
            return int(self.key, 16) % (2**61 - 1) or 1
        except ValueError:
            return int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:8], "little") % (2**61 - 1) or 1

    @property
    def key_id(self) -> str:
        """Short public id of the key (safe to publish in metadata; does not reveal the key)."""
        return hashlib.sha256(b"aigc-watermark:" + self.key.encode()).hexdigest()[:12]


def key_path() -> Path:
    return Path(os.environ.get("AIGC_HOME") or Path.home() / ".aigc") / KEY_FILE


def load_config() -> WatermarkConfig:
    """The deployment's watermark: `$AIGC_WATERMARK_KEY`, else `$AIGC_HOME/watermark.key` (created once)."""
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        return WatermarkConfig(key=env)
    path = key_path()
    if not path.exists():
        _create_key_file(path)
    return _config_from_file(str(path), path.stat().st_mtime_ns)


def _create_key_file(path: Path) -> None:
    """Write a fresh key without ever replacing one: a full temp file, then link() (fails if another
    process made the key first; then its key is used). Mode 0600."""
    tmp = atomic_write_text(
        path.with_name(f".{path.name}.{secrets.token_hex(4)}.new"), secrets.token_hex(32) + "\n"
    )
    try:
        tmp.chmod(0o600)
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


@lru_cache(maxsize=8)
def _config_from_file(path: str, mtime_ns: int) -> WatermarkConfig:
    """Read once per file version (the server rebuilds its row parameters often)."""
    key = Path(path).read_text(encoding="utf-8").strip()
    if not key:
        raise AigcError(
            f"watermark key file {path} is empty; delete it (a new key is made) or set ${KEY_ENV}"
        )
    return WatermarkConfig(key=key)


# ---------------------------------------------------------------------------- green lists


def context_seed(context: Sequence[int], hash_key: int) -> int:
    """Generator seed for a context of h token ids (h = 1: transformers' lefthash)."""
    if len(context) == 1:
        seed = hash_key * int(context[0])
    else:
        digest = hashlib.blake2b(b"".join(int(t).to_bytes(4, "little") for t in context), digest_size=8)
        seed = hash_key * int.from_bytes(digest.digest(), "little")
    return seed % (2**64 - 1)


@lru_cache(maxsize=8192)
def _green_ids(seed: int, vocab_size: int, size: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randperm(vocab_size, generator=g)[:size]


def greenlist_ids(context: Sequence[int], cfg: WatermarkConfig, vocab_size: int) -> torch.Tensor:
    """Green token ids (gamma * V of them) after `context` (its last h tokens are used)."""
    ctx = list(context)[-cfg.context_width :]
    return _green_ids(context_seed(ctx, cfg.hash_key), vocab_size, int(vocab_size * cfg.gamma))


def greenlist_mask(context: Sequence[int], cfg: WatermarkConfig, vocab_size: int) -> torch.Tensor:
    """(V,) bool: True for green tokens."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[greenlist_ids(context, cfg, vocab_size)] = True
    return mask


# ---------------------------------------------------------------------------- marking


def watermark_logits(
    logits: torch.Tensor, histories: Sequence[Sequence[int]], cfgs: Sequence[WatermarkConfig | None]
) -> torch.Tensor:
    """Add delta to the green logits of each row whose config is set (the engine's last processor).

    logits: (B, V); histories: each row's prompt + generated ids; a row with fewer than h tokens
    of history is left alone (transformers skips seeding the same way).
    """
    B, V = logits.shape
    # one cached (V,) mask per (key, context): stacking them costs far less than indexing per row
    masks, deltas = [], []
    for hist, cfg in zip(histories, cfgs, strict=True):
        if cfg is None or len(hist) < cfg.context_width:
            masks.append(_no_mask(V))
            deltas.append(0.0)
            continue
        ctx = hist[len(hist) - cfg.context_width :]
        masks.append(_green_mask(context_seed(ctx, cfg.hash_key), V, int(V * cfg.gamma)))
        deltas.append(cfg.delta)
    bias = torch.stack(masks).to(logits.dtype) * torch.tensor(deltas, dtype=logits.dtype)[:, None]  # (B, V)
    return logits + bias


@lru_cache(maxsize=8192)
def _green_mask(seed: int, vocab_size: int, size: int) -> torch.Tensor:
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[_green_ids(seed, vocab_size, size)] = True
    return mask


@lru_cache(maxsize=16)
def _no_mask(vocab_size: int) -> torch.Tensor:
    return torch.zeros(vocab_size, dtype=torch.bool)


# ---------------------------------------------------------------------------- detection


@dataclass
class Detection:
    """Result of testing a token sequence for the watermark."""

    z_score: float
    p_value: float
    green: int  # green tokens among the scored ones
    scored: int  # tokens scored
    detected: bool
    threshold: float
    key_id: str

    @property
    def green_fraction(self) -> float:
        return self.green / self.scored if self.scored else 0.0

    def verdict(self) -> str:
        if self.scored == 0:
            return "too short to test (no token after the context)"
        if self.detected:
            return f"watermarked (z = {self.z_score:.2f} > {self.threshold:g})"
        return f"no watermark (z = {self.z_score:.2f} <= {self.threshold:g})"

    def to_dict(self) -> dict:
        return {
            "z_score": self.z_score,
            "p_value": self.p_value,
            "green": self.green,
            "scored": self.scored,
            "green_fraction": self.green_fraction,
            "detected": self.detected,
            "threshold": self.threshold,
            "key_id": self.key_id,
            "verdict": self.verdict(),
        }


def z_score(green: int, scored: int, gamma: float) -> float:
    """One-proportion z-test of the green count (paper eq. 2); 0 for an empty sequence."""
    if scored == 0:
        return 0.0
    return (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))


def p_value(z: float) -> float:
    """One-sided p-value of a z-score under the null (no watermark): P(Z > z)."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def detect(
    tokens: Sequence[int],
    cfg: WatermarkConfig,
    vocab_size: int,
    threshold: float = Z_THRESHOLD,
    ignore_repeated: bool = False,
) -> Detection:
    """Test token ids (generated text, ideally without the prompt) for the watermark of `cfg`."""
    tokens = [int(t) for t in tokens]
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise AigcError(
            f"token id {bad[0]} is outside the vocabulary [0, {vocab_size}); use the model that made the text"
        )
    h = cfg.context_width
    pairs = [(tuple(tokens[i - h : i]), tokens[i]) for i in range(h, len(tokens))]
    if ignore_repeated:
        pairs = list(dict.fromkeys(pairs))
    green = sum(int(t) in _green_set(ctx, cfg, vocab_size) for ctx, t in pairs)
    z = z_score(green, len(pairs), cfg.gamma)
    return Detection(
        z_score=z,
        p_value=p_value(z),
        green=green,
        scored=len(pairs),
        detected=len(pairs) > 0 and z > threshold,
        threshold=threshold,
        key_id=cfg.key_id,
    )


def _green_set(context: tuple[int, ...], cfg: WatermarkConfig, vocab_size: int) -> frozenset[int]:
    return _green_set_cached(context_seed(context, cfg.hash_key), vocab_size, int(vocab_size * cfg.gamma))


@lru_cache(maxsize=8192)
def _green_set_cached(seed: int, vocab_size: int, size: int) -> frozenset[int]:
    return frozenset(_green_ids(seed, vocab_size, size).tolist())


def detect_text(
    text: str,
    tokenizer,
    vocab_size: int,
    cfg: WatermarkConfig | None = None,
    threshold: float = Z_THRESHOLD,
    ignore_repeated: bool = False,
) -> Detection:
    """Tokenize `text` with the model's tokenizer and test it (`cfg` None: the deployment's key).

    A BPE tokenizer may split the text differently than the model generated it; the few tokens
    that differ only add noise to the count.
    """
    cfg = cfg or load_config()
    try:
        ids = tokenizer.encode(text)
    except Exception as e:  # a char tokenizer refuses unseen characters
        raise AigcError(
            f"cannot tokenize the text with this model's tokenizer ({e}); use the model that made it"
        ) from e
    return detect(ids, cfg, vocab_size, threshold=threshold, ignore_repeated=ignore_repeated)
