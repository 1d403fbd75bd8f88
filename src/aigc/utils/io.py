"""Atomic file writes: write to a temp file beside the target, fsync, then rename.

A crash (or a full disk) mid-write leaves the previous file intact, never a half-written one.
Output directories are built in a staging directory beside the target that is renamed into place at
the end; a staging directory is `flock`ed while its process lives, so the next build of the same
target removes the ones a killed process left behind (the kernel drops a lock even on kill -9).
"""

from __future__ import annotations

import contextlib
import errno
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
    blocker = _file_in_the_way(path.parent)  # fail before the work, not when the result is written
    if blocker is not None:
        raise AigcError(f"cannot write {path} ({blocker} is a file, not a directory); pick another --out")
    if path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()) and not overwrite:
        raise AigcError(
            f"output directory {path} exists and is not empty; pass --overwrite to replace it "
            "or choose another --out"
        )
    return path


# ----------------------------------------------------------------------------- creating directories


def _file_in_the_way(path: Path) -> Path | None:
    """The first of `path` and its parents that exists as something other than a directory."""
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def _why(e: OSError, path: Path) -> str:
    """The reason an OSError gives, in words (a parent that is a file says so, not "File exists")."""
    blocker = _file_in_the_way(path)
    if blocker is not None:
        return f"{blocker} is a file, not a directory"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return (e.strerror or str(e)).lower()


def cannot_write(e: OSError, path: str | Path):
    """The one-line error for an output directory that cannot be created or written."""
    from aigc.errors import AigcError

    return AigcError(f"cannot write {path} ({_why(e, Path(path))}); pick another --out")


def make_dir(path: str | Path) -> Path:
    """`mkdir -p path`, with an OSError (no permission, a parent that is a file, read-only or full
    disk) turned into one line naming the directory."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(e, path) from None
    return path


# ----------------------------------------------------------------------------- locks

try:
    import fcntl
except ImportError:  # Windows: no flock; staging dirs are not cleaned and runs are not locked
    fcntl = None  # type: ignore[assignment]

_stage_locks: dict[Path, int] = {}  # staging dir -> the open fd holding its flock


def _try_flock(fd: int) -> bool:
    """Take an exclusive flock on `fd` without waiting; False when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_stage(stage: Path) -> bool | None:
    """Hold a flock on the staging directory itself (no file inside it: the whole directory is
    renamed into place). True when held, False when another process holds it (a clean-up about to
    remove it), None where directories cannot be flocked (no fcntl, some network file systems)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(stage, os.O_RDONLY)
    except OSError:
        return None
    try:
        locked: bool | None = _try_flock(fd)
    except OSError:
        locked = None
    if not locked:
        os.close(fd)
        return locked
    _stage_locks[stage] = fd
    return True


def release_staging(stage: Path) -> None:
    """Drop this process's lock on a staging directory (after it was committed or removed)."""
    fd = _stage_locks.pop(Path(stage), None)
    if fd is not None:
        os.close(fd)


def clean_stale_staging(final: str | Path) -> list[Path]:
    """Remove the staging directories of `final` that no live process holds (left by a killed
    build); returns them. Does nothing where locks are not available (it could not tell)."""
    final = Path(final)
    removed: list[Path] = []
    if fcntl is None or not final.parent.is_dir():
        return removed
    for p in final.parent.glob(f".{final.name}.*.tmp"):
        if not p.is_dir() or p.is_symlink() or p in _stage_locks:
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _try_flock(fd):  # nobody holds it: its process is gone
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        except OSError:
            pass  # this file system cannot flock directories: leave it
        finally:
            os.close(fd)
    return removed


def staging_dir(final: str | Path) -> Path:
    """A fresh temp directory beside `final`, to build an output in before `commit_dir`.

    It is locked while this process lives; stale staging dirs of the same target are removed first.
    An OSError (no permission, a parent that is a file, ...) becomes one line naming `final`.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(e, final) from None
    clean_stale_staging(final)
    while True:
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        except OSError as e:
            raise cannot_write(e, final) from None
        locked = _lock_stage(stage)
        if locked is None:
            return stage  # no locks here: a plain staging dir, as before
        # another process's clean-up may have taken it in the instant before our lock: make another
        if locked and stage.is_dir():
            return stage
        release_staging(stage)


def commit_dir(staging: Path, final: str | Path) -> Path:
    """Move a finished staging directory onto `final` (replacing an old one only at the end)."""
    final = Path(final)
    staging = Path(staging)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    release_staging(staging)
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
        release_staging(stage)
        raise


# ----------------------------------------------------------------------------- run-directory lock

LOCK_FILE = ".lock"  # inside a run directory while a process trains into it


class DirLock:
    """An exclusive `flock` on `DIR/.lock` for as long as one process writes into DIR.

    Creates DIR when needed (and removes it again on release if it then holds nothing: a refused
    or failed start leaves no empty directory). The kernel releases the lock on any exit, kill -9
    included, so a stale `.lock` file never blocks anyone; `release` deletes it. Where there is no
    fcntl (Windows) nothing is locked.

        with DirLock(out, "trained"):
            ...  # only this process writes into out
    """

    def __init__(self, path: str | Path, doing: str = "written") -> None:
        self.path, self.doing = Path(path), doing
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> DirLock:
        from aigc.errors import AigcError

        self.created = not self.path.exists()
        make_dir(self.path)
        if fcntl is None:
            return self
        lock = self.path / LOCK_FILE
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                self._remove_if_empty()
                raise cannot_write(e, self.path) from None
            try:
                locked = _try_flock(fd)
            except OSError:  # a file system without locks: go on unlocked
                os.close(fd)
                return self
            if not locked:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise AigcError(
                    f"{self.path} is being {self.doing} by another process (pid {pid}); "
                    "wait for it or pick another --out"
                )
            # the holder before us may have deleted the file as we opened it: lock the one on disk
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            (self.path / LOCK_FILE).unlink(missing_ok=True)  # while still held: no one else's lock
            os.close(self.fd)
            self.fd = None
        self._remove_if_empty()

    def _remove_if_empty(self) -> None:
        if self.created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only when empty

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
