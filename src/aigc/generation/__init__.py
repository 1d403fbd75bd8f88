"""Text generation: logits processors, sampling, beam search, the token-id engine, streaming.

Layers, bottom up: `processors` and `sampling` (pure functions of logits), `beam` (beam search),
`decoders` (model + KV cache / carried state), `engine` (token ids in, token ids out), `stream`
(UTF-8-safe detokenizing, stop strings), `text` (TextGenerator: the one place that joins model and
tokenizer), `hf` (pretrained transformers models through the same API).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from aigc.errors import AigcError
from aigc.generation.params import GenerationParams, make_params

if TYPE_CHECKING:
    from aigc.generation.hf import HFTextGenerator
    from aigc.generation.text import TextGenerator

ARTIFACT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def load_generator(
    spec: str | Path, dtype: Any = None, compile: bool = False
) -> TextGenerator | HFTextGenerator:
    """A text generator for a run directory of ours or `hf:<local dir or hub id>`.

    `dtype` (e.g. torch.bfloat16) sets the weights' dtype for decoding; default: as stored.
    `compile=True` compiles our GPT's decode step (the first step then takes ~15-40 s,
    1-4 s once inductor's disk cache holds it).
    """
    spec = str(spec)
    no_compile = "compile is for our own GPT runs, not transformers models; drop --compile"
    if spec.startswith("hf:"):
        from aigc.generation.hf import load_hf

        if compile:
            raise AigcError(no_compile)
        return load_hf(spec, dtype=dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        missing = [f for f in ARTIFACT_FILES if not (path / f).is_file()]
        if missing and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            from aigc.generation.hf import load_hf  # a transformers folder (e.g. from `aigc export`)

            if compile:
                raise AigcError(no_compile)
            return load_hf("hf:" + str(path), dtype=dtype)
        if missing:
            raise AigcError(
                f"{path} is not a model artifact: missing {', '.join(missing)}; pass a trained run "
                "directory (aigc train ... --out DIR) or hf:<dir or hub id>"
            )
    elif not spec or "/" in spec or "\\" in spec or spec.startswith("."):
        raise AigcError(f"model {spec!r} not found: pass a trained run directory or hf:<dir or hub id>")
    from aigc.generation.text import TextGenerator

    return TextGenerator.from_artifact(spec, dtype=dtype, compile=compile)


__all__ = ["GenerationParams", "load_generator", "make_params"]
