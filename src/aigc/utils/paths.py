"""Where AIGC Studio keeps its own files, and keeping host paths out of what leaves the host."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# config keys whose values may be paths on the machine that trained or serves (data.dir, data.path,
# init_from, tuned_from.path, ...): model cards and the model details API never show them whole
PATH_KEYS = ("path", "dir", "init_from", "run", "out", "source")

# an absolute path (/a/b, ~/a/b, C:\a\b) of two or more parts that does not continue a word, a URL
# or a relative path (a/b, https://h/a/b); group "name" is its last part
_HOST_PATH = re.compile(
    r"(?<![\w.:/\\~-])(?:~|[A-Za-z]:)?[/\\]+(?:[^\s/\\`'\"<>|*]+[/\\]+)+(?P<name>[^\s/\\`'\"<>|*]+)"
)


def aigc_home() -> Path:
    """`$AIGC_HOME`, default `~/.aigc`: the store, caches, downloads, models for `aigc serve`."""
    return Path(os.environ.get("AIGC_HOME") or Path.home() / ".aigc")


def hide_host_paths(text: str) -> str:
    """`text` with every absolute path reduced to its last part (`/tmp/x/data/digits` -> `digits`);
    relative paths and URLs are left alone."""
    return _HOST_PATH.sub(lambda m: m["name"], text)


def public_config(config: Any) -> Any:
    """A copy of a run config whose `PATH_KEYS` values (at any depth) show no host path: absolute
    paths in them are reduced to their last part; the rest (a relative path, a data set's name,
    `hf:gpt2`, the other keys' values) stays."""

    def walk(v: Any, hide: bool) -> Any:
        if isinstance(v, dict):
            return {k: walk(x, hide or k in PATH_KEYS) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, hide) for x in v]
        return hide_host_paths(v) if hide and isinstance(v, str) else v

    return walk(config, False)
