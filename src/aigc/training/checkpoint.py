"""Resumable checkpoints: one directory per step, safetensors + JSON, written atomically.

Layout under `<run>/checkpoints/`:

    step-00000500/tensors.safetensors   model weights, optimizer moments, RNG states, task tensors
    step-00000500/state.json            step, clock, schedule, python/numpy RNG, optimizer hyper-
                                        parameters, task cursor, config, best val loss, ...
    latest                              name of the newest complete checkpoint (atomic pointer)

A checkpoint is built in a staging directory and renamed into place, then `latest` is switched, then
old ones beyond `keep_last` are deleted: a crash or a full disk at any point leaves the previous
checkpoint whole and `latest` pointing at it. Nothing is ever unpickled.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from aigc.errors import AigcError
from aigc.utils.io import atomic_write_json, atomic_write_text, read_json

TENSORS = "tensors.safetensors"
STATE = "state.json"
LATEST = "latest"


# ----------------------------------------------------------------------------- flattening


def to_cpu(t: torch.Tensor) -> torch.Tensor:
    # clone: safetensors refuses tensors that share storage (tied embeddings); contiguous for views
    return t.detach().to("cpu").contiguous().clone()


def module_tensors(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": to_cpu(v) for k, v in state.items()}


def optimizer_to_flat(
    prefix: str, opt: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (moments, step counts) and JSON (the rest)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{idx}.{key}"] = to_cpu(value)
            else:
                plain.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "plain_state": plain}


def optimizer_from_flat(
    prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], opt: torch.optim.Optimizer
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, _, name = key[len(prefix) :].partition(".")
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["plain_state"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})
    # Saved tensors are contiguous; give each moment its parameter's memory layout again. Fused
    # AdamW walks parameter and moments in memory order, so a channels_last weight with contiguous
    # moments would be updated with the wrong elements after a resume.
    for param, entry in opt.state.items():
        for key, value in entry.items():
            if (
                isinstance(value, torch.Tensor)
                and value.shape == param.shape
                and value.stride() != param.stride()
            ):
                entry[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# ----------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global torch (+CUDA), numpy and python RNG states as (tensors, JSON)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------- save / load


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and (p / TENSORS).is_file() and (p / STATE).is_file()
    ]
    return sorted(found, key=_step_of)


def save_checkpoint(
    ckpt_root: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], keep_last: int
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune to the newest `keep_last`.

    Raises AigcError when the write fails (e.g. disk full); the previous checkpoint is untouched.
    """
    final = ckpt_root / step_dir_name(step)
    stage = None
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        # a plain temp dir: the run directory's lock already keeps other processes out
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=ckpt_root))
        save_file(tensors, str(stage / TENSORS))
        atomic_write_json(stage / STATE, state)
        for name in (TENSORS, STATE):
            with open(stage / name, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        os.replace(stage, final)
        atomic_write_text(ckpt_root / LATEST, final.name + "\n")
    except OSError as e:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        previous = latest_checkpoint(ckpt_root)
        raise AigcError(
            f"could not write checkpoint at step {step} ({e.strerror or e}); "
            f"last good checkpoint: {previous or 'none'}; free disk space and resume with --resume"
        ) from None
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` points at; else the newest complete one; None when there is none."""
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        target = ckpt_root / pointer.read_text(encoding="utf-8").strip()
        if (target / TENSORS).is_file() and (target / STATE).is_file():
            return target
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(path / TENSORS)), read_json(path / STATE)


def clean_staging(ckpt_root: Path) -> None:
    """Remove half-written staging directories left by a killed process."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
