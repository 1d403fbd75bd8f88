"""The models a server offers: artifacts under the model dirs plus `hf:` entries from a config file.

Ids (what clients send as `model`):

  DIR/<name>/config.json             -> `name`
  DIR/<name>/<version>/config.json   -> `name@version`; plain `name` is the newest version
                                        (versions sorted numerically where they are numbers)
  {"models": {"<name>": "hf:<dir>"}} -> `name` (a transformers causal LM folder; --models-config)

A client's name is only ever looked up in this table, never joined to a path, so `../x` cannot
reach outside the model dirs (the schema also refuses such names). The dirs are listed again at
most every RESCAN_INTERVAL_S, so a new version (or a run directory replaced in place: its weights'
mtime changes) is picked up without a restart. Models load lazily on first use; when the loaded
ones exceed the memory budget, the least recently used idle ones are unloaded.

A version that fails to load (weights cut short by a copy in progress, tokenizer.json missing, ...)
answers 503 with one line naming it, what was wrong and what to do; the log gets one warning. The
failure is remembered until a file in its folder changes (name, size or mtime), then the next
request tries again. Plain `name` skips the versions known to fail and goes to the newest one that
loads, so a version being copied in does not take the model down; `name@version` stays strict.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aigc.errors import AigcError
from aigc.registry import run_kind
from aigc.serve.settings import RESCAN_INTERVAL_S, Settings

log = logging.getLogger("aigc.serve")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class UnknownModel(AigcError):
    """A model id the registry does not hold (the server answers 404)."""


@dataclass
class ModelEntry:
    id: str  # "name" or "name@version"
    name: str
    version: str | None
    spec: str  # a run directory or "hf:<dir or id>"
    kind: str  # "text" | "image" | "music"
    created: int
    signature: tuple  # changes when the artifact is replaced in place
    size_bytes: int = 0


@dataclass
class LoadedModel:
    entry: ModelEntry
    generator: Any  # TextGenerator | ImageGenerator
    scheduler: Any = None  # batching.Scheduler for text models
    lock: threading.Lock = field(default_factory=threading.Lock)  # image models: one call at a time
    images: Any = None  # image models: routes.images.ImageQueue (made on first use)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def busy(self) -> int:
        return self.scheduler.load if self.scheduler is not None else int(self.lock.locked())

    @property
    def alive(self) -> bool:
        """False once a worker process has died: the registry loads the model again."""
        return getattr(self.scheduler, "alive", True)


def _version_key(v: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[._-]", v.lstrip("vV")))


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _stamp(spec: str) -> tuple | None:
    """Names, sizes and mtimes of the files in an artifact's folder (None if it is not a local
    folder, e.g. a hub id): a failed load is tried again once this changes."""
    path = Path(spec.removeprefix("hf:")).expanduser()
    files = []
    try:
        for p in path.iterdir():
            if p.is_file():
                st = p.stat()
                files.append((p.name, st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    return tuple(sorted(files))


def _folder(entry: ModelEntry) -> str:
    """An entry's folder as the user knows it (relative to the models dir: no host paths)."""
    return f"{entry.name}/{entry.version}" if entry.version is not None else entry.name


def _load_problem(entry: ModelEntry, exc: Exception) -> str:
    """What was wrong with an artifact that failed to load: a few words and the short reason, on
    one line, without host paths ("its weights could not be read: <reason>")."""
    from safetensors import SafetensorError

    run = Path(entry.spec)
    if entry.kind != "image" and not entry.spec.startswith("hf:") and not (run / "tokenizer.json").is_file():
        return "its tokenizer.json is missing"
    reason = " ".join(str(exc).split()) or type(exc).__name__
    for path in (str(run.resolve()), entry.spec):
        reason = reason.replace(path, _folder(entry))
    reason = reason if len(reason) <= 200 else reason[:197] + "..."
    if isinstance(exc, SafetensorError):
        return f"its weights could not be read: {reason}"
    if isinstance(exc, AigcError):
        return reason
    return f"it failed to load: {type(exc).__name__}: {reason}"


