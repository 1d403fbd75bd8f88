"""Text cleaning: one newline convention, Unicode NFC, optional dedup and PII scrubbing.

Cleaning happens here and nowhere else: tokenizers carry no normalizer, so what is cleaned is
exactly what a model sees and `decode(encode(s)) == s` holds for the cleaned text.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

# PII patterns (ASCII digits only: CJK numerals and the like are not phone numbers).
EMAIL_RE = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Digit groups joined by spaces, dots, dashes, optional +country and (area) code: 555-123-4567,
# +44 20 7946 0958, (030) 1234 5678. Only matches with >= PHONE_MIN_DIGITS digits count, so dates
# (2024-01-15) and versions (3.11.7) survive.
PHONE_RE = re.compile(
    r"(?<![\w+])(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{2,5}\)[ .-]?)?[0-9]{2,5}(?:[ .-][0-9]{2,5}){1,4}(?![\w])"
)
PHONE_MIN_DIGITS = 9
DIGIT_RUN_RE = re.compile(r"(?<![0-9])[0-9]{9,}(?![0-9])")  # card, account, id numbers
EMAIL_MASK, PHONE_MASK, NUMBER_MASK = "[EMAIL]", "[PHONE]", "[NUMBER]"


def normalize(text: str) -> str:
    """Strip a leading BOM, turn CRLF / CR into LF, compose to Unicode NFC."""
    text = text.removeprefix("\ufeff")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Mask e-mail addresses, phone numbers and long digit runs; return the text and the counts."""
    counts = {"emails": 0, "phones": 0, "digit_runs": 0}

    def email(_: re.Match) -> str:
        counts["emails"] += 1
        return EMAIL_MASK

    def phone(m: re.Match) -> str:
        if sum(ch.isdigit() for ch in m.group()) < PHONE_MIN_DIGITS:
            return m.group()
        counts["phones"] += 1
        return PHONE_MASK

    def digits(_: re.Match) -> str:
        counts["digit_runs"] += 1
        return NUMBER_MASK

    # E-mails first (they may hold digits), then phone numbers, then what is left of long numbers.
    text = EMAIL_RE.sub(email, text)
    text = PHONE_RE.sub(phone, text)
    text = DIGIT_RUN_RE.sub(digits, text)
    return text, counts


@dataclass
class CleanStats:
    documents_in: int = 0
    empty_removed: int = 0
    duplicates_removed: int = 0
    emails: int = 0
    phones: int = 0
    digit_runs: int = 0


class Cleaner:
    """Cleans documents one by one; returns None for a document to drop (empty or a duplicate).

    Deterministic: a fresh Cleaner over the same documents keeps and drops the same ones, which lets
    data preparation read a corpus in several passes instead of holding it in memory.
    """

    def __init__(self, dedup: bool = False, scrub: bool = False) -> None:
        self.dedup, self.scrub = dedup, scrub
        self.stats = CleanStats()
        self._seen: set[bytes] = set()  # 16-byte digests, not texts: dedup of large corpora fits in RAM

    def __call__(self, text: str) -> str | None:
        self.stats.documents_in += 1
        text = normalize(text)
        if not text.strip():
            self.stats.empty_removed += 1
            return None
        if self.dedup:  # exact duplicates, judged before masking (masks would make texts equal)
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if digest in self._seen:
                self.stats.duplicates_removed += 1
                return None
            self._seen.add(digest)
        if self.scrub:
            text, counts = scrub_pii(text)
            self.stats.emails += counts["emails"]
            self.stats.phones += counts["phones"]
            self.stats.digit_runs += counts["digit_runs"]
        return text
