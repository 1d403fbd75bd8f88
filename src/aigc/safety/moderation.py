"""Moderation: configurable categories of word / regex rules with a policy each (allow, flag, block).

The defaults (`moderation.toml` beside this file: short English and Chinese lists, documented
there) merge with a user file (`$AIGC_MODERATION` or an explicit path) of the same shape: its
words and regexes are added to the category of the same name, its `policy` replaces the default,
and new categories are added. Text is normalised with Unicode NFKC + casefold before matching, so
full-width letters and case tricks do not slip through; Latin words match as whole words, CJK
phrases as substrings (Chinese has no spaces between words).

`Moderator.check(text)` -> `ModerationResult`: the categories that matched, the phrases that
matched, and the action (the strictest policy among them). Rules give scores 0 or 1.

Optionally a classifier trained on the user's own labelled examples (`aigc train classifier`, the
sentiment machinery: any labels, e.g. `ok` / `toxic`) adds to the rules. A rules file names it:

    [classifier]
    model = "runs/toxicity"     # the classifier run directory
    threshold = 0.8             # P(label) at or above which its category matches
    [classifier.labels]         # classifier label -> moderation category (other labels: ignored)
    toxic = "harassment"

Its probability becomes that category's score in `to_openai()`, and a match lists
`classifier:<label> <p>` among the phrases. Nothing is downloaded: the run is a local directory.
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
VERDICT_MAX = 64  # characters of the store's `moderation` column
STREAM_HOLDBACK = 64  # characters a moderated stream holds back (see StreamGuard)
STREAM_WINDOW = 256  # characters before each new delta that a stream check looks back over


def normalize(text: str) -> str:
    """NFKC + casefold: 'ＫＩＬＬ' and 'Kill' both become 'kill'."""
    return unicodedata.normalize("NFKC", text).casefold()


def _word_pattern(word: str) -> str:
    w = re.escape(normalize(word).strip())
    # whole words for Latin script, substrings for CJK (no word boundaries there)
    return rf"(?<!\w){w}(?!\w)" if word.isascii() else w


# What re.IGNORECASE matches besides a lowercase ASCII character itself in normalised text: the
# dotless i only (uppercase letters, the long s and the Kelvin sign do not survive `normalize`).
# test_safety_moderation checks this against re over every character `normalize` can give.
_IGNORECASE_EXTRA = {"i": "ı"}


def _fold(text: str) -> str:
    """Normalised text with `_IGNORECASE_EXTRA` read as the ASCII letter (one character for one):
    there, case-sensitive ASCII words match what re.IGNORECASE ones match in the text, and the
    regex module's IGNORECASE (which does not equate the dotless i with i) what re's does. (A
    `replace` per character: 0.03 us on 55 characters, `str.translate` 1.2.)"""
    for c, extra in _IGNORECASE_EXTRA.items():
        for x in extra:
            text = text.replace(x, c)
    return text


def _ascii_word_alternative(word: str) -> str:
    r"""A normalised ASCII word as a case-sensitive pattern matching, in `_fold`ed text, what
    `(?<!\w)word(?!\w)` matches with re.IGNORECASE in the text.

    It starts with a plain character and tests the boundary behind the word after it ((?<!\w.)
    there is (?<!\w) before it): a union of such patterns lets re jump between the positions
    holding one of the words' first characters, instead of trying every word at every position
    (case-insensitive literals rule that scan out)."""
    return rf"{re.escape(word[0])}(?<!\w.){re.escape(word[1:])}(?!\w)"


def _compile_any(parts: list[str], engine: Any = re) -> Any:
    """One case-insensitive pattern of `engine` (the re or the regex module) matching any of
    `parts`, or None for none."""
    return (
        engine.compile("|".join(f"(?:{p})" for p in parts), engine.IGNORECASE | engine.DOTALL)
        if parts
        else None
    )


def _split_rules(categories: list[Category], engine: Any) -> list[Any]:
    """The rules of `categories` as patterns of `engine` (the re or the regex module) that between
    them match in `_fold`ed text where the categories' `compile()` patterns do in the text, faster:
    all Latin words in one case-sensitive pattern (`_ascii_word_alternative`), all other words in one, then each
    category's regexes (kept apart: their group numbers and names). All default rules, 55
    characters without a match: the searches 18 -> 8 µs (`bench/bench_moderation.py`)."""
    latin = [_ascii_word_alternative(w) for c in categories for w in c._latin()]
    other = [w for c in categories for w in c._other()]
    pats = [engine.compile("|".join(latin), engine.DOTALL)] if latin else []
    groups = ([other] if other else []) + [c.regex for c in categories if c.regex]
    return pats + [_compile_any(g, engine) for g in groups]


@dataclass
class Category:
    name: str
    policy: str
    description: str = ""
    words: list[str] = field(default_factory=list)
    regex: list[str] = field(default_factory=list)

    def _latin(self) -> list[str]:
        """The normalised ASCII words (matched as whole words)."""
        return [normalize(w).strip() for w in self.words if w.strip() and w.isascii()]

    def _other(self) -> list[str]:
        """The non-ASCII words' patterns (substrings)."""
        return [_word_pattern(w) for w in self.words if w.strip() and not w.isascii()]

    def compile(self) -> re.Pattern | None:
        # Latin words share one (?<!\w)(?:a|b|...)(?!\w) group: the boundary test runs once per
        # position instead of once per word (all default rules: 1.4x faster, docs/benchmarks.md)
        latin = [re.escape(w) for w in self._latin()]
        group = [rf"(?<!\w)(?:{'|'.join(latin)})(?!\w)"] if latin else []
        return _compile_any(group + self._other() + list(self.regex))


