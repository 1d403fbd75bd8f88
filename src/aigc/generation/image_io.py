"""Image outputs: tensors -> PIL, PNGs that carry their generation parameters, grids, animated GIFs.

Every PNG gets a `parameters` text chunk (JSON of everything needed to make it again) plus one
chunk per common key (`model`, `seed`, `sampler`, `steps`, `guidance`, `label`), so the values show
in ordinary image viewers and `read_png_params` gives them back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aigc.utils.io import atomic_write

PARAM_KEYS = ("model", "seed", "sampler", "steps", "guidance", "label", "prompt")


def to_pil(x: torch.Tensor) -> list:
    """(B, C, H, W) in [-1, 1] -> list of PIL images ('L' for one channel, 'RGB' for three)."""
    from PIL import Image

    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
    a = a.permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    return [Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img) for img in a]


def png_info(params: dict[str, Any]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(params, sort_keys=True, default=str))
    for key in PARAM_KEYS:
        if params.get(key) is not None:
            info.add_text(key, str(params[key]))
    return info


def save_png(image, path: str | Path, params: dict[str, Any] | None = None) -> Path:
    """Write one PNG atomically, with `params` in its text chunks."""
    info = png_info(params or {})
    return atomic_write(path, lambda p: image.save(p, format="PNG", pnginfo=info))


def read_png_params(path: str | Path) -> dict[str, Any]:
    """The `parameters` JSON chunk of a PNG written by `save_png` ({} when absent)."""
    from PIL import Image

    with Image.open(path) as im:
        chunks = im.text if hasattr(im, "text") else {}
    if "aigc" in chunks:  # stamped by aigc.safety.provenance: `parameters` is then an A1111 line
        return json.loads(chunks["aigc"]).get("parameters", {})
    text = chunks.get("parameters")
    return json.loads(text) if text else {}


def make_grid(images: list, nrow: int | None = None, pad: int = 2):
    """Tile same-sized PIL images into one image, `nrow` per row (default: about square)."""
    from PIL import Image

    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / nrow)
    grid = Image.new(images[0].mode, (nrow * (w + pad) + pad, rows * (h + pad) + pad), 0)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid.paste(img, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def save_gif(frames: list, path: str | Path, fps: float = 12.0, params: dict[str, Any] | None = None) -> Path:
    """Write an animated GIF (looping) atomically; `params` go into its comment."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    comment = json.dumps(params or {}, sort_keys=True, default=str).encode()
    duration = max(20, round(1000 / fps))

    def write(p: Path) -> None:
        frames[0].save(
            p,
            format="GIF",
            save_all=True,
            append_images=frames[1:],
            duration=duration,
            loop=0,
            comment=comment,
            optimize=False,
        )

    return atomic_write(path, write)


def upscale(image, factor: int):
    """Nearest-neighbour enlargement, so 16x16 or 28x28 samples are visible in a viewer."""
    from PIL import Image

    if factor <= 1:
        return image
    return image.resize((image.size[0] * factor, image.size[1] * factor), Image.Resampling.NEAREST)


def pil_to_array(image) -> np.ndarray:
    return np.asarray(image)


__all__ = [
    "make_grid",
    "pil_to_array",
    "png_info",
    "read_png_params",
    "save_gif",
    "save_png",
    "to_pil",
    "upscale",
]
