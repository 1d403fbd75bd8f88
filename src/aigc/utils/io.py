"""Atomic file writes: write to a temp file beside the target, fsync, then rename.

A crash (or a full disk) mid-write leaves the previous file intact, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` and move the result onto `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def prepare_out_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Check an output directory is usable: refuse a non-empty one unless `overwrite`.

    Returns the path; it is not created here (callers build into a temp dir and `commit_dir`).
    """
    from aigc.errors import AigcError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AigcError(f"output path {path} exists and is not a directory; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise AigcError(
            f"output directory {path} exists and is not empty; pass --overwrite to replace it "
            "or choose another --out"
        )
    return path


def staging_dir(final: str | Path) -> Path:
    """A fresh temp directory beside `final`, to build an output in before `commit_dir`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


def commit_dir(staging: Path, final: str | Path) -> Path:
    """Move a finished staging directory onto `final` (replacing an old one only at the end)."""
    final = Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    return final


@contextlib.contextmanager
def building_dir(final: str | Path) -> Iterator[Path]:
    """Build an output directory in a staging dir that replaces `final` only when the block ends
    without error; on any error the staging dir is removed and `final` is left as it was.

        with building_dir(out) as stage:
            save_file(..., stage / "model.safetensors")
    """
    stage = staging_dir(final)
    try:
        yield stage
        commit_dir(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
