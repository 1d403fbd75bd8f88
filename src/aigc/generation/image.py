"""ImageGenerator: one front for every image model (our diffusion/VAE/GAN runs, diffusers pipelines).

    gen = ImageGenerator.load("runs/digits")           # a trained run directory
    gen = ImageGenerator.load("hf:path/to/sd-pipeline") # a local diffusers pipeline (or hub id)
    out = gen.generate(n=16, seed=0, label=7, guidance=3.0, sampler="dpm", steps=20)
    out.save("outputs/")                                # PNGs with parameters + grid.png

Parameters are checked against what the model can do before any tensor work, so a bad request
fails with one line that lists the allowed values. Randomness comes from one explicit
`torch.Generator` per image, seeded `seed + i`, so image i is `generate(n=1, seed=seed + i)` with
its label alone (up to a batched pass's rounding); that seed is recorded in the image's PNG text
chunks. `seed_per_image=False` draws the whole call from one generator, as diffusers' pipelines do.

A model that takes no text (ours, an unconditional pipeline) accepts a prompt only when it is empty
or names one of its classes (case and surrounding spaces ignored): `prompt="3"` is `label="3"`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aigc.errors import AigcError
from aigc.generation.image_io import make_grid, save_gif, save_png, to_pil, upscale
from aigc.models.diffusion import SAMPLERS, denoise, make_scheduler

HF_PREFIX = "hf:"
# Scheduler options on top of make_scheduler's, per sampler (our diffusion runs); bench/bench_samplers.py
# overrides entries to measure them ("dpm-sde:20:use_lu_lambdas=1"). Empty on purpose: on the MNIST
# runs of docs/benchmarks.md ("DPM-Solver++ at 20 steps") no option tried beat diffusers' defaults
# at 20 steps (log-SNR / Karras / exponential / beta spacing, lambda clipping, leading spacing,
# sigma_min final step, Euler final step, Heun update, order 1 or 3, thresholding ratio).
SAMPLER_OPTIONS: dict[str, dict[str, Any]] = {}
# sampling precision of our diffusion models; auto = bf16 where it beats fp32
DTYPES = ("auto", "bf16", "fp32")
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed keeps 64 bits; text and music take 0..2**63-1 too


def check_seed(seed: int, n: int = 1) -> None:
    """Image i of a call uses seed + i: all n of them must lie in 0..SEED_MAX, never wrap around."""
    if not 0 <= seed <= SEED_MAX - max(n, 1) + 1:
        top = SEED_MAX - max(n, 1) + 1
        for_n = f" for {n} images (image i uses seed + i, up to 2**63-1)" if n > 1 else ""
        raise AigcError(f"--seed {seed} is out of range; allowed: 0..{top}{for_n}; pick a seed in that range")


def _autocast_dtype(dtype: str) -> torch.dtype | None:
    """bf16 autocast for "bf16" (and "auto" on a CPU whose bf16 kernels beat fp32); None = plain fp32."""
    from aigc.training.trainer import autocast_dtype

    if dtype not in DTYPES:
        raise AigcError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return autocast_dtype(dtype, torch.device("cpu"), option="--dtype")  # training's rule


@dataclass
class GeneratedImages:
    """What `generate` returns: PIL images and, for each, the parameters that made it."""

    images: list
    params: list[dict[str, Any]] = field(default_factory=list)
    tensor: torch.Tensor | None = None  # (n, C, H, W) in [-1, 1] before 8-bit rounding (our models only)

    def save(
        self, out_dir: str | Path, grid: bool = True, scale: int = 1, prefix: str = "image"
    ) -> list[Path]:
        """Write `<prefix>-000.png`... (+ `grid.png`) into `out_dir`; each PNG carries its params."""
        out_dir = Path(out_dir)
        paths = [
            save_png(upscale(img, scale), out_dir / f"{prefix}-{i:03d}.png", p)
            for i, (img, p) in enumerate(zip(self.images, self.params, strict=True))
        ]
        if grid and self.images:
            shared = {k: v for k, v in self.params[0].items() if k not in ("index", "label")}
            labels = sorted({str(p.get("label")) for p in self.params})
            shared["label"] = labels[0] if len(labels) == 1 else ",".join(labels)
            paths.append(save_png(upscale(make_grid(self.images), scale), out_dir / "grid.png", shared))
        return paths


def sampler_scheduler(cfg, sampler: str):
    """The diffusers scheduler our diffusion runs sample with: make_scheduler + SAMPLER_OPTIONS."""
    sched = make_scheduler(cfg, sampler)
    extra = SAMPLER_OPTIONS.get(sampler)
    return type(sched).from_config(sched.config, **extra) if extra else sched


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation: keeps Gaussian noise at its usual norm (a straight line would shrink it)."""
    fa, fb = a.flatten(), b.flatten()
    omega = torch.arccos(torch.clamp(torch.dot(fa / fa.norm(), fb / fb.norm()), -1, 1))
    if omega.abs() < 1e-4:
        return (1 - t) * a + t * b
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def _randn(shape: tuple[int, ...], g: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise of `shape` from one generator, or row i from generator i (a list)."""
    if isinstance(g, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=gi) for gi in g])  # (len(g), ...)
    return torch.randn(shape, generator=g)


class ImageGenerator:
    """Generate images from a trained run (`family` diffusion | vae | gan) or a diffusers pipeline."""

    def __init__(self, family: str, model: Any, config: Any, name: str, classes: list[str] | None = None):
        self.family = family  # "diffusion" | "vae" | "gan" | "hf"
        self.model = model  # UNet2DModel | VAE | Generator | DiffusionPipeline
        self.config = config
        self.name = name
        self.classes = classes or []

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, name: str | Path, device: str = "cpu") -> ImageGenerator:
        """A run directory, or `hf:<dir or id>` for a diffusers pipeline (StableDiffusion, DDPM, ...)."""
        name = str(name)
        if name.startswith(HF_PREFIX):
            return cls._load_hf(name[len(HF_PREFIX) :], device)
        path = Path(name)
        if not (path / "config.json").is_file():
            raise AigcError(
                f"{name} is not a model directory (no config.json); pass a run directory or hf:<dir>"
            )
        from aigc.training.image_tasks import load_image_model
        from aigc.utils.io import read_json

        family, mcfg, module = load_image_model(path, device)
        classes = read_json(path / "config.json").get("data", {}).get("classes", [])
        return cls(family, module, mcfg, path.name, classes)

    @classmethod
    def _load_hf(cls, ref: str, device: str) -> ImageGenerator:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(ref, use_safetensors=True)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AigcError(
                f"cannot load diffusers pipeline {ref!r}: {first}; pass a local directory saved with "
                "save_pretrained (safetensors weights) or a hub id reachable online"
            ) from None
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls("hf", pipe, None, ref)

    # ---------------------------------------------------------------- checks

    @property
    def conditional(self) -> bool:
        return self.family in ("diffusion", "gan") and self.config.num_classes > 0

    @property
    def is_text_to_image(self) -> bool:
        return self.family == "hf" and hasattr(self.model, "tokenizer")

    @property
    def class_names(self) -> list[str]:
        """What a label or a prompt may name: the run's classes (their indices as text where it has none)."""
        if not self.conditional:
            return []
        k = self.config.num_classes
        names = [str(c) for c in self.classes[:k]]
        return names + [str(i) for i in range(len(names), k)]

    def label_from_prompt(self, prompt: str | None, label: Any = None) -> Any:
        """The label a prompt gives a model that takes no text: an empty prompt leaves `label` as it is;
        a class name (case and surrounding spaces ignored) gives that class's index, which `label`, if
        given too, must agree with. Anything else is an AigcError listing the class names."""
        text = (prompt or "").strip()
        if not text:
            return label
        names = self.class_names
        if not names:
            raise AigcError(
                f"{self.name} is an unconditional {self.family} model: it takes no prompt (a prompt names a "
                "class of a class-conditional model, or is text for a text-to-image one); send none or an empty one"
            )
        hits = [i for i, c in enumerate(names) if c.strip().casefold() == text.casefold()]
        if len(hits) > 1:  # names that differ only in case: the exact spelling decides
            hits = [i for i in hits if names[i].strip() == text]
        if len(hits) != 1:
            shown = ", ".join(repr(c) for c in names[:50]) + (", ..." if len(names) > 50 else "")
            raise AigcError(
                f"prompt {text!r} is not a class of {self.name}; a {self.family} model takes no text: a prompt "
                f"must name one of its classes ({shown}) or be empty"
            )
        idx = hits[0]
        if label is not None:
            wanted = [
                self._label_index(one) for one in (label if isinstance(label, (list, tuple)) else [label])
            ]
            if any(w != idx for w in wanted):

                def shown(i: int) -> str:
                    return str(i) if names[i] == str(i) else f"{i} ({names[i]})"

                raise AigcError(
                    f"prompt {text!r} names class {shown(idx)} but label {label!r} asks for class "
                    f"{', '.join(shown(w) for w in dict.fromkeys(wanted))}; send one of them, or both alike"
                )
        return idx

    def label_of(self, i: int, label: Any = None, prompt: str | None = None) -> Any:
        """The label image i of a call gets, so that it can be made alone with n=1: one of a list, the
        given one or the class the prompt names, else the classes in turn (i % k, as `generate` cycles them)."""
        if not self.is_text_to_image:
            label = self.label_from_prompt(prompt, label)
        if isinstance(label, (list, tuple)):
            return label[i]
        if label is None and self.conditional:
            return i % self.config.num_classes
        return label

    def _check(
        self, label, guidance, sampler, steps, prompt
    ) -> tuple[int | None, float | None, str | None, int | None]:
        """Validate a request against the model; return (label index, guidance, sampler, steps) resolved."""
        if sampler is not None and sampler not in SAMPLERS:
            raise AigcError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        if steps is not None and steps < 1:
            raise AigcError(f"steps must be >= 1, got {steps}")
        if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
            raise AigcError(
                f"--guidance {guidance} is out of range; allowed: a number >= 0 (0 = unconditional samples, "
                "1 = conditional without guidance, about 3 = the usual strength)"
            )
        if self.family in ("vae", "gan") and (sampler is not None or steps is not None):
            raise AigcError(
                f"--sampler/--steps apply to diffusion models; this is a {self.family} (one forward pass)"
            )
        if not self.is_text_to_image:  # no text: a prompt may only name a class (or be empty)
            label = self.label_from_prompt(prompt, label)
        if self.family == "hf":
            if label is not None:
                raise AigcError(f"{self.name} is not class-conditional; drop --label")
            if guidance is not None and not self.is_text_to_image:
                raise AigcError(
                    f"{self.name} is unconditional: guidance needs a text-to-image model; drop --guidance"
                )
            return None, guidance, sampler, steps
        if not self.conditional:
            if label is not None or guidance is not None:
                which = "--label" if label is not None else "--guidance"
                # what can be trained instead: vae runs are never conditional, guidance is diffusion's
                family = self.family if (self.family == "gan" and which == "--label") else "diffusion"
                never = " (vae runs are never class-conditional)" if self.family == "vae" else ""
                raise AigcError(
                    f"{self.name} is an unconditional {self.family} model: {which} needs a class-conditional "
                    f"{family} run{never}; drop {which}, or train one with `aigc train {family} --set "
                    "conditional=true` on labelled data"
                )
            return (
                None,
                None,
                sampler or getattr(self.config, "sampler", None),
                steps or getattr(self.config, "steps", None),
            )
        if guidance is not None and self.family != "diffusion":
            raise AigcError("guidance applies to diffusion models; drop --guidance for a GAN")
        idx: int | list[int] | None = None
        if isinstance(label, (list, tuple)):
            idx = [self._label_index(one) for one in label]  # one label per image
        elif label is not None:
            idx = self._label_index(label)
        if self.family == "diffusion":
            guidance = self.config.guidance if guidance is None else guidance
            return idx, guidance, sampler or self.config.sampler, steps or self.config.steps
        return idx, None, None, None

    def _label_index(self, label: int | str) -> int:
        """A class index from an index or a class name; AigcError when outside the classes."""
        k = self.config.num_classes
        names = self.classes[:k]
        if isinstance(label, str) and label in names:
            return names.index(label)
        try:
            idx = int(label)
        except (TypeError, ValueError):
            idx = -1
        if not 0 <= idx < k:
            shown = f" (names: {', '.join(names)})" if names and names != [str(i) for i in range(k)] else ""
            raise AigcError(f"label {label!r} is outside the classes 0..{k - 1}{shown}; pick one of them")
        return idx

    def check(
        self,
        n: int = 1,
        label: int | str | list[int | str] | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        prompt: str | None = None,
        batch_size: int = 64,
        dtype: str = "auto",
    ) -> tuple[Any, float | None, str | None, int | None]:
        """Every check `generate` makes, with no tensor work (a server admits a job with it); returns
        (label index or indices, guidance, sampler, steps) resolved against the model."""
        if n < 1:
            raise AigcError(f"n must be >= 1, got {n}")
        if batch_size < 1:
            raise AigcError(f"batch_size must be >= 1, got {batch_size}")
        label_idx, guidance, sampler, steps = self._check(label, guidance, sampler, steps, prompt)
        if isinstance(label_idx, list) and len(label_idx) != n:
            raise AigcError(f"{len(label_idx)} labels for n={n} images; give one label, or n of them")
        self._amp(dtype)
        return label_idx, guidance, sampler, steps

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        n: int = 1,
        seed: int | Sequence[int] = 0,
        label: int | str | list[int | str] | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        prompt: str | None = None,
        batch_size: int = 64,
        size: int | None = None,
        dtype: str = "auto",
        seed_per_image: bool = True,
    ) -> GeneratedImages:
        """n images; `label` is one class for all, or a list of n; without it labels cycle through the classes.

        A model that takes no text accepts a `prompt` only when it is empty or names a class (then it is the label).
        `dtype` (diffusion runs): "auto" samples under bf16 autocast where the CPU's bf16 kernels beat fp32
        (1.2-1.5x faster, FD unchanged within noise: docs/benchmarks.md), "fp32" the exact path.
        `seed_per_image` (default): image i draws all its noise from its own generator seeded `seed + i`
        (recorded as its seed), so `generate(n=1, seed=seed + i)` with its label gives image i alone; False:
        one generator for the whole call (diffusers' pipelines' way, which the oracle tests compare against).
        A list of n seeds: image i from its own generator seeded seeds[i] (a server merging requests).
        """
        if not isinstance(seed, int):
            if len(seed) != n:
                raise AigcError(f"{len(seed)} seeds for n={n} images; give one seed, or n of them")
            seeds, seed_per_image = [int(s) for s in seed], True
            for s in seeds:
                check_seed(s)
        else:
            check_seed(seed, n if seed_per_image else 1)
            seeds = [seed + i if seed_per_image else seed for i in range(n)]
        label_idx, guidance, sampler, steps = self.check(
            n, label, guidance, sampler, steps, prompt, batch_size, dtype
        )
        amp = self._amp(dtype)
        if not self.is_text_to_image:
            prompt = None  # it named the label (or was empty)
        g: torch.Generator | list[torch.Generator] = torch.Generator(device="cpu").manual_seed(seeds[0])
        if seed_per_image:
            g = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        base = {
            "model": self.name,
            "family": self.family,
            "seed": seeds[0],
            "n": n,
            "time": round(time.time(), 3),
        }
        if self.family == "hf":
            return self._generate_hf(n, g, guidance, sampler, steps, prompt, size, base, seeds, batch_size)
        labels = None
        if self.conditional:
            k = self.config.num_classes
            if isinstance(label_idx, list):
                labels = torch.tensor(label_idx)
            else:
                # no label: the classes in turn (label_of gives image i's alone)
                labels = torch.full((n,), label_idx) if label_idx is not None else torch.arange(n) % k
        outs = []
        for start in range(0, n, batch_size):  # one generator (or one per image) across batches
            b = min(batch_size, n - start)
            lab = labels[start : start + b] if labels is not None else None
            gb = g[start : start + b] if isinstance(g, list) else g
            outs.append(self._sample(b, gb, lab, guidance, sampler, steps, amp=amp))
        x = torch.cat(outs)  # (n, C, H, W) in [-1, 1]
        params = []
        for i in range(n):
            p = {
                **base,
                "seed": seeds[i],
                "index": i,
                "sampler": sampler,
                "steps": steps,
                "guidance": guidance,
            }
            if self.family == "diffusion":
                p["dtype"] = "bf16" if amp is not None else "fp32"
            p["label"] = int(labels[i]) if labels is not None else None
            params.append(p)
        return GeneratedImages(to_pil(x), params, x)

    def _amp(self, dtype: str) -> torch.dtype | None:
        """The autocast dtype for sampling (diffusion only; VAE/GAN/hf always run as loaded)."""
        if dtype not in DTYPES:
            raise AigcError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        if self.family != "diffusion":
            if dtype == "bf16":
                raise AigcError(
                    f"--dtype {dtype} applies to our diffusion runs; this is a {self.family} model"
                )
            return None
        return _autocast_dtype(dtype)

    def _sample(self, b, g, labels, guidance, sampler, steps, x_T=None, amp=None) -> torch.Tensor:
        """One batch from our own models: (b, C, H, W) in [-1, 1] (diffusion: under `amp` autocast).

        `g` is one generator, or a list of b (image i's noise, x_T and each step's, from g[i]).
        """
        if self.family == "diffusion":
            if x_T is None and isinstance(g, list):  # denoise draws x_T from one generator only
                cfg = self.model.config
                x_T = _randn((b, cfg.in_channels, cfg.sample_size, cfg.sample_size), g)  # (b, C, H, W)
            sched = sampler_scheduler(self.config, sampler)
            w = guidance if labels is not None else 1.0
            # the UNet runs in bf16 under autocast; x, the guidance mix and the solver stay fp32
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                x = denoise(self.model, sched, b, steps, g, labels, w, self.config.null_label, x_T=x_T)
            return x.float()
        z = x_T if x_T is not None else _randn((b, self.config.latent_dim), g)  # (b, latent_dim)
        if self.family == "vae":
            return self.model.decode(z)
        return self.model(z, labels)

    def _generate_hf(
        self, n, g, guidance, sampler, steps, prompt, size, base, seeds, batch_size
    ) -> GeneratedImages:
        """One pipeline call with one generator; with one generator per image (a list), batch_size at a time."""
        pipe = self.model
        if sampler is not None:  # swap the scheduler, keeping the pipeline's noise schedule
            from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

            cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}.get(sampler, DPMSolverMultistepScheduler)
            extra = {"algorithm_type": "sde-dpmsolver++" if sampler == "dpm-sde" else "dpmsolver++"}
            extra = extra if cls is DPMSolverMultistepScheduler else {}
            pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
        steps = steps or (50 if self.is_text_to_image else 1000)
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "output_type": "pil"}
        if self.is_text_to_image:
            kwargs.update(prompt=prompt or "")
            kwargs["guidance_scale"] = 7.5 if guidance is None else guidance  # the pipelines' default
            if size is not None:
                kwargs.update(height=size, width=size)
        count = "num_images_per_prompt" if self.is_text_to_image else "batch_size"
        chunk = batch_size if isinstance(g, list) else n  # one generator: one call, as before
        images = []
        for start in range(0, n, chunk):
            b = min(chunk, n - start)
            gb = g[start : start + b] if isinstance(g, list) else g
            images += pipe(**kwargs, **{count: b}, generator=gb).images
        used = sampler or type(pipe.scheduler).__name__
        params = [
            {
                **base,
                "seed": seeds[i],
                "index": i,
                "sampler": used,
                "steps": steps,
                "guidance": kwargs.get("guidance_scale"),
                "prompt": prompt,
            }
            for i in range(len(images))
        ]
        return GeneratedImages(list(images), params)

    # ---------------------------------------------------------------- animation

    @torch.no_grad()
    def animate(
        self,
        frames: int = 24,
        seed: int = 0,
        label: int | str | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        keyframes: int = 3,
        dtype: str = "auto",
    ) -> tuple[list, dict[str, Any]]:
        """A latent interpolation: slerp through `keyframes` random latents (looping back), one image per frame.

        Diffusion models walk the initial noise x_T with a deterministic sampler (DDIM or DPM-Solver++;
        the fresh noise of DDPM and dpm-sde at every step would make the frames flicker).
        """
        if self.family == "hf":
            raise AigcError("--animate works with our own diffusion/VAE/GAN runs, not hf: pipelines")
        if frames < 2 or keyframes < 2:
            raise AigcError(f"an animation needs frames >= 2 and keyframes >= 2, got {frames}, {keyframes}")
        if isinstance(label, (list, tuple)):
            raise AigcError("an animation takes one --label (the whole walk is one class)")
        label_idx, guidance, sampler, steps = self._check(label, guidance, sampler, steps, None)
        amp = self._amp(dtype)
        if self.family == "diffusion" and sampler in ("ddpm", "dpm-sde"):  # stochastic: frames would flicker
            sampler = {"ddpm": "ddim", "dpm-sde": "dpm"}[sampler]
        check_seed(seed)
        g = torch.Generator(device="cpu").manual_seed(seed)
        if self.family == "diffusion":
            c, s = self.config.in_channels, self.config.image_size
            keys = [torch.randn((1, c, s, s), generator=g) for _ in range(keyframes)]
        else:
            keys = [torch.randn((1, self.config.latent_dim), generator=g) for _ in range(keyframes)]
        keys.append(keys[0])  # loop
        latents = []
        for i in range(frames):
            pos = i / frames * keyframes
            j, t = int(pos), pos - int(pos)
            latents.append(_slerp(keys[j], keys[j + 1], t))
        x_T = torch.cat(latents)  # (frames, ...)
        labels = None
        if self.conditional:
            labels = torch.full((frames,), label_idx if label_idx is not None else 0)
        x = self._sample(frames, g, labels, guidance, sampler, steps, x_T=x_T, amp=amp)
        params = {"model": self.name, "family": self.family, "seed": seed, "frames": frames, "sampler": sampler,
                  "steps": steps, "guidance": guidance, "label": None if labels is None else int(labels[0]),
                  "animation": f"slerp through {keyframes} latents",
                  **({"dtype": "bf16" if amp is not None else "fp32"} if self.family == "diffusion" else {})}  # fmt: skip
        return to_pil(x), params

    def save_animation(
        self, frames: list, params: dict[str, Any], path: str | Path, scale: int = 1, fps: float = 12
    ):
        return save_gif([upscale(f, scale) for f in frames], path, fps=fps, params=params)


def load_image_generator(name: str | Path, device: str = "cpu") -> ImageGenerator:
    return ImageGenerator.load(name, device)


__all__ = [
    "DTYPES",
    "SAMPLER_OPTIONS",
    "SEED_MAX",
    "GeneratedImages",
    "ImageGenerator",
    "check_seed",
    "load_image_generator",
    "sampler_scheduler",
]
