"""Image data: read a source, make every image the same size and mode, store a compact array file.

Sources (`prepare_images(source, ...)`):
  - `digits`                  scikit-learn's 8x8 handwritten digits (1,797 images, always offline)
  - `mnist`                   MNIST IDX files found on the data search path (`AIGC_DATA_PATH`, see
                              `find_mnist`), or a directory holding the train/t10k IDX pairs
  - `path/to/*-idx3-ubyte.gz` one IDX image file (its `*-labels-idx1-ubyte*` partner gives labels)
  - `path/to/file.npz`        arrays `images` (N, H, W) | (N, H, W, C) | (N, C, H, W) and optional `labels`
  - `path/to/folder/`         image files; the first sub-folder level names the classes

A prepared directory holds `images.safetensors` (`images` uint8 (N, C, H, W), `labels` int64 (N)),
`meta.json` (count, shape, classes, source hash, what was skipped) and `config.json` (the
resolved `ImageDataConfig`). Images are stored as uint8 and scaled to `value_range` on load, so
the file is 4x smaller than float32 and normalisation stays a config choice.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from aigc.config import resolve, save_config, to_dict
from aigc.errors import AigcError
from aigc.utils.io import atomic_write_json, building_dir, prepare_out_dir, read_json

FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTIN_SOURCES = ("digits", "mnist")
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MAX_REPORTED = 5  # how many skipped file names the report lists


@dataclass
class ImageDataConfig:
    """How to turn a source into same-sized arrays."""

    size: int | None = None  # output side (square); None keeps the source size
    channels: int | None = None  # 1 (grayscale) or 3 (RGB); None follows the source
    fit: Literal["resize", "pad", "crop"] = "resize"  # how to reach `size`
    value_range: tuple[float, float] = (-1.0, 1.0)  # what uint8 0..255 maps to on load
    flip: bool = False  # random horizontal flips during training (augmentation)
    split: Literal["train", "test", "all"] = "train"  # for MNIST-style IDX sources
    limit: int | None = None  # keep at most this many images (first ones)

    def __post_init__(self) -> None:
        if self.size is not None and not 4 <= self.size <= 1024:
            raise ValueError(f"size must be between 4 and 1024 pixels, got {self.size}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.value_range[0] >= self.value_range[1]:
            raise ValueError(f"value_range must be (low, high) with low < high, got {self.value_range}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class PreparedImages:
    """A prepared image data set in memory."""

    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N)
    meta: dict[str, Any]
    config: ImageDataConfig = field(default_factory=ImageDataConfig)

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes", []))

    def as_float(self, images: np.ndarray | None = None) -> np.ndarray:
        """uint8 images -> float32 in `config.value_range`."""
        lo, hi = self.config.value_range
        x = self.images if images is None else images
        return (x.astype(np.float32) / 255.0) * (hi - lo) + lo


# ----------------------------------------------------------------------------- readers


@dataclass
class _Raw:
    """What a reader returns: images as uint8 arrays or file paths, before fitting."""

    arrays: np.ndarray | None  # uint8 (N, H, W) or (N, H, W, C)
    files: list[Path]
    labels: np.ndarray  # int64 (N)
    classes: list[str]
    source_hash: str
    description: str


def _hash_files(paths: list[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(root) if root else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (MNIST format; gzip or raw): magic, dims, then big-endian data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    except (OSError, EOFError, struct.error) as e:
        raise AigcError(
            f"cannot read IDX file {path}: {e}; expected an MNIST-style IDX file (.gz or raw)"
        ) from None
    if zero != 0 or dtype_code != 0x08:
        raise AigcError(
            f"{path} is not an unsigned-byte IDX file (magic {zero:#x}/{dtype_code:#x}); expected MNIST format"
        )
    count = int(np.prod(dims))
    body = np.frombuffer(data, dtype=np.uint8, count=count, offset=4 + 4 * ndim)
    return body.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    # some mirrors spell it train-images.idx3-ubyte
    alt = stem.replace("-idx", ".idx")
    for name in (alt + ".gz", alt):
        if (directory / name).is_file():
            return directory / name
    return None


def find_mnist() -> Path | None:
    """The MNIST directory on the data search path (`AIGC_DATA_PATH`, ':'-separated), or None."""
    for root in os.environ.get("AIGC_DATA_PATH", "").split(os.pathsep):
        if not root:
            continue
        for candidate in (Path(root), Path(root) / "mnist", Path(root) / "images" / "mnist"):
            if _find_idx(candidate, MNIST_FILES["train"][0]):
                return candidate
    return None


def _read_idx_dir(directory: Path, split: str) -> _Raw:
    splits = ["train", "test"] if split == "all" else [split]
    images, labels, used = [], [], []
    for s in splits:
        img_path = _find_idx(directory, MNIST_FILES[s][0])
        lab_path = _find_idx(directory, MNIST_FILES[s][1])
        if img_path is None:
            raise AigcError(
                f"no {MNIST_FILES[s][0]}[.gz] in {directory}; an IDX directory needs the MNIST file pairs "
                "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...)"
            )
        images.append(_read_idx(img_path))
        labels.append(
            _read_idx(lab_path).astype(np.int64) if lab_path else np.zeros(len(images[-1]), np.int64)
        )
        used += [p for p in (img_path, lab_path) if p]
    arrays = np.concatenate(images)
    lab = np.concatenate(labels)
    classes = [str(c) for c in range(int(lab.max()) + 1)] if lab.size else []
    return _Raw(arrays, [], lab, classes, _hash_files(used), f"IDX {directory} ({split})")


def _read_idx_file(path: Path) -> _Raw:
    arrays = _read_idx(path)
    lab_name = path.name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
    lab_path = path.with_name(lab_name)
    used = [path]
    if lab_name != path.name and lab_path.is_file():
        labels = _read_idx(lab_path).astype(np.int64)
        used.append(lab_path)
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    else:
        labels, classes = np.zeros(len(arrays), np.int64), []
    return _Raw(arrays, [], labels, classes, _hash_files(used), f"IDX {path}")


def _read_npz(path: Path) -> _Raw:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise AigcError(
            f"cannot read {path}: {e}; expected an .npz with arrays 'images' and optional 'labels'"
        ) from None
    key = next((k for k in ("images", "x", "X", "arr_0") if k in arrays), None)
    if key is None:
        raise AigcError(
            f"{path} has no 'images' array (found {', '.join(arrays) or 'none'}); save it as images=..."
        )
    x = arrays[key]
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise AigcError(
            f"{path}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3, got {x.shape}"
        )
    if x.dtype != np.uint8:  # floats in [0, 1] or [-1, 1], or wider ints: map to 0..255
        x = x.astype(np.float64)
        lo, hi = float(x.min()), float(x.max())
        if lo >= -1.0 and hi <= 1.0:
            x = (x + 1) * 127.5 if lo < 0 else x * 255.0
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if "labels" in arrays:
        labels = arrays["labels"].astype(np.int64).reshape(-1)
        if len(labels) != len(x):
            raise AigcError(f"{path}: {len(x)} images but {len(labels)} labels; they must match")
        if labels.size and labels.min() < 0:
            raise AigcError(f"{path}: labels must be >= 0, got {labels.min()}")
        classes = [str(c) for c in range(int(labels.max()) + 1)] if labels.size else []
    else:
        labels, classes = np.zeros(len(x), np.int64), []
    return _Raw(x, [], labels, classes, _hash_files([path]), f"npz {path}")


def _read_folder(root: Path) -> _Raw:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise AigcError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}; point SOURCE at a folder of images"
        )
    # Class = first sub-folder level; files directly in root belong to no class.
    subdirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    index = {name: i for i, name in enumerate(subdirs)}
    labels = np.array([index.get(p.relative_to(root).parts[0], 0) for p in files], dtype=np.int64)
    if subdirs and any(len(p.relative_to(root).parts) == 1 for p in files):
        raise AigcError(
            f"{root} mixes images in class sub-folders with images at its top level; "
            "put every image in a sub-folder named after its class, or none of them"
        )
    return _Raw(None, files, labels, subdirs, _hash_files(files, root), f"folder {root}")


def _read_digits() -> _Raw:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 -> 0..255, (N, 8, 8)
    h = hashlib.sha256(x.tobytes() + d.target.astype(np.int64).tobytes()).hexdigest()[:16]
    return _Raw(x, [], d.target.astype(np.int64), [str(c) for c in range(10)], h, "scikit-learn digits (8x8)")


def read_source(source: str, split: str = "train") -> _Raw:
    """Dispatch a source string to its reader (see module docstring)."""
    if source == "digits":
        return _read_digits()
    path = Path(source).expanduser()
    if source == "mnist" and not path.exists():
        found = find_mnist()
        if found is None:
            raise AigcError(
                "MNIST not found on the data search path; set AIGC_DATA_PATH to a folder holding "
                "mnist/train-images-idx3-ubyte.gz (or images/mnist/...), or pass the directory path"
            )
        return _read_idx_dir(found, split)
    if not path.exists():
        raise AigcError(
            f"image source {source!r} not found; use a folder of images, an .npz, an IDX .gz file or folder, "
            f"or a built-in source ({', '.join(BUILTIN_SOURCES)})"
        )
    if path.is_dir():
        if _find_idx(path, MNIST_FILES["train"][0]) or _find_idx(path, MNIST_FILES["test"][0]):
            return _read_idx_dir(path, split)
        return _read_folder(path)
    if path.suffix == ".npz":
        return _read_npz(path)
    if "idx" in path.name and "ubyte" in path.name:
        return _read_idx_file(path)
    raise AigcError(
        f"unsupported image source file {path.name}; use .npz, an MNIST IDX file (*-idx3-ubyte[.gz]), "
        "or a folder of images"
    )


# ----------------------------------------------------------------------------- fitting


def _fit(img: Any, size: int | None, fit: str, mode: str) -> np.ndarray:
    """One PIL image -> uint8 (C, size, size) in `mode` ('L' or 'RGB')."""
    from PIL import Image

    if img.mode != mode:
        if img.mode in ("RGBA", "LA", "P") and mode == "RGB":
            img = img.convert("RGBA")
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent -> white
            img = Image.alpha_composite(bg, img)
        img = img.convert(mode)
    if size is not None and img.size != (size, size):
        w, h = img.size
        if fit == "resize":
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        elif fit == "crop":  # scale the short side to `size`, center-crop the long one
            s = size / min(w, h)
            img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
            left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
            img = img.crop((left, top, left + size, top + size))
        else:  # pad: shrink only if too large (keeping aspect), then center on a black canvas
            if max(w, h) > size:
                s = size / max(w, h)
                img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
            canvas = Image.new(mode, (size, size), 0)
            canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
            img = canvas
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)


def _fit_all(raw: _Raw, cfg: ImageDataConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Fit every image; return (images (N, C, H, W), labels, skipped file names)."""
    from PIL import Image, UnidentifiedImageError

    out, keep, skipped = [], [], []
    if raw.arrays is not None:
        src_channels = 1 if raw.arrays.ndim == 3 else raw.arrays.shape[-1]
        mode = "L" if (cfg.channels or src_channels) == 1 else "RGB"
        n = len(raw.arrays) if cfg.limit is None else min(cfg.limit, len(raw.arrays))
        native = (cfg.size is None or raw.arrays.shape[1:3] == (cfg.size, cfg.size)) and (
            cfg.channels or src_channels
        ) == src_channels
        if native:  # nothing to do per image: a fast array path for MNIST-sized sets
            x = raw.arrays[:n]
            x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
            return np.ascontiguousarray(x), raw.labels[:n], []
        for i in range(n):
            out.append(_fit(Image.fromarray(raw.arrays[i]), cfg.size, cfg.fit, mode))
        return np.stack(out), raw.labels[:n], []

    # Files: a corrupt or unreadable one is skipped and reported, not fatal.
    images = []
    for path, label in zip(raw.files, raw.labels, strict=True):
        if cfg.limit is not None and len(images) >= cfg.limit:
            break
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.copy())
            keep.append(label)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            skipped.append(path.name)
    if not images:
        raise AigcError(
            f"no usable images in {raw.description}: all {len(skipped)} files were unreadable "
            f"(e.g. {', '.join(skipped[:MAX_REPORTED])}); check the files are valid PNG/JPEG"
        )
    if cfg.size is None and len({im.size for im in images}) > 1:
        sizes = sorted({im.size for im in images})[:3]
        raise AigcError(
            f"images in {raw.description} have different sizes (e.g. {sizes}); set a common size, "
            "e.g. --set size=32 (with fit=resize|pad|crop)"
        )
    gray = all(im.mode in ("L", "1", "I", "I;16", "LA") for im in images)
    mode = "L" if (cfg.channels or (1 if gray else 3)) == 1 else "RGB"
    out = [_fit(im, cfg.size, cfg.fit, mode) for im in images]
    return np.stack(out), np.array(keep, dtype=np.int64), skipped


