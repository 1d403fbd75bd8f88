"""Training Tasks for the image families: diffusion, VAE and GAN (see training/task.py for the protocol).

Shared by all three: the prepared images live on the device as uint8 (N, C, H, W); a batch is
`batch_size` random indices drawn from a Task-owned generator (so resume is exact), scaled to
the data's value range, optionally flipped. The last `val_count` images are held out for eval.

- DiffusionTask: noise-prediction loss on a diffusers UNet2DModel, label dropout for
  classifier-free guidance, an EMA of the weights (saved in checkpoints, used for samples and
  for the artifact), a diffusers-format export (`diffusers/` loads in DDPMPipeline).
- VAETask: negative ELBO; samples are prior draws and reconstructions.
- GANTask: one Task, two optimizers ("D" then "G" each step); logs d_loss, g_loss, D accuracy and
  sample diversity, and warns when they say the GAN is collapsing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc.data.images import PreparedImages, load_prepared_images
from aigc.errors import AigcError
from aigc.models.diffusion import EMA, DiffusionConfig, build_unet, denoise, diffusion_loss, make_scheduler
from aigc.models.gan import GAN, GANConfig, d_accuracy, d_loss, g_loss
from aigc.models.vae import VAE, VAEConfig
from aigc.training.config import TrainConfig
from aigc.training.task import Context, Task, TaskState, Throughput, adamw
from aigc.utils.paths import hide_host_paths

log = logging.getLogger("aigc.train")

IMAGE_FAMILIES = ("diffusion", "vae", "gan")
MODEL_CONFIGS: dict[str, type] = {"diffusion": DiffusionConfig, "vae": VAEConfig, "gan": GANConfig}


def check_sample_interval(n: int) -> None:
    from aigc.errors import ConfigError

    if n < 0:
        raise ConfigError(f"sample_interval must be >= 0 (0 = samples only at the end), got {n}")


@dataclass
class DiffusionRunConfig:
    model: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    conditional: bool = False  # class-conditional (needs labelled data)
    sample_interval: int = 0  # steps between sample grids in samples/; 0 = only at the end

    def __post_init__(self) -> None:
        check_sample_interval(self.sample_interval)


@dataclass
class VAERunConfig:
    model: VAEConfig = field(default_factory=VAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample_interval: int = 0

    def __post_init__(self) -> None:
        check_sample_interval(self.sample_interval)


@dataclass
class GANRunConfig:
    model: GANConfig = field(default_factory=GANConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    conditional: bool = False
    sample_interval: int = 0

    def __post_init__(self) -> None:
        check_sample_interval(self.sample_interval)


RUN_CONFIGS: dict[str, type] = {"diffusion": DiffusionRunConfig, "vae": VAERunConfig, "gan": GANRunConfig}


def fit_model_to_data(
    family: str, model: dict[str, Any], data: PreparedImages, conditional: bool
) -> dict[str, Any]:
    """Fill the data-given fields of a model config dict (size, channels, classes)."""
    c, h, w = data.meta["shape"]
    if h != w:
        raise AigcError(f"images are {h}x{w}; the image models need square images: prepare with --set size=N")
    model = {**model, "image_size": h, "in_channels": c}
    if family in ("diffusion", "gan"):
        if conditional and data.meta.get("num_classes", 0) < 2:
            raise AigcError(
                "conditional=true needs labelled data with at least 2 classes (sub-folders, IDX/npz labels); "
                f"{data.meta.get('source')} has {data.meta.get('num_classes', 0)}"
            )
        model["num_classes"] = data.meta["num_classes"] if conditional else 0
    return model


def save_grid(x: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """(B, C, H, W) in [-1, 1] -> one PNG grid (duplicated from generation.image_io: training stays below it)."""
    from PIL import Image

    from aigc.utils.io import atomic_write

    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
    b, c, h, w = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / nrow))
    grid = torch.zeros((c, rows * (h + 2) + 2, nrow * (w + 2) + 2), dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = x[i]
    a = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(a[..., 0] if c == 1 else a)
    return atomic_write(path, lambda p: img.save(p, format="PNG"))


class _ImageTask(Task):
    """Data handling shared by the image Tasks."""

    def __init__(self, data: PreparedImages, train: TrainConfig, val_fraction: float = 0.05) -> None:
        self.data = data
        self.train_cfg = train
        n = len(data.images)
        self.val_count = min(512, int(n * val_fraction)) if n >= 40 else 0
        self.train_count = n - self.val_count
        if train.batch_size > self.train_count:  # before anything is allocated for such a batch
            raise AigcError(
                f"train.batch_size={train.batch_size} is larger than the training set: {self.train_count:,} "
                f"train images ({self.val_count:,} more held out for eval); lower it "
                f"(--set train.batch_size={self.train_count}) or prepare more images"
            )
        self.images = torch.from_numpy(np.ascontiguousarray(data.images))  # uint8 (N, C, H, W), moved lazily
        self.labels = torch.from_numpy(data.labels.astype(np.int64))
        self.lo, self.hi = data.config.value_range
        self.flip = data.config.flip
        self.gen = torch.Generator().manual_seed(train.seed)  # batch draws: ours, so resume is exact
        self.step_count = 0
        self.samples_dir: Path | None = None  # set by train_image: grids every sample_interval steps
        self.sample_interval = 0

    def maybe_sample(self, ctx: Context) -> None:
        """Write a sample grid mid-training (the Trainer itself samples only at the end)."""
        if not (self.samples_dir and self.sample_interval and ctx.rank == 0):
            return
        if self.step_count % self.sample_interval:
            return
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        modes = {name: m.training for name, m in ctx.raw_modules.items()}
        for m in ctx.raw_modules.values():
            m.eval()
        with torch.no_grad():
            self.samples(ctx, self.samples_dir)
        for name, m in ctx.raw_modules.items():
            m.train(modes[name])

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255.0 * (self.hi - self.lo) + self.lo  # uint8 -> value_range

    def next_batch(self, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a random global batch: images (b, C, H, W) float, labels (b)."""
        b = ctx.cfg.batch_size
        idx = torch.randint(0, self.train_count, (b,), generator=self.gen)[ctx.rank_slice(b)]
        flips = torch.rand(b, generator=self.gen)[ctx.rank_slice(b)] < 0.5
        x = self._to_float(self.images[idx])
        if self.flip:  # horizontal flip augmentation on half the batch
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        x = x.to(ctx.device, non_blocking=True)
        return x, self.labels[idx].to(ctx.device)

    def val_batches(self, ctx: Context):
        """Fixed held-out batches (the last `val_count` images), for comparable val losses."""
        b = ctx.cfg.batch_size
        start = self.train_count
        for i in range(ctx.cfg.eval_batches):
            lo = start + i * b
            if lo >= len(self.images):
                break
            sl = slice(lo, min(lo + b, len(self.images)))
            yield self._to_float(self.images[sl]).to(ctx.device), self.labels[sl].to(ctx.device)

    def throughput(self) -> Throughput:
        return Throughput("images", self.train_cfg.batch_size * self.train_cfg.grad_accum)

    def state_dict(self) -> TaskState:
        return TaskState(tensors={"batch_rng": self.gen.get_state()}, meta={"step_count": self.step_count})

    def load_state_dict(self, state: TaskState) -> None:
        self.gen.set_state(state.tensors["batch_rng"])
        self.step_count = int(state.meta.get("step_count", 0))

    def _data_card(self) -> str:
        m = self.data.meta
        source = hide_host_paths(str(m["source"]))  # a folder's name, not where it lies on this machine
        return (
            f"{m['count']} images of {m['shape']} from {source} (hash {m['source_hash']}); "
            f"classes: {', '.join(m['classes']) or 'none'}; {self.val_count} held out for eval"
        )


