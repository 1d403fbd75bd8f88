"""Text language models (gpt, lstm): the run config, the `TextTask`, and `train_text`.

Batches are random windows of `model.block_size + 1` tokens from the prepared `train.bin`,
drawn with a seeded `torch.Generator` the task owns (its state is in every checkpoint, so a resumed
run draws the same windows). Under DDP every rank draws the same global micro-batch and keeps its
own contiguous slice. Validation uses a fixed set of windows (same seed every evaluation), so val
losses along a run, and between runs with the same data, compare; bits per byte
(`val_loss * val_tokens / (val_bytes * ln 2)`) also compares char and BPE models.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc import config as C
from aigc.errors import AigcError, ConfigError
from aigc.training.config import TrainConfig
from aigc.training.task import Context, Task, TaskState, Throughput, adamw
from aigc.utils.compile import can_compile
from aigc.utils.paths import hide_host_paths

TEXT_FAMILIES = ("gpt", "lstm")


# ----------------------------------------------------------------------------- configs


@dataclass
class SampleConfig:
    """Samples written to samples/ (and the card) at the end of training."""

    num: int = 1
    tokens: int = 200
    temperature: float = 0.8
    top_k: int = 40
    prompt: str = ""  # empty = start from a newline (char) or end-of-text (bpe)


# The time-budget recipes of PERFORMANCE-NOTES.md: at 90 s many small steps win (4 layers x 128,
# context 64, batch 12, lr 5e-3); at 600 s a 192-wide model with context 128 (lr 3e-3); longer
# budgets afford a larger model. `preset = "auto"` picks the row for `train.max_time`.
AUTO_GPT = [
    # (max_time up to, model, train)
    (150, {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}, {"lr": 5e-3, "batch_size": 12}),
    (900, {"n_layer": 4, "n_head": 4, "n_embd": 192, "block_size": 128}, {"lr": 3e-3, "batch_size": 12}),
    (math.inf, {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256}, {"lr": 1e-3, "batch_size": 16}),
]
AUTO_LSTM = [
    (150, {"n_layer": 1, "n_embd": 128, "n_hidden": 256, "block_size": 64}, {"lr": 5e-3, "batch_size": 12}),
    (900, {"n_layer": 2, "n_embd": 192, "n_hidden": 384, "block_size": 128}, {"lr": 3e-3, "batch_size": 12}),
    (
        math.inf,
        {"n_layer": 2, "n_embd": 256, "n_hidden": 768, "block_size": 256},
        {"lr": 2e-3, "batch_size": 16},
    ),
]
AUTO_TRAIN = {
    "warmup_steps": 100,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "eval_interval": 500,
    "eval_batches": 40,
    "ckpt_interval": 500,
}


# torch.compile of the GPT cut a training step's CPU time 1.45-1.55x at the 90-second recipe's
# size (1 and 2 threads, 2-core Zen 5, torch 2.13; per-op overhead is what it removes), but the
# first compile costs ~17 s (~8 s with inductor's on-disk cache warm): it pays from a few minutes on.
AUTO_COMPILE_FROM_S = 300


def auto_preset(family: str, max_time: float | None) -> dict[str, Any]:
    """A preset dict sized to the time budget (no budget: the 90-second recipe for 3000 steps)."""
    table = AUTO_GPT if family == "gpt" else AUTO_LSTM
    budget = max_time if max_time is not None else 90
    _, model, train = next(row for row in table if budget <= row[0])
    train = {**AUTO_TRAIN, **train}
    if family == "gpt" and max_time is not None and max_time >= AUTO_COMPILE_FROM_S and can_compile():
        train["compile"] = True
    if max_time is None:
        train["max_steps"] = 3000
    return {"model": dict(model), "train": train}


def resolve_text_config(
    family: str,
    prepared: Any,
    preset: str = "auto",
    overrides: list[str] | dict[str, Any] | None = None,
    max_steps: int | None = None,
    max_time: float | None = None,
    init_from: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The resolved run config dict {"family", "model", "train", "sample", "data"}.

    Order: dataclass defaults -> preset (a shipped name, a .toml path, or "auto") -> --set
    overrides -> --max-steps / --max-time. `model.vocab_size` comes from the data's tokenizer;
    `init_from` (the source artifact's config) fixes the model shape.
    """
    from aigc.models import model_config

    if family not in TEXT_FAMILIES:
        raise AigcError(f"unknown text family {family!r}; valid: {', '.join(TEXT_FAMILIES)}")
    over = overrides if isinstance(overrides, dict) else C.parse_overrides(overrides)
    # a time budget given on the command line replaces the preset's step budget unless one is given too
    budget: dict[str, Any] = {}
    if max_time is not None:
        budget["max_time"] = max_time
        if max_steps is None and "max_steps" not in over.get("train", {}):
            budget["max_steps"] = None
    if max_steps is not None:
        budget["max_steps"] = max_steps
    time_budget = budget.get("max_time", over.get("train", {}).get("max_time"))
    base = auto_preset(family, time_budget) if preset == "auto" else C.load_preset(family, preset)
    data = C.merge(C.merge(base, over), {"train": budget} if budget else {})
    unknown = sorted(set(data) - {"model", "train", "sample"})
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r}; valid sections: model, train, sample")

    model = dict(data.get("model", {}))
    if init_from is not None:  # the source's shape; the preset's [model] table does not apply
        asked = over.get("model", {})
        changed = [k for k, v in asked.items() if k != "dropout" and init_from["model"].get(k, v) != v]
        if changed:
            raise ConfigError(
                f"--init-from fixes the model shape; cannot change model.{changed[0]} "
                "(only model.dropout may be set)"
            )
        model = {**init_from["model"], **({"dropout": asked["dropout"]} if "dropout" in asked else {})}
    vocab = prepared.tokenizer.vocab_size
    if model.get("vocab_size", 0) in (0, None):
        model["vocab_size"] = vocab
    elif model["vocab_size"] < vocab:
        raise ConfigError(
            f"model.vocab_size={model['vocab_size']} is smaller than the data's tokenizer ({vocab} tokens); "
            "leave it unset to take it from the data"
        )
    model_cfg = model_config(family, model)
    train_cfg = C.from_dict(TrainConfig, data.get("train", {}), prefix="train.")
    sample_cfg = C.from_dict(SampleConfig, data.get("sample", {}), prefix="sample.")
    meta = prepared.meta
    return {
        "family": family,
        "model": C.to_dict(model_cfg),
        "train": C.to_dict(train_cfg),
        "sample": C.to_dict(sample_cfg),
        "data": {
            "path": str(Path(prepared.path).resolve()),
            "tokenizer": dict(meta["tokenizer"]),
            "train_tokens": int(meta["train_tokens"]),
            "val_tokens": int(meta["val_tokens"]),
            "val_bytes": int(meta["val_bytes"]),
            "source": meta.get("source"),
        },
    }


