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
# the command that uses a run of each kind that is not a text model
COMMAND_FOR_KIND = {
    "image": "aigc generate image",
    "music": "aigc generate music",
    "classifier": "aigc sentiment",
}


def not_a_text_model(path: Path) -> AigcError:
    """The error for a run of ours that is not a text model (an image, music or classifier run)."""
    from aigc.registry import describe_run, run_kind

    command = COMMAND_FOR_KIND.get(run_kind(path) or "")
    hint = f" (to use this run: `{command}`)" if command else ""
    return AigcError(
        f"{path} is {describe_run(path)}, not a text model; text generation needs a text run "
        f"(gpt, lstm), a transformers model folder or hf:<id>{hint}"
    )


def _transformers_config(path: Path) -> bool:
    """Whether `path`/config.json is a transformers model's (it names a `model_type`)."""
    import json

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg)


def load_generator(
    spec: str | Path, dtype: Any = None, compile: bool = False
) -> TextGenerator | HFTextGenerator:
    """A text generator for a run directory of ours or `hf:<local dir or hub id>`.

    `dtype` (e.g. torch.bfloat16) sets the weights' dtype for decoding; default: as stored.
    `compile=True` compiles our GPT's decode step (the first step then takes ~15-40 s,
    1-4 s once inductor's disk cache holds it).
    """
    from aigc.registry import TEXT_FAMILIES, describe_run, run_family, run_kind  # (imports torch)

    spec = str(spec)
    no_compile = "compile is for our own GPT runs, not transformers models; drop --compile"
    if spec.startswith("hf:"):
        from aigc.generation.hf import load_hf

        if compile:
            raise AigcError(no_compile)
        local = Path(spec.removeprefix("hf:")).expanduser()
        if local.is_dir() and run_family(local) is not None:  # one of our runs, not a transformers folder
            if run_kind(local) != "text":
                raise not_a_text_model(local)
            raise AigcError(f"{local} is {describe_run(local)} of aigc, not a transformers folder; drop hf:")
        return load_hf(spec, dtype=dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        family = run_family(path)  # None: not a run of ours (a transformers folder, or no model at all)
        if family is not None and family not in TEXT_FAMILIES:  # (a music gpt: from_artifact says so)
            raise not_a_text_model(path)
        missing = [f for f in ARTIFACT_FILES if not (path / f).is_file()]
        if missing and family is None and _transformers_config(path) and any(path.glob("*.safetensors")):
            from aigc.generation.hf import load_hf  # a transformers folder (e.g. from `aigc export`)

            if compile:
                raise AigcError(no_compile)
            return load_hf("hf:" + str(path), dtype=dtype)
        if missing:
            what = f"missing {', '.join(missing)}"
            if family is None and (path / "config.json").is_file() and not _transformers_config(path):
                what += ", and its config.json names no aigc 'family' (nor a transformers 'model_type')"
            raise AigcError(
                f"{path} is not a model artifact: {what}; pass a trained run directory "
                "(aigc train ... --out DIR), a transformers model folder or hf:<dir or hub id>"
            )
    elif not spec or "/" in spec or "\\" in spec or spec.startswith("."):
        raise AigcError(f"model {spec!r} not found: pass a trained run directory or hf:<dir or hub id>")
    from aigc.generation.text import TextGenerator

    return TextGenerator.from_artifact(spec, dtype=dtype, compile=compile)


__all__ = ["GenerationParams", "load_generator", "make_params"]