# ============================================================================ diffusion


class DiffusionTask(_ImageTask):
    family = "diffusion"

    def __init__(self, cfg: DiffusionConfig, data: PreparedImages, train: TrainConfig) -> None:
        super().__init__(data, train)
        self.cfg = cfg
        self.unet = build_unet(cfg)  # contiguous: channels_last slows GroupNorm (see build_unet)
        self.ema = EMA(self.unet, cfg.ema_decay)
        self.ema_unet = build_unet(cfg)  # scratch module the EMA weights are copied into to sample/eval
        self.noise = make_scheduler(cfg, "ddpm")  # add_noise only; holds no weights

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.unet}

    def optimizers(self, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        return {"model": adamw(self.unet, cfg)}

    def _labels(self, y: torch.Tensor) -> torch.Tensor | None:
        return y if self.cfg.num_classes > 0 else None

    def training_step(self, ctx: Context) -> dict[str, float]:
        for _ in ctx.accumulate("model"):
            x, y = self.next_batch(ctx)
            with ctx.autocast():
                loss = diffusion_loss(ctx.modules["model"], self.noise, x, self._labels(y), self.cfg)
            ctx.backward(loss)
        ctx.step("model")
        self.ema.update(ctx.raw_modules["model"])
        self.step_count += 1
        self.maybe_sample(ctx)
        return {"loss": ctx.mean(loss)}

    def _ema_model(self, device: torch.device) -> nn.Module:
        self.ema.copy_to(self.ema_unet)
        return self.ema_unet.to(device).eval()

    def eval(self, ctx: Context) -> dict[str, float]:
        if not self.val_count:
            return {}
        unet = self._ema_model(ctx.device)
        g = torch.Generator(device=ctx.device).manual_seed(0)  # same noise and t every eval
        losses = []
        for x, y in self.val_batches(ctx):
            with ctx.autocast():
                losses.append(
                    float(diffusion_loss(unet, self.noise, x, self._labels(y), self.cfg, generator=g))
                )
        return {"val_loss": ctx.mean(sum(losses) / len(losses))}

    def samples(self, ctx: Context, out_dir: Path) -> list[Path]:
        unet = self._ema_model(ctx.device)
        g = torch.Generator(device=ctx.device).manual_seed(0)
        n, labels = 16, None
        if self.cfg.num_classes:  # one row per class (up to 10 classes x 4 samples)
            k = min(self.cfg.num_classes, 10)
            n, labels = 4 * k, torch.arange(k, device=ctx.device).repeat_interleave(4)
        sched = make_scheduler(self.cfg, self.cfg.sampler)
        with torch.no_grad():
            x = denoise(unet, sched, n, self.cfg.steps, g, labels, self.cfg.guidance, self.cfg.null_label)
        return [
            save_grid(x, out_dir / f"step-{self.step_count:07d}.png", nrow=4 if labels is not None else None)
        ]

    def state_dict(self) -> TaskState:
        state = super().state_dict()
        state.tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        state.meta["ema_updates"] = self.ema.num_updates
        return state

    def load_state_dict(self, state: TaskState) -> None:
        super().load_state_dict(state)
        ema = {k.removeprefix("ema."): v for k, v in state.tensors.items() if k.startswith("ema.")}
        self.ema.load_state_dict(ema, int(state.meta["ema_updates"]))

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.ema.state_dict().items()}

    def export(self, run_dir: Path) -> None:
        export_diffusers(self.cfg, self.artifact_tensors(), Path(run_dir) / "diffusers")

    def card(self) -> dict[str, str]:
        kind = (
            f"class-conditional ({self.cfg.num_classes} classes, CFG)"
            if self.cfg.num_classes
            else "unconditional"
        )
        n = sum(p.numel() for p in self.unet.parameters())
        return {
            "Model": f"UNet2DModel {kind}, {n / 1e6:.2f}M parameters, EMA decay {self.cfg.ema_decay}",
            "Data": self._data_card(),
            "Use": diffusers_usage(self.cfg),
        }