def _artifact_kind(path: Path) -> tuple[str, tuple, int] | None:
    """(kind, signature, bytes) of an artifact dir, or None if it is not a servable one."""
    cfg, weights = path / "config.json", path / "model.safetensors"
    if not (cfg.is_file() and weights.is_file()):
        return None
    kind = run_kind(path)  # text, music (a gpt on music events), image, or what the server does not serve
    if kind not in ("text", "music", "image"):
        return None
    st = weights.stat()
    return kind, (st.st_mtime_ns, st.st_size, cfg.stat().st_mtime_ns), st.st_size


class ModelRegistry:
    """Name -> entry table, rescanned lazily; name -> loaded model, LRU within a memory budget."""

    def __init__(self, settings: Settings, metrics: Any = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.entries: dict[str, ModelEntry] = {}  # every id, incl. plain names of versioned models
        self.versions: dict[str, list[str]] = {}  # name -> ids, oldest first
        self.loaded: OrderedDict[tuple, LoadedModel] = OrderedDict()  # (spec, signature) -> model
        self.lock = threading.RLock()
        self.load_locks: dict[tuple, threading.Lock] = {}
        # spec -> (its files' stamp, what was wrong) of the artifacts that failed to load
        self.failed: dict[str, tuple[tuple | None, str]] = {}
        self._scanned = 0.0
        # the server's event loop (set by the app): a worker process's events are read on it
        self.loop: asyncio.AbstractEventLoop | None = None
        self.scan(force=True)

    # ------------------------------------------------------------------ the table

    def scan(self, force: bool = False) -> None:
        """List the model dirs again (at most every RESCAN_INTERVAL_S unless forced)."""
        now = time.monotonic()
        if not force and now - self._scanned < RESCAN_INTERVAL_S:
            return
        self._forget_changed_failures()
        entries: dict[str, ModelEntry] = {}
        versions: dict[str, list[str]] = {}
        for d in self.settings.models_dirs:
            d = Path(d).expanduser()
            if not d.is_dir():
                continue
            for sub in sorted(d.iterdir()):
                if not sub.is_dir() or not NAME_RE.match(sub.name) or sub.name in entries:
                    continue
                found = _artifact_kind(sub)
                if found is not None:
                    kind, sig, size = found
                    entries[sub.name] = ModelEntry(
                        sub.name, sub.name, None, str(sub), kind, int(sig[0] // 1e9), sig, size
                    )
                    versions[sub.name] = [sub.name]
                    continue
                vs = []
                for vdir in sub.iterdir():
                    if vdir.is_dir() and NAME_RE.match(vdir.name) and (f := _artifact_kind(vdir)) is not None:
                        kind, sig, size = f
                        mid = f"{sub.name}@{vdir.name}"
                        vs.append(
                            ModelEntry(
                                mid, sub.name, vdir.name, str(vdir), kind, int(sig[0] // 1e9), sig, size
                            )
                        )
                if vs:
                    vs.sort(key=lambda e: _version_key(e.version))
                    for e in vs:
                        entries[e.id] = e
                    # plain name: the newest version not known to fail (the newest if all do)
                    entries[sub.name] = ([e for e in vs if e.spec not in self.failed] or vs)[-1]
                    versions[sub.name] = [e.id for e in vs]
        for name, spec in self._config_entries().items():
            if name not in entries:
                entries[name] = ModelEntry(name, name, None, spec, "text", 0, (spec,), 0)
                versions[name] = [name]
        with self.lock:
            self.entries, self.versions, self._scanned = entries, versions, now

    def _forget_changed_failures(self) -> None:
        """Drop the failures whose folder has changed since: their next request loads them again."""
        with self.lock:
            failed = list(self.failed.items())
        for spec, (stamp, _) in failed:
            if stamp is None or _stamp(spec) != stamp:
                with self.lock:
                    self.failed.pop(spec, None)

    def _config_entries(self) -> dict[str, str]:
        path = self.settings.models_config
        if path is None:
            return {}
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            models = data["models"]
            assert isinstance(models, dict)
        except (OSError, ValueError, KeyError, AssertionError, TypeError):
            raise AigcError(
                f'models config {path} must be JSON like {{"models": {{"name": "hf:<dir or id>"}}}}'
            ) from None
        for name, spec in models.items():
            if not NAME_RE.match(name) or not isinstance(spec, str) or not spec.startswith("hf:"):
                raise AigcError(
                    f"models config {path}: entry {name!r}: names are letters, digits, '.', '_', '-' "
                    "and values are 'hf:<dir or hub id>'"
                )
        return models

    def list(self) -> list[tuple[str, ModelEntry, list[str]]]:
        """(name, newest entry, all version ids) per model name."""
        self.scan()
        with self.lock:
            return [(n, self.entries[n], list(v)) for n, v in sorted(self.versions.items())]

    def resolve(self, model_id: str) -> ModelEntry:
        self.scan()
        with self.lock:
            entry = self.entries.get(model_id)
            if entry is None:
                available = ", ".join(sorted(self.entries)) or "none (put run directories under --models DIR)"
                raise UnknownModel(f"model {model_id!r} not found; available: {available}")
            return entry

    # ------------------------------------------------------------------ loading

    def loaded_now(self, model_id: str, kind: str) -> LoadedModel | None:
        """The model if it is loaded and the table is fresh (no disk access: safe on the event loop)."""
        if time.monotonic() - self._scanned >= RESCAN_INTERVAL_S:
            return None
        with self.lock:
            entry = self.entries.get(model_id)
            lm = self.loaded.get((entry.spec, entry.signature)) if entry is not None else None
            if lm is None or entry.kind != kind or not lm.alive:
                return None
            self.loaded.move_to_end((entry.spec, entry.signature))
            lm.last_used = time.monotonic()
            return lm

    def get(self, model_id: str, kind: str | None = None) -> LoadedModel:
        """The loaded model for an id, loading it on first use (blocking: call off the event loop).

        A version that cannot be loaded is a 503 naming it. A plain name then goes to the next
        newest version that loads; `name@version` does not.
        """
        entry = self.resolve(model_id)
        tries = [entry]
        if entry.id != model_id:  # a plain name: if its version fails, the older ones in turn
            with self.lock:
                ids = self.versions.get(model_id, [])
                older = ids[: ids.index(entry.id)] if entry.id in ids else []
                tries += [self.entries[v] for v in reversed(older)]
        for e in tries:
            if kind is not None and e.kind != kind:
                raise AigcError(
                    f"model {model_id!r} is {_a(e.kind)} model; this route needs {_a(kind)} model"
                )
            lm = self._get(e)
            if lm is not None:
                if e is not entry:  # the table's plain name skips the failed version from now on
                    log.info("serving %s as %r: %s cannot be loaded", e.id, model_id, entry.id)
                    self.scan(force=True)
                return lm
        raise self._unavailable(entry)

    def _get(self, entry: ModelEntry) -> LoadedModel | None:
        """The loaded model of an entry, or None if it fails to load (`self.failed` says why)."""
        key = (entry.spec, entry.signature)
        dead = None
        with self.lock:
            lm = self.loaded.get(key)
            if lm is not None and not lm.alive:  # its worker process died: load it again
                log.warning("the worker process of model %s stopped; loading it again", entry.id)
                dead, lm = self.loaded.pop(key), None
            if lm is not None:
                self.loaded.move_to_end(key)
                lm.last_used = time.monotonic()
                return lm
            load_lock = self.load_locks.setdefault(key, threading.Lock())
        if dead is not None:
            self._close(dead)
        with load_lock:  # one load per model, concurrent requests wait for it
            with self.lock:
                if key in self.loaded:
                    return self.loaded[key]
                if entry.spec in self.failed:  # tried again once its files change
                    return None
            stamp = _stamp(entry.spec)  # before: files that change during the load are tried again
            t0 = time.perf_counter()
            try:
                lm = self._load(entry)
            except Exception as e:  # bad files, whatever the loader raises: one line (traceback at DEBUG)
                problem = _load_problem(entry, e)
                log.warning("model %s cannot be loaded from %s: %s", entry.id, entry.spec, problem,
                            exc_info=log.isEnabledFor(logging.DEBUG))  # fmt: skip
                with self.lock:
                    self.failed[entry.spec] = (stamp, problem)
                return None
            if self.metrics is not None:
                self.metrics.observe_load(entry.id, time.perf_counter() - t0)
            with self.lock:
                self.loaded[key] = lm
                evicted = self._evict(keep=key)
            for old in evicted:  # outside the lock: a closing scheduler may wait for its last step
                self._close(old)
        return lm

    def load_problem(self, entry: ModelEntry) -> str | None:
        """Why the entry failed to load (None if it loaded, was not tried, or changed since)."""
        with self.lock:
            failed = self.failed.get(entry.spec)
        return failed[1] if failed is not None else None

    def _unavailable(self, entry: ModelEntry) -> Exception:
        """The 503 of a model that exists but cannot be loaded: which, what was wrong, what to do."""
        from aigc.serve.app import ApiError  # (the app imports this module)

        problem = self.load_problem(entry) or "it failed to load"
        if entry.spec.startswith("hf:"):
            todo = "fix its entry in --models-config"
        else:
            todo = f"fix or remove the folder {_folder(entry)} in the models dir"
        with self.lock:
            others = [v for v in self.versions.get(entry.name, [])
                      if v != entry.id and v in self.entries and self.entries[v].spec not in self.failed]  # fmt: skip
        if others:
            todo += f", or ask for {others[-1]}"
        return ApiError(
            503, f"model {entry.id!r} cannot be loaded: {problem}; {todo}", "model_unavailable", "model"
        )

    def _load(self, entry: ModelEntry) -> LoadedModel:
        log.info("loading model %s from %s", entry.id, entry.spec)
        if entry.kind == "image":
            from aigc.generation.image import ImageGenerator

            return LoadedModel(entry, ImageGenerator.load(entry.spec))
        if entry.kind == "music":  # one call at a time under LoadedModel.lock, like images
            from aigc.generation.music import MusicGenerator

            music = MusicGenerator.from_artifact(entry.spec)
            music.model_id = entry.id
            return LoadedModel(entry, music)
        import torch

        from aigc.generation import load_generator
        from aigc.serve.batching import Scheduler

        dtype = self.settings.dtype
        gen = load_generator(entry.spec, dtype=getattr(torch, dtype) if dtype else None)
        gen.model_id = entry.id
        s = self.settings
        if s.worker_process:  # decoding off this process's GIL; the child loads its own copy
            from aigc.serve.worker import ProcessScheduler

            sched = ProcessScheduler(
                gen, entry.spec, dtype, s.max_batch, s.max_queue, self.metrics, self.loop
            )
        else:
            sched = Scheduler(
                gen, max_batch=s.max_batch, max_rows=s.max_queue, metrics=self.metrics, loop=self.loop
            )
        return LoadedModel(entry, gen, sched)

    def _evict(self, keep: tuple) -> list[LoadedModel]:
        """Drop least recently used idle models while over the memory budget (or replaced)."""
        out = []
        # a replaced artifact (new weights at the same path) is unloaded as soon as it is idle
        current = {(e.spec, e.signature) for e in self.entries.values()}
        for key, lm in list(self.loaded.items()):
            if key != keep and key not in current and not lm.busy:
                out.append(self.loaded.pop(key))
        # the decoder keeps about one more copy of the weights: budget twice the file size (a
        # worker process holds its own model and decoder: twice more)
        copies = 4 if self.settings.worker_process else 2
        total = sum(copies * lm.entry.size_bytes for lm in self.loaded.values())
        for key, lm in list(self.loaded.items()):  # oldest first
            if total <= self.settings.memory_budget_bytes:
                break
            if key != keep and not lm.busy:
                total -= copies * lm.entry.size_bytes
                out.append(self.loaded.pop(key))
        return out

    def _close(self, lm: LoadedModel) -> None:
        log.info("unloading model %s", lm.entry.id)
        if lm.scheduler is not None:
            lm.scheduler.close()  # rows that sneak in meanwhile get an error asking to retry

    def queue_depth(self) -> dict[str, int]:
        with self.lock:
            return {lm.entry.id: lm.busy for lm in self.loaded.values()}

    def loaded_ids(self) -> list[str]:
        with self.lock:
            return [lm.entry.id for lm in self.loaded.values()]

    def close(self) -> None:
        with self.lock:
            models = list(self.loaded.values())
            self.loaded.clear()
        for lm in models:
            self._close(lm)
