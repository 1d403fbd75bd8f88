"""Hugging Face causal LMs on our side of the fence: Llama <-> GPT weights, and a wrapper for the rest.

Our GPT is Llama-shaped (see gpt.py), so the two convert exactly, tensor for tensor:

  ours                          transformers LlamaForCausalLM
  tok_emb.weight                model.embed_tokens.weight
  blocks.N.attn_norm.weight     model.layers.N.input_layernorm.weight
  blocks.N.attn.qkv.weight      model.layers.N.self_attn.{q,k,v}_proj.weight   (rows split H:K:K)
  blocks.N.attn.proj.weight     model.layers.N.self_attn.o_proj.weight
  blocks.N.mlp_norm.weight      model.layers.N.post_attention_layernorm.weight
  blocks.N.mlp.gate_up.weight   model.layers.N.mlp.{gate,up}_proj.weight       (rows split 1:1)
  blocks.N.mlp.down.weight      model.layers.N.mlp.down_proj.weight
  norm.weight                   model.norm.weight
  lm_head.weight                lm_head.weight (absent when tie_word_embeddings)

`import_llama(dir)` reads a LlamaForCausalLM folder (ours from `aigc export`, or any Llama with
default RoPE and no biases) into a GPTConfig + state dict, so fine-tuning runs on our fast model.
`HFCausalLM` wraps any other `AutoModelForCausalLM` folder behind our forward(idx, targets)
interface. Only safetensors are read; transformers is imported only when a wrapper is built.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from aigc.errors import AigcError
from aigc.models.gpt import GPT, GPTConfig

# ----------------------------------------------------------------------------- GPT <-> Llama names


def to_llama_state(model: GPT, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our GPT's weights under LlamaForCausalLM names (fused projections split; tied head omitted)."""
    cfg = model.config
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim

    def t(x: torch.Tensor) -> torch.Tensor:  # own, contiguous storage: safetensors refuses views
        return x.detach().to(dtype or x.dtype).contiguous().clone()

    out = {"model.embed_tokens.weight": t(model.tok_emb.weight), "model.norm.weight": t(model.norm.weight)}
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = b.attn.qkv.weight.split([H * D, K * D, K * D], dim=0)
        gate, up = b.mlp.gate_up.weight.chunk(2, dim=0)
        out |= {
            p + "input_layernorm.weight": t(b.attn_norm.weight),
            p + "self_attn.q_proj.weight": t(q),
            p + "self_attn.k_proj.weight": t(k),
            p + "self_attn.v_proj.weight": t(v),
            p + "self_attn.o_proj.weight": t(b.attn.proj.weight),
            p + "post_attention_layernorm.weight": t(b.mlp_norm.weight),
            p + "mlp.gate_proj.weight": t(gate),
            p + "mlp.up_proj.weight": t(up),
            p + "mlp.down_proj.weight": t(b.mlp.down.weight),
        }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t(model.lm_head.weight)
    return out


