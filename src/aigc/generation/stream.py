"""Streaming text out of a growing list of token ids, and stop strings.

A byte-level BPE token can hold half of a UTF-8 character (one Chinese character is 3 bytes, an
emoji 4, often split over 2-3 tokens); decoding such a prefix gives U+FFFD. `Detokenizer` decodes
a short window of the growing sequence and emits only the stable part: text before a trailing
U+FFFD is held back until the next tokens complete the character (the vLLM / TGI offset scheme,
which also keeps each step O(1) instead of decoding everything again).

`StopMatcher` finds stop strings in the streamed text and holds back any tail that could still
become a stop string, so a stream never shows text that the final result cuts off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Turn token ids, one at a time, into text deltas that never split a character."""

    def __init__(self, decode: Callable[[list[int]], str], prefix_ids: Sequence[int] = ()) -> None:
        # `prefix_ids`: context (e.g. the prompt's last tokens) so a first token decodes as it does
        # mid-text (tokenizers that drop a leading space at the start of a text)
        self.decode = decode
        self.ids: list[int] = list(prefix_ids)[-4:]
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = len(self.ids)  # ids before this are already emitted

    @classmethod
    def reading(cls, decode: Callable[[list[int]], str], ids: list[int], start: int) -> Detokenizer:
        """A detokenizer over `ids`, a list its owner appends the tokens to (no `add` per token):
        the text of `ids[start:]`, with up to 4 ids before `start` as context (as `prefix_ids`)."""
        d = cls(decode)
        d.ids, d.prefix_offset, d.read_offset = ids, max(0, start - 4), start
        return d

    def push(self, token: int) -> str:
        """Add one token; return the newly stable text (possibly '')."""
        self.ids.append(int(token))
        return self.take()

    def add(self, token: int) -> None:
        """Add one token without decoding yet: a later `take()` or `flush()` returns its text (a
        server decodes a row's tokens a few at a time: two decodes per delta, not per token)."""
        self.ids.append(int(token))

    def take(self) -> str:
        """The newly stable text of the tokens added since the last delta (possibly '')."""
        if self.read_offset >= len(self.ids):
            return ""
        prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character decodes as U+FFFD here)."""
        if self.read_offset >= len(self.ids):
            return ""
        prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Feed text deltas; get back what is safe to show and whether a stop string was hit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # everything fed so far
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add a delta; return the text that can be shown now (stop string and what follows are cut)."""
        if self.stopped or not delta:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += delta
        # 1. a complete stop string: cut there (the earliest one wins)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        # 2. hold back a tail that is the beginning of some stop string
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self._emit(len(self.text) - hold)

    def flush(self) -> str:
        """At the end of generation, release the held-back tail (it never became a stop string)."""
        return "" if self.stopped else self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out

    @property
    def final_text(self) -> str:
        """The text up to (not including) the first stop string."""
        return self.text[: self.emitted] if self.stopped else self.text


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the first stop string; return (text, whether one was found)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)
