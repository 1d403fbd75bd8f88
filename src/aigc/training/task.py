"""The Task protocol: what differs per model family, behind one interface the Trainer drives.

The split (ARCHITECTURE.md "Task"):

- a **Task** owns what differs per family: its modules, its optimizers, how a batch is drawn, the
  loss, evaluation, samples, and any extra state (an EMA copy, the data sampler's cursor);
- the **Trainer** owns what is the same: the loop, device, precision/autocast, gradient
  accumulation, clipping, the LR schedule, checkpoints and exact resume, RNG state, DDP wrapping,
  logging, budgets and early stopping.

The Task talks to the Trainer only through the `Context` it is handed. One optimizer step of a
text model reads:

    def training_step(self, ctx):
        for _ in ctx.accumulate("model"):          # grad_accum micro-steps (DDP syncs on the last)
            x, y = self.next_batch(ctx)            # this rank's share of the global micro-batch
            with ctx.autocast():
                _, loss = ctx.modules["model"](x, y)
            ctx.backward(loss)                     # scaled by 1/grad_accum (and by the fp16 scaler)
        ctx.step("model")                          # unscale, clip, optimizer.step, zero_grad
        return {"loss": ctx.mean(loss)}

and a GAN's alternating updates are the same calls twice, with two optimizers:

    def modules(self):            return {"G": self.g, "D": self.d}
    def optimizers(self, cfg):    return {"G": adamw(self.g, cfg, lr=...), "D": adamw(self.d, cfg, ...)}
    def training_step(self, ctx):
        real = self.next_batch(ctx)
        with ctx.autocast():
            d_loss = ...                           # D on real and G(z).detach()
        ctx.backward(d_loss); ctx.step("D")
        with ctx.autocast():
            g_loss = ...                           # D(G(z)) against "real" labels
        ctx.backward(g_loss); ctx.step("G")
        return {"loss": ctx.mean(g_loss + d_loss), "d_loss": ..., "g_loss": ...}

Rules the Trainer relies on:

1. `modules()` returns the same `nn.Module` objects on every call. The Trainer moves them to the
   device, may wrap them (DDP, torch.compile) and hands the wrapped ones back as `ctx.modules`;
   `ctx.raw_modules` are the plain ones (for `state_dict`, EMA updates, generation).
   `optimizers(cfg)` is called once, after the move, and may use `adamw(...)` below.
2. `training_step(ctx)` does one optimizer step per optimizer it steps and returns floats to
   log; `"loss"` is required (the Trainer stops on a non-finite loss). Use `ctx.mean(x)` for
   values that should be averaged over DDP ranks.
3. Randomness: draw batches from a generator the Task owns (seeded from `cfg.seed`) and return
   its state from `state_dict()`; the Trainer saves and restores the global torch/numpy/python
   RNGs (dropout, noise) itself. Under DDP, every rank draws the same *global* micro-batch of
   `cfg.batch_size` and keeps its slice `ctx.rank_slice(cfg.batch_size)`, so the union of the
   ranks' batches is exactly the single-process batch.
4. `eval(ctx)` runs under `torch.no_grad()` with the modules in eval mode (the Trainer switches
   them back) and returns floats; `"val_loss"` is the key best-checkpoint keeping and early
   stopping watch (omit it and every checkpoint counts as the best one).
5. `state_dict()` returns a `TaskState`: tensors (saved to safetensors) and JSON-able values;
   `load_state_dict(state)` restores them. Module and optimizer state are NOT included: the
   Trainer saves those from `modules()` / `optimizers()`.
6. `artifact_tensors()` is what goes into the run's `model.safetensors` (the weights to use:
   the model for an LM, the generator for a GAN, the EMA weights for diffusion); the Trainer
   writes it whenever val_loss improves. `export(run_dir)` writes any other artifact file
   (`tokenizer.json`, ...); `samples(ctx, out_dir)` writes samples; `card()` gives markdown
   sections for `card.md`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aigc.training.config import TrainConfig


@dataclass
class TaskState:
    """Extra state of a Task for checkpoints: tensors go to safetensors, `meta` to JSON."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Throughput:
    """Work done by one optimizer step (all ranks together), for tokens/s and MFU."""

    unit: str  # "tokens", "images", ...
    per_step: int  # units per optimizer step
    flops_per_step: float | None = None  # forward + backward FLOPs per optimizer step; None = no MFU


