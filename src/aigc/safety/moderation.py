"""Moderation: configurable categories of word / regex rules with a policy each (allow, flag, block).

The defaults (`moderation.toml` beside this file: short English and Chinese lists, documented
there) merge with a user file (`$AIGC_MODERATION` or an explicit path) of the same shape: its
words and regexes are added to the category of the same name, its `policy` replaces the default,
and new categories are added. Text is normalised with Unicode NFKC + casefold before matching, so
full-width letters and case tricks do not slip through; Latin words match as whole words, CJK
phrases as substrings (Chinese has no spaces between words).

`Moderator.check(text)` -> `ModerationResult`: the categories that matched, the phrases that
matched, and the action (the strictest policy among them). Rules give scores 0 or 1: there is no
classifier here, and `to_openai()` says so by reporting 1.0 / 0.0 in OpenAI's response shape.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aigc.errors import AigcError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

DEFAULTS = Path(__file__).with_name("moderation.toml")
ENV = "AIGC_MODERATION"
POLICIES = ("allow", "flag", "block")  # in order of strictness
CATEGORY_KEYS = {"policy", "description", "words", "regex"}


def normalize(text: str) -> str:
    """NFKC + casefold: 'ＫＩＬＬ' and 'Kill' both become 'kill'."""
    return unicodedata.normalize("NFKC", text).casefold()


def _word_pattern(word: str) -> str:
    w = re.escape(normalize(word).strip())
    # whole words for Latin script, substrings for CJK (no word boundaries there)
    return rf"(?<!\w){w}(?!\w)" if word.isascii() else w


@dataclass
class Category:
    name: str
    policy: str
    description: str = ""
    words: list[str] = field(default_factory=list)
    regex: list[str] = field(default_factory=list)

    def compile(self) -> re.Pattern | None:
        parts = [_word_pattern(w) for w in self.words if w.strip()] + list(self.regex)
        return re.compile("|".join(f"(?:{p})" for p in parts), re.IGNORECASE | re.DOTALL) if parts else None


@dataclass
class ModerationResult:
    action: str  # "allow" | "flag" | "block"
    categories: dict[str, bool]  # every category -> matched
    matches: dict[str, list[str]]  # matched categories -> the phrases found

    @property
    def flagged(self) -> bool:
        return any(self.categories.values())

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    def blocked_categories(self, policies: dict[str, str]) -> list[str]:
        return [c for c, hit in self.categories.items() if hit and policies[c] == "block"]

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "flagged": self.flagged, "categories": [c for c, v in self.categories.items() if v],
                "matches": self.matches}  # fmt: skip

    def to_openai(self) -> dict[str, Any]:
        """One item of OpenAI's moderation `results` list."""
        return {
            "flagged": self.flagged,
            "categories": dict(self.categories),
            "category_scores": {c: 1.0 if v else 0.0 for c, v in self.categories.items()},
            "action": self.action,  # ours: what this deployment does with it
        }


