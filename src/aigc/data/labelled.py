"""Labelled text files (text + label) for classifiers: TSV, CSV or JSONL.

Formats, chosen by extension unless given:
- `tsv` (.tsv, .txt): one example per line, `text<TAB>label`, split at the LAST tab (so tabs inside
  the text survive). Lines are split on "\\n" only: `str.splitlines()` would also break at U+0085
  and U+2028, which occur inside sentences (the UCI sentiment files have them).
- `csv` (.csv): two columns text,label (a header row naming them is detected and skipped), or
  any columns with a header containing `text` and `label`.
- `jsonl` (.jsonl, .json): one object per line with "text" and "label" keys.

Blank lines are skipped and counted. A missing label, an unknown label (when the allowed labels
are given), a single class or a suspicious number of classes is an `AigcError`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aigc.errors import AigcError

Format = Literal["tsv", "csv", "jsonl"]
FORMATS: dict[str, Format] = {
    ".tsv": "tsv",
    ".txt": "tsv",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
}
HEADER_LABELS = {"label", "labels", "sentiment", "class", "target"}
MAX_CLASSES = 100


@dataclass
class LabelledData:
    texts: list[str]
    labels: list[str]
    format: Format
    source: str
    skipped_empty: int = 0
    sha256: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return sorted(self.counts)

    def __len__(self) -> int:
        return len(self.texts)


def detect_format(path: Path) -> Format:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AigcError(
            f"cannot tell the format of {path.name} from its extension; allowed: "
            f"{', '.join(sorted(FORMATS))}; rename the file or pass the format (tsv, csv, jsonl)"
        )
    return fmt


def _lines(text: str) -> list[str]:
    """Split on "\n" only; a final newline ends the last line rather than starting an empty one."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _rows_tsv(text: str, name: str) -> tuple[list[tuple[str, str]], int]:
    rows, empty = [], 0
    for i, line in enumerate(_lines(text), 1):
        line = line.rstrip("\r")
        if not line.strip():
            empty += 1
            continue
        if "\t" not in line:
            raise AigcError(f"{name} line {i} has no tab: expected `text<TAB>label`; fix or remove that line")
        t, _, label = line.rpartition("\t")
        rows.append((t.strip(), label.strip()))
    if rows and rows[0][1].lower() in HEADER_LABELS:
        rows = rows[1:]  # a header row
    return rows, empty


def _rows_csv(text: str, name: str) -> tuple[list[tuple[str, str]], int]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, empty = [], 0
    text_col, label_col = 0, 1
    first = True
    for i, rec in enumerate(reader, 1):
        if not rec or not any(c.strip() for c in rec):
            empty += 1
            continue
        if first:  # a header row names the columns
            first = False
            low = [c.strip().lower() for c in rec]
            if "text" in low and any(h in low for h in HEADER_LABELS):
                text_col = low.index("text")
                label_col = next(low.index(h) for h in low if h in HEADER_LABELS)
                continue
        if len(rec) <= max(text_col, label_col):
            raise AigcError(f"{name} row {i} has {len(rec)} column(s); expected text,label")
        rows.append((rec[text_col].strip(), rec[label_col].strip()))
    return rows, empty


def _rows_jsonl(text: str, name: str, text_key: str, label_key: str) -> tuple[list[tuple[str, str]], int]:
    rows, empty = [], 0
    for i, line in enumerate(_lines(text), 1):
        if not line.strip():
            empty += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AigcError(f"{name} line {i} is not valid JSON ({e.msg}); one object per line") from None
        if not isinstance(obj, dict) or text_key not in obj or label_key not in obj:
            raise AigcError(f'{name} line {i} needs "{text_key}" and "{label_key}" keys')
        rows.append((str(obj[text_key]).strip(), str(obj[label_key]).strip()))
    return rows, empty


