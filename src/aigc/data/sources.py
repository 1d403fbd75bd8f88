"""Where text comes from: a file, a directory, a JSON Lines file, or a built-in corpus.

A `Source` is a list of files plus a rule that turns each file's text into documents; it can be
iterated any number of times (data preparation reads it in several passes, so a corpus larger than
RAM streams through, one file at a time). Every file is checked to be UTF-8 text: a binary or
non-UTF-8 file is an error naming the file and the byte offset of the first bad byte.

Built-in corpora (`BUILTINS`) are found on the data search path: the folders in `AIGC_DATA_PATH`
(os.pathsep-separated), then the download cache `$AIGC_HOME/data` (default `~/.aigc/data`).
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

from aigc.errors import AigcError
from aigc.utils.io import atomic_write
from aigc.utils.paths import aigc_home

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


# ---------------------------------------------------------------------- reading files


def _binary(name: str, offset: int) -> AigcError:
    return AigcError(
        f"{name} looks binary: NUL byte at byte offset {offset}; give UTF-8 text files only "
        "(for a directory, select them with --glob, e.g. --glob '**/*.txt')"
    )


def _not_utf8(name: str, offset: int, byte: int) -> AigcError:
    return AigcError(
        f"{name} is not UTF-8 text: invalid byte 0x{byte:02x} at byte offset {offset}; convert it to "
        "UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or leave it out (--glob)"
    )


def read_lines(path: Path, digest: Any = None, block: int = 1 << 20) -> Iterator[str]:
    """The lines of a UTF-8 text file (line ends kept), streamed; `digest.update` sees every byte.

    A NUL byte (binary file) or an invalid UTF-8 sequence is an error naming the file and the
    byte offset. Reads at most `block` bytes at a time, so a file never has to fit in memory.
    """
    name = str(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file before `raw`
    parts: list[str] = []  # pieces of a line longer than `block`
    with open(path, "rb") as f:
        while raw := f.readline(block):
            if digest is not None:
                digest.update(raw)
            nul = raw.find(b"\x00")
            pending = len(decoder.getstate()[0])  # bytes of a sequence cut by the previous block
            try:
                text = decoder.decode(raw)
            except UnicodeDecodeError as e:
                bad = offset - pending + e.start
                if nul >= 0 and offset + nul < bad:
                    raise _binary(name, offset + nul) from None
                raise _not_utf8(name, bad, e.object[e.start]) from None
            if nul >= 0:
                raise _binary(name, offset + nul)
            offset += len(raw)
            parts.append(text)
            if raw.endswith(b"\n"):
                yield "".join(parts)
                parts = []
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:  # the file ends inside a multi-byte sequence
        raise _not_utf8(name, offset - len(e.object) + e.start, e.object[e.start]) from None
    if parts:
        yield "".join(parts)


def split_blocks(lines: Iterable[str]) -> Iterator[str]:
    """Documents separated by blank lines (e.g. one poem per block), streamed."""
    block: list[str] = []
    for line in itertools.chain(lines, ["\n"]):  # a final separator flushes the last block
        if line.strip("\r\n"):
            block.append(line)
        elif block:
            if any(x.strip() for x in block):
                yield "".join(block).rstrip("\r\n")
            block = []


def _field_value(record: Any, field_path: str, where: str) -> str:
    node = record
    for part in field_path.split("."):
        if not isinstance(node, dict) or part not in node:
            keys = ", ".join(sorted(node)) if isinstance(node, dict) else f"a {type(node).__name__}"
            raise AigcError(
                f"{where}: no field {field_path!r} (fields there: {keys}); choose one with --field"
            )
        node = node[part]
    if isinstance(node, str):
        return node
    if isinstance(node, list) and all(isinstance(x, str) for x in node):
        return "\n".join(node)  # e.g. a poem's list of lines
    raise AigcError(
        f"{where}: field {field_path!r} is {type(node).__name__}, not text; --field must name a string "
        "(or a list of strings)"
    )


def json_records(lines: Iterable[str], name: str, field_path: str) -> Iterator[str]:
    """Documents of a JSON Lines file (one object per line, streamed) or of a JSON array of objects."""
    lines = iter(lines)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if lineno == 1 and line.lstrip().startswith("["):  # a JSON array: parsed as a whole
            try:
                records = json.loads(line + "".join(lines))
            except json.JSONDecodeError as e:
                raise AigcError(
                    f"{name}: not valid JSON ({e.msg} at line {e.lineno}); fix the file"
                ) from None
            for i, record in enumerate(records):
                yield _field_value(record, field_path, f"{name} item {i}")
            return
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise AigcError(
                f"{name}:{lineno}: not valid JSON ({e.msg}); each line of a JSON Lines file must be one JSON object"
            ) from None
        yield _field_value(record, field_path, f"{name}:{lineno}")


def first_json_keys(path: Path) -> list[str]:
    """Keys of the first record of a JSON / JSON Lines file (for error messages); [] if unknown."""
    try:
        lines = read_lines(path)
        first_line = next(line for line in lines if line.strip())
        if first_line.lstrip().startswith("["):
            first = json.loads(first_line + "".join(lines))[0]
        else:
            first = json.loads(first_line)
        return sorted(first) if isinstance(first, dict) else []
    except (json.JSONDecodeError, IndexError, StopIteration, KeyError):
        return []


# ---------------------------------------------------------------------- Source


@dataclass
class Source:
    """Files and how to read them; `documents()` yields raw (uncleaned) document texts."""

    name: str  # what the user asked for: a path or a built-in name
    description: str
    files: list[Path]
    root: Path | None = None  # for relative names in hashes and messages
    field: str | None = None  # JSON sources: which field holds the text
    blocks: bool = False  # text files: one document per blank-line separated block
    skip_unreadable: bool = False  # built-in code corpora skip odd files instead of failing
    skipped: list[str] = dc_field(default_factory=list)  # files left out (skip_unreadable)

    def rel(self, path: Path) -> str:
        if self.root is not None:
            try:
                return path.relative_to(self.root).as_posix()
            except ValueError:
                pass
        return str(path)

    def documents(self, on_file: Callable[[str, str], None] | None = None) -> Iterator[str]:
        """Raw documents in a fixed order; `on_file(name, sha256)` is called when a file is done."""
        self.skipped = []
        for path in self.files:
            digest = hashlib.sha256()
            docs: Iterable[str] = self._read(path, digest)
            if self.skip_unreadable:  # small files: read whole first, so a bad one yields nothing
                try:
                    docs = list(docs)
                except (OSError, AigcError):
                    self.skipped.append(self.rel(path))
                    continue
            try:
                yield from docs
            except OSError as e:
                raise AigcError(
                    f"cannot read {path}: {e.strerror}; check the file and its permissions"
                ) from None
            finally:  # also when the reader stops early (max_bytes): the bytes read so far
                if on_file is not None:
                    on_file(self.rel(path), digest.hexdigest())

    def _read(self, path: Path, digest: Any) -> Iterator[str]:
        lines = read_lines(path, digest)
        if self.field is not None and path.suffix.lower() in JSON_SUFFIXES:
            yield from json_records(lines, str(path), self.field)
        elif self.blocks:
            yield from split_blocks(lines)
        else:
            yield "".join(lines)  # one document: the only case that holds a whole file in memory


# ---------------------------------------------------------------------- built-in corpora


@dataclass(frozen=True)
class Builtin:
    description: str
    relpath: str | None = None  # under a data-path folder; None for collected corpora
    url: str | None = None  # canonical download
    sha256: str | None = None
    blocks: bool = False
    max_bytes: int | None = None  # default cap (config max_bytes overrides)


SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

BUILTINS: dict[str, Builtin] = {
    "python-stdlib": Builtin(
        "source code of this Python's standard library (code generation; always available)",
        max_bytes=4_000_000,  # keeps the offline demo to seconds; --max-bytes raises it
    ),
    "shakespeare": Builtin(
        "tiny Shakespeare, 1.1 MB of plays (char-rnn / nanoGPT)",
        relpath="text/tinyshakespeare.txt",
        url=SHAKESPEARE_URL,
        sha256=SHAKESPEARE_SHA256,
    ),
    "tang-poems": Builtin(
        "12,950 Tang poems, traditional Chinese; one document per poem",
        relpath="text/tang-poems.txt",
        blocks=True,
    ),
}


def data_search_path() -> list[Path]:
    """Folders searched for data sets: `AIGC_DATA_PATH` entries, then the download cache."""
    folders = [Path(p) for p in os.environ.get("AIGC_DATA_PATH", "").split(os.pathsep) if p]
    return [*folders, aigc_home() / "data"]


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's own .py files, sorted, without test suites and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS]  # prune: site-packages can be huge
        files.extend(Path(folder, n) for n in names if n.endswith(".py") and not n.startswith("test_"))
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def find_builtin(name: str) -> Path | None:
    """Where a built-in corpus is on this machine (a file, or the stdlib folder), or None."""
    entry = BUILTINS[name]
    if entry.relpath is None:
        return stdlib_files()[0]
    for folder in data_search_path():
        if (folder / entry.relpath).is_file():
            return folder / entry.relpath
    return None


def builtin_status() -> list[dict[str, Any]]:
    """One row per built-in: name, available, where (or where it was looked for), size, description."""
    rows = []
    for name, entry in BUILTINS.items():
        if entry.relpath is None:  # collected from this Python: always there
            root, files = stdlib_files()
            available, size = True, sum(p.stat().st_size for p in files)
            where = f"{root} ({len(files)} .py files)"
        elif (path := find_builtin(name)) is not None:
            available, size, where = True, path.stat().st_size, str(path)
        else:
            available, size = False, None
            where = "not found; looked for " + ", ".join(str(f / entry.relpath) for f in data_search_path())
        rows.append(
            {
                "name": name,
                "available": available,
                "where": where,
                "size": size,
                "download": entry.url is not None,
                "description": entry.description,
            }
        )
    return rows


def download_builtin(name: str, url: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch a built-in corpus into the cache, verify its sha256, store it atomically; return the path."""
    entry = BUILTINS[name]
    if entry.url is None or entry.relpath is None:
        raise AigcError(f"built-in corpus {name!r} cannot be downloaded; place it on AIGC_DATA_PATH instead")
    url = url or entry.url
    dest = aigc_home() / "data" / entry.relpath
    digest = hashlib.sha256()

    def write(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise AigcError(
                f"could not download {name} from {url} ({reason}); check the connection, or put the file at {dest}"
            ) from None
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            raise AigcError(
                f"download of {name} from {url} has sha256 {digest.hexdigest()}, expected {entry.sha256}; "
                "the file is corrupt or changed upstream, nothing was saved"
            )

    return atomic_write(dest, write)


def _builtin_source(name: str, download: bool, url: str | None, blocks: bool = False) -> Source:
    entry = BUILTINS[name]
    if entry.relpath is None:
        root, files = stdlib_files()
        return Source(name, f"Python standard library at {root}", files, root=root, skip_unreadable=True)
    path = find_builtin(name)
    if path is None and download and entry.url is not None:
        path = download_builtin(name, url)
    if path is None:
        looked = ", ".join(str(f / entry.relpath) for f in data_search_path())
        how = f", or pass --download to fetch it from {entry.url}" if entry.url else ""
        raise AigcError(
            f"built-in corpus {name!r} not found (looked for {looked}); set AIGC_DATA_PATH to a folder "
            f"holding {entry.relpath}{how}"
        )
    return Source(name, f"built-in {name} ({path})", [path], root=path.parent, blocks=entry.blocks or blocks)


def open_source(
    source: str,
    field: str | None = None,
    glob: str | None = None,
    blocks: bool = False,
    download: bool = False,
    url: str | None = None,
) -> Source:
    """Resolve what the user named: a built-in corpus, a file, or a directory (with `glob`)."""
    if source in BUILTINS:
        if field or glob:
            raise AigcError(
                f"--field and --glob apply to files and directories, not to the built-in {source!r}"
            )
        return _builtin_source(source, download, url, blocks)
    path = Path(source).expanduser()
    if not path.exists():
        looks_like_name = os.sep not in source and "/" not in source and not path.suffix
        if looks_like_name:
            raise AigcError(
                f"unknown built-in corpus {source!r}; built-ins: {', '.join(BUILTINS)} "
                "(see `aigc data list`), or give the path of a file or directory"
            )
        raise AigcError(f"source {source} not found: no such file or directory; check the path")
    if download:
        raise AigcError("--download applies to built-in corpora (see `aigc data list`), not to a path")
    if path.is_file():
        if glob:
            raise AigcError(f"--glob applies to a directory source; {path} is a file")
        is_json = path.suffix.lower() in JSON_SUFFIXES
        if is_json and field is None:
            keys = first_json_keys(path)
            raise AigcError(
                f"{path} is JSON: name the field that holds the text with --field "
                f"(fields in the first record: {', '.join(keys) or 'none found'})"
            )
        if field is not None and not is_json:
            raise AigcError(
                f"--field applies to JSON Lines files ({', '.join(JSON_SUFFIXES)}); {path} is not one"
            )
        return Source(source, f"file {path}", [path], root=path.parent, field=field, blocks=blocks)
    pattern = glob or "**/*"
    try:
        matches = list(path.glob(pattern))
    except (ValueError, NotImplementedError) as e:
        raise AigcError(
            f"--glob {pattern!r} is not usable ({e}); give a relative pattern like '**/*.txt'"
        ) from None
    files = sorted(
        (p for p in matches if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        exts = sorted({p.suffix for p in path.rglob("*") if p.is_file() and p.suffix
                       and not any(s.startswith(".") for s in p.relative_to(path).parts)})  # fmt: skip
        others = [f"**/*{e}" for e in exts if f"**/*{e}" != pattern]
        hint = (f"; the files there end in {', '.join(exts[:8])}: try --glob '{others[0]}'" if others
                else "; it holds no other files: pass the folder that holds your text")  # fmt: skip
        raise AigcError(f"no files in {path} match --glob {pattern!r}{hint}")
    return Source(
        source,
        f"directory {path} ({len(files)} files, {pattern})",
        files,
        root=path,
        field=field,
        blocks=blocks,
    )