def diffusers_usage(cfg: DiffusionConfig) -> str:
    """The card's "Use" section: `aigc generate image`, or the `diffusers/` export in diffusers.

    An unconditional run loads in `DDPMPipeline`; a class-conditional one does not run there (its
    UNet needs `class_labels`, which the pipeline never passes), so its card gives the sampling loop
    with labels and classifier-free guidance (the null label is K = num_classes)."""
    if not cfg.num_classes:
        return "`aigc generate image --model RUN` or `DDPMPipeline.from_pretrained(RUN/diffusers)`"
    k, c, s = cfg.num_classes, cfg.in_channels, cfg.image_size
    return f"""`aigc generate image --model RUN --label CLASS` (a class index or name), or in diffusers:
`DDPMPipeline` cannot call this class-conditional UNet (it passes no `class_labels`); run the loop:

```python
import torch
from diffusers import DDPMScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("RUN/diffusers/unet").eval()
scheduler = DDPMScheduler.from_pretrained("RUN/diffusers/scheduler")
labels = torch.tensor({list(range(min(k, 4)))})  # class indices 0..{k - 1}, in the order of the classes above
null = torch.full_like(labels, {k})  # the null label: the unconditional half of guidance
guidance = {cfg.guidance}
g = torch.Generator().manual_seed(0)
x = torch.randn((len(labels), {c}, {s}, {s}), generator=g)
scheduler.set_timesteps(scheduler.config.num_train_timesteps)
with torch.no_grad():
    for t in scheduler.timesteps:
        eps = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
        eps_cond, eps_uncond = eps.chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x, generator=g).prev_sample
images = (x.clamp(-1, 1) + 1) / 2  # (B, {c}, {s}, {s}) in [0, 1]
```"""