# ----------------------------------------------------------------------------- the task


def check_context_fits(block_size: int, prepared: Any) -> None:
    """Each window needs block_size + 1 tokens (inputs and shifted targets) in both splits."""
    short = {name: len(arr) for name, arr in (("train", prepared.train), ("val", prepared.val))}
    for split, n in short.items():
        if split == "val" and n == 0:
            raise AigcError(
                "the data's val split is empty (prepared with --val-fraction 0): training measures val loss "
                "on it; prepare the data again with a val fraction > 0, e.g. aigc data prepare SOURCE --out DIR "
                "--val-fraction 0.1"
            )
        if n < block_size + 1:
            raise AigcError(
                f"context longer than the data: model.block_size={block_size} needs at least "
                f"{block_size + 1} tokens but the {split} split has {n}; lower it "
                f"(--set model.block_size={max(1, n - 1)}) or prepare more data"
            )


def check_batch_fits(batch_size: int, block_size: int, prepared: Any) -> None:
    """A batch may not ask for more windows than the train split has (it would only repeat them, in
    memory that grows with the batch: 20,000 windows of a 5k-token set were killed at ~24 GB)."""
    windows = len(prepared.train) - block_size
    if batch_size > windows:
        raise AigcError(
            f"train.batch_size={batch_size} is larger than the training set: its {len(prepared.train):,} "
            f"tokens hold {windows:,} windows of model.block_size+1={block_size + 1} tokens; lower it "
            f"(--set train.batch_size={windows}) or prepare more data"
        )


