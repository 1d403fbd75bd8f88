"""TextGenerator: the one place that joins a model and a tokenizer.

    gen = TextGenerator.from_artifact("runs/shakespeare")
    [r] = gen.generate("ROMEO:", max_new_tokens=100, temperature=0.8, seed=1)
    for delta in gen.stream("ROMEO:"): print(delta, end="")

Everything below the text boundary is the token-id `Engine`. Each result carries its provenance:
model id, resolved seed and parameters, time; `generate(prompt, **result.params)` gives the same
text again. An empty prompt is unconditional generation: it starts from the tokenizer's BOS/EOS
token, or token 0 when it has neither (for a char model trained on text, usually a newline).

Chat: our own models have no chat template, so turns are written as plain text,

    User: <message>
    Assistant: <reply>

(plus an optional first "System: ..." line), generation stops at the next "\nUser:", and the
oldest turns are dropped when the conversation no longer fits the context. A Hugging Face
tokenizer's own chat template is used when it has one (see `hf.py`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aigc.errors import AigcError
from aigc.generation.engine import Completion, DecodeRun, Engine, Request
from aigc.generation.params import GenerationParams, make_params
from aigc.generation.stream import Detokenizer, StopMatcher

CHAT_USER, CHAT_ASSISTANT, CHAT_SYSTEM = "User: ", "Assistant: ", "System: "
CHAT_STOP = "\nUser:"


@dataclass
class GenerationResult:
    """One generated text with its provenance."""

    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length"
    seed: int | None
    params: dict[str, Any]
    usage: dict[str, int]
    model: str
    created: float = field(default_factory=time.time)
    index: int = 0  # position among the results of one call
    prompt: str = ""
    score: float | None = None  # beam search
    logprobs: list[dict[str, Any]] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TextGenerator:
    """Generate text with one of our models (GPT or LSTM) and its tokenizer."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        model_id: str = "model",
        dtype: torch.dtype | None = None,
        decoder: Any | None = None,
        compile: bool = False,
    ) -> None:
        from aigc.generation.decoders import make_decoder

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.decoder = decoder if decoder is not None else make_decoder(self.model, dtype, compile=compile)
        self.engine = Engine(self.decoder, eos_id=getattr(tokenizer, "eos_id", None))

    @classmethod
    def from_artifact(
        cls, path: str | Path, dtype: torch.dtype | None = None, compile: bool = False
    ) -> TextGenerator:
        """Load a trained run directory (config.json, model.safetensors, tokenizer.json).

        `dtype`: decoding weights (float32, bfloat16, float16 = fp16 weights with fp32 compute,
        int8 = weight-only int8); `compile`: torch.compile the decode step (see `decoders.py`).
        """
        from aigc.registry import load_artifact

        art = load_artifact(path)
        if getattr(art, "family", None) not in ("gpt", "lstm"):
            raise AigcError(
                f"{path} holds a {getattr(art, 'family', '?')} model; text generation needs gpt or lstm"
            )
        if getattr(art.tokenizer, "kind", None) == "music":
            raise AigcError(
                f"{path} is a music model; use aigc generate music (or aigc.load for a MusicGenerator)"
            )
        return cls(art.model, art.tokenizer, model_id=str(path), dtype=dtype, compile=compile)

    # ------------------------------------------------------------------ text <-> ids

    @property
    def context_length(self) -> int | None:
        return self.decoder.max_len

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt or a logit bias may name: [0, vocab_size), in the model's output and
        the tokenizer's vocabulary both."""
        return min(self.decoder.vocab_size, getattr(self.tokenizer, "vocab_size", self.decoder.vocab_size))

    def encode(self, text: str) -> list[int]:
        try:
            return list(self.tokenizer.encode(text))
        except AigcError:
            table = getattr(self.tokenizer, "_table", None)  # a char vocabulary: name what it lacks
            if getattr(self.tokenizer, "kind", None) != "char" or table is None:
                raise
            for special in table.specials:  # a special token is one id, not its characters
                text = text.replace(special, "")
            known = set(table.lookup)
            missing = [c for c in dict.fromkeys(text) if c not in known]
            if not missing:
                raise
            shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in missing[:5]) + (
                ", ..." if len(missing) > 5 else ""
            )
            raise AigcError(
                f"the text has {len(missing)} character(s) not in the char tokenizer's vocabulary, which this "
                f"model cannot encode: {shown}; the vocabulary ({len(known)} characters) was fixed when the "
                "model's data was prepared, so remove them from the prompt, or train a new model on data that "
                "contains them (aigc data prepare; its --unknown unk maps unseen characters to <unk>)"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def start_ids(self) -> list[int]:
        """Prompt ids for an empty prompt (unconditional generation)."""
        for name in ("bos_id", "eos_id"):
            t = getattr(self.tokenizer, name, None)
            if t is not None:
                return [int(t)]
        return [0]

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token sequences of strings (for bad_words): with and without a leading space."""
        out = []
        for s in texts:
            for variant in dict.fromkeys([s, " " + s.lstrip()]):
                ids = self.encode(variant)
                if ids and ids not in out:
                    out.append(ids)
        return out

    # ------------------------------------------------------------------ requests

    def _requests(
        self, prompt: str | Sequence[int], params: GenerationParams
    ) -> tuple[list[int], list[GenerationParams]]:
        """(prompt ids, one resolved params per row); `prompt` is a text or its token ids."""
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
        else:
            ids = self.encode(prompt) if prompt else self.start_ids()
        if not ids:  # e.g. a prompt that is only whitespace the tokenizer drops
            ids = self.start_ids()
        seed = params.resolved_seed()
        extra = {}
        if params.bad_words:
            extra["bad_words_ids"] = params.bad_words_ids + self.token_ids(params.bad_words)
        # n samples: seeds seed, seed+1, ... so each one is reproducible alone with its own seed (one
        # copy per row, of validated params with valid changes: a seed in range, the tokenizer's ids)
        rows = [
            params.replace_checked_by_caller(n=1, seed=(seed + k) % 2**63, **extra) for k in range(params.n)
        ]
        return ids, rows

    def generate(
        self, prompt: str | Sequence[str] = "", params: GenerationParams | dict | None = None, **kwargs: Any
    ) -> list[GenerationResult]:
        """Generate for one prompt or a list (one batch); `n` results per prompt, prompt-major.

        Parameters are GenerationParams fields (`max_new_tokens`, `temperature`, `top_p`, `seed`,
        `stop`, `num_beams`, ...), given as `params` and/or keyword arguments.
        """
        p = make_params(params, **kwargs)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return self.generate_batch([(pr, p) for pr in prompts])

    def generate_batch(self, items: Sequence[tuple[str, GenerationParams]]) -> list[GenerationResult]:
        """Generate for (prompt, params) pairs with different parameters in one batch."""
        results: list[GenerationResult | None] = []
        batch: list[tuple[int, str, Request]] = []  # (result slot, prompt, request)
        for prompt, params in items:
            ids, rows = self._requests(prompt, params)
            if params.num_beams > 1:
                results.extend(self._beam(prompt, ids, rows[0]))
                continue
            for row in rows:
                batch.append((len(results), prompt, Request(ids, row)))
                results.append(None)
        if batch:
            run = self.engine.run([r for _, _, r in batch])
            texts = self._consume(run)
            for k, (slot, prompt, req) in enumerate(batch):
                results[slot] = self._result(prompt, req.params, run.completions[k], texts[k])
        for i, r in enumerate(results):
            r.index = i
        return results  # type: ignore[return-value]

    def stream(
        self, prompt: str = "", params: GenerationParams | dict | None = None, **kwargs: Any
    ) -> TextStream:
        """Text deltas as they are generated (never half a character); `.result` when done."""
        p = make_params(params, **kwargs)
        if p.num_beams > 1 or p.n > 1:
            raise AigcError("stream() yields one text: use num_beams=1 and n=1 (or generate() for several)")
        return TextStream(self, prompt, p)

    # ------------------------------------------------------------------ internals

    def _consume(self, run: DecodeRun, on_delta=None) -> list[str]:
        """Drive a run: detokenize each row, watch stop strings, stop rows that hit one."""
        reqs = run.requests
        detoks = [Detokenizer(self.decode, r.prompt) for r in reqs]
        matchers = [StopMatcher(r.params.stop) for r in reqs]
        stop_sets = [set(self.engine.stop_ids(r.params)) for r in reqs]
        for step in run:
            for i, t in step:
                if t in stop_sets[i] or matchers[i].stopped:
                    continue  # the stop token itself is not text
                shown = matchers[i].feed(detoks[i].push(t))
                if matchers[i].stopped:
                    run.stop(i)
                if shown and on_delta is not None:
                    on_delta(i, shown)
        for i in range(len(reqs)):
            if not matchers[i].stopped:
                tail = matchers[i].feed(detoks[i].flush())
                tail += matchers[i].flush()
                if tail and on_delta is not None:
                    on_delta(i, tail)
        return [m.final_text for m in matchers]

    def _beam(self, prompt: str, ids: list[int], params: GenerationParams) -> list[GenerationResult]:
        from aigc.generation.stream import truncate_at_stop

        stops = set(self.engine.stop_ids(params))
        out = []
        for c in self.engine.beam(Request(ids, params)):
            toks = c.tokens[:-1] if c.tokens and c.tokens[-1] in stops else c.tokens
            det = Detokenizer(self.decode, ids)
            text = "".join(det.push(t) for t in toks) + det.flush()
            text, hit = truncate_at_stop(text, params.stop)
            if hit:
                c.finish_reason = "stop"
            out.append(self._result(prompt, params, c, text))
        return out

    def _result(
        self, prompt: str | Sequence[int], params: GenerationParams, c: Completion, text: str
    ) -> GenerationResult:
        if not isinstance(prompt, str):  # given as token ids
            prompt = self.decode(prompt)
        logprobs = None
        if params.logprobs:
            logprobs = [
                {
                    "token": t,
                    "text": self.decode([t]),
                    "logprob": lp,
                    "top": [{"token": a, "text": self.decode([a]), "logprob": b} for a, b in top],
                }
                for t, lp, top in zip(c.tokens, c.logprobs, c.top_logprobs, strict=True)
            ]
        return GenerationResult(
            text=text,
            tokens=list(c.tokens),
            finish_reason=c.finish_reason,
            seed=params.seed,
            params=params.to_dict(),
            usage={
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": len(c.tokens),
                "total_tokens": c.prompt_tokens + len(c.tokens),
            },
            model=self.model_id,
            prompt=prompt,
            score=c.score,
            logprobs=logprobs,
            warnings=list(c.warnings),
        )

    @torch.no_grad()
    def prompt_logprobs(self, ids: Sequence[int], top_n: int = 0) -> list[dict[str, Any]]:
        """Each prompt token's log-probability given the tokens before it (OpenAI's echo with
        logprobs), from one forward pass over the prompt; `GenerationResult.logprobs`' format.

        The first token's `logprob` and `top` are None (nothing predicts it), as are those of the
        tokens before the last `context_length` (the pass covers what the model can see). Like the
        generated tokens', they are the model's raw distribution (no penalties or filters).
        """
        from aigc.generation.sampling import token_logprobs

        ids = [int(t) for t in ids]
        ctx = self.context_length
        start = max(0, len(ids) - ctx) if ctx else 0
        out: list[dict[str, Any]] = [
            {"token": t, "text": self.decode([t]), "logprob": None, "top": None} for t in ids
        ]
        if len(ids) - start < 2:
            return out
        device = next(self.model.parameters()).device
        x = torch.tensor([ids[start:]], device=device)  # (1, T)
        res = self.model(x)  # ours: (logits, loss); transformers: an output with .logits
        logits = res[0] if isinstance(res, tuple) else res.logits  # (1, T, V)
        # position t predicts token t + 1
        lps, tops = token_logprobs(logits[0, :-1], x[0, 1:], top_n)  # (T - 1) each
        for item, lp, top in zip(out[start + 1 :], lps, tops, strict=True):
            item["logprob"] = lp
            item["top"] = [{"token": a, "text": self.decode([a]), "logprob": b} for a, b in top]
        return out

    # ------------------------------------------------------------------ chat

    def chat_prompt(self, messages: Sequence[dict[str, str]], max_new_tokens: int = 0) -> str:
        """The prompt for a conversation, dropping the oldest turns until it fits the context.

        `messages`: [{"role": "system"|"user"|"assistant", "content": ...}, ...], ending with a
        user message.
        """
        system = [m for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        ctx = self.context_length
        while True:
            text = self.format_chat(system + turns)
            try:
                n_tokens = len(self.encode(text))
            except AigcError as e:  # e.g. a char vocabulary without the letters of "User:"
                raise AigcError(
                    f"{e} (the chat format writes turns as {CHAT_USER!r} / {CHAT_ASSISTANT!r} lines)"
                ) from None
            if ctx is None or len(turns) <= 1 or n_tokens + max_new_tokens <= ctx:
                return text
            turns = turns[1:]  # drop the oldest message (then its reply) first
            while turns and turns[0]["role"] != "user" and len(turns) > 1:
                turns = turns[1:]

    def format_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """Plain-text chat format (see the module docstring), ending with the assistant's cue."""
        prefix = {"system": CHAT_SYSTEM, "user": CHAT_USER, "assistant": CHAT_ASSISTANT}
        lines = []
        for m in messages:
            if m["role"] not in prefix:
                raise AigcError(f"chat role {m['role']!r} is not one of system, user, assistant")
            lines.append(prefix[m["role"]] + m["content"].strip())
        return "\n".join(lines) + "\n" + CHAT_ASSISTANT.rstrip()

    def chat_stops(self) -> list[str]:
        return [CHAT_STOP]