def export_diffusers(cfg: DiffusionConfig, weights: dict[str, torch.Tensor], out: Path) -> Path:
    """Write a diffusers DDPMPipeline directory (unet/ + scheduler/ + model_index.json), atomically."""

    from diffusers import DDPMPipeline

    from aigc.utils.io import building_dir

    unet = build_unet(cfg)
    unet.load_state_dict(weights)
    with building_dir(out) as stage:
        DDPMPipeline(unet=unet, scheduler=make_scheduler(cfg, "ddpm")).save_pretrained(
            stage, safe_serialization=True
        )
    return out


# ============================================================================ VAE


class VAETask(_ImageTask):
    family = "vae"

    def __init__(self, cfg: VAEConfig, data: PreparedImages, train: TrainConfig) -> None:
        super().__init__(data, train)
        self.cfg = cfg
        self.vae = VAE(cfg)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.vae}

    def training_step(self, ctx: Context) -> dict[str, float]:
        for _ in ctx.accumulate("model"):
            x, _ = self.next_batch(ctx)
            with ctx.autocast():
                loss, parts = ctx.modules["model"](x)
            ctx.backward(loss)
        ctx.step("model")
        self.step_count += 1
        self.maybe_sample(ctx)
        return {"loss": ctx.mean(loss), "recon": ctx.mean(parts["recon"]), "kl": ctx.mean(parts["kl"])}

    def eval(self, ctx: Context) -> dict[str, float]:
        if not self.val_count:
            return {}
        g = torch.Generator(device=ctx.device).manual_seed(0)
        losses = [float(ctx.raw_modules["model"](x, generator=g)[0]) for x, _ in self.val_batches(ctx)]
        return {"val_loss": ctx.mean(sum(losses) / len(losses))}

    def samples(self, ctx: Context, out_dir: Path) -> list[Path]:
        vae = ctx.raw_modules["model"]
        g = torch.Generator(device=ctx.device).manual_seed(0)
        x = vae.sample(16, generator=g)
        real = self._to_float(self.images[:8]).to(ctx.device)
        recon = torch.cat([real, vae.reconstruct(real)])  # top: inputs, bottom: reconstructions
        return [
            save_grid(x, out_dir / f"step-{self.step_count:07d}.png"),
            save_grid(recon, out_dir / f"recon-{self.step_count:07d}.png", nrow=8),
        ]

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.vae.state_dict().items()}

    def card(self) -> dict[str, str]:
        return {
            "Model": f"conv VAE, latent {self.cfg.latent_dim}, beta {self.cfg.beta}, {self.vae.num_params() / 1e6:.2f}M parameters",
            "Data": self._data_card(),
        }


# ============================================================================ GAN


