"""Tune a text model on feedback: DPO, KTO or SFT on the store's ratings -> a new model version.

    report = tune_text("story", store=store, method="dpo")     # models/story/3 -> models/story/4

References: DPO (Rafailov et al. 2023, eq. 7, with cDPO label smoothing as in TRL's "sigmoid"
loss), KTO (Ethayarajh et al. 2024, eq. 7 as TRL's KTOTrainer computes it: the KL term is the
detached, clamped mean log-ratio of mismatched prompt/completion pairs), SFT (cross-entropy on
the completion tokens only).

One model sits in memory while training: the reference model is the starting weights, so its
log-probabilities are computed once, before the first step, and kept as tensors. The shared
`Trainer` drives the `PreferenceTask` (schedule, clipping, metrics.jsonl, loss.png, card.md).
Guard: the held-out LM loss on the original data's val split is measured before and after; if it
rose by more than `tune.max_loss_increase` (or training went non-finite), nothing is published:
the model name still resolves to the old version, the report goes to `_rejected-<version>/` next
to it, and an AigcError says so.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc import config as C
from aigc.errors import AigcError, ConfigError
from aigc.training.config import TrainConfig
from aigc.training.task import Context, Task, TaskState, adamw
from aigc.tuning.losses import (
    Seq,
    batch_tensors,
    completion_lm_loss,
    dpo_loss,
    heldout_lm_loss,
    kto_loss,
    make_seq,
    reference_logps,
    sequence_logps,
)
from aigc.tuning.preference import (
    METHODS,
    PreferenceData,
    PreferenceSettings,
    build_preferences,
    feedback_rows,
    no_feedback_message,
)
from aigc.utils.paths import hide_host_paths

# ----------------------------------------------------------------------------- config


@dataclass
class TuneConfig(PreferenceSettings):
    """`tune.*` settings (preset `[tune]` table, `--set tune.beta=0.2`); the preference-data keys
    (min_pairs, max_per_user, heldout_fraction, ...) come from `PreferenceSettings`."""

    method: str = "dpo"  # dpo | kto | sft
    # losses
    beta: float = 0.1  # DPO / KTO: strength of the pull towards the reference model
    label_smoothing: float = 0.0  # DPO: assumed share of flipped preference labels (cDPO)
    rpo_alpha: float = 0.0  # DPO: + alpha x NLL of the chosen outputs per token (RPO; TRL's rpo_alpha)
    desirable_weight: float = 1.0  # KTO: loss weight of liked outputs
    undesirable_weight: float = 1.0  # KTO: loss weight of disliked outputs
    mix_weight: float = 0.0  # weight of LM loss on the original training data (0 = off)
    mix_batch: int = 4  # windows of original data per step when mix_weight > 0
    # optimisation (the Trainer's settings for this run)
    lr: float = 1e-4
    max_steps: int | None = 200
    max_time: float | None = None
    batch_size: int = 8  # pairs (dpo) / rows (kto, sft) per step
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 keeps the policy/reference log-ratio exactly 0 at step 0
    eval_interval: int = 50
    log_interval: int = 10
    max_len: int = 128  # tokens of prompt + completion (cut to the model's context)
    seed: int = 0
    # preference data: the fields of aigc.tuning.preference.PreferenceSettings (inherited), and
    model_name: str = ""  # the feedback's model name (default: the run's name)
    # guard
    max_loss_increase: float = 0.10  # held-out LM loss may rise by at most this fraction
    guard_batches: int = 20
    guard_block: int = 64  # tokens per held-out window (cut to the model's context)
    # report (aigc.tuning.report)
    samples: int = 64  # generations per model for the before/after comparison
    sample_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0
    prompts: list[str] = field(default_factory=list)  # default: the feedback's prompts

    def __post_init__(self) -> None:
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.beta > 0, f"beta must be > 0, got {self.beta}"),
            (
                0 <= self.label_smoothing < 0.5,
                f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}",
            ),
            (self.mix_weight >= 0, f"mix_weight must be >= 0, got {self.mix_weight}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.max_len >= 2, f"max_len must be >= 2, got {self.max_len}"),
            (
                0 <= self.heldout_fraction < 1,
                f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}",
            ),
            (
                self.on_mismatch in ("error", "skip"),
                f"on_mismatch must be error or skip, got {self.on_mismatch!r}",
            ),
            (self.max_loss_increase >= 0, f"max_loss_increase must be >= 0, got {self.max_loss_increase}"),
            (self.samples >= 0, f"samples must be >= 0, got {self.samples}"),
            (
                self.precision in ("auto", "bf16", "fp32"),
                f"precision must be auto, bf16 or fp32, got {self.precision!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def train_config(self) -> TrainConfig:
        """The Trainer's config for this tuning run (no mid-run checkpoints: runs are short)."""
        return TrainConfig(
            lr=self.lr, min_lr_ratio=0.1, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
            grad_clip=self.grad_clip, batch_size=self.batch_size, max_steps=self.max_steps,
            max_time=self.max_time, eval_interval=self.eval_interval, ckpt_interval=0, keep_last=1,
            log_interval=self.log_interval, precision=self.precision, seed=self.seed,
        )  # fmt: skip


