"""Scorers: one number per generated item, higher = better (best-of-n, simulated raters, tuning).

    scorer = load_scorer("sentiment")           # P(positive) from the newest sentiment classifier
    scorer.score(["I love it", "awful"])        # -> [0.97, 0.02]

Specs (`load_scorer(spec)`):

- `sentiment` / `sentiment:PATH`: P(positive) from a classifier run (`aigc train classifier`);
  without PATH the newest one in the registry (`evaluation.sentiment.load_classifier(None)`).
- `label:NAME` / `label:NAME@PATH`: P(label NAME) from any text classifier run (its `labels`).
- `digit:K@DATA_DIR`: images; P(class K) under the data set's own feature classifier
  (`evaluation.images.feature_classifier`, trained once on the prepared image data, then cached).
  K is a class index or one of the data set's class names.
- `python:FILE.py:FUNC` / `python:module:FUNC`: a user's function `f(list) -> list[float]`. It is
  code the user chose to run (never accepted from an HTTP request: see `serve`). Its kind is
  `FUNC.kind` when the function sets it ("text" | "image"), else "text".

Text scorers take strings; image scorers take PIL images or a uint8 (N, C, H, W) array.
Loaded scorers are cached per spec (and the weights' mtime), so a server or a loop reloads nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from aigc.errors import AigcError

Kind = Literal["text", "image"]
SPEC_HELP = (
    "sentiment, sentiment:PATH, label:NAME, label:NAME@PATH, digit:K@DATA_DIR, "
    "python:FILE.py:FUNC or python:module:FUNC"
)


class Scorer:
    """A scoring function with a name and the kind of items it takes."""

    def __init__(self, name: str, kind: Kind, fn: Callable[[list[Any]], list[float]]) -> None:
        self.name = name
        self.kind: Kind = kind
        self._fn = fn

    def score(self, items: Sequence[Any] | np.ndarray) -> list[float]:
        """One float per item, higher = better."""
        items = _as_items(items, self.kind, self.name)
        if not items:
            return []
        scores = self._fn(items)
        return _check_scores(scores, len(items), self.name)

    def __repr__(self) -> str:
        return f"Scorer({self.name!r}, kind={self.kind!r})"


def _as_items(items: Any, kind: Kind, name: str) -> list[Any]:
    if kind == "image" and isinstance(items, (np.ndarray, torch.Tensor)):
        return list(items)  # (N, C, H, W) -> N arrays (C, H, W)
    if isinstance(items, str):
        raise AigcError(f"scorer {name} takes a list of items, got one string; pass [text]")
    items = list(items)
    if kind == "text":
        bad = [type(x).__name__ for x in items if not isinstance(x, str)]
        if bad:
            raise AigcError(f"scorer {name} scores texts (str), got {bad[0]}; pass generated strings")
    return items


def _check_scores(scores: Any, n: int, name: str) -> list[float]:
    try:
        out = [float(s) for s in scores]
    except (TypeError, ValueError) as e:
        raise AigcError(f"scorer {name} must return a list of numbers, one per item ({e})") from None
    if len(out) != n:
        raise AigcError(f"scorer {name} returned {len(out)} scores for {n} items; return one per item")
    if any(math.isnan(s) for s in out):
        raise AigcError(f"scorer {name} returned NaN; return finite numbers (higher = better)")
    return out


# ----------------------------------------------------------------------------- text classifiers


def classifier_scorer(label: str | None, path: str | None, spec: str) -> Scorer:
    """P(label) from a text classifier run; label None = its `positive_label`."""
    from aigc.evaluation.sentiment import load_classifier

    clf = load_classifier(path or None)
    if label is None:
        label = clf.config.get("positive_label")
        if label is None:
            raise AigcError(
                f"classifier {clf.path} has no `positive` label (labels: {', '.join(clf.labels)}); "
                "use label:NAME@PATH with one of them"
            )
    if label not in clf.labels:
        raise AigcError(
            f"label {label!r} is not one of classifier {clf.path}'s labels: {', '.join(clf.labels)}"
        )
    col = clf.labels.index(label)

    def fn(texts: list[str]) -> list[float]:
        return clf.predict_proba(texts)[:, col].tolist()

    return Scorer(spec, "text", fn)


# ----------------------------------------------------------------------------- digit (image class)


def _image_array(items: list[Any], shape: tuple[int, int, int], name: str) -> np.ndarray:
    """PIL images / (C, H, W) or (H, W) uint8 arrays -> uint8 (N, C, H, W) matching `shape`."""
    c, h, w = shape
    rows = []
    for x in items:
        if hasattr(x, "convert") and hasattr(x, "size"):  # a PIL image
            x = np.asarray(x.convert("L" if c == 1 else "RGB"))  # (H, W) or (H, W, 3)
            x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        x = np.asarray(x)
        if x.ndim == 2:
            x = x[None]  # (H, W) -> (1, H, W)
        if x.dtype != np.uint8:
            raise AigcError(f"scorer {name} takes uint8 images (or PIL images), got dtype {x.dtype}")
        if x.shape != (c, h, w):
            raise AigcError(
                f"scorer {name} was trained on {c}x{h}x{w} images, got {'x'.join(map(str, x.shape))}; "
                "score images of the data set's size and channels"
            )
        rows.append(x)
    return np.stack(rows)


def digit_scorer(target: str, data_dir: str, spec: str, feature_cfg: Any = None) -> Scorer:
    """P(class `target`) under the prepared image data set's own (cached) feature classifier.

    `feature_cfg`: an `evaluation.images.FeatureTrainConfig` (default: the metrics' own recipe,
    so the scorer shares the cached network `aigc eval` trains on the same data).
    """
    from aigc.data.images import load_prepared_images
    from aigc.evaluation.images import as_float_images, feature_classifier

    data = load_prepared_images(data_dir)
    classes = [str(c) for c in data.meta.get("classes") or []]
    present = sorted({int(v) for v in np.unique(np.asarray(data.labels))})
    if target in classes:
        k = classes.index(target)
    elif target.isdigit():
        k = int(target)
    else:
        raise AigcError(
            f"class {target!r} is not in {data_dir}; allowed: {', '.join(classes or map(str, present))}"
        )
    if k not in present:
        allowed = ", ".join(f"{i} ({classes[i]})" if i < len(classes) else str(i) for i in present)
        raise AigcError(f"class {target!r} has no images in {data_dir}; allowed classes: {allowed}")
    model, info = feature_classifier(data.images, data.labels, feature_cfg)
    shape = tuple(info["image_shape"])

    @torch.no_grad()
    def fn(items: list[Any]) -> list[float]:
        x = as_float_images(_image_array(items, shape, spec))  # (N, C, H, W) in [-1, 1]
        probs = torch.cat([torch.softmax(model(x[i : i + 512])[0], -1) for i in range(0, len(x), 512)])
        return probs[:, k].tolist()

    scorer = Scorer(spec, "image", fn)
    scorer.info = info  # type: ignore[attr-defined]  # the classifier's held-out accuracy, hash
    return scorer


# ----------------------------------------------------------------------------- user's python


def python_scorer(target: str, spec: str) -> Scorer:
    """`FILE.py:FUNC` (a file the user points at) or `module:FUNC` (an importable module)."""
    where, sep, func_name = target.rpartition(":")
    if not sep or not where or not func_name.isidentifier():
        raise AigcError(f"scorer spec {spec!r}: write python:FILE.py:FUNC or python:module:FUNC")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise AigcError(
                    f"scorer file {path} not found; pass python:FILE.py:FUNC with an existing file"
                )
            mod_name = f"aigc_user_scorer_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module  # dataclasses & co. look their module up while loading
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except AigcError:
        raise
    except Exception as e:  # the user's code: any error is theirs, named with the file
        raise AigcError(f"scorer {where} failed to load: {type(e).__name__}: {e}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise AigcError(
            f"scorer {where} has no function {func_name!r}; define def {func_name}(items) -> list[float]"
        )
    kind = getattr(fn, "kind", "text")
    if kind not in ("text", "image"):
        raise AigcError(f"scorer {where}:{func_name} sets kind={kind!r}; allowed: text, image")

    def call(items: list[Any]) -> list[float]:
        try:
            return fn(items)
        except AigcError:
            raise
        except Exception as e:
            raise AigcError(f"scorer {where}:{func_name} raised {type(e).__name__}: {e}") from None

    return Scorer(spec, kind, call)


# ----------------------------------------------------------------------------- specs

_CACHE: dict[tuple[str, float, str], Scorer] = {}
_LOCK = threading.Lock()


def _mtime(path: str | None) -> float:
    if not path:
        return 0.0
    p = Path(path).expanduser()
    for f in (p / "model.safetensors", p / "images.safetensors", p):
        if f.exists():
            return f.stat().st_mtime
    return 0.0


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """(kind, argument, path) of a scorer spec; an AigcError listing the forms when malformed."""
    spec = (spec or "").strip()
    head, _, rest = spec.partition(":")
    if head == "sentiment":
        return "sentiment", None, rest or None
    if head == "label" and rest:
        name, _, path = rest.partition("@")
        if name:
            return "label", name, path or None
    if head == "digit" and rest:
        k, _, path = rest.partition("@")
        if k and path:
            return "digit", k, path
        raise AigcError(f"scorer spec {spec!r}: write digit:K@DATA_DIR (a prepared image data set)")
    if head == "python" and rest:
        return "python", rest, None
    raise AigcError(f"unknown scorer spec {spec!r}; allowed: {SPEC_HELP}")


def load_scorer(spec: str, feature_cfg: Any = None) -> Scorer:
    """The scorer a spec names (see the module docstring); cached per spec and weights' mtime.

    `feature_cfg` (digit scorers only): how the feature classifier is trained (tests: fewer steps).
    """
    kind, arg, path = parse_spec(spec)
    if kind == "python":  # the user's file may change between calls: load it each time
        return python_scorer(arg or "", spec)
    if kind in ("sentiment", "label") and path is None:
        from aigc.evaluation.sentiment import find_classifiers

        found = find_classifiers()
        key = (spec, _mtime(str(found[0])) if found else 0.0, str(found[0]) if found else "")
    else:
        key = (spec, _mtime(path), repr(feature_cfg) if feature_cfg is not None else "")
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        if kind == "digit":
            scorer = digit_scorer(arg or "", path or "", spec, feature_cfg)
        else:
            scorer = classifier_scorer(arg, path, spec)
        _CACHE[key] = scorer
        return scorer


__all__ = ["SPEC_HELP", "Scorer", "load_scorer", "parse_spec"]