class TextTask(Task):
    """Next-token prediction on a prepared token stream, for any causal LM of `aigc.models`."""

    def __init__(self, family: str, model: nn.Module, prepared: Any, cfg: TrainConfig, sample: SampleConfig):
        self.family, self.model, self.data, self.cfg, self.sample_cfg = family, model, prepared, cfg, sample
        self.block_size = model.config.block_size
        check_context_fits(self.block_size, prepared)
        check_batch_fits(cfg.batch_size, self.block_size, prepared)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # the train-window cursor (checkpointed)
        self._samples: list[str] = []  # written at the end, shown in the card

    # ---------------------------------------------------------------- Task API

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        return {"model": adamw(self.model, cfg)}

    def windows(
        self, arr: np.ndarray, gen: torch.Generator, ctx: Context
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of a global batch of random windows: x, y each (B_rank, T)."""
        T = self.block_size
        starts = torch.randint(len(arr) - T, (self.cfg.batch_size,), generator=gen)  # (B_global,)
        starts = starts[ctx.rank_slice(self.cfg.batch_size)].tolist()  # (B_rank,)
        rows = np.stack([arr[i : i + T + 1] for i in starts]).astype(np.int64)  # (B_rank, T+1)
        rows = torch.from_numpy(rows).to(ctx.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]  # inputs, next-token targets

    def training_step(self, ctx: Context) -> dict[str, float]:
        model = ctx.modules["model"]
        total = 0.0
        for _ in ctx.accumulate("model"):
            x, y = self.windows(self.data.train, self.gen, ctx)
            with ctx.autocast():
                _, loss = model(x, y)
            ctx.backward(loss)
            total += loss.detach().float()
        ctx.step("model")
        return {"loss": ctx.mean(total / self.cfg.grad_accum)}

    def eval(self, ctx: Context) -> dict[str, float]:
        model = ctx.modules["model"]
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)  # the same windows every evaluation
        losses = []
        for _ in range(self.cfg.eval_batches):
            x, y = self.windows(self.data.val, gen, ctx)
            with ctx.autocast():
                _, loss = model(x, y)
            losses.append(loss.float())
        val_loss = ctx.mean(torch.stack(losses).mean())
        meta = self.data.meta
        bpb = val_loss * meta["val_tokens"] / (meta["val_bytes"] * math.log(2))
        return {"val_loss": val_loss, "val_bpb": bpb, "val_ppl": math.exp(min(val_loss, 50.0))}

    def state_dict(self) -> TaskState:
        return TaskState(tensors={"train_gen": self.gen.get_state()})

    def load_state_dict(self, state: TaskState) -> None:
        self.gen.set_state(state.tensors["train_gen"])

    def throughput(self) -> Throughput:
        tokens = self.cfg.batch_size * self.cfg.grad_accum * self.block_size
        flops = getattr(self.model, "flops_per_token", None)
        return Throughput("tokens", tokens, flops() * tokens if flops else None)

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        return dedupe_tied(self.model)

    def export(self, run_dir: Path) -> None:
        shutil.copyfile(Path(self.data.path) / "tokenizer.json", run_dir / ".tokenizer.json.tmp")
        (run_dir / ".tokenizer.json.tmp").replace(run_dir / "tokenizer.json")

    # ---------------------------------------------------------------- samples + card

    def samples(self, ctx: Context, out_dir: Path) -> list[Path]:
        from aigc.utils.io import atomic_write_text

        s = self.sample_cfg
        tok = self.data.tokenizer
        self._samples = []
        paths = []
        for i in range(s.num):
            gen = torch.Generator().manual_seed(self.cfg.seed + 100 + i)
            text = sample_text(self.model, tok, s, gen, ctx)
            self._samples.append(text)
            paths.append(atomic_write_text(out_dir / f"sample-{i}.txt", text))
        return paths

    def card(self) -> dict[str, str]:
        meta = self.data.meta
        n = (
            self.model.num_params()
            if hasattr(self.model, "num_params")
            else sum(p.numel() for p in self.model.parameters())
        )
        tk = meta["tokenizer"]
        # a card is shown and shared: the data's name, not where it lies on this machine
        where, source = hide_host_paths(str(self.data.path)), hide_host_paths(str(meta.get("source", "?")))
        data = (
            f"- prepared data: `{where}` (source: {source})\n"
            f"- tokenizer: {tk['kind']} (id {tk['id']}, {self.data.tokenizer.vocab_size} tokens)\n"
            f"- train tokens: {meta['train_tokens']:,}; val tokens: {meta['val_tokens']:,} "
            f"({meta['val_bytes']:,} bytes)"
        )
        out = {"Parameters": f"{n:,}", "Data": data}
        if self._samples:
            out["Sample text"] = "```text\n" + self._samples[0][:1000] + "\n```"
        return out


def dedupe_tied(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with each shared tensor once (the `safetensors.torch.save_model` convention, so
    `safetensors.torch.load_model` restores tied weights)."""
    from safetensors.torch import _remove_duplicate_names

    state = model.state_dict()
    for names in _remove_duplicate_names(state).values():
        for name in names:
            del state[name]
    return state


@torch.no_grad()
def sample_text(model: nn.Module, tok: Any, s: SampleConfig, gen: torch.Generator, ctx: Context) -> str:
    """Plain ancestral sampling with temperature and top-k (the generation layer does it better)."""
    if s.prompt:
        ids = tok.encode(s.prompt)
    elif tok.kind == "char" and "\n" in tok.hf.get_vocab():
        ids = tok.encode("\n")
    elif getattr(tok, "bos_id", None) is not None:  # music pieces start with <bos>
        ids = [tok.bos_id]
    else:  # documents are separated by end-of-text
        ids = [tok.eos_id if tok.eos_id is not None else 0]
    idx = torch.tensor([ids], dtype=torch.long, device=ctx.device)  # (1, T)
    T = model.config.block_size
    for _ in range(s.tokens):
        with ctx.autocast():
            logits, _ = model(idx[:, -T:])  # crop to the context, (1, t, V)
        logits = logits[:, -1, :].float() / max(s.temperature, 1e-6)  # last position
        if s.top_k:
            kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        nxt = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=gen).to(ctx.device)  # (1, 1)
        idx = torch.cat([idx, nxt], dim=1)
    return tok.decode(idx[0].tolist())