@dataclass
class TuneSettings:
    tune: TuneConfig = field(default_factory=TuneConfig)


def resolve_tune_config(
    method: str | None = None,
    preset: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    max_steps: int | None = None,
    max_time: float | None = None,
) -> TuneConfig:
    """defaults -> preset (`presets/tune/NAME.toml` or a path) -> `--set tune.k=v` -> flags."""
    over = overrides if isinstance(overrides, dict) else C.parse_overrides(overrides)
    unknown = sorted(set(over) - {"tune"})
    if unknown:
        raise ConfigError(
            f"unknown config section {unknown[0]!r}; tuning settings are tune.* (e.g. tune.beta=0.2)"
        )
    flags: dict[str, Any] = {}
    if method is not None:
        flags["method"] = method
    if max_time is not None:
        flags["max_time"] = max_time
        if max_steps is None and "max_steps" not in over.get("tune", {}):
            flags["max_steps"] = None
    if max_steps is not None:
        flags["max_steps"] = max_steps
    data = C.merge(over, {"tune": flags}) if flags else over
    settings = C.resolve(TuneSettings, "tune", preset, data)
    cfg = settings.tune
    if cfg.max_steps is None and cfg.max_time is None:
        raise ConfigError("set a budget: tune.max_steps or tune.max_time (--max-steps N / --max-time S)")
    return cfg


# ----------------------------------------------------------------------------- the task


