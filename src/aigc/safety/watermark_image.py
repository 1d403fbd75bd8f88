"""Invisible image watermark: a 32-bit key id in the 8x8 block DCT of the luminance.

Our own method (numpy + scipy; `invisible-watermark` pulls opencv-python, onnx and onnxruntime).
It is the classic block-DCT quantisation index modulation (QIM; Chen & Wornell 2001) used by
dwtDct-style marks, chosen because JPEG works on the same 8x8 DCT blocks:

  1. Y = 0.299 R + 0.587 G + 0.114 B (float), cut into 8x8 blocks, orthonormal 2-D DCT per block.
  2. Four mid-frequency coefficients per block are the "slots". A key-seeded permutation assigns
     every slot one of the 32 payload bits (so each bit is repeated over the whole image) and a
     key-seeded dither d in [0, step).
  3. QIM: a slot carrying bit b is moved to the nearest point of the lattice d + b*step/2 + k*step.
  4. The change of Y is added to R, G and B alike (that changes Y exactly and leaves the colour,
     Cb and Cr, alone); round, clip to [0, 255].

Detection reads every slot's bit (nearest lattice), takes the majority per payload bit and compares
the 32 bits with this deployment's key id: >= 29 matching bits (p < 2e-6 for an unmarked image,
binomial tail) is a detection. A wrong key gives a different permutation and dither: ~16 of 32.

The payload is the first 32 bits of `WatermarkConfig.key_id` (the same id the text mark and the
provenance record carry). Size: bits repeat (H // 8) * (W // 8) * 4 / 32 times; below about 64x64
there are too few repeats to survive JPEG (see docs/benchmarks.md for measured figures), and
`embed` refuses images under MIN_SIDE px.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.fft import dctn, idctn

from aigc.errors import AigcError
from aigc.safety.watermark_text import WatermarkConfig, load_config

BITS = 32
STEP = 24.0  # QIM lattice step in DCT units: larger survives stronger JPEG, costs PSNR
SLOTS = ((1, 2), (2, 1), (2, 2), (3, 1))  # mid-frequency (row, col) coefficients of each 8x8 block
MATCH_THRESHOLD = 29  # of 32 bits
MIN_SIDE = 24  # px: 3x3 blocks = 36 slots, the least that holds 32 bits once


@dataclass
class ImageDetection:
    """Result of reading the mark from an image."""

    matched: int  # payload bits equal to this key's id (of BITS)
    bit_accuracy: float
    p_value: float  # P(>= matched bits by chance) for an unmarked image
    detected: bool
    key_id: str
    repeats: float  # slots per payload bit in this image

    def verdict(self) -> str:
        if self.detected:
            return f"watermarked ({self.matched}/{BITS} key id bits match)"
        return f"no watermark ({self.matched}/{BITS} key id bits match, {MATCH_THRESHOLD} needed)"

    def to_dict(self) -> dict:
        return {
            "status": "detected" if self.detected else "not detected",
            "matched_bits": self.matched,
            "bits": BITS,
            "bit_accuracy": self.bit_accuracy,
            "p_value": self.p_value,
            "detected": self.detected,
            "key_id": self.key_id,
            "repeats_per_bit": self.repeats,
            "verdict": self.verdict(),
        }


def payload_bits(cfg: WatermarkConfig) -> np.ndarray:
    """(32,) uint8: the first 32 bits of the key id."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(cfg.key_id[:8]), dtype=np.uint8))


