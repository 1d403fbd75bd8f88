"""Generation parameters: one validated dataclass, recorded with every result.

Names follow `transformers` (`top_k`, `top_p`, `min_p`, `typical_p`, `repetition_penalty`,
`no_repeat_ngram_size`, `num_beams`, ...) and OpenAI (`n`, `stop`, `presence_penalty`,
`frequency_penalty`, `logit_bias`, `logprobs`), so a request from either world maps one to one.
A value out of range raises `AigcError` naming the parameter and the allowed range.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from aigc.errors import AigcError

MAX_TOP_LOGPROBS = 20


@dataclass
class GenerationParams:
    """How to decode. Defaults: plain sampling at temperature 1 for 128 new tokens."""

    max_new_tokens: int = 128
    # sampling: temperature 0 (or do_sample=False) is greedy
    temperature: float = 1.0
    do_sample: bool | None = None  # None: sample unless temperature == 0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    typical_p: float = 1.0  # 1: off
    # penalties
    repetition_penalty: float = 1.0  # HF/CTRL: over prompt + generated tokens; 1: off
    presence_penalty: float = 0.0  # OpenAI: over generated tokens; 0: off
    frequency_penalty: float = 0.0  # OpenAI: over generated tokens; 0: off
    no_repeat_ngram_size: int = 0  # 0: off
    bad_words: list[str] = field(
        default_factory=list
    )  # strings never to produce (tokenized by the text layer)
    bad_words_ids: list[list[int]] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # beam search
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: int = 1
    # requests
    n: int = 1  # independent samples, seeds seed, seed+1, ...
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    # safety: green-list watermark with the deployment's key (aigc.safety.watermark_text)
    watermark: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        self.validate()

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Raise AigcError for the first invalid value, naming the parameter and its allowed range."""
        _int("max_new_tokens", self.max_new_tokens, lo=0)
        _num("temperature", self.temperature, lo=0.0, rule="a number >= 0 (0 = greedy)")
        _int("top_k", self.top_k, lo=0, rule="an integer >= 0 (0 = off)")
        _num("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True, rule="a number in (0, 1] (1 = off)")
        _num("min_p", self.min_p, lo=0.0, hi=1.0, rule="a number in [0, 1] (0 = off)")
        _num("typical_p", self.typical_p, lo=0.0, hi=1.0, lo_open=True, rule="a number in (0, 1] (1 = off)")
        _num(
            "repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True, rule="a number > 0 (1 = off)"
        )
        _num("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0, rule="a number in [-2, 2] (0 = off)")
        _num(
            "frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0, rule="a number in [-2, 2] (0 = off)"
        )
        _int("no_repeat_ngram_size", self.no_repeat_ngram_size, lo=0, rule="an integer >= 0 (0 = off)")
        _int("num_beams", self.num_beams, lo=1, rule="an integer >= 1 (1 = no beam search)")
        _num("length_penalty", self.length_penalty, rule="a finite number")
        if self.early_stopping not in (True, False, "never"):
            raise AigcError(
                f"early_stopping={self.early_stopping!r} is invalid; allowed: true, false or 'never'"
            )
        _int("num_return_sequences", self.num_return_sequences, lo=1, rule="an integer >= 1")
        _int("n", self.n, lo=1, hi=128, rule="an integer in [1, 128]")
        _int(
            "top_logprobs",
            self.top_logprobs,
            lo=0,
            hi=MAX_TOP_LOGPROBS,
            rule=f"an integer in [0, {MAX_TOP_LOGPROBS}]",
        )
        if not isinstance(self.watermark, bool):
            raise AigcError(f"watermark={self.watermark!r} is invalid; allowed: true or false")
        if self.seed is not None:
            _int("seed", self.seed, lo=0, hi=2**63 - 1, rule="an integer in [0, 2**63)")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise AigcError(f"stop={self.stop!r} is invalid; allowed: a list of non-empty strings")
        if not all(isinstance(s, str) and s for s in self.bad_words):
            raise AigcError(f"bad_words={self.bad_words!r} is invalid; allowed: a list of non-empty strings")
        for seq in self.bad_words_ids:
            if not seq or not all(isinstance(t, int) and t >= 0 for t in seq):
                raise AigcError(
                    f"bad_words_ids={self.bad_words_ids!r} is invalid; allowed: non-empty lists of token ids"
                )
        for t in self.stop_token_ids:
            _int("stop_token_ids", t, lo=0, rule="a list of token ids >= 0")
        for v in self.logit_bias.values():
            _num("logit_bias", v, lo=-100.0, hi=100.0, rule="token id -> a number in [-100, 100]")
        # beam search is deterministic: refuse sampling options rather than silently ignoring them
        if self.num_beams > 1:
            sampling = {
                "do_sample": (self.do_sample, (None, False)),
                "top_k": (self.top_k, (0,)),
                "top_p": (self.top_p, (1.0,)),
                "min_p": (self.min_p, (0.0,)),
                "typical_p": (self.typical_p, (1.0,)),
                "presence_penalty": (self.presence_penalty, (0.0,)),
                "frequency_penalty": (self.frequency_penalty, (0.0,)),
                "n": (self.n, (1,)),
            }
            for name, (value, neutral) in sampling.items():
                if value not in neutral:
                    raise AigcError(
                        f"num_beams={self.num_beams} cannot be combined with {name}={value!r}: beam search is "
                        f"deterministic; drop {name} (use num_return_sequences for several beams) or set num_beams=1"
                    )
            if self.num_return_sequences > self.num_beams:
                raise AigcError(
                    f"num_return_sequences={self.num_return_sequences} must be <= num_beams={self.num_beams}; "
                    "raise num_beams or lower num_return_sequences"
                )
        elif self.num_return_sequences != 1:
            raise AigcError(
                f"num_return_sequences={self.num_return_sequences} needs beam search (num_beams > 1); "
                "use n for several samples"
            )
        if self.do_sample is True and self.temperature == 0:
            raise AigcError(
                "do_sample=true cannot be combined with temperature=0 (greedy); set temperature > 0"
            )

    # ------------------------------------------------------------------ derived values

    @property
    def sampling(self) -> bool:
        """True when tokens are drawn at random (else greedy / beam search)."""
        if self.num_beams > 1:
            return False
        if self.do_sample is None:
            return self.temperature > 0
        return self.do_sample

    def resolved(self, seed: int | None = None) -> GenerationParams:
        """A copy with a concrete seed (given, own, or fresh random) so the result can be reproduced."""
        return dataclasses.replace(self, seed=self.resolved_seed(seed))

    def replace_checked_by_caller(self, **changes: Any) -> GenerationParams:
        """A copy with `changes` that the caller has made valid, not validated again: what
        `dataclasses.replace` gives (2.0 against 6.8 us, quiet; a server copies the parameters for
        each row of every request). For values that did not come from a user."""
        new = copy.copy(self)
        new.__dict__.update(changes)
        if "logit_bias" not in changes:  # (replace's __post_init__ makes a fresh dict)
            new.logit_bias = dict(self.logit_bias)
        return new

    def resolved_seed(self, seed: int | None = None) -> int:
        """The seed `resolved` gives: `seed`, else the own one, else a fresh random one."""
        if seed is None:
            seed = self.seed if self.seed is not None else secrets.randbits(63)
        return int(seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for provenance (logit_bias keys become strings, as in JSON)."""
        # what dataclasses.asdict gives (fresh lists), ~10x faster: one per served request
        d = {name: getattr(self, name) for name in _FIELD_NAMES}
        d.update(
            bad_words=list(self.bad_words),
            bad_words_ids=[list(w) for w in self.bad_words_ids],
            logit_bias={str(k): v for k, v in self.logit_bias.items()},
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
        )
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationParams:
        """Build from a dict (e.g. a stored result); unknown keys are an error listing the valid ones."""
        unknown = sorted(set(data).difference(_FIELD_NAMES))
        if unknown:
            valid = ", ".join(sorted(_FIELD_NAMES))
            raise AigcError(f"unknown generation parameter {unknown[0]!r}; valid: {valid}")
        return cls(**data)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(GenerationParams))


def make_params(
    params: GenerationParams | dict[str, Any] | None = None, **overrides: Any
) -> GenerationParams:
    """GenerationParams from an instance, a dict and/or keyword overrides (None values are ignored)."""
    base = dataclasses.asdict(params) if isinstance(params, GenerationParams) else dict(params or {})
    base.update({k: v for k, v in overrides.items() if v is not None})
    return GenerationParams.from_dict(base)


# ---------------------------------------------------------------------------- checks


def _num(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    rule: str = "",
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        raise AigcError(f"{name}={value!r} is out of range; allowed: {rule or 'a finite number'}")


def _int(name: str, value: Any, lo: int | None = None, hi: int | None = None, rule: str = "") -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and lo is not None:
        ok = value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        raise AigcError(f"{name}={value!r} is out of range; allowed: {rule or f'an integer >= {lo}'}")