# ----------------------------------------------------------------------------- data loading


def open_prepared(path: str | Path) -> Any:
    """Prepared text (`aigc.data.load_prepared`) or music event data (the same layout), with a
    hint when the directory is missing."""
    from aigc.data import load_prepared
    from aigc.utils.io import read_json

    path = Path(path)
    if not path.exists():
        raise AigcError(
            f"prepared data directory {path} not found; create it with `aigc data prepare SOURCE --out {path}`"
        )
    if (path / "meta.json").is_file() and read_json(path / "meta.json").get("kind") == "music":
        from aigc.data.music import load_prepared_music  # event tokens train exactly like text

        return load_prepared_music(path)
    return load_prepared(path)


# ----------------------------------------------------------------------------- init-from


def read_init_source(
    path: str | Path, family: str, prepared: Any
) -> tuple[dict[str, Any], Callable[[nn.Module], None]]:
    """(model config dict, weight loader) of what `--init-from` names: a run directory of ours or a
    transformers Llama folder (gpt only, e.g. from `aigc export`). Its tokenizer must be the data's."""
    from aigc.models.hf_causal import import_llama, is_llama, read_hf_config
    from aigc.tokenizers import load_tokenizer
    from aigc.utils.io import read_json

    path = Path(path)
    if not (path / "config.json").is_file():
        raise AigcError(
            f"--init-from {path}: no config.json; give a run directory or a transformers Llama folder"
        )
    src = read_json(path / "config.json")
    if "family" in src:  # one of our runs
        if src["family"] != family:
            raise AigcError(
                f"--init-from {path} is a {src['family']!r} model; train it with `aigc train {src['family']}`"
            )
        if not (path / "model.safetensors").is_file():
            raise AigcError(f"--init-from {path}: no model.safetensors (the run never saved weights)")
        model_cfg = src["model"]

        def load(model: nn.Module) -> None:
            from safetensors.torch import load_model

            load_model(model, str(path / "model.safetensors"))
    else:  # a transformers folder: only Llama-shaped ones map onto our GPT
        if not is_llama(read_hf_config(path)):
            raise AigcError(
                f"--init-from {path} is a {src.get('model_type', '?')} transformers model; only Llama-shaped "
                "models (e.g. from `aigc export`) fine-tune here, as gpt"
            )
        if family != "gpt":
            raise AigcError(f"--init-from {path} is a transformers model; it fine-tunes as gpt, not {family}")
        gpt_cfg, state = import_llama(path)
        model_cfg = C.to_dict(gpt_cfg)

        def load(model: nn.Module) -> None:
            model.load_state_dict(state, strict=False)  # rope tables are buffers we compute ourselves

    src_tok = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
    data_tok = prepared.meta["tokenizer"]
    if src_tok is None or src_tok.id != data_tok["id"]:
        raise AigcError(
            f"--init-from {path} uses tokenizer {src_tok.id if src_tok else '(none)'} but the data at "
            f"{prepared.path} was prepared with tokenizer {data_tok['id']} ({data_tok['kind']}); "
            f"prepare the data with its tokenizer (aigc data prepare SOURCE --out DIR --tokenizer {path}), "
            "or drop --init-from to train from scratch"
        )
    return model_cfg, load


