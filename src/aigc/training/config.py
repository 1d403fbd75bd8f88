"""`TrainConfig`: the settings the shared Trainer owns (optimizer, schedule, precision, budgets, ...).

Every family's run config has a `train` table of this type; presets set it in `[train]` and
`--set train.lr=3e-4` overrides it. Per-family knobs (e.g. a GAN's second learning rate) live in the
family's own config table, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Precision = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass
class TrainConfig:
    # optimizer: AdamW (fused kernel when the device has one)
    lr: float = 3e-4  # peak learning rate (after warmup)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm per optimizer; 0 disables clipping
    # batches: batch_size is the GLOBAL micro-batch (split across DDP ranks); one optimizer step
    # sees batch_size * grad_accum examples.
    batch_size: int = 12
    grad_accum: int = 1
    # budgets: training stops at whichever comes first; with max_time the LR schedule follows
    # the elapsed fraction of the time budget (short budgets are won by optimizer steps).
    max_steps: int | None = 2000
    max_time: float | None = None  # seconds of training (eval and checkpoint time included)
    # evaluation, early stopping, checkpoints, logging
    eval_interval: int = 250  # steps between evaluations; 0 = only at the end
    eval_batches: int = 20
    early_stop_patience: int = 0  # evaluations without val_loss improvement before stopping; 0 = never
    ckpt_interval: int = 500  # steps between resumable checkpoints; 0 = only at the end
    keep_last: int = 2  # resumable checkpoints kept on disk
    log_interval: int = 10
    tensorboard: bool = False
    # device and speed
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" | "mps"
    precision: Precision = "auto"  # auto = bf16 autocast where supported, else fp32 (weights stay fp32)
    compile: bool = (
        False  # torch.compile the model(s); the text `auto` preset turns it on for GPT runs of >= 300 s
    )
    peak_flops: float | None = None  # matmul ceiling for MFU; None = measure once and cache
    seed: int = 1337

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (all(0 <= b < 1 for b in self.betas), f"betas must be in [0, 1), got {list(self.betas)}"),
            (self.eps >= 0, f"eps must be >= 0, got {self.eps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (
                self.max_time is None or self.max_time > 0,
                f"max_time must be > 0 seconds, got {self.max_time}",
            ),
            (self.eval_interval >= 0, f"eval_interval must be >= 0, got {self.eval_interval}"),
            (self.eval_batches >= 1, f"eval_batches must be >= 1, got {self.eval_batches}"),
            (self.ckpt_interval >= 0, f"ckpt_interval must be >= 0, got {self.ckpt_interval}"),
            (self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}"),
            (self.log_interval >= 1, f"log_interval must be >= 1, got {self.log_interval}"),
            (
                self.early_stop_patience >= 0,
                f"early_stop_patience must be >= 0, got {self.early_stop_patience}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.max_steps is None and self.max_time is None:
            raise ValueError("set a budget: max_steps or max_time (e.g. --max-steps 2000 or --max-time 600)")
