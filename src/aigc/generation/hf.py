"""Pretrained Hugging Face causal LMs through the same generate/stream API ("hf:<dir or hub id>").

    gen = load_hf("hf:gpt2")          # or a local directory saved with save_pretrained
    gen.generate("Hello", num_beams=5, no_repeat_ngram_size=2, max_new_tokens=40)

The model's forward and its `past_key_values` (a `DynamicCache`) do the tensor work; OUR engine
does everything else: processors, per-row seeds, stop strings, streaming, beam search. Beam search
is ours too (`beam.py` follows transformers' algorithm step for step, checked against
`model.generate` in the tests), so every feature behaves the same for our models and for HF ones.

Batched prompts of different lengths are left-padded with an attention mask and explicit
position ids (the usual HF recipe); finished rows leave the batch via the cache's
`reorder_cache`. Weights are read only from safetensors (`use_safetensors=True`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aigc.errors import AigcError
from aigc.generation.text import TextGenerator


class HFTokenizer:
    """The small tokenizer interface the generator needs, over a transformers tokenizer."""

    kind = "hf"

    def __init__(self, tok: Any, eos_id: int | None = None) -> None:
        self.tok = tok
        self.eos_id = eos_id if eos_id is not None else tok.eos_token_id
        self.bos_id = tok.bos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


class HFDecoder:
    """Decoder protocol (see `decoders.py`) over a transformers causal LM and its KV cache."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        cfg = model.config
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_len: int | None = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None
        )
        self.device = next(model.parameters()).device
        self.cache = None
        self.mask: torch.Tensor | None = None  # (B, S) 1 = real token, 0 = left padding

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int | None = None) -> torch.Tensor:
        from transformers import DynamicCache

        L = max(len(p) for p in prompts)
        pad = 0
        ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p in prompts], device=self.device)  # (B, L)
        self.mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        position_ids = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (B, L): real positions under left padding
        self.cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1].float()  # (B, V)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)
        out = self.model(
            input_ids=tokens[:, None].to(self.device),
            attention_mask=self.mask,
            position_ids=positions[:, None].to(self.device),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        index = index.to(self.device)
        self.cache.reorder_cache(index)
        self.mask = self.mask.index_select(0, index)


class HFTextGenerator(TextGenerator):
    """TextGenerator for a transformers causal LM; chat uses the tokenizer's template if it has one."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str = "hf") -> None:
        # end of text: the tokenizer's EOS and every EOS the model's generation config lists
        gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = [tokenizer.eos_token_id] + (gc_eos if isinstance(gc_eos, list) else [gc_eos])
        eos_ids = list(dict.fromkeys(e for e in eos_ids if e is not None))
        super().__init__(
            model,
            HFTokenizer(tokenizer, eos_ids[0] if eos_ids else None),
            model_id=model_id,
            decoder=HFDecoder(model),
        )
        self.engine.eos_id = eos_ids or None
        self.hf_tokenizer = tokenizer

    def format_chat(self, messages: Sequence[dict[str, str]]) -> str:
        if getattr(self.hf_tokenizer, "chat_template", None):
            return self.hf_tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
        return super().format_chat(messages)

    def encode(self, text: str) -> list[int]:
        # a chat template already holds its special tokens: don't add a second BOS
        if (
            getattr(self.hf_tokenizer, "chat_template", None)
            and self.hf_tokenizer.bos_token
            and text.startswith(self.hf_tokenizer.bos_token)
        ):
            return self.hf_tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def chat_stops(self) -> list[str]:
        return [] if getattr(self.hf_tokenizer, "chat_template", None) else super().chat_stops()


# files a saved transformers tokenizer has one of (to say "no tokenizer" when loading it failed)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _first_line(e: Exception) -> str:
    line = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return line.rstrip(":")


def load_hf(spec: str, dtype: torch.dtype | None = None) -> HFTextGenerator:
    """`hf:<local dir or hub id>` -> HFTextGenerator (AutoModelForCausalLM + AutoTokenizer)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:  # pragma: no cover - depends on the environment
        raise AigcError("hf: models need transformers: pip install 'aigc[hf]'") from None
    if dtype == torch.int8:
        raise AigcError("int8 weights are for our own GPT runs; load hf: models in float32 or bfloat16")
    name = spec.removeprefix("hf:")
    if not name:
        raise AigcError("empty hf: spec; use hf:<local directory> or hf:<hub id>, e.g. hf:gpt2")
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise AigcError(
                f"{name} is not a directory; hf: needs a saved transformers model folder or a hub id"
            )
        missing = [f for f in ("config.json",) if not (path / f).is_file()]
        if not any(path.glob("*.safetensors")):
            missing.append("*.safetensors weights")
        if missing:
            raise AigcError(
                f"{path} is not a transformers model folder: missing {', '.join(missing)} "
                "(save one with model.save_pretrained(dir, safe_serialization=True))"
            )
        name = str(path)
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    # transformers says what is wrong with a folder as an OSError or a ValueError (many lines)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        if looks_local and not any((path / f).is_file() for f in TOKENIZER_FILES):
            why = f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
        else:
            why = f"cannot load the tokenizer of hf:{name} ({_first_line(e)})"
        raise AigcError(f"{why}; save it beside the model with tokenizer.save_pretrained(dir)") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise AigcError(f"cannot load hf:{name}: {_first_line(e)}") from None
    return HFTextGenerator(model, tok, model_id=f"hf:{name}")
