"""Export trained models to other ecosystems' formats.

`export_hf(model, tokenizer, out_dir)` writes a folder that `transformers` loads with no extra code:

  config.json             LlamaConfig (architectures ["LlamaForCausalLM"])
  model.safetensors       weights under Llama names (see aigc/models/hf_causal.py for the map)
  generation_config.json  bos/eos ids
  tokenizer.json, tokenizer_config.json   via `tokenizer.save_pretrained`

Only our GPT exports: it is Llama-shaped, so `LlamaForCausalLM` computes the same logits. The LSTM
has no transformers class; its weights stay in the artifact's model.safetensors. The folder is
built in a staging directory and moved into place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from aigc.errors import AigcError
from aigc.models.gpt import GPT, GPTConfig
from aigc.models.hf_causal import to_llama_state
from aigc.utils.io import atomic_write_json, building_dir, prepare_out_dir

FORMATS = ("hf",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def llama_config(
    cfg: GPTConfig, dtype: torch.dtype = torch.float32, eos_id: int | None = None
) -> dict[str, Any]:
    """The config.json of `transformers.LlamaConfig` describing our GPT."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": None,  # our models start from the prompt; no BOS token is prepended
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "dtype": str(dtype).removeprefix("torch."),
    }


def export_hf(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    dtype: torch.dtype | str = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write `model` (our GPT) and `tokenizer` as a transformers folder at `out_dir`.

    Args:
        model: a trained `GPT`; other families are refused with an AigcError.
        tokenizer: an `aigc.tokenizers.Tokenizer` (anything with `save_pretrained(dir)` and `eos_id`).
        out_dir: the folder to create; a non-empty one is replaced only with `overwrite`.
        dtype: weights' dtype on disk, torch.float32 or torch.bfloat16 (or their names).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise AigcError(f"unknown export dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise AigcError(f"cannot export weights as {dtype}; valid dtypes: {', '.join(DTYPES)}")
    if not isinstance(model, GPT):
        raise AigcError(
            f"only gpt models export to Hugging Face format (transformers has no class for {type(model).__name__}); "
            "use the artifact's model.safetensors + config.json with aigc instead"
        )
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and vocab > model.config.vocab_size:
        raise AigcError(
            f"tokenizer has {vocab} tokens but the model only {model.config.vocab_size}; "
            "export the tokenizer the model was trained with"
        )
    from safetensors.torch import save_file

    out_dir = prepare_out_dir(out_dir, overwrite)
    eos_id = getattr(tokenizer, "eos_id", None)
    with building_dir(out_dir) as stage:
        atomic_write_json(stage / "config.json", llama_config(model.config, dtype, eos_id))
        save_file(to_llama_state(model, dtype), str(stage / "model.safetensors"), metadata={"format": "pt"})
        # no max_length: transformers warns when it meets max_new_tokens; the context length is
        # config.json's max_position_embeddings
        generation = {"bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None}
        atomic_write_json(stage / "generation_config.json", generation)
        tokenizer.save_pretrained(stage)
    return out_dir


def export_artifact(run: str | Path, out_dir: str | Path, fmt: str = "hf", **kwargs: Any) -> Path:
    """Export a trained run directory (see aigc.registry) in format `fmt` to `out_dir`."""
    if fmt not in FORMATS:
        raise AigcError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    from aigc.registry import load_artifact, read_artifact_config

    family = read_artifact_config(run)["family"]
    exported = Path(run) / "diffusers" / "model_index.json"
    if family == "diffusion" and exported.is_file():  # training wrote the diffusers export already
        raise AigcError(
            f"{run} is a diffusion model, already exported in diffusers format at {exported.parent} "
            f"(how to load it: {Path(run) / 'card.md'}); copy that folder, --format hf is for gpt models only"
        )
    if family != "gpt":  # say so before loading any weights
        raise AigcError(
            f"{run} is a {family} model; only gpt models export to Hugging Face format (transformers "
            "has no class for it): use the run's model.safetensors + config.json with aigc instead"
        )
    art = load_artifact(run)
    if art.tokenizer is None:
        raise AigcError(f"{run} has no tokenizer.json; a text model exports together with its tokenizer")
    return export_hf(art.model, art.tokenizer, out_dir, **kwargs)


__all__ = ["DTYPES", "FORMATS", "export_artifact", "export_hf", "llama_config"]