class Context:
    """What a Task may ask of the Trainer during a step or an evaluation."""

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        modules: dict[str, nn.Module],
        raw_modules: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
        autocast_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cfg = cfg
        self.device = device
        self.modules = modules
        self.raw_modules = raw_modules
        self.optimizers = optimizers or {}
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler
        self.rank = rank
        self.world_size = world_size
        self.step_num = 0  # the optimizer step being computed (1-based); set by the Trainer
        self.grad_norms: dict[str, float] = {}

    # ---------------------------------------------------------------- precision

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward pass (bf16/fp16 autocast, or nothing for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---------------------------------------------------------------- gradients

    def accumulate(self, name: str = "model") -> Iterator[int]:
        """Yield micro-step indices 0..grad_accum-1; under DDP, skip the gradient all-reduce of
        module `name` on all but the last micro-step (it happens once, on the last backward)."""
        n = self.cfg.grad_accum
        module = self.modules.get(name)
        for i in range(n):
            last = i == n - 1
            sync_off = not last and hasattr(module, "no_sync")
            with module.no_sync() if sync_off else contextlib.nullcontext():  # type: ignore[union-attr]
                yield i

    def backward(self, loss: torch.Tensor, accumulated: bool = True) -> None:
        """Backpropagate `loss`, divided by grad_accum when it is one of several micro-steps."""
        if accumulated and self.cfg.grad_accum > 1:
            loss = loss / self.cfg.grad_accum
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self, name: str = "model") -> float:
        """Unscale, clip (cfg.grad_clip), step and zero the grads of optimizer `name`; returns the
        gradient norm before clipping (nan when clipping is off)."""
        opt = self.optimizers[name]
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        norm = float("nan")
        if self.cfg.grad_clip > 0 and params:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.grad_norms[name] = norm
        return norm

    # ---------------------------------------------------------------- distributed

    def rank_slice(self, global_batch: int) -> slice:
        """The rows of a global batch this rank keeps (contiguous, equal shares)."""
        if global_batch % self.world_size:
            from aigc.errors import AigcError

            raise AigcError(
                f"batch size {global_batch} does not split evenly over {self.world_size} processes; "
                f"set train.batch_size to a multiple of {self.world_size}"
            )
        share = global_batch // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def mean(self, value: torch.Tensor | float) -> float:
        """A scalar averaged over DDP ranks (a plain float when single-process)."""
        t = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        if self.world_size > 1:
            import torch.distributed as dist

            t = t.to(self.device).clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t / self.world_size
        return float(t)

    def sum(self, value: torch.Tensor | float) -> float:
        """A scalar summed over DDP ranks."""
        t = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        if self.world_size > 1:
            import torch.distributed as dist

            t = t.to(self.device).clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)


class Task:
    """Base class of per-family training tasks (see the module docstring for the contract).

    Subclasses must implement `modules`, `training_step` and `artifact_tensors`; the rest have
    working defaults.
    """

    family: str = "?"

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def optimizers(self, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        """One AdamW per module by default, named like the module."""
        return {name: adamw(m, cfg) for name, m in self.modules().items()}

    def training_step(self, ctx: Context) -> dict[str, float]:
        raise NotImplementedError

    def eval(self, ctx: Context) -> dict[str, float]:
        return {}

    def samples(self, ctx: Context, out_dir: Path) -> list[Path]:
        return []

    def state_dict(self) -> TaskState:
        return TaskState()

    def load_state_dict(self, state: TaskState) -> None:
        return None

    def throughput(self) -> Throughput | None:
        return None

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def export(self, run_dir: Path) -> None:
        return None

    def card(self) -> dict[str, str]:
        """Markdown sections for card.md, e.g. {"Data": "...", "Sample": "..."}."""
        return {}


def adamw(
    module: nn.Module, cfg: TrainConfig, lr: float | None = None, betas: tuple[float, float] | None = None
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms), fused when the device has it.

    Parameters are grouped the nanoGPT way: >= 2-D tensors (weights of linears, embeddings, convs)
    decay; 1-D ones (biases, norm gains) do not. Shared parameters appear once.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    device = params[0].device.type if params else "cpu"
    fused = device in ("cpu", "cuda")  # torch >= 2.4 has fused AdamW kernels for both
    return torch.optim.AdamW(
        groups, lr=cfg.lr if lr is None else lr, betas=betas or cfg.betas, eps=cfg.eps, fused=fused
    )