class PreferenceTask(Task):
    """DPO / KTO / SFT steps on pre-tokenized feedback rows, optionally mixed with original LM data.

    Precomputes the reference log-probs of every training and held-out sequence at construction
    (the model's weights then are the reference).
    """

    def __init__(
        self,
        family: str,
        model: nn.Module,
        data: PreferenceData,
        encode: Callable[[str], list[int]],
        start_ids: list[int],
        eos_id: int | None,
        cfg: TuneConfig,
        train_tokens: np.ndarray | None = None,
        export: Callable[[Path], None] | None = None,
        card_text: str = "",
    ):
        self.family, self.model, self.cfg = family, model, cfg
        self.method = data.method
        self._export, self._card_text = export, card_text
        block = getattr(model.config, "block_size", None) or cfg.max_len
        self.max_len = min(cfg.max_len, block)
        self.encode, self.start_ids, self.eos_id = encode, start_ids, eos_id
        self.train_rows, self.heldout_rows = data.train, data.heldout
        self.train_seqs = self._sequences(data.train)  # name -> [Seq]
        self.heldout_seqs = self._sequences(data.heldout)
        # the reference model's log-probs, once (one pass; the only copy of the weights is `model`)
        self.ref = {k: reference_logps(model, v) for k, v in self.train_seqs.items() if self.method != "sft"}
        self.ref_heldout = {
            k: reference_logps(model, v) for k, v in self.heldout_seqs.items() if self.method != "sft"
        }
        self.labels = torch.tensor([bool(r["label"]) for r in data.train]) if self.method == "kto" else None
        self.labels_heldout = (
            torch.tensor([bool(r["label"]) for r in data.heldout]) if self.method == "kto" else None
        )
        self.train_tokens = train_tokens if cfg.mix_weight > 0 else None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.nonfinite_at: int | None = None

    def _seq(self, prompt: str, completion: str) -> Seq:
        prompt_ids = self.encode(prompt) if prompt else list(self.start_ids)
        comp = self.encode(completion) + ([self.eos_id] if self.eos_id is not None else [])
        return make_seq(prompt_ids or list(self.start_ids), comp, self.max_len)

    def _sequences(self, rows: list[dict[str, Any]]) -> dict[str, list[Seq]]:
        if self.method == "dpo":
            return {"chosen": [self._seq(r["prompt"], r["chosen"]) for r in rows],
                    "rejected": [self._seq(r["prompt"], r["rejected"]) for r in rows]}  # fmt: skip
        seqs = {"completion": [self._seq(r["prompt"], r["completion"]) for r in rows]}
        if self.method == "kto":  # mismatched pairs for the KL reference point: prompt i, completion i-1
            n = len(rows)
            seqs["kl"] = [self._seq(rows[i]["prompt"], rows[(i - 1) % n]["completion"]) for i in range(n)]
        return seqs

    # ---------------------------------------------------------------- the losses on a batch

    def losses(self, model: nn.Module, idx: list[int], heldout: bool = False) -> dict[str, torch.Tensor]:
        """The method's loss (and reward statistics) on rows `idx` of the training or held-out set."""
        seqs = self.heldout_seqs if heldout else self.train_seqs
        ref = self.ref_heldout if heldout else self.ref
        t = torch.tensor(idx, dtype=torch.long)
        if self.method == "sft":
            x, y, _ = batch_tensors([seqs["completion"][i] for i in idx])
            _, loss = model(x, y)  # mean cross-entropy over completion tokens (-1 elsewhere)
            return {"loss": loss}
        if self.method == "dpo":
            # chosen and rejected in one forward: (2B, T)
            both = sequence_logps(
                model, [seqs["chosen"][i] for i in idx] + [seqs["rejected"][i] for i in idx]
            )
            pc, pr = both[: len(idx)], both[len(idx) :]
            losses, rc, rr = dpo_loss(pc, pr, ref["chosen"][t], ref["rejected"][t], self.cfg.beta,
                                      self.cfg.label_smoothing)  # fmt: skip
            margin = rc - rr
            out = {"loss": losses.mean(), "reward_chosen": rc.mean(), "reward_rejected": rr.mean(),
                   "reward_margin": margin.mean(), "reward_acc": (margin > 0).float().mean()}  # fmt: skip
            if (
                self.cfg.rpo_alpha > 0
            ):  # RPO: keep the chosen outputs likely, not only likelier than the rejected
                tokens = sum(len(seqs["chosen"][i].ids) - seqs["chosen"][i].start for i in idx)
                out["nll_chosen"] = -pc.sum() / max(tokens, 1)
                out["loss"] = out["loss"] + self.cfg.rpo_alpha * out["nll_chosen"]
            return out
        labels = (self.labels_heldout if heldout else self.labels)[t]
        both = sequence_logps(model, [seqs["completion"][i] for i in idx] + [seqs["kl"][i] for i in idx])
        p, p_kl = both[: len(idx)], both[len(idx) :]
        losses, rewards, kl = kto_loss(p, ref["completion"][t], labels, p_kl, ref["kl"][t], self.cfg.beta,
                                       self.cfg.desirable_weight, self.cfg.undesirable_weight)  # fmt: skip
        out = {"loss": losses.mean(), "kl": kl}
        if labels.any():
            out["reward_chosen"] = rewards[labels].mean()
        if (~labels).any():
            out["reward_rejected"] = rewards[~labels].mean()
        if "reward_chosen" in out and "reward_rejected" in out:
            out["reward_margin"] = out["reward_chosen"] - out["reward_rejected"]
        return out

    # ---------------------------------------------------------------- Task API

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        return {"model": adamw(self.model, cfg)}

    def training_step(self, ctx: Context) -> dict[str, float]:
        model = ctx.modules["model"]
        n = len(self.train_rows)
        idx = torch.randint(n, (min(self.cfg.batch_size, n),), generator=self.gen).tolist()
        with ctx.autocast():
            out = self.losses(model, idx)
            loss = out["loss"]
            if self.train_tokens is not None:  # LM loss on the original data: a guard against forgetting
                T = min(self.cfg.guard_block, self.max_len, len(self.train_tokens) - 1)
                starts = torch.randint(len(self.train_tokens) - T, (self.cfg.mix_batch,), generator=self.gen)
                rows = torch.from_numpy(
                    np.stack([self.train_tokens[i : i + T + 1] for i in starts.tolist()]).astype(np.int64)
                )
                _, mix = model(rows[:, :-1], rows[:, 1:])
                out["mix_loss"] = mix
                loss = loss + self.cfg.mix_weight * mix
        if not torch.isfinite(loss):
            self.nonfinite_at = ctx.step_num
        ctx.backward(loss)
        ctx.step("model")
        return {k: float(v.detach()) for k, v in out.items()}

    def eval(self, ctx: Context) -> dict[str, float]:
        """Held-out preference metrics (no `val_loss`: every evaluation's weights are kept)."""
        if not self.heldout_rows:
            return {}
        model = ctx.modules["model"]
        sums: dict[str, float] = {}
        n = len(self.heldout_rows)
        for i in range(0, n, 32):
            idx = list(range(i, min(n, i + 32)))
            for k, v in self.losses(model, idx, heldout=True).items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
        return {f"heldout_{k}": v / n for k, v in sums.items()}

    def state_dict(self) -> TaskState:
        return TaskState(tensors={"gen": self.gen.get_state()})

    def load_state_dict(self, state: TaskState) -> None:
        self.gen.set_state(state.tensors["gen"])

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        from aigc.training.text import dedupe_tied

        return dedupe_tied(self.model)

    def export(self, run_dir: Path) -> None:
        if self._export is not None:
            self._export(run_dir)

    def card(self) -> dict[str, str]:
        n = sum(p.numel() for p in self.model.parameters())
        return {"Parameters": f"{n:,}", "Tuning": self._card_text}