def read_labelled(
    path: str | Path,
    format: Format | None = None,
    labels: list[str] | None = None,
    text_key: str = "text",
    label_key: str = "label",
    min_classes: int = 2,
) -> LabelledData:
    """Read a labelled text file (see the module docstring for the formats).

    `labels`: the allowed labels; any other label is an error. Rows whose text or label is empty
    after stripping count as empty lines (skipped), except a row with text but no label.
    """
    path = Path(path)
    if not path.is_file():
        raise AigcError(f"labelled data file {path} not found; pass a TSV, CSV or JSONL file of text + label")
    fmt = format or detect_format(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AigcError(f"{path.name} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if fmt == "tsv":
        rows, empty = _rows_tsv(text, path.name)
    elif fmt == "csv":
        rows, empty = _rows_csv(text, path.name)
    elif fmt == "jsonl":
        rows, empty = _rows_jsonl(text, path.name, text_key, label_key)
    else:
        raise AigcError(f"unknown format {fmt!r}; allowed: tsv, csv, jsonl")
    kept = []
    for t, lab in rows:
        if not t:
            empty += 1  # a label with no text carries nothing to learn from
            continue
        if not lab:
            raise AigcError(f"{path.name}: the example {t[:40]!r} has an empty label; every row needs one")
        kept.append((t, lab))
    if not kept:
        raise AigcError(f"{path.name} holds no labelled examples ({empty} empty lines)")
    counts = Counter(lab for _, lab in kept)
    if labels is not None:
        unknown = sorted(set(counts) - set(labels))
        if unknown:
            raise AigcError(
                f"{path.name} has unknown label(s) {', '.join(map(repr, unknown[:5]))}; allowed labels: "
                f"{', '.join(map(repr, labels))}; fix the file or the allowed labels"
            )
    if len(counts) < min_classes:
        raise AigcError(
            f"{path.name} has only {len(counts)} class ({', '.join(map(repr, counts))}); a classifier needs "
            f"at least {min_classes}: add examples of the other label(s)"
        )
    if len(counts) > MAX_CLASSES or len(counts) > 0.5 * len(kept) > 10:
        raise AigcError(
            f"{path.name} has {len(counts)} distinct labels in {len(kept)} rows: is the label column right? "
            f"The label must be the last field (TSV), the `label` column (CSV) or the `{label_key}` key (JSONL)"
        )
    return LabelledData(
        texts=[t for t, _ in kept],
        labels=[lab for _, lab in kept],
        format=fmt,
        source=str(path),
        skipped_empty=empty,
        sha256=hashlib.sha256(raw).hexdigest(),
        counts=dict(sorted(counts.items())),
    )


def read_many(paths: list[str | Path], **kwargs) -> LabelledData:
    """Read several labelled files as one data set (e.g. the three UCI sentiment files)."""
    parts = [read_labelled(p, **kwargs) for p in paths]
    if len(parts) == 1:
        return parts[0]
    counts: Counter = Counter()
    for p in parts:
        counts.update(p.counts)
    h = hashlib.sha256("".join(p.sha256 for p in parts).encode()).hexdigest()
    return LabelledData(
        texts=[t for p in parts for t in p.texts],
        labels=[lab for p in parts for lab in p.labels],
        format=parts[0].format,
        source=", ".join(p.source for p in parts),
        skipped_empty=sum(p.skipped_empty for p in parts),
        sha256=h,
        counts=dict(sorted(counts.items())),
    )


def stratified_split(labels: list[str], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, test indices): `test_fraction` of each class goes to test, seeded."""
    import random

    if not 0 < test_fraction < 1:
        raise AigcError(f"test fraction must be between 0 and 1, got {test_fraction}")
    rng = random.Random(seed)
    train, test = [], []
    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    for lab in sorted(by_class):
        idx = by_class[lab]
        rng.shuffle(idx)
        if len(idx) < 2:
            raise AigcError(f"label {lab!r} has a single example; need at least 2 per label to hold one out")
        n_test = min(len(idx) - 1, max(1, round(len(idx) * test_fraction)))
        test += idx[:n_test]
        train += idx[n_test:]
    return sorted(train), sorted(test)