@dataclass
class ClassifierRule:
    """A classifier run whose labels map to categories (the `[classifier]` table of a rules file)."""

    model: str
    labels: dict[str, str]  # classifier label -> category
    threshold: float = 0.5
    _clf: Any = None

    def scores(self, text: str) -> dict[str, float]:
        """category -> the highest probability among the labels mapped to it."""
        if self._clf is None:
            from aigc.evaluation.sentiment import load_classifier

            self._clf = load_classifier(self.model)
            unknown = sorted(set(self.labels) - set(self._clf.labels))
            if unknown:
                raise AigcError(
                    f"moderation classifier {self.model} has no label {unknown[0]!r} "
                    f"(its labels: {', '.join(self._clf.labels)}); fix [classifier.labels]"
                )
        probs = self._clf.predict_proba([text])[0]
        out: dict[str, float] = {}
        for label, cat in self.labels.items():
            p = float(probs[self._clf.labels.index(label)])
            out[cat] = max(out.get(cat, 0.0), p)
        return out


@dataclass
class ModerationResult:
    action: str  # "allow" | "flag" | "block"
    categories: dict[str, bool]  # every category -> matched
    matches: dict[str, list[str]]  # matched categories -> the phrases found
    scores: dict[str, float] | None = None  # classifier probabilities per category, when one ran

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
            "category_scores": {
                c: max(1.0 if v else 0.0, (self.scores or {}).get(c, 0.0)) for c, v in self.categories.items()
            },
            "action": self.action,  # ours: what this deployment does with it
        }