class Moderator:
    """Compiled rules; `check(text)` is cheap (one regex search per category)."""

    def __init__(self, categories: dict[str, Category]) -> None:
        self.categories = categories
        self.policies = {n: c.policy for n, c in categories.items()}
        self._patterns = {n: c.compile() for n, c in categories.items()}

    @classmethod
    def load(cls, path: str | Path | None = None, defaults: bool = True) -> Moderator:
        """Defaults merged with `path` (else `$AIGC_MODERATION`, else none)."""
        cats: dict[str, Category] = {}
        sources = ([DEFAULTS] if defaults else []) + ([Path(path)] if path else [])
        if path is None and os.environ.get(ENV):
            sources.append(Path(os.environ[ENV]))
        for src in sources:
            for name, c in _read(src).items():
                if name in cats:
                    old = cats[name]
                    old.words += c.get("words", [])
                    old.regex += c.get("regex", [])
                    old.policy = c.get("policy", old.policy)
                    old.description = c.get("description", old.description)
                else:
                    if "policy" not in c:
                        raise AigcError(
                            f"{src}: new category {name!r} needs a policy; allowed: {', '.join(POLICIES)}"
                        )
                    cats[name] = Category(name=name, **c)
        return cls(cats)

    def check(self, text: str) -> ModerationResult:
        t = normalize(text)
        hits: dict[str, bool] = {}
        matches: dict[str, list[str]] = {}
        for name, pat in self._patterns.items():
            found = sorted({m.group(0) for m in pat.finditer(t)}) if pat is not None else []
            hits[name] = bool(found) and self.policies[name] != "allow"
            if hits[name]:
                matches[name] = found[:5]
        action = max((self.policies[n] for n, v in hits.items() if v), key=POLICIES.index, default="allow")
        return ModerationResult(action=action, categories=hits, matches=matches)

    def enforce(self, texts: list[str], what: str = "prompt") -> list[ModerationResult]:
        """Check texts; raise AigcError naming the category when one is blocked."""
        results = [self.check(t) for t in texts]
        for r in results:
            if r.blocked:
                cats = ", ".join(r.blocked_categories(self.policies))
                raise AigcError(
                    f"{what} blocked by moderation (category: {cats}); rephrase it, or change the policy "
                    f"of that category in a moderation file (${ENV} or --moderation FILE)"
                )
        return results


def _read(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and validate one rules file -> {category: table}."""
    if not path.is_file():
        raise AigcError(
            f"moderation file {path} not found; pass a TOML file (see src/aigc/safety/moderation.toml)"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise AigcError(f"moderation file {path} is not valid TOML ({e}); fix it") from None
    unknown = sorted(set(data) - {"categories"})
    if unknown:
        raise AigcError(
            f"moderation file {path}: unknown key {unknown[0]!r}; allowed: [categories.<name>] tables"
        )
    cats = data.get("categories", {})
    for name, c in cats.items():
        bad = sorted(set(c) - CATEGORY_KEYS) if isinstance(c, dict) else ["(not a table)"]
        if bad:
            raise AigcError(f"moderation file {path}: category {name!r} has unknown key {bad[0]!r}; "
                            f"allowed: {', '.join(sorted(CATEGORY_KEYS))}")  # fmt: skip
        if "policy" in c and c["policy"] not in POLICIES:
            raise AigcError(f"moderation file {path}: category {name!r} policy {c['policy']!r} is invalid; "
                            f"allowed: {', '.join(POLICIES)}")  # fmt: skip
        for key in ("words", "regex"):
            if not isinstance(c.get(key, []), list) or not all(isinstance(w, str) for w in c.get(key, [])):
                raise AigcError(f"moderation file {path}: category {name!r} {key} must be a list of strings")
        for rx in c.get("regex", []):
            try:
                re.compile(rx)
            except re.error as e:
                raise AigcError(
                    f"moderation file {path}: category {name!r} regex {rx!r} is invalid ({e})"
                ) from None
    return cats


def evaluate(moderator: Moderator, items: list[tuple[str, str]]) -> dict[str, Any]:
    """Precision / recall of the rules on labelled texts [(text, category or "none")].

    "any": flagged at all vs labelled harmful at all; per category: that category matched vs labelled.
    """
    preds = [moderator.check(t) for t, _ in items]
    gold = [label for _, label in items]

    def pr(pred: list[bool], true: list[bool]) -> dict[str, float | int]:
        tp = sum(p and t for p, t in zip(pred, true, strict=True))
        fp = sum(p and not t for p, t in zip(pred, true, strict=True))
        fn = sum(t and not p for p, t in zip(pred, true, strict=True))
        return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0,
                "tp": tp, "fp": fp, "fn": fn}  # fmt: skip

    out = {"any": pr([p.flagged for p in preds], [g != "none" for g in gold]), "n": len(items)}
    for c in moderator.categories:
        out[c] = pr([p.categories[c] for p in preds], [g == c for g in gold])
    return out