class GANTask(_ImageTask):
    """DCGAN as one Task with two optimizers: each step updates D once, then G once."""

    family = "gan"
    collapse_steps = 50  # consecutive suspicious steps before warning

    def __init__(self, cfg: GANConfig, data: PreparedImages, train: TrainConfig) -> None:
        super().__init__(data, train)
        self.cfg = cfg
        self.gan = GAN(cfg)
        self.suspicious = 0
        self.warned = False

    def modules(self) -> dict[str, nn.Module]:
        return {"G": self.gan.generator, "D": self.gan.discriminator}

    def optimizers(self, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        return {
            "D": adamw(self.gan.discriminator, cfg, lr=self.cfg.d_lr),
            "G": adamw(self.gan.generator, cfg),
        }

    def training_step(self, ctx: Context) -> dict[str, float]:
        G, D = ctx.modules["G"], ctx.modules["D"]
        real, y = self.next_batch(ctx)
        y = y if self.cfg.num_classes else None
        z = torch.randn((real.shape[0], self.cfg.latent_dim), device=ctx.device)  # (B, Z), global RNG
        # 1. discriminator: real -> 1, G(z) (detached) -> 0
        with ctx.autocast():
            fake = G(z, y)
            d_real, d_fake = D(real, y), D(fake.detach(), y)
            loss_d = d_loss(d_real, d_fake)
        ctx.backward(loss_d, accumulated=False)
        ctx.step("D")
        # 2. generator: non-saturating, make D call G(z) real
        with ctx.autocast():
            loss_g = g_loss(D(fake, y))
        ctx.backward(loss_g, accumulated=False)
        ctx.step("G")
        self.step_count += 1
        acc = d_accuracy(d_real.float(), d_fake.float())
        diversity = float(fake.detach().float().std(dim=0).mean())  # ~0 when every sample is the same
        self._watch(acc, diversity)
        self.maybe_sample(ctx)
        return {
            "loss": ctx.mean(loss_d + loss_g),
            "d_loss": ctx.mean(loss_d),
            "g_loss": ctx.mean(loss_g),
            "d_acc": ctx.mean(acc),
            "diversity": ctx.mean(diversity),
        }

    def _watch(self, acc: float, diversity: float) -> None:
        """Warn once when D wins outright or G's samples stop differing, for `collapse_steps` steps."""
        self.suspicious = self.suspicious + 1 if (acc > 0.98 or diversity < 0.02) else 0
        if self.suspicious >= self.collapse_steps and not self.warned:
            self.warned = True
            log.warning(
                "GAN may be collapsing at step %d: D accuracy %.2f, sample diversity %.3f for %d steps; "
                "try model.spectral_norm=true, a lower model.d_lr, or restart from an earlier checkpoint",
                self.step_count,
                acc,
                diversity,
                self.collapse_steps,
            )

    def eval(self, ctx: Context) -> dict[str, float]:
        if not self.val_count:
            return {}
        G, D = ctx.raw_modules["G"], ctx.raw_modules["D"]
        g = torch.Generator(device=ctx.device).manual_seed(0)
        accs = []
        for x, y in self.val_batches(ctx):
            y = y if self.cfg.num_classes else None
            z = torch.randn((x.shape[0], self.cfg.latent_dim), generator=g, device=ctx.device)
            accs.append(d_accuracy(D(x, y), D(G(z, y), y)))
        return {"val_d_acc": ctx.mean(sum(accs) / len(accs))}

    def samples(self, ctx: Context, out_dir: Path) -> list[Path]:
        g = torch.Generator(device=ctx.device).manual_seed(0)
        n, labels = 16, None
        if self.cfg.num_classes:
            k = min(self.cfg.num_classes, 10)
            n, labels = 4 * k, torch.arange(k, device=ctx.device).repeat_interleave(4)
        z = torch.randn((n, self.cfg.latent_dim), generator=g, device=ctx.device)
        with torch.no_grad():
            x = ctx.raw_modules["G"](z, labels)
        return [
            save_grid(x, out_dir / f"step-{self.step_count:07d}.png", nrow=4 if labels is not None else None)
        ]

    def state_dict(self) -> TaskState:
        state = super().state_dict()
        state.meta.update({"suspicious": self.suspicious, "warned": self.warned})
        return state

    def load_state_dict(self, state: TaskState) -> None:
        super().load_state_dict(state)
        self.suspicious = int(state.meta.get("suspicious", 0))
        self.warned = bool(state.meta.get("warned", False))

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.gan.generator.state_dict().items()}

    def card(self) -> dict[str, str]:
        kind = (
            f"class-conditional ({self.cfg.num_classes} classes)" if self.cfg.num_classes else "unconditional"
        )
        sn = ", spectral norm" if self.cfg.spectral_norm else ""
        return {
            "Model": f"DCGAN {kind}{sn}, {self.gan.num_params() / 1e6:.2f}M parameters",
            "Data": self._data_card(),
        }


TASKS: dict[str, type[_ImageTask]] = {"diffusion": DiffusionTask, "vae": VAETask, "gan": GANTask}