# ----------------------------------------------------------------------------- entry point


def train_text(
    family: str,
    data: str | Path,
    out: str | Path,
    preset: str = "auto",
    overrides: list[str] | dict[str, Any] | None = None,
    max_steps: int | None = None,
    max_time: float | None = None,
    resume: bool = False,
    init_from: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Any = None,
):
    """Train a gpt/lstm language model on a prepared text directory into run directory `out`."""
    from aigc.models import build_model
    from aigc.training.distributed import env_info
    from aigc.training.trainer import (
        Trainer,
        check_resumable,
        check_resume_config,
        run_dir_lock,
        seed_everything,
        start_fresh,
    )

    prepared = open_prepared(data)
    out = Path(out)
    with run_dir_lock(out):  # held to the end: a second run into `out` is refused meanwhile
        saved = None
        if resume:
            saved = check_resumable(out)
            init_from = init_from or saved.get("init_from")  # a fine-tune resumes as a fine-tune
        src = read_init_source(init_from, family, prepared) if init_from else None
        run_cfg = resolve_text_config(
            family,
            prepared,
            preset,
            overrides,
            max_steps,
            max_time,
            init_from={"model": src[0]} if src else None,
        )
        if src:
            run_cfg["init_from"] = str(Path(init_from).resolve())
        if saved is not None:
            check_resume_config(saved, run_cfg)
        train_cfg = C.from_dict(TrainConfig, run_cfg["train"])
        check_context_fits(run_cfg["model"]["block_size"], prepared)
        check_batch_fits(train_cfg.batch_size, run_cfg["model"]["block_size"], prepared)
        if saved is None and env_info().is_main:  # under DDP only rank 0 touches the run directory
            start_fresh(out, overwrite, log)
        seed_everything(train_cfg.seed)
        model = build_model(family, run_cfg["model"])
        if src:
            src[1](model)
        task = TextTask(family, model, prepared, train_cfg, C.from_dict(SampleConfig, run_cfg["sample"]))
        return Trainer(task, train_cfg, out, run_cfg, resume=resume, progress=progress, log=log).fit()


__all__ = ["SampleConfig", "TextTask", "auto_preset", "resolve_text_config", "train_text"]