# ----------------------------------------------------------------------------- prepare / load


def prepare_images(
    source: str,
    out: str | Path,
    config: ImageDataConfig | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Read `source`, fit every image to one size/mode, write `out/` atomically; return meta.

    `config` (or the defaults) is updated by `overrides` (`["size=32", "channels=1"]`).
    """
    from safetensors.numpy import save_file

    base = to_dict(config) if config is not None else None
    cfg = resolve(ImageDataConfig, overrides=overrides, base=base)
    out = prepare_out_dir(out, overwrite=overwrite)

    raw = read_source(source, cfg.split)
    images, labels, skipped = _fit_all(raw, cfg)
    n, c, h, w = images.shape
    if images.shape[0] == 0:
        raise AigcError(f"no usable images in {raw.description}; the source is empty")
    classes = raw.classes
    meta = {
        "kind": "image",
        "format_version": FORMAT_VERSION,
        "count": int(n),
        "shape": [int(c), int(h), int(w)],
        "classes": classes,
        "num_classes": len(classes),
        "label_counts": np.bincount(labels, minlength=len(classes)).tolist() if classes else [],
        "source": source,
        "source_hash": raw.source_hash,
        "description": raw.description,
        "skipped": len(skipped),
        "skipped_files": skipped[:MAX_REPORTED],
        "value_range": list(cfg.value_range),
        "flip": cfg.flip,
    }
    with building_dir(out) as stage:
        save_file(
            {"images": np.ascontiguousarray(images), "labels": labels}, str(stage / "images.safetensors")
        )
        atomic_write_json(stage / "meta.json", meta)
        save_config(cfg, stage / "config.json")
    return meta


def load_prepared_images(directory: str | Path) -> PreparedImages:
    """Load a directory written by `prepare_images`."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    if not (directory / "images.safetensors").is_file() or not (directory / "meta.json").is_file():
        raise AigcError(
            f"{directory} is not a prepared image data set (no images.safetensors/meta.json); "
            "make one with `aigc data prepare SOURCE --kind image --out DIR`"
        )
    meta = read_json(directory / "meta.json")
    if meta.get("kind") != "image":
        raise AigcError(
            f"{directory} holds {meta.get('kind')!r} data, not images; prepare it with --kind image"
        )
    arrays = load_file(str(directory / "images.safetensors"))
    cfg_path = directory / "config.json"
    cfg = resolve(ImageDataConfig, base=read_json(cfg_path)) if cfg_path.is_file() else ImageDataConfig()
    return PreparedImages(arrays["images"], arrays["labels"], meta, cfg)


__all__ = [
    "ImageDataConfig",
    "PreparedImages",
    "find_mnist",
    "load_prepared_images",
    "prepare_images",
    "read_source",
]