class Moderator:
    """Compiled rules; `check(text)` is cheap (one regex search per category)."""

    def __init__(self, categories: dict[str, Category], classifier: ClassifierRule | None = None) -> None:
        self.categories = categories
        self.policies = {n: c.policy for n, c in categories.items()}
        self._patterns = {n: c.compile() for n, c in categories.items()}
        # the quick test most texts end at: does any rule of a category that is not allowed match
        self._screen = _split_rules([c for c in categories.values() if c.policy != "allow"], re)
        self.classifier = classifier
        self._partials: list[Any] | None = None  # `regex` twins of the blocking patterns (hold_from)
        if classifier is not None:
            missing = sorted(set(classifier.labels.values()) - set(categories))
            if missing:
                raise AigcError(
                    f"moderation classifier maps to unknown category {missing[0]!r}; known: "
                    f"{', '.join(categories)} (or define it under [categories.{missing[0]}] with a policy)"
                )

    @classmethod
    def load(cls, path: str | Path | None = None, defaults: bool = True) -> Moderator:
        """Defaults merged with `path` (else `$AIGC_MODERATION`, else none)."""
        cats: dict[str, Category] = {}
        classifier: ClassifierRule | None = None
        sources = ([DEFAULTS] if defaults else []) + ([Path(path)] if path else [])
        if path is None and os.environ.get(ENV):
            sources.append(Path(os.environ[ENV]))
        for src in sources:
            table, clf = _read(src)
            classifier = clf or classifier  # a later file's classifier replaces an earlier one
            for name, c in table.items():
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
        return cls(cats, classifier)

    def hold_from(self, text: str) -> int | None:
        """The earliest index of `text` (normalised) where a phrase of a *blocking* category could
        still begin, given more text after it (len(text) when none could); None when that cannot
        be told (a classifier is configured). Text before the index can be sent: whatever follows,
        no blocked match can include it. Uses the `regex` module's partial matching."""
        if self.classifier is not None:
            return None
        if self._partials is None:
            import regex

            # (the earliest start over the split patterns is the earliest over their union)
            self._partials = _split_rules([c for c in self.categories.values() if c.policy == "block"], regex)
        text = _fold(text)  # (one character for one: the indices hold)
        starts = [m.start() for p in self._partials if (m := p.search(text, partial=True)) is not None]
        return min(starts, default=len(text))

    def check(self, text: str, normalized: str | None = None) -> ModerationResult:
        """`normalized`: `normalize(text)` when the caller has it already (a stream's window)."""
        t = normalize(text) if normalized is None else normalized
        hits: dict[str, bool] = dict.fromkeys(self._patterns, False)
        matches: dict[str, list[str]] = {}
        folded = _fold(t)
        screened = not any(p.search(folded) for p in self._screen)  # no rule matches: nothing to find
        for name, pat in () if screened else self._patterns.items():
            # a rule matched somewhere (rare): which categories, and their phrases
            hits[name] = pat is not None and self.policies[name] != "allow" and pat.search(t) is not None
            if hits[name]:
                matches[name] = sorted({m.group(0) for m in pat.finditer(t)})[:5]
        scores = None
        if self.classifier is not None and t.strip():
            scores = self.classifier.scores(text)
            for cat, p in scores.items():
                if p >= self.classifier.threshold and self.policies[cat] != "allow":
                    hits[cat] = True
                    matches.setdefault(cat, []).append(f"classifier:{cat} {p:.2f}")
        action = max((self.policies[n] for n, v in hits.items() if v), key=POLICIES.index, default="allow")
        return ModerationResult(action=action, categories=hits, matches=matches, scores=scores)

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

    def verdict(self, *results: ModerationResult | None) -> str | None:
        """The store's `moderation` value for one output from its checks (prompt, output, ...):
        None when nothing matched, else "flagged:<categories>" or "blocked:<categories>" (those at
        the strictest policy reached), cut to the column's VERDICT_MAX characters."""
        hit = [r for r in results if r is not None]
        action = max((r.action for r in hit), key=POLICIES.index, default="allow")
        if action == "allow":
            return None
        cats = sorted({c for r in hit for c, m in r.categories.items() if m and self.policies[c] == action})
        return f"{'blocked' if action == 'block' else 'flagged'}:{','.join(cats)}"[:VERDICT_MAX]