# ----------------------------------------------------------------------------- loading the base model


@dataclass
class Base:
    """The model to tune and what tuning needs to know about it."""

    dir: Path
    kind: str  # "own" (a gpt/lstm run) | "hf" (a transformers folder)
    family: str
    config: dict[str, Any]
    model: nn.Module
    encode: Callable[[str], list[int]]
    start_ids: list[int]
    eos_id: int | None
    tokenizer_id: str | None
    name: str
    version: str | None
    weights_hash: str | None
    tokenizer: Any = None


def load_base(model_dir: Path, model_name: str = "") -> Base:
    """Our gpt/lstm run directory, or a transformers causal LM folder (via HFCausalLM)."""
    from aigc.tuning.versions import model_id, weights_hash
    from aigc.utils.io import read_json

    if not (model_dir / "config.json").is_file():
        raise AigcError(
            f"{model_dir} is not a model: no config.json; pass a run directory or a transformers folder"
        )
    cfg = read_json(model_dir / "config.json")
    name, version = model_id(model_dir)
    if "family" in cfg:
        from aigc.registry import load_artifact

        if cfg["family"] not in ("gpt", "lstm"):
            raise AigcError(
                f"{model_dir} is a {cfg['family']!r} model; text tuning takes gpt or lstm runs "
                "(image models: aigc tune dispatches them to the image tuner)"
            )
        art = load_artifact(model_dir)
        tok = art.tokenizer
        if getattr(tok, "kind", None) == "music":
            raise AigcError(f"{model_dir} is a music model; tuning on feedback supports text models")
        start = [t for t in (getattr(tok, "bos_id", None), tok.eos_id) if t is not None][:1] or [0]
        return Base(model_dir, "own", cfg["family"], cfg, art.model.float().train(), tok.encode, start, tok.eos_id,
                    tok.id, model_name or name, version, weights_hash(model_dir), tok)  # fmt: skip
    if "architectures" not in cfg and "model_type" not in cfg:
        raise AigcError(f"{model_dir}/config.json is neither an aigc run nor a transformers model")
    from transformers import AutoTokenizer

    from aigc.generation.hf import HFTokenizer
    from aigc.models.hf_causal import HFCausalLM

    model = HFCausalLM(model_dir)
    try:
        hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise AigcError(
            f"{model_dir} has no usable tokenizer ({str(e).splitlines()[0]}); save one with the model"
        ) from None
    tok = HFTokenizer(hf_tok)
    start = [t for t in (tok.bos_id, tok.eos_id) if t is not None][:1] or [0]

    def encode(text: str) -> list[int]:
        return hf_tok.encode(text, add_special_tokens=False)

    return Base(model_dir, "hf", "hf", cfg, model.train(), encode, start, tok.eos_id, None,
                model_name or name, version, None, hf_tok)  # fmt: skip