def from_llama_state(cfg: GPTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `to_llama_state`: a state dict our GPT(cfg) loads with `strict=True`."""

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise AigcError(
                f"Llama weights are missing {name}; the folder is incomplete or not a LlamaForCausalLM"
            )
        return state[name].float()

    out = {"tok_emb.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    for i in range(cfg.n_layer):
        p, a = f"model.layers.{i}.", f"blocks.{i}."
        out |= {
            a + "attn_norm.weight": get(p + "input_layernorm.weight"),
            a + "attn.qkv.weight": torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
            a + "attn.proj.weight": get(p + "self_attn.o_proj.weight"),
            a + "mlp_norm.weight": get(p + "post_attention_layernorm.weight"),
            a + "mlp.gate_up.weight": torch.cat(
                [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]
            ),
            a + "mlp.down.weight": get(p + "mlp.down_proj.weight"),
        }
    # a tied model shares one matrix; load_state_dict needs the name present either way
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else get("lm_head.weight")
    return out


# ----------------------------------------------------------------------------- reading a folder


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json of a transformers folder, checking the folder has safetensors weights."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise AigcError(f"{path} is not a transformers model folder: no config.json")
    if not any(path.glob("*.safetensors")):
        hint = " (only pytorch_model.bin, which is never loaded: pickle)" if any(path.glob("*.bin")) else ""
        raise AigcError(
            f"{path} has no *.safetensors weights{hint}; re-save it with "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    with open(path / "config.json", encoding="utf-8") as f:
        return json.load(f)


def read_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's model.safetensors, or of the shards its index lists."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise AigcError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state |= load_file(str(path / name))
    return state


def is_llama(hf_config: dict[str, Any]) -> bool:
    return hf_config.get("model_type") == "llama" or "LlamaForCausalLM" in hf_config.get("architectures", [])


def llama_to_gpt_config(c: dict[str, Any]) -> GPTConfig:
    """GPTConfig of a Llama config.json; refuses the variants our GPT does not implement."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {
        "rope scaling": rope_type != "default",
        "attention biases": c.get("attention_bias", False),
        "MLP biases": c.get("mlp_bias", False),
        f"activation {c.get('hidden_act')}": c.get("hidden_act", "silu") != "silu",
        "a head_dim other than hidden_size / num_attention_heads": c.get("head_dim")
        not in (None, c["hidden_size"] // c["num_attention_heads"]),
    }
    bad = [name for name, yes in unsupported.items() if yes]
    if bad:
        raise AigcError(
            f"this Llama uses {', '.join(bad)}, which our GPT does not implement; "
            "fine-tune it through the generic transformers wrapper instead (HFCausalLM)"
        )
    try:
        cfg = GPTConfig(
            vocab_size=c["vocab_size"],
            block_size=c.get("max_position_embeddings", 2048),
            n_layer=c["num_hidden_layers"],
            n_head=c["num_attention_heads"],
            n_kv_head=c.get("num_key_value_heads") or None,
            n_embd=c["hidden_size"],
            mlp_hidden=c["intermediate_size"],
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            init_std=float(c.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise AigcError(f"Llama config.json lacks {e.args[0]!r}; the folder is incomplete") from None
    except ValueError as e:
        raise AigcError(f"Llama config.json does not fit our GPT: {e}") from None
    if cfg.mlp_hidden == dataclasses.replace(cfg, mlp_hidden=None).hidden_dim:
        cfg.mlp_hidden = None  # the default rule gives it: keep the config as we would write it
    return cfg


def import_llama(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """A LlamaForCausalLM folder -> (GPTConfig, state dict for our GPT), from safetensors only."""
    hf_config = read_hf_config(path)
    if not is_llama(hf_config):
        raise AigcError(
            f"{path} holds a {hf_config.get('model_type', '?')} model, not a Llama; only Llama-shaped "
            "models convert to our GPT (others run through HFCausalLM)"
        )
    cfg = llama_to_gpt_config(hf_config)
    return cfg, from_llama_state(cfg, read_safetensors_dir(path))


# ----------------------------------------------------------------------------- any causal LM


@dataclass
class HFCausalConfig:
    """What the trainer and generation need to know about a wrapped transformers model."""

    path: str
    vocab_size: int
    block_size: int
    model_type: str = ""


class HFCausalLM(nn.Module):
    """`AutoModelForCausalLM.from_pretrained(local_dir)` behind our language-model interface."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        super().__init__()
        hf_config = read_hf_config(path)
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:  # pragma: no cover - depends on the environment
            raise AigcError(
                "loading a transformers model needs transformers: pip install 'aigc[hf]'"
            ) from None
        try:
            self.hf = AutoModelForCausalLM.from_pretrained(
                str(path), use_safetensors=True, local_files_only=True, dtype=dtype
            )
        except (OSError, ValueError, KeyError) as e:
            raise AigcError(f"transformers cannot load {path} as a causal LM: {e}") from None
        c = self.hf.config
        block = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 1024
        self.config = HFCausalConfig(
            path=str(Path(path).resolve()),
            vocab_size=self.hf.get_output_embeddings().weight.shape[0],
            block_size=int(block),
            model_type=hf_config.get("model_type", ""),
        )

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, V), mean cross-entropy vs targets (-1 ignored) or None)."""
        logits = self.hf(input_ids=idx, use_cache=False).logits  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """6 x (2-D weights but embedding tables, plus the head) + attention at full context."""
        lookups = {id(m.weight) for m in self.hf.modules() if isinstance(m, nn.Embedding)}
        matmul = sum(p.numel() for p in self.parameters() if p.dim() == 2 and id(p) not in lookups)
        head = self.hf.get_output_embeddings().weight
        if id(head) in lookups:  # tied: the head is an embedding table, but it still multiplies
            matmul += head.numel()
        c = self.hf.config
        layers = getattr(c, "num_hidden_layers", getattr(c, "n_layer", 0))
        width = getattr(c, "hidden_size", getattr(c, "n_embd", 0))
        return 6 * matmul + 12 * layers * width * self.config.block_size


__all__ = [
    "HFCausalConfig",
    "HFCausalLM",
    "from_llama_state",
    "import_llama",
    "is_llama",
    "llama_to_gpt_config",
    "read_hf_config",
    "read_safetensors_dir",
    "to_llama_state",
]