def _layout(cfg: WatermarkConfig, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Key-seeded (bit index per slot (n,), dither per slot (n,)); each bit gets n // 32 or more slots."""
    seed = int.from_bytes(hashlib.sha256(b"aigc-image-mark:" + cfg.key.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    bit_of_slot = rng.permutation(np.arange(n_slots) % BITS)
    dither = rng.uniform(0, STEP, n_slots)
    return bit_of_slot, dither


def _luma_blocks(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """uint8 (H, W) or (H, W, 3) -> (luma float (H, W), DCT blocks (bh, bw, 8, 8), bh, bw)."""
    rgb = a.astype(np.float64)
    y = rgb if rgb.ndim == 2 else rgb[..., :3] @ np.array([0.299, 0.587, 0.114])  # (H, W)
    bh, bw = y.shape[0] // 8, y.shape[1] // 8
    blocks = y[: bh * 8, : bw * 8].reshape(bh, 8, bw, 8).transpose(0, 2, 1, 3)  # (bh, bw, 8, 8)
    return y, dctn(blocks, axes=(2, 3), norm="ortho"), bh, bw


def _to_array(image) -> np.ndarray:
    a = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    if a.dtype != np.uint8:
        raise AigcError(f"image mode {image.mode} is not supported; use 8-bit L or RGB")
    return a


def embed(image, cfg: WatermarkConfig | None = None):
    """A copy of a PIL image (L or RGB; others are converted to RGB) carrying the key id."""
    from PIL import Image

    cfg = cfg or load_config()
    a = _to_array(image)
    H, W = a.shape[:2]
    if min(H, W) < MIN_SIDE:
        raise AigcError(
            f"image is {W}x{H}: the watermark needs at least {MIN_SIDE}x{MIN_SIDE} px; upscale it first "
            "(e.g. aigc generate image --scale) or skip the mark"
        )
    _, coef, bh, bw = _luma_blocks(a)
    rows, cols = zip(*SLOTS, strict=True)
    slots = coef[:, :, rows, cols].reshape(-1)  # (bh * bw * 4,)
    bit_of_slot, dither = _layout(cfg, slots.size)
    # 3. QIM: nearest point of the lattice d + b * step/2 + k * step
    offset = dither + payload_bits(cfg)[bit_of_slot] * STEP / 2
    target = np.round((slots - offset) / STEP) * STEP + offset
    delta = np.zeros_like(coef)
    delta[:, :, rows, cols] = (target - slots).reshape(bh, bw, len(SLOTS))
    dy = idctn(delta, axes=(2, 3), norm="ortho").transpose(0, 2, 1, 3).reshape(bh * 8, bw * 8)  # (H', W')
    # 4. the same luma change on every channel keeps the colour
    out = a.astype(np.float64)
    if out.ndim == 2:
        out[: bh * 8, : bw * 8] += dy
    else:
        out[: bh * 8, : bw * 8, :3] += dy[..., None]
    return Image.fromarray(
        np.clip(np.round(out), 0, 255).astype(np.uint8),
        mode=image.mode if image.mode in ("L", "RGB") else "RGB",
    )


def read_bits(image, cfg: WatermarkConfig) -> tuple[np.ndarray, float]:
    """Majority-voted payload bits (32,) read with `cfg`'s layout, and the repeats per bit."""
    a = _to_array(image)
    _, coef, bh, bw = _luma_blocks(a)
    if bh * bw == 0:
        return np.zeros(BITS, dtype=np.uint8), 0.0
    rows, cols = zip(*SLOTS, strict=True)
    slots = coef[:, :, rows, cols].reshape(-1)
    bit_of_slot, dither = _layout(cfg, slots.size)
    # which half-lattice is nearer: (c - d) / (step / 2) rounded, parity = bit
    votes = np.round((slots - dither) / (STEP / 2)).astype(np.int64) % 2
    ones = np.bincount(bit_of_slot, weights=votes, minlength=BITS)
    total = np.bincount(bit_of_slot, minlength=BITS)
    return (ones * 2 > total).astype(np.uint8), slots.size / BITS


def detect(image, cfg: WatermarkConfig | None = None) -> ImageDetection:
    """Test a PIL image for this deployment's mark (a clean "not detected" when absent)."""
    cfg = cfg or load_config()
    bits, repeats = read_bits(image, cfg)
    matched = int((bits == payload_bits(cfg)).sum())
    return ImageDetection(
        matched=matched,
        bit_accuracy=matched / BITS,
        p_value=binomial_tail(matched, BITS),
        detected=matched >= MATCH_THRESHOLD,
        key_id=cfg.key_id,
        repeats=repeats,
    )


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


def detect_file(path: str | Path, cfg: WatermarkConfig | None = None) -> dict:
    """Detect on an image file (PNG, JPEG, ...); unreadable images are an AigcError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
    except FileNotFoundError:
        raise AigcError(f"file {path} not found; pass the path of an image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise AigcError(f"{path} is not a readable image ({e}); pass a PNG or JPEG file") from None
    return detect(image, cfg).to_dict()


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB between two 8-bit images (inf when identical)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