class TextStream:
    """Iterator of text deltas for one request; `.result` holds the GenerationResult at the end."""

    def __init__(self, gen: TextGenerator, prompt: str, params: GenerationParams) -> None:
        self.gen, self.prompt, self.params = gen, prompt, params
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        gen = self.gen
        ids, rows = gen._requests(self.prompt, self.params)
        run = gen.engine.run([Request(ids, rows[0])])
        pending: list[str] = []
        reqs = run.requests
        det = Detokenizer(gen.decode, reqs[0].prompt)
        matcher = StopMatcher(rows[0].stop)
        stops = set(gen.engine.stop_ids(rows[0]))
        for step in run:
            for _, t in step:
                if t in stops or matcher.stopped:
                    continue
                pending.append(matcher.feed(det.push(t)))
                if matcher.stopped:
                    run.stop(0)
            for d in pending:
                if d:
                    yield d
            pending.clear()
        if not matcher.stopped:
            tail = matcher.feed(det.flush()) + matcher.flush()
            if tail:
                yield tail
        self.result = gen._result(self.prompt, rows[0], run.completions[0], matcher.final_text)


class ChatSession:
    """A multi-turn conversation kept within the model's context (oldest turns dropped first)."""

    def __init__(self, gen: Any, system: str | None = None, params: GenerationParams | None = None) -> None:
        self.gen = gen
        self.system = system
        self.params = params or GenerationParams(max_new_tokens=200, temperature=0.8)
        self.messages: list[dict[str, str]] = []

    def reset(self) -> None:
        self.messages = []

    def send(self, text: str) -> Iterator[str]:
        """Add a user message; yield the reply's text deltas; the reply joins the history."""
        self.messages.append({"role": "user", "content": text})
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        prompt = self.gen.chat_prompt(msgs, self.params.max_new_tokens)
        params = dataclasses.replace(self.params, stop=list(self.params.stop) + self.gen.chat_stops())
        stream = self.gen.stream(prompt, params)
        parts = []
        for d in stream:
            parts.append(d)
            yield d
        self.messages.append({"role": "assistant", "content": "".join(parts).strip()})
