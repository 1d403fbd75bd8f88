"""Model versions on disk: find a model by name, name the next version, publish one atomically.

The layout is the server's (`aigc.serve.registry`):

    DIR/<name>/config.json              -> model `name` (unversioned)
    DIR/<name>/<version>/config.json    -> `name@version`; plain `name` is the newest version

A tuned model is published as the next version of the same name (`DIR/name/3` -> `DIR/name/4`),
so `name` resolves to it at once and `name@3` keeps serving the old one. Publishing is one
`os.rename` of a finished staging directory: readers see the old set of versions or the new one,
never a half-written directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

from aigc.errors import AigcError

VERSION_RE = re.compile(r"^([vV]?)(\d+)$")  # versions we can count up: 3, 12, v2


def resolve_model(spec: str, models_dirs: list[Path] | None = None) -> Path:
    """A run directory for `spec`: a path to one, or a registry id `name` / `name@version` looked
    up in `models_dirs` (default `$AIGC_HOME/models`) exactly as `aigc serve` looks it up."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if spec.startswith("hf:"):
        hf = Path(spec[3:]).expanduser()
        if hf.is_dir():
            return hf.resolve()
        raise AigcError(f"{spec}: no such folder; tuning needs a local transformers folder (hf:DIR)")
    from aigc.serve.registry import NAME_RE, ModelRegistry, UnknownModel
    from aigc.serve.settings import Settings, default_models_dir

    dirs = [Path(d) for d in models_dirs] if models_dirs else [default_models_dir()]
    name = spec.partition("@")[0]
    if not NAME_RE.match(name) or "/" in spec or "\\" in spec:
        raise AigcError(
            f"model {spec!r} not found: pass a run directory or a model name (name or name@version)"
        )
    try:
        entry = ModelRegistry(Settings(models_dirs=dirs)).resolve(spec)
    except UnknownModel as e:
        raise AigcError(
            f"{e} (looked in {', '.join(map(str, dirs))}; pass --models DIR or a run directory)"
        ) from None
    if entry.spec.startswith("hf:"):
        return Path(entry.spec[3:]).expanduser().resolve()
    return Path(entry.spec).resolve()


def model_id(run_dir: Path) -> tuple[str, str | None]:
    """(name, version) the server gives a run directory: `DIR/name/3` -> ("name", "3"),
    an unversioned `DIR/name` -> ("name", None)."""
    run_dir = Path(run_dir).resolve()
    if VERSION_RE.match(run_dir.name) and not (run_dir.parent / "config.json").is_file():
        return run_dir.parent.name, run_dir.name
    return run_dir.name, None


def next_version_dir(model_dir: Path) -> Path:
    """`DIR/name/3` -> `DIR/name/4` (one past the highest numbered sibling); an unversioned
    `DIR/name` is refused, since its next version has no place: the caller must pass --out."""
    model_dir = Path(model_dir).resolve()
    name, version = model_id(model_dir)
    if version is None:
        raise AigcError(
            f"{model_dir} is not a versioned model (DIR/NAME/VERSION, e.g. models/story/1), so the "
            "tuned model has no next version to become; pass --out DIR for the new run "
            f"(e.g. --out {model_dir.parent / name / '2'} after moving the model to {model_dir.parent / name / '1'})"
        )
    prefix = VERSION_RE.match(model_dir.name).group(1)
    numbers = [int(m.group(2)) for p in model_dir.parent.iterdir() if (m := VERSION_RE.match(p.name))]
    return model_dir.parent / f"{prefix}{max(numbers) + 1}"


def publish_version(staged_dir: Path, target_dir: Path) -> Path:
    """Move a finished staging directory to `target_dir` in one rename; refuses to overwrite."""
    staged_dir, target_dir = Path(staged_dir), Path(target_dir)
    if target_dir.exists() and (not target_dir.is_dir() or any(target_dir.iterdir())):
        raise AigcError(
            f"{target_dir} already exists; a published version is never overwritten, choose another --out"
        )
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staged_dir, target_dir)  # atomic; fails if another publisher got there first
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise AigcError(
                f"{target_dir} was created meanwhile; a published version is never overwritten"
            ) from None
        raise
    return target_dir


def weights_hash(run_dir: Path) -> str | None:
    """sha256 (first 16 hex) of a run's model.safetensors: what the server records as `model_hash`."""
    weights = Path(run_dir) / "model.safetensors"
    if not weights.is_file():
        return None
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


__all__ = ["model_id", "next_version_dir", "publish_version", "resolve_model", "weights_hash"]
