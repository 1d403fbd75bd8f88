"""Content-addressed output folder: images, audio and MIDI live here, never inside the database.

A blob's ref is `<sha256 hex>.<ext>`, its file `$AIGC_HOME/outputs/<first 2 hex>/<ref>` (git's
object layout: no folder grows past 1/256 of the files). Same bytes, same ref: a second `put` of
an identical output writes nothing. Refs are checked against a strict pattern before they touch
the file system, so a ref from a request can never name a path outside the folder.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from aigc.errors import AigcError
from aigc.utils.io import atomic_write_bytes

REF_RE = re.compile(r"[0-9a-f]{64}\.[a-z0-9]{1,8}")
EXT_RE = re.compile(r"[a-z0-9]{1,8}")


def check_ref(ref: str) -> str:
    """`ref` if it is a well-formed blob ref, else AigcError (no path traversal through refs)."""
    if not isinstance(ref, str) or not REF_RE.fullmatch(ref):
        raise AigcError(
            f"invalid output ref {ref!r}: expected 64 lowercase hex digits (sha256), a dot and an "
            "extension of 1-8 lowercase letters or digits, e.g. 'ab12...ef.png'"
        )
    return ref


class Blobs:
    """A content-addressed folder (default `$AIGC_HOME/outputs`)."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            from aigc.utils.paths import aigc_home

            root = aigc_home() / "outputs"
        self.root = Path(root)

    def put(self, data: bytes, ext: str) -> str:
        """Store `data` (atomically; once per content) and return its ref."""
        ext = ext.lower().removeprefix(".")
        if not EXT_RE.fullmatch(ext):
            raise AigcError(f"invalid extension {ext!r}: use 1-8 letters or digits, e.g. png, wav, mid")
        ref = f"{hashlib.sha256(data).hexdigest()}.{ext}"
        path = self.path(ref)
        if not path.is_file() or path.stat().st_size != len(data):
            atomic_write_bytes(path, data)
        return ref

    def path(self, ref: str) -> Path:
        """Where the blob `ref` lives (whether or not it exists)."""
        check_ref(ref)
        return self.root / ref[:2] / ref

    def exists(self, ref: str) -> bool:
        return self.path(ref).is_file()

    def get(self, ref: str, verify: bool = True) -> bytes:
        """The blob's bytes; with `verify`, check they still hash to the ref."""
        path = self.path(ref)
        if not path.is_file():
            from aigc.feedback.store import NotFoundError

            raise NotFoundError(f"no output {ref} under {self.root}")
        data = path.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != ref.partition(".")[0]:
            raise AigcError(f"output {path} is corrupt (its content no longer matches its hash); delete it")
        return data


__all__ = ["Blobs", "check_ref"]