def build_image_task(
    family: str, data_dir: str | Path, preset: str | None = None, overrides: list[str] | dict | None = None
) -> tuple[_ImageTask, Any]:
    """Resolve the run config (defaults -> preset -> overrides -> sizes from the data) and build the Task.

    Returns (task, run_config); `run_config` is a dataclass with `model` and `train` tables.
    """
    from aigc.config import from_dict, load_preset, merge, parse_overrides

    if family not in TASKS:
        raise AigcError(f"unknown image family {family!r}; valid: {', '.join(IMAGE_FAMILIES)}")
    data = load_prepared_images(data_dir)
    raw: dict[str, Any] = load_preset(family, preset) if preset else {}
    if overrides:
        raw = merge(raw, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    run_cls = RUN_CONFIGS[family]
    conditional = bool(raw.get("conditional", False))
    model = fit_model_to_data(family, raw.get("model", {}), data, conditional)
    run = from_dict(run_cls, {**raw, "model": model})
    task = TASKS[family](run.model, data, run.train)
    return task, run


def run_config_dict(family: str, run: Any, data_dir: str | Path) -> dict[str, Any]:
    """The artifact's config.json: {"family", "model", "train", "data"} (+ the data meta)."""
    from aigc.config import to_dict

    d = to_dict(run)
    data = load_prepared_images(data_dir)
    return {
        "family": family,
        "model": d["model"],
        "train": d["train"],
        "data": {
            "dir": str(data_dir),
            **{k: data.meta[k] for k in ("source", "source_hash", "shape", "classes", "value_range")},
        },
        **({"conditional": d["conditional"]} if "conditional" in d else {}),
    }


def load_image_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[str, Any, nn.Module]:
    """Rebuild a trained image model from its artifact: (family, model config, module in eval mode)."""
    from safetensors.torch import load_file

    from aigc.config import from_dict
    from aigc.utils.io import read_json

    run_dir = Path(run_dir)
    cfg = read_json(run_dir / "config.json")
    family = cfg.get("family")
    if family not in MODEL_CONFIGS:
        raise AigcError(
            f"{run_dir} holds a {family!r} model, not an image model ({', '.join(IMAGE_FAMILIES)})"
        )
    mcfg = from_dict(MODEL_CONFIGS[family], cfg["model"], prefix="model.")
    module: nn.Module
    if family == "diffusion":
        module = build_unet(mcfg)
    elif family == "vae":
        module = VAE(mcfg)
    else:
        module = GAN(mcfg).generator
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise AigcError(f"{run_dir} has no model.safetensors; the run did not finish a checkpoint")
    module.load_state_dict(load_file(str(weights)))
    return family, mcfg, module.to(device).eval()


def train_image(
    family: str,
    data: str | Path,
    out: str | Path,
    preset: str | None = "auto",
    overrides: list[str] | dict | None = None,
    max_steps: int | None = None,
    max_time: float | None = None,
    resume: bool = False,
    init_from: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Any = None,
):
    """Train an image model (`aigc train gan|vae|diffusion --data DIR --out RUN`); returns TrainResult.

    Order: defaults -> preset ("auto" = small) -> `overrides` -> --max-steps/--max-time -> sizes from
    the data. A --max-time without --max-steps lets the clock alone end the run.
    """
    from aigc.config import load_preset, merge, parse_overrides
    from aigc.training.distributed import env_info
    from aigc.training.trainer import Trainer, check_resumable, run_dir_lock, seed_everything, start_fresh

    if init_from is not None:
        raise AigcError(
            "--init-from is for text models; image runs start from scratch or continue with --resume"
        )
    raw = (
        dict(overrides or {})
        if isinstance(overrides, dict) or overrides is None
        else parse_overrides(overrides)
    )
    budget: dict[str, Any] = {}
    if max_time is not None:
        budget["max_time"] = max_time
        if max_steps is None and "max_steps" not in raw.get("train", {}):
            budget["max_steps"] = None
    if max_steps is not None:
        budget["max_steps"] = max_steps
    if budget:
        raw = merge(raw, {"train": budget})
    preset = "small" if preset == "auto" else preset
    out = Path(out)
    with run_dir_lock(out):  # held to the end: a second run into `out` is refused meanwhile
        if resume:
            check_resumable(out)  # (the checkpoint's own config is checked when it is loaded)
        # seed before building the model so its initialisation is repeatable
        merged = merge(load_preset(family, preset) if preset else {}, raw)
        seed_everything(int(merged.get("train", {}).get("seed", TrainConfig.seed)))
        task, run = build_image_task(family, data, preset, raw)  # validates config and batch size
        if not resume and env_info().is_main:
            start_fresh(out, overwrite, log)  # a fresh run must not resume or mix with old files
        task.samples_dir = out / "samples"
        task.sample_interval = run.sample_interval
        run_config = run_config_dict(family, run, data)
        trainer = Trainer(task, run.train, out, run_config, resume=resume, progress=progress, log=log)
        return trainer.fit()


__all__ = [
    "IMAGE_FAMILIES",
    "RUN_CONFIGS",
    "TASKS",
    "DiffusionTask",
    "GANTask",
    "VAETask",
    "build_image_task",
    "diffusers_usage",
    "export_diffusers",
    "load_image_model",
    "run_config_dict",
    "save_grid",
    "train_image",
]