def original_data(base: Base) -> Any | None:
    """The prepared data the base run was trained on (for the guard and mixing), if it is still there
    and uses the run's tokenizer."""
    path = (base.config.get("data") or {}).get("path")
    if base.kind != "own" or not path or not Path(path).is_dir():
        return None
    from aigc.training.text import open_prepared

    try:
        prepared = open_prepared(path)
    except AigcError:
        return None
    return prepared if prepared.meta["tokenizer"]["id"] == base.tokenizer_id else None


# ----------------------------------------------------------------------------- entry point


@dataclass
class GuardResult:
    ok: bool
    before: float
    after: float
    change: float  # (after - before) / before
    limit: float
    source: str  # "val split of DIR" | "held-out feedback completions"
    reason: str = ""
    root: dict[str, Any] = field(default_factory=dict)  # the lineage's first version: {model, loss, id}


def tune_text(
    model: str | Path,
    out: str | Path | None = None,
    *,
    store: Any,
    method: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    preset: str | None = None,
    max_steps: int | None = None,
    max_time: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    scorer: str | None = None,
    models_dirs: list[Path] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tune a text model on its feedback in `store`; publish the result as its next version.

    `model`: a run directory, a transformers folder, or a name / name@version under `models_dirs`.
    `out`: the new run directory (default: the next version beside `model`). Returns the report
    dict (`aigc.tuning.report`). Raises AigcError, publishing nothing, when the feedback is too
    little or mismatched, or when the held-out guard trips (the report is then written to
    `_rejected-<version>/` beside the target).
    """
    from aigc.training.trainer import Trainer, seed_everything
    from aigc.tuning import report as R
    from aigc.tuning.versions import VERSION_RE, next_version_dir, publish_version, resolve_model
    from aigc.utils.io import atomic_write_json, prepare_out_dir, staging_dir

    say = log or (lambda msg: None)
    cfg = resolve_tune_config(method, preset, overrides, max_steps, max_time)
    base_dir = resolve_model(str(model), models_dirs)
    base = load_base(base_dir, cfg.model_name)
    target = Path(out).expanduser().resolve() if out is not None else next_version_dir(base_dir)
    if target == base_dir:
        raise AigcError(f"--out {target} is the model being tuned; choose a new directory")
    if target.exists() and any(target.iterdir()) and (out is None or not overwrite):
        prepare_out_dir(target, overwrite=False)  # raises: non-empty
    # 1. preference data
    gens = feedback_rows(store, base.name, "text")
    if not gens:  # nothing under this name: say which names the store does hold feedback for
        raise AigcError(no_feedback_message(store, base.name, "text", cfg.method))
    data = build_preferences(
        gens, cfg.method, base_dir if base.kind == "own" else None, base.tokenizer_id, cfg
    )
    say(
        f"feedback on {base.name}: {data.stats['train']} {cfg.method} rows for training, {data.stats['heldout']} held out"
    )
    # 2. the task (reference log-probs now), the guard's 'before'
    seed_everything(cfg.seed)
    prepared = original_data(base)
    task_holder: dict[str, PreferenceTask] = {}

    def guard_loss(m: nn.Module) -> tuple[float, str]:
        if prepared is not None:
            block = min(cfg.guard_block, getattr(m.config, "block_size", cfg.guard_block))
            return heldout_lm_loss(
                m, prepared.val, block, cfg.guard_batches, seed=cfg.seed
            ), f"val split of {prepared.path}"
        t = task_holder["task"]
        key = "chosen" if cfg.method == "dpo" else "completion"
        seqs = t.heldout_seqs.get(key) or t.train_seqs[key]
        if cfg.method == "kto":
            rows = t.heldout_rows or t.train_rows
            seqs = [s for s, r in zip(seqs, rows, strict=True) if r["label"]] or seqs
        return completion_lm_loss(m, seqs), "liked held-out feedback completions (no original data found)"

    def lineage_root(before: float, source: str) -> dict[str, Any]:
        """The guard's figure for the first version of this lineage: a chain of tunings may not
        drift further from it than one tuning may (only when measured the same way)."""
        gid = f"{source}|block={cfg.guard_block}|batches={cfg.guard_batches}|seed={cfg.seed}"
        prev = ((base.config.get("tune") or {}).get("result") or {}).get("guard_root") or {}
        if prev.get("id") == gid and isinstance(prev.get("loss"), (int, float)):
            return prev
        return {"model": _model_ref(base), "loss": before, "id": gid}

    def export(run_dir: Path) -> None:
        if base.kind == "own":
            shutil.copyfile(base_dir / "tokenizer.json", run_dir / ".tokenizer.json.tmp")
            (run_dir / ".tokenizer.json.tmp").replace(run_dir / "tokenizer.json")

    base_where = hide_host_paths(str(base_dir))  # its folder's name only: a card is shown and shared
    card = (
        f"- tuned from `{base_where}` ({base.name}{'@' + base.version if base.version else ''}, "
        f"weights {base.weights_hash or '-'}) with {cfg.method.upper()}\n"
        f"- feedback: " + ", ".join(f"{k} {v}" for k, v in data.stats.items() if not isinstance(v, dict))
    )
    task = PreferenceTask(base.family, base.model, data, base.encode, base.start_ids, base.eos_id, cfg,
                          prepared.train if prepared is not None else None, export, card)  # fmt: skip
    task_holder["task"] = task
    before, guard_source = guard_loss(base.model)
    root = lineage_root(before, guard_source)
    say(f"held-out LM loss before: {before:.4f} ({guard_source})")
    # 3. train in a staging dir beside the target (the registry ignores dot-names)
    stage = staging_dir(target)
    train_dir = stage if base.kind == "own" else stage / "tuning"
    run_cfg = _run_config(base, cfg, data)
    t0 = time.time()
    failure = ""
    try:
        try:
            result = Trainer(task, cfg.train_config(), train_dir, run_cfg, progress=progress, log=say).fit()
            steps = result.steps
        except AigcError:
            if task.nonfinite_at is None:
                raise
            failure = f"training loss became non-finite at step {task.nonfinite_at}"
            steps = task.nonfinite_at
        # 4. the guard
        after = guard_loss(base.model)[0] if not failure else math.nan
        change = (after - before) / before if before and math.isfinite(after) else math.inf
        if not failure and not math.isfinite(after):
            failure = "held-out LM loss became non-finite"
        elif not failure and change > cfg.max_loss_increase:
            failure = (f"held-out LM loss rose {change:+.1%} ({before:.4f} -> {after:.4f}), more than "
                       f"tune.max_loss_increase={cfg.max_loss_increase:.0%}")  # fmt: skip
        elif not failure and (after - root["loss"]) / root["loss"] > cfg.max_loss_increase:
            failure = (f"held-out LM loss is {(after - root['loss']) / root['loss']:+.1%} above the first "
                       f"version it descends from ({root['model']}: {root['loss']:.4f} -> {after:.4f}), more "
                       f"than tune.max_loss_increase={cfg.max_loss_increase:.0%}")  # fmt: skip
        guard = GuardResult(
            not failure, before, after, change, cfg.max_loss_increase, guard_source, failure, root
        )
        if base.kind == "hf":
            _finish_hf(base, stage, train_dir, save=not failure)
        shutil.rmtree(train_dir / "checkpoints", ignore_errors=True)  # tuning runs are short: not resumable
        # 5. the report (samples before/after only when the weights are usable)
        rep = R.build_report(
            base=base, tuned_dir=stage, tuned_model=base.model if math.isfinite(after) else None, data=data, cfg=cfg,
            guard=guard, metrics_path=stage / "metrics.jsonl", scorer=scorer, steps=steps,
            elapsed=time.time() - t0, target=target, log=say,
        )  # fmt: skip
        cfg_path = stage / ("config.json" if base.kind == "own" else "aigc_tune.json")
        run_cfg["tune"]["result"] = R.finite({**R.summary(rep), "guard_root": root})
        atomic_write_json(
            cfg_path, run_cfg if base.kind == "own" else {k: run_cfg[k] for k in ("tuned_from", "tune")}
        )
        R.write_report(rep, stage)
        R.link_in_card(stage)
        if failure:
            rejected = target.with_name(f"_rejected-{target.name}")
            if rejected.exists():
                shutil.rmtree(rejected)
            (stage / "model.safetensors").unlink(missing_ok=True)  # never servable
            stage.rename(rejected)
            versions = [p.name for p in target.parent.iterdir() if VERSION_RE.match(p.name)]
            kept = (f"{base.name} still resolves to {max(versions, key=lambda v: int(VERSION_RE.match(v).group(2)))}"
                    if base.version is not None and out is None and versions else f"{target} was not created")  # fmt: skip
            raise AigcError(
                f"tuning stopped, nothing published: {failure}; {kept}. "
                f"Report: {rejected / 'report.md'}; lower tune.lr (now {cfg.lr}), raise tune.beta or set "
                f"tune.mix_weight (e.g. 0.5)"
            )
        if target.exists() and out is not None and overwrite:
            shutil.rmtree(target)
        publish_version(stage, target)
        say(f"published {target}")
        rep["run"] = str(target)
        return rep
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _model_ref(base: Base) -> str:
    return base.name + (f"@{base.version}" if base.version else "")


def _run_config(base: Base, cfg: TuneConfig, data: PreferenceData) -> dict[str, Any]:
    """config.json of the tuned run: the base's (so it rebuilds unchanged) + where it came from + how."""
    tuned_from = {"path": str(base.dir), "model": _model_ref(base), "weights_hash": base.weights_hash}
    tune = {"method": cfg.method, "config": C.to_dict(cfg), "feedback": data.stats}
    if base.kind == "hf":
        return {"family": "hf", "model": {}, "tuned_from": tuned_from, "tune": tune}
    out = {k: v for k, v in base.config.items() if k not in ("init_from", "tuned_from", "tune")}
    return {**out, "train": C.to_dict(cfg.train_config()), "init_from": str(base.dir), "tuned_from": tuned_from,
            "tune": tune}  # fmt: skip


def _finish_hf(base: Base, stage: Path, train_dir: Path, save: bool) -> None:
    """A transformers folder in `stage` (weights + tokenizer when `save`) with the run's logs beside them."""
    if save:
        base.model.hf.save_pretrained(str(stage), safe_serialization=True)
        base.tokenizer.save_pretrained(str(stage))
    for name in ("metrics.jsonl", "card.md", "loss.png"):
        if (train_dir / name).is_file():
            (train_dir / name).replace(stage / name)
    shutil.rmtree(train_dir, ignore_errors=True)


__all__ = [
    "PreferenceTask",
    "TuneConfig",
    "dpo_loss",
    "heldout_lm_loss",
    "kto_loss",
    "load_base",
    "resolve_tune_config",
    "sequence_logps",
    "tune_text",
]
