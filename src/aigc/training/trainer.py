"""The Trainer: one training loop for every model family (the family lives in a `Task`).

It owns what is the same everywhere: device and precision, DDP wrapping, the LR schedule (linear
warmup, cosine decay by step or by elapsed fraction of a time budget), budgets and early stopping,
evaluation and best-weights keeping, exact-resume checkpoints, and the logs (metrics.jsonl,
TensorBoard, progress bar). See `aigc.training.task` for what a Task provides.

A run directory grows while training (`config.json` first, then `metrics.jsonl`,
`checkpoints/`, `model.safetensors` at every val improvement) and is completed at the end
(`loss.png`, `card.md`, `samples/`, and whatever `Task.export` writes). Every file is written
atomically, so a killed run leaves only whole files and a resumable checkpoint; Ctrl-C (single
process) finishes the current step, checkpoints it and stops. `train_text` / `train_image` hold an
flock on the run directory (`run_dir_lock`) for the whole run, so two runs never share one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from aigc.config import diff
from aigc.errors import AigcError
from aigc.training import checkpoint as ckpt
from aigc.training import distributed as dist_utils
from aigc.training.config import TrainConfig
from aigc.training.metrics import MetricsLog, Progress, TensorBoard, peak_flops, plot_loss
from aigc.training.task import Context, Task
from aigc.utils.io import LOCK_FILE, DirLock, atomic_write, atomic_write_json, make_dir, read_json

# train.* keys that may change between a run and its resume: budgets, bookkeeping, and the
# optimizer hyperparameters one changes to recover from a NaN (shapes and batches may not change)
RESUMABLE_CHANGES = {
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "grad_clip",
    "precision",
    "max_steps",
    "max_time",
    "eval_interval",
    "eval_batches",
    "early_stop_patience",
    "ckpt_interval",
    "keep_last",
    "log_interval",
    "tensorboard",
    "compile",
    "peak_flops",
}


# ----------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (call before building the model, so its init is repeatable)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AigcError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AigcError(f"train.device={name} but no CUDA GPU is available; use train.device=cpu or auto")
    return device


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


# "auto" precision takes bf16 on a CPU only where a bf16 matmul is at least this much faster than
# fp32: CPUs that report bf16 kernels range from ~4.5x (Zen 5, AMX) to slower than fp32 (AVX-512
# BF16 without AMX, e.g. a VM that hides AMX: 0.6x, and a tiny GPT trained 33 % fewer steps)
AUTO_BF16_MIN_SPEEDUP = 1.2


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 matmul time / bf16 matmul time on this CPU with the current thread count (measured once
    per process, ~50 ms; 0 when the CPU has no bf16 kernels)."""
    if not bf16_supported(torch.device("cpu")):
        return 0.0
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(256, 512, generator=g), torch.randn(512, 512, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    best = {torch.float32: math.inf, torch.bfloat16: math.inf}
    with torch.inference_mode():
        for _ in range(6):  # interleaved, best of each: robust to a neighbour's load
            for dt, (a, b) in ((torch.float32, (a32, b32)), (torch.bfloat16, (a16, b16))):
                t = time.perf_counter()
                for _ in range(3):
                    torch.mm(a, b)
                best[dt] = min(best[dt], time.perf_counter() - t)
    return best[torch.float32] / best[torch.bfloat16]


def auto_bf16(device: torch.device) -> bool:
    """What "auto" precision means on `device`: bf16 where supported and (on a CPU) faster."""
    if device.type == "cpu":
        return cpu_bf16_speedup() >= AUTO_BF16_MIN_SPEEDUP
    return bf16_supported(device)


def precision_note(device: torch.device) -> str:
    """Why "auto" chose what it did on `device`, for the training log."""
    if device.type != "cpu":
        return "bf16 autocast" if auto_bf16(device) else "fp32 (no bf16 on this device)"
    x = cpu_bf16_speedup()
    if x == 0:
        return "fp32 (this CPU has no bf16 kernels)"
    use = "bf16 autocast" if x >= AUTO_BF16_MIN_SPEEDUP else "fp32"
    return f"{use} (a bf16 matmul runs {x:.1f}x fp32 on this CPU; train.precision=bf16|fp32 to choose)"


def autocast_dtype(
    precision: str, device: torch.device, option: str = "train.precision"
) -> torch.dtype | None:
    """The autocast dtype for `precision` (fp32, fp16, bf16, auto) on `device` (None = plain fp32);
    `option` names the setting in the errors (image sampling passes "--dtype")."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise AigcError(f"{option}=fp16 needs a CUDA GPU; use bf16 or fp32 on this device")
        return torch.float16
    if precision == "bf16":
        if not bf16_supported(device):
            raise AigcError(f"{option}=bf16 is not supported on {device}; use fp32 or auto")
        return torch.bfloat16
    return torch.bfloat16 if auto_bf16(device) else None  # auto


def lr_factor(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (1-based) after `elapsed` seconds.

    1. linear warmup over warmup_steps; 2. cosine decay from 1 to min_lr_ratio over the budget,
    where progress is the larger of the step fraction and the time fraction (a time budget
    decays by the clock: short budgets are won by getting many well-scheduled steps in).
    """
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = 0.0
    if cfg.max_steps:
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.max_time:
        progress = max(progress, elapsed / cfg.max_time)
    progress = min(max(progress, 0.0), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check_resume_config(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume when anything but budgets/bookkeeping changed."""

    def allowed(key: str) -> bool:
        return key.startswith("sample.") or (key.startswith("train.") and key[6:] in RESUMABLE_CHANGES)

    changes = [d for d in diff(saved, current) if not allowed(d.split(":")[0])]
    if changes:
        raise AigcError(
            "cannot resume: the config differs from the checkpoint's ("
            + "; ".join(changes)
            + "); resume with the same settings, or start a new run in another --out"
        )


# ----------------------------------------------------------------------------- the run directory

# what a run killed before its first checkpoint leaves: nothing a new run would lose by replacing it
DEBRIS = {"config.json", "metrics.jsonl", "checkpoints", "tensorboard", LOCK_FILE}


def run_dir_lock(out: Path) -> contextlib.AbstractContextManager:
    """Hold `out` for this training (rank 0 under DDP; the other ranks never write there). A second
    train or --resume into it is refused while this process lives; any exit releases it."""
    if not dist_utils.env_info().is_main:
        return contextlib.nullcontext()
    return DirLock(out, "trained")


def check_resumable(out: Path) -> dict[str, Any]:
    """The saved run config of `out`, for --resume; one clear line when there is nothing to resume."""
    if not (out / "config.json").is_file():
        raise AigcError(
            f"--resume: {out} is not a run directory (no config.json); drop --resume to start one"
        )
    if ckpt.latest_checkpoint(out / "checkpoints") is None:
        raise AigcError(
            f"no checkpoint in {out} yet (the run stopped before its first save); "
            "start it again without --resume"
        )
    return read_json(out / "config.json")


def start_fresh(out: Path, overwrite: bool, log: Any = None) -> None:
    """Make `out` ready for a new run (called holding its lock): empty it with `overwrite`, or when it
    holds only what a run killed before its first checkpoint leaves; refuse anything else."""
    from aigc.utils.io import prepare_out_dir

    entries = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
    if not entries:
        prepare_out_dir(out)  # (names a file in the way)
        return
    debris = (
        (out / "config.json").is_file()
        and all(p.name in DEBRIS for p in entries)
        and ckpt.latest_checkpoint(out / "checkpoints") is None
    )
    if not (overwrite or debris):
        if (out / "checkpoints").is_dir():
            raise AigcError(
                f"{out} already holds a training run; pass --resume to continue it, --overwrite to "
                "replace it, or choose another --out"
            )
        prepare_out_dir(out)  # raises: not empty
    if debris and not overwrite and log is not None:
        log(f"reusing {out}: its earlier run stopped before its first checkpoint")
    for p in entries:  # the lock file stays: this process holds it
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training at a step boundary; `str()` says where and whether it was saved."""


@contextlib.contextmanager
def stop_on_sigint(enabled: bool):
    """While training, the first Ctrl-C only sets a flag (the loop stops after the current step and
    saves it); a second one interrupts at once. Only in the main thread of a single process whose
    SIGINT handler is Python's default (not under DDP: every rank would have to agree on the step)."""
    flag = threading.Event()
    if not (enabled and threading.current_thread() is threading.main_thread()):
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        flag.set()
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C: stop now, without saving

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    elapsed: float
    stopped: str  # "max_steps" | "max_time" | "early_stop"
    best_val_loss: float | None
    final: dict[str, float] = field(default_factory=dict)  # the last eval's metrics


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Drive a `Task` under a `TrainConfig`, writing into `run_dir`.

    `run_config` is the resolved run config (saved as config.json and inside every checkpoint,
    checked on resume). Call `fit()`.
    """

    def __init__(
        self,
        task: Task,
        cfg: TrainConfig,
        run_dir: str | Path,
        run_config: dict[str, Any],
        resume: bool = False,
        progress: bool = True,
        log: Any = None,
    ):
        self.task, self.cfg, self.run_dir = task, cfg, Path(run_dir)
        self.run_config, self.resume, self.show_progress = run_config, resume, progress
        self.log = log or (lambda msg: None)  # a callable printing one line to the user (stderr)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.step = 0
        self.elapsed = 0.0
        self.best_val = math.inf
        self.bad_evals = 0
        self.last_eval: dict[str, float] = {}

    # ---------------------------------------------------------------- setup

    def _setup(self) -> None:
        cfg = self.cfg
        device = resolve_device(cfg.device)
        self.dist = dist_utils.setup(device)
        self.device = dist_utils.rank_device(device, self.dist)
        self.main = self.dist.is_main
        if self.dist.enabled and self.main:
            import torch.distributed as dist

            self.log(f"distributed: {self.dist.world_size} processes ({dist.get_backend()})")
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        if cfg.precision == "auto":
            if self.dist.enabled:  # one precision for every rank: rank 0's measurement decides
                bf16 = dist_utils.broadcast_flag(self.amp_dtype is not None, self.dist)
                self.amp_dtype = torch.bfloat16 if bf16 else None
            if self.main:
                self.log(f"precision auto: {precision_note(self.device)}")
        self.raw = self.task.modules()
        for m in self.raw.values():
            m.to(self.device)
        wrapped = {}
        for name, m in self.raw.items():
            w = dist_utils.wrap(m, self.device, self.dist)
            wrapped[name] = torch.compile(w) if cfg.compile else w
        self.optimizers = self.task.optimizers(cfg)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])  # the peak LR the schedule scales
        scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.ctx = Context(
            cfg, self.device, wrapped, self.raw, self.optimizers, self.amp_dtype, scaler,
            self.dist.rank, self.dist.world_size,
        )  # fmt: skip
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.main)
        if self.main:
            make_dir(self.run_dir)  # one line (not a traceback) when it cannot be created
            atomic_write_json(self.run_dir / "config.json", self.run_config)

    # ---------------------------------------------------------------- checkpoints

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, m in self.raw.items():
            tensors.update(ckpt.module_tensors(f"module.{name}.", m.state_dict()))
        opt_meta = {}
        for name, opt in self.optimizers.items():
            t, opt_meta[name] = ckpt.optimizer_to_flat(f"optim.{name}.", opt)
            tensors.update(t)
        rng_t, rng_meta = ckpt.rng_state()
        tensors.update(rng_t)
        task_state = self.task.state_dict()
        tensors.update({f"task.{k}": ckpt.to_cpu(v) for k, v in task_state.tensors.items()})
        state = {
            "format_version": 1,
            "step": self.step,
            "elapsed": self.elapsed,
            "best_val": None if math.isinf(self.best_val) else self.best_val,
            "bad_evals": self.bad_evals,
            "optimizers": opt_meta,
            "scaler": self.ctx.scaler.state_dict() if self.ctx.scaler is not None else None,
            "rng": rng_meta,
            "task": task_state.meta,
            "config": self.run_config,
        }
        return tensors, state

    def _save_checkpoint(self) -> None:
        error = None
        if self.main:
            tensors, state = self._state()
            try:
                ckpt.save_checkpoint(self.ckpt_root, self.step, tensors, state, self.cfg.keep_last)
            except AigcError as e:
                error = e
        # rank 0 tells the others whether it worked (so a full disk stops every rank, none hangs)
        ok = dist_utils.broadcast_flag(error is None, self.dist)
        if error is not None:
            raise error
        if not ok:
            raise AigcError(f"rank 0 could not write the checkpoint at step {self.step}; see its message")

    def _load_checkpoint(self) -> None:
        from aigc.training.task import TaskState

        if self.main:
            ckpt.clean_staging(self.ckpt_root)
        path = ckpt.latest_checkpoint(self.ckpt_root)
        if path is None:
            self.log(f"no checkpoint in {self.ckpt_root}; starting from step 0")
            self.metrics.truncate_after(0)
            return
        tensors, state = ckpt.load_checkpoint(path)
        check_resume_config(state["config"], self.run_config)
        for name, m in self.raw.items():
            prefix = f"module.{name}."
            m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        for name, opt in self.optimizers.items():
            # moments come from the checkpoint, hyperparameters (lr, weight decay, ...) from the
            # current config: after a NaN stop the user may lower train.lr and resume
            fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            ckpt.optimizer_from_flat(f"optim.{name}.", tensors, state["optimizers"][name], opt)
            for group, hyper in zip(opt.param_groups, fresh, strict=True):
                group.update(hyper)
        if self.ctx.scaler is not None and state["scaler"]:
            self.ctx.scaler.load_state_dict(state["scaler"])
        task_t = {k.removeprefix("task."): v for k, v in tensors.items() if k.startswith("task.")}
        self.task.load_state_dict(TaskState(task_t, state["task"]))
        ckpt.set_rng_state(tensors, state["rng"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.best_val = math.inf if state["best_val"] is None else state["best_val"]
        self.bad_evals = state["bad_evals"]
        self.metrics.truncate_after(self.step)
        self.log(f"resumed from {path} (step {self.step})")

    def _save_artifact_weights(self) -> None:
        if self.main:
            tensors = {k: ckpt.to_cpu(v) for k, v in self.task.artifact_tensors().items()}
            atomic_write(self.run_dir / "model.safetensors", lambda p: save_file(tensors, str(p)))

    # ---------------------------------------------------------------- evaluation

    def _evaluate(self) -> dict[str, float]:
        for m in self.raw.values():
            m.eval()
        with torch.no_grad():
            result = self.task.eval(self.ctx)
        for m in self.raw.values():
            m.train()
        self.last_eval = result
        self.metrics.write({"kind": "eval", "step": self.step, **result, "time": round(self.elapsed, 3)})
        self.tb.write({"kind": "eval", "step": self.step, **result})
        val = result.get("val_loss")
        improved = val is None or val < self.best_val
        if improved:
            if val is not None:
                self.best_val = val
            self.bad_evals = 0
            self._save_artifact_weights()
        else:
            self.bad_evals += 1
        return result

    # ---------------------------------------------------------------- the loop

    def _budget_left(self) -> str | None:
        """The reason to stop now, or None."""
        cfg = self.cfg
        if cfg.max_steps is not None and self.step >= cfg.max_steps:
            return "max_steps"
        if cfg.max_time is not None and self.elapsed >= cfg.max_time:
            return "max_time"
        if cfg.early_stop_patience and self.bad_evals >= cfg.early_stop_patience:
            return "early_stop"
        return None

    def _tick(self, clock: float) -> None:
        """Update the elapsed time; under DDP with a time budget every rank takes rank 0's clock,
        so the time-based LR and the stop decision are identical everywhere."""
        self.elapsed = time.perf_counter() - clock
        if self.cfg.max_time is not None:
            self.elapsed = dist_utils.broadcast_float(self.elapsed, self.dist)

    def _set_lr(self) -> float:
        factor = lr_factor(self.cfg, self.step, self.elapsed)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        first = next(iter(self.optimizers.values()))
        return first.param_groups[0]["lr"]

    def _nan_stop(self, loss: float) -> None:
        good = ckpt.latest_checkpoint(self.ckpt_root)
        raise AigcError(
            f"loss became {loss} at step {self.step}; last good checkpoint: {good or 'none'}"
            f"; lower train.lr (now {self.cfg.lr}), raise train.warmup_steps or use train.precision=fp32"
            f"{', then continue with --resume' if good else ''}"
        )

    def fit(self) -> TrainResult:
        self._setup()
        if self.resume:
            self._load_checkpoint()
        self.tb = TensorBoard(self.run_dir / "tensorboard", self.cfg.tensorboard and self.main)
        bar = Progress(self.cfg.max_steps, self.cfg.max_time, enabled=self.show_progress and self.main)
        try:
            stopped = self._loop(bar)
            self._finish()
        finally:
            bar.close()
            self.tb.close()
            dist_utils.teardown(self.dist)
        best = None if math.isinf(self.best_val) else self.best_val
        return TrainResult(self.run_dir, self.step, self.elapsed, stopped, best, self.last_eval)

    def _loop(self, bar: Progress) -> str:
        cfg = self.cfg
        self.throughput = self.task.throughput()
        self.peak = None  # the MFU ceiling, measured before the clock starts so it costs no budget
        if self.main and self.throughput is not None and self.throughput.flops_per_step:
            self.peak = peak_flops(self.device, self.amp_dtype or torch.float32, cfg.peak_flops)
        clock = time.perf_counter() - self.elapsed  # the clock continues across a resume
        self.window = [0.0, 0]  # training seconds and steps since the last log line
        with stop_on_sigint(not self.dist.enabled) as interrupted:
            return self._steps(bar, clock, interrupted)

    def _steps(self, bar: Progress, clock: float, interrupted: threading.Event) -> str:
        cfg = self.cfg
        while (stopped := self._budget_left()) is None:
            self.step += 1
            self.ctx.step_num = self.step
            lr = self._set_lr()
            t0 = time.perf_counter()
            out = self.task.training_step(self.ctx)
            loss = float(out["loss"])
            self.window[0] += time.perf_counter() - t0
            self.window[1] += 1
            if not math.isfinite(loss):
                self._nan_stop(loss)
            self._tick(clock)
            if self.step % cfg.log_interval == 0 or self.step == 1:
                self._log_train(out, lr)
                bar.update(self.step, self.elapsed, f"loss {loss:.3f} lr {lr:.2e}")
            if cfg.eval_interval and self.step % cfg.eval_interval == 0:
                self._evaluate()
                self._tick(clock)
            if cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0:
                self._save_checkpoint()
                self._tick(clock)
            if interrupted.is_set():  # Ctrl-C: this step is complete, save it and stop
                if not (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0):
                    self._save_checkpoint()
                raise TrainingInterrupted(
                    f"interrupted at step {self.step}; checkpoint saved; continue with --resume"
                )
        return stopped

    def _log_train(self, out: dict[str, float], lr: float) -> None:
        """One train record: the task's metrics, lr, grad norm, throughput and MFU over the window."""
        record: dict[str, Any] = {"kind": "train", "step": self.step, **out, "lr": lr}
        norm = next(iter(self.ctx.grad_norms.values()), math.nan)
        if not math.isnan(norm):
            record["grad_norm"] = norm
        seconds, steps = max(self.window[0], 1e-9), self.window[1]
        if self.throughput is not None:
            record[f"{self.throughput.unit}_per_s"] = round(self.throughput.per_step * steps / seconds, 1)
            if self.peak:
                record["mfu"] = round(self.throughput.flops_per_step * steps / seconds / self.peak, 4)
        record["time"] = round(self.elapsed, 3)
        self.metrics.write(record)
        self.tb.write(record)
        self.window = [0.0, 0]

    def _finish(self) -> None:
        """Final eval (unless this step had one), final checkpoint, artifact files, card."""
        cfg = self.cfg
        if not (cfg.eval_interval and self.step % cfg.eval_interval == 0) or not self.last_eval:
            self._evaluate()
        if not (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0):
            self._save_checkpoint()
        if not (self.run_dir / "model.safetensors").exists():
            self._save_artifact_weights()
        samples_dir = self.run_dir / "samples"
        sample_files = []
        if self.main:
            # samples come from the final weights (the best ones unless val got worse lately)
            samples_dir.mkdir(exist_ok=True)
            for m in self.raw.values():
                m.eval()
            with torch.no_grad():
                sample_files = self.task.samples(self.ctx, samples_dir)
            self.task.export(self.run_dir)
            plot_loss(
                self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", self.run_config.get("family", "")
            )
            from aigc.training.card import write_card

            write_card(self.run_dir, self.run_config, self.task, self.last_eval, self.best_val, self.step,
                       self.elapsed, sample_files)  # fmt: skip
        dist_utils.barrier(self.dist)