class StreamGuard:
    """Moderates one text as it streams: `feed(delta)` -> the part that is safe to send now.

    At every delta the new text is checked together with the `window` characters before it. Text is
    held back from the earliest point where a blocking rule could still match if more text came
    (`Moderator.hold_from`, partial regex matching: "...and then ki" holds back "ki", a plain
    sentence holds back nothing), so streams flow at once and a blocked phrase is never sent, not
    even in part. Where that cannot be told (a classifier is configured, or normalisation changed
    the text's length) the last `holdback` characters are held back instead: a blocked phrase of up
    to `holdback` characters is then never sent, a longer match may have its start sent before it
    is recognised. A match spanning more than `window` is caught only by `finish`, which checks the
    whole text once before releasing the rest. Once blocked, nothing more is sent (`blocked`,
    `result` say why).
    """

    def __init__(
        self, moderator: Moderator, holdback: int = STREAM_HOLDBACK, window: int = STREAM_WINDOW
    ) -> None:
        self.moderator, self.holdback, self.window = moderator, holdback, window
        self.text = ""
        self.sent = 0  # characters of `text` already released
        self.result: ModerationResult | None = None
        self._checked: str | None = None  # the whole text, when the last feed's check covered it

    @property
    def blocked(self) -> bool:
        return self.result is not None and self.result.blocked

    def feed(self, delta: str) -> str:
        if self.blocked:
            return ""
        # check the new text with `window` characters before it (backed off to a word start, so a
        # cut word cannot look whole): the cost per delta stays flat however long the text grows
        start = max(0, len(self.text) - self.window)
        while start > 0 and (self.text[start - 1].isalnum() or self.text[start - 1] == "_"):
            start -= 1
        self.text += delta
        window = self.text[start:]
        norm = normalize(window)
        self.result = self.moderator.check(window, norm)
        self._checked = self.text if start == 0 else None
        if self.blocked:
            return ""
        hold = self.moderator.hold_from(norm) if len(norm) == len(window) else None
        safe = len(self.text) - self.holdback if hold is None else start + hold
        safe = max(self.sent, safe)
        out, self.sent = self.text[self.sent : safe], safe
        return out

    def finish(self, final: str | None = None) -> str:
        """The held-back rest once the text is complete (`final`: the authoritative whole text)."""
        if self.blocked:
            return ""
        if final is not None and final.startswith(self.text[: self.sent]):
            self.text = final
        if self.text != self._checked:  # else the last feed checked this very text already
            self.result = self.moderator.check(self.text)
        if self.blocked:
            return ""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


def _read_classifier(path: Path, table: Any) -> ClassifierRule:
    """Validate a `[classifier]` table; a relative model path is relative to the rules file."""
    allowed = {"model", "threshold", "labels"}
    if not isinstance(table, dict) or sorted(set(table) - allowed) or "model" not in table:
        raise AigcError(f"moderation file {path}: [classifier] needs model = \"RUN_DIR\" and [classifier.labels] "
                        f"(label = \"category\"); allowed keys: {', '.join(sorted(allowed))}")  # fmt: skip
    labels = table.get("labels", {})
    if not labels or not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise AigcError(f"moderation file {path}: [classifier.labels] must map labels to category names")
    threshold = table.get("threshold", 0.5)
    if not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise AigcError(f"moderation file {path}: classifier threshold {threshold!r} must be in (0, 1]")
    model = Path(str(table["model"])).expanduser()
    if not model.is_absolute():
        model = path.parent / model
    return ClassifierRule(model=str(model), labels=dict(labels), threshold=float(threshold))


def _read(path: Path) -> tuple[dict[str, dict[str, Any]], ClassifierRule | None]:
    """Parse and validate one rules file -> ({category: table}, its classifier or None)."""
    if not path.is_file():
        raise AigcError(
            f"moderation file {path} not found; pass a TOML file (see src/aigc/safety/moderation.toml)"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise AigcError(f"moderation file {path} is not valid TOML ({e}); fix it") from None
    unknown = sorted(set(data) - {"categories", "classifier"})
    if unknown:
        raise AigcError(
            f"moderation file {path}: unknown key {unknown[0]!r}; allowed: [categories.<name>] tables "
            "and one [classifier] table"
        )
    classifier = _read_classifier(path, data["classifier"]) if "classifier" in data else None
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
    return cats, classifier


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
