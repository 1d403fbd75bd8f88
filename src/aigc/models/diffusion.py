"""Denoising diffusion (DDPM, Ho et al. 2020) with classifier-free guidance (Ho & Salimans 2022).

The network is diffusers' `UNet2DModel`; the noise schedules and samplers are diffusers'
schedulers (DDPM, DDIM, DPM-Solver++), built from one `DiffusionConfig`. This file holds the
config, the builders and the denoising loop (`denoise`), kept apart as in diffusers: the model
maps tensors to tensors, the scheduler holds no weights, the loop is short and takes an explicit
`torch.Generator`.

Notation: B batch, C image channels, H = W = image_size, K = num_classes (K+1 with the null label).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from aigc.errors import AigcError

SAMPLERS = ("ddpm", "ddim", "dpm", "dpm-sde")


@dataclass
class DiffusionConfig:
    image_size: int = 32  # H = W; filled from the data set
    in_channels: int = 1  # C; filled from the data set
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # one UNet level each; levels-1 downsamplings
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = (2,)  # levels (0-based) with self-attention blocks
    norm_num_groups: int = 8
    # class conditioning: num_classes > 0 adds an embedding table with one extra "null" row that
    # label dropout trains, so one network gives both eps(x, y) and eps(x) for guidance.
    num_classes: int = 0
    label_dropout: float = 0.1
    # noise schedule (shared by training and every sampler)
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "squaredcos_cap_v2", "scaled_linear"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # what the network predicts: the noise ("epsilon", Ho et al.) or the velocity v = a_t eps - s_t x0
    # ("v_prediction", Salimans & Ho 2022). With a cosine schedule, epsilon's x0 = (x_t - s_t eps) / a_t
    # divides by a_t ~ 5e-5 at t = 999, so ODE samplers' first steps amplify its errors; v stays bounded
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    ema_decay: float = 0.999  # EMA of the weights; the EMA copy is what sampling uses
    # generation defaults (the CLI may override)
    sampler: Literal["ddpm", "ddim", "dpm", "dpm-sde"] = "dpm"
    steps: int = 20
    guidance: float = 3.0

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if levels < 1:
            raise ValueError("block_out_channels needs at least one level")
        # ranges first: a 0 or negative here crashes only later, mid-training (or divides by zero below)
        for name, value, low in (
            ("layers_per_block", self.layers_per_block, 1),
            ("norm_num_groups", self.norm_num_groups, 1),
            ("num_classes", self.num_classes, 0),
            ("num_train_timesteps", self.num_train_timesteps, 1),
            ("steps", self.steps, 1),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if any(c < 1 for c in self.block_out_channels):
            raise ValueError(
                f"every block_out_channels entry must be >= 1, got {list(self.block_out_channels)}"
            )
        if not 0 <= self.beta_start <= self.beta_end < 1:
            raise ValueError(
                f"the noise schedule needs 0 <= beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if self.steps > self.num_train_timesteps:
            raise ValueError(
                f"steps ({self.steps}) cannot exceed num_train_timesteps ({self.num_train_timesteps})"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block_out_channels entry must be divisible by norm_num_groups={self.norm_num_groups}"
            )
        if any(not 0 <= i < levels for i in self.attention_levels):
            raise ValueError(
                f"attention_levels must be level indices in 0..{levels - 1}, got {self.attention_levels}"
            )
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}"
            )
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        check_image_size(self.image_size, self.block_out_channels)

    @property
    def null_label(self) -> int:
        return self.num_classes  # the extra embedding row


def supported_sizes(block_out_channels: tuple[int, ...] | list[int]) -> tuple[int, list[int]]:
    """(multiple, examples): the UNet halves the size len-1 times and must double back exactly."""
    m = 2 ** (len(block_out_channels) - 1)
    return m, [s for s in (8, 16, 28, 32, 64, 128) if s % m == 0 and s >= m]


def check_image_size(size: int, block_out_channels: tuple[int, ...] | list[int]) -> None:
    m, examples = supported_sizes(block_out_channels)
    if size < m or size % m:
        raise AigcError(
            f"image size {size} is not supported by a UNet with {len(block_out_channels)} levels: sizes must "
            f"be multiples of {m} (e.g. {', '.join(map(str, examples))}); prepare the data with "
            f"--set size=N or change model.block_out_channels"
        )


def _probs(
    q: torch.Tensor, k: torch.Tensor, scale: float, scores: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out = softmax(q k^T * scale) for one chunk of heads: bf16 scores, softmax in fp32 stored as bf16."""
    torch.baddbmm(scores, q, k.transpose(1, 2), beta=0, alpha=scale, out=scores)  # (c, L, L)
    return torch.softmax(scores, -1, out=out)


class _ChunkedAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v for bf16 (N, L, d) tensors, computed as diffusers' `AttnProcessor`
    does under autocast (bf16 scores from `baddbmm`, softmax in fp32 rounded to bf16, bf16 `bmm`),
    with a hand-written backward and the (N, L, L) work done `chunk` heads at a time.

    Why: at UNet2DModel's head size 8 the matmuls are cheap (oneDNN bf16) and the time goes to the
    softmax and to memory: autograd through the plain maths allocates several fresh (N, L, L) fp32
    tensors per call, and glibc hands buffers that large back to the kernel on free, so each one is
    page-faulted in again (at 14x14 tokens, batch 16: 97 ms forward + backward; PyTorch's fp32 flash
    kernel 50 ms; this 33 ms, one thread). Here the scratch buffers hold one chunk and are reused,
    and backward recomputes P chunk by chunk as flash attention does (in the training step as fast
    as keeping all of P, measured, and memory stays O(N L d)).

    Backward: P again, dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
    dQ = dS K * scale, dK = dS^T Q * scale; dS in fp32, the matmuls in bf16 like the forward's.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, chunk: int):  # q, k, v: (N, L, d) bf16, contiguous
        n, length, _ = q.shape
        c = min(chunk, n)
        o = torch.empty_like(q)  # (N, L, d)
        scores, p = (q.new_empty(c, length, length) for _ in "sp")  # (c, L, L) each
        for i in range(0, n, chunk):
            h, m = slice(i, min(i + chunk, n)), min(chunk, n - i)
            torch.bmm(_probs(q[h], k[h], scale, scores[:m], out=p[:m]), v[h], out=o[h])  # (m, L, d)
        ctx.save_for_backward(q, k, v, o)
        ctx.scale, ctx.chunk = scale, chunk
        return o

    @staticmethod
    def backward(ctx, do):  # do: (N, L, d)
        q, k, v, o = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        n, length, _ = q.shape
        c = min(chunk, n)
        do = do.to(q.dtype).contiguous()
        delta = (do.float() * o.float()).sum(-1, keepdim=True)  # (N, L, 1) = rowsum(dP * P)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dp, p = (q.new_empty(c, length, length) for _ in "dp")  # (c, L, L) bf16; dp: scores, dP, dS
        a, b = (torch.empty(c, length, length, dtype=torch.float32, device=q.device) for _ in "ab")
        for i in range(0, n, chunk):
            h, m = slice(i, min(i + chunk, n)), min(chunk, n - i)
            ph = _probs(q[h], k[h], scale, dp[:m], out=p[:m])  # P of this chunk, as in forward
            torch.bmm(ph.transpose(1, 2), do[h], out=dv[h])  # dV = P^T dO
            torch.bmm(do[h], v[h].transpose(1, 2), out=dp[:m])  # dP = dO V^T
            a[:m].copy_(dp[:m]).sub_(delta[h]).mul_(b[:m].copy_(ph))  # dS = P * (dP - delta), fp32
            ds = dp[:m].copy_(a[:m])
            torch.baddbmm(dq[h], ds, k[h], beta=0, alpha=scale, out=dq[h])  # dQ = dS K * scale
            torch.baddbmm(dk[h], ds.transpose(1, 2), q[h], beta=0, alpha=scale, out=dk[h])  # dK
        return dq, dk, dv, None, None


CHUNK_SCORES = 1 << 20  # scores per chunk of heads (4 MB per fp32 scratch buffer)


@torch.compiler.disable  # traced by torch.compile it made the step ~1.8x slower: runs eagerly
def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of bf16 (N, L, d) tensors, N = batch * heads, through `_ChunkedAttention`."""
    chunk = max(1, CHUNK_SCORES // (q.shape[1] * k.shape[1]))
    with torch.autocast(q.device.type, enabled=False):  # the dtypes are chosen inside
        return _ChunkedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, chunk)


class SpatialAttnProcessor:
    """diffusers' attention for UNet2DModel's self-attention blocks, faster on CPUs under bf16.

    Same weights, same maths, chosen per call:
    - training under bf16 on a CPU (grad enabled): `chunked_attention`, the numerics of diffusers'
      `AttnProcessor` under autocast (bf16 scores, fp32 softmax) at 2/3 of the time of PyTorch's
      fp32 flash kernel (oracle test against `AttnProcessor`);
    - inference under bf16 on a CPU: the flash kernel with q, k, v in fp32, because in bf16 it is
      slow at UNet2DModel's head size of 8 (7x7 tokens 27 ms vs 4 ms in fp32, batch 16);
    - elsewhere (fp32, GPUs): `AttnProcessor2_0` unchanged (oracle test against it).
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:  # fmt: skip
        assert encoder_hidden_states is None and attention_mask is None and attn.spatial_norm is None
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, L, C), L = H*W tokens
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (B, L, C) each
        nh, d = attn.heads, k.shape[-1] // attn.heads
        dtype = q.dtype
        cpu_bf16 = q.device.type == "cpu" and dtype == torch.bfloat16  # bf16 autocast or weights
        if cpu_bf16 and torch.is_grad_enabled():
            q, k, v = (t.view(b, -1, nh, d).transpose(1, 2).reshape(b * nh, -1, d) for t in (q, k, v))
            o = chunked_attention(q, k, v, attn.scale)  # (B*nh, L, d)
            o = o.view(b, nh, -1, d).transpose(1, 2).reshape(b, -1, nh * d)  # (B, L, C)
        else:
            q, k, v = (t.view(b, -1, nh, d).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, d)
            if cpu_bf16:
                with torch.autocast("cpu", enabled=False):
                    o = F.scaled_dot_product_attention(q.float(), k.float(), v.float())  # (B, nh, L, d)
            else:
                o = F.scaled_dot_product_attention(q, k, v)
            o = o.transpose(1, 2).reshape(b, -1, nh * d).to(dtype)  # (B, L, C)
        o = attn.to_out[1](attn.to_out[0](o))  # output projection, dropout
        o = o.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        if attn.residual_connection:
            o = o + residual
        return o / attn.rescale_output_factor


def use_spatial_attn(unet) -> None:
    """Give every attention block of a UNet2DModel the `SpatialAttnProcessor` (weights untouched)."""
    from diffusers.models.attention_processor import Attention

    for m in unet.modules():
        if isinstance(m, Attention):
            m.set_processor(SpatialAttnProcessor())


def build_unet(cfg: DiffusionConfig):
    """The diffusers UNet2DModel described by `cfg` (plain noise predictor eps(x_t, t[, y])).

    Its attention blocks use `SpatialAttnProcessor` (same results, faster on CPUs under bf16).
    Keep it in the default, contiguous memory format: on CPUs, channels_last makes GroupNorm
    5-25x slower in bf16 (measured), which costs more than the 10-15 % it saves in the convs.
    """
    from diffusers import UNet2DModel

    levels = range(len(cfg.block_out_channels))
    unet = UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(
            "AttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels
        ),
        up_block_types=tuple(
            "AttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels)
        ),
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=8,
        # class_embed_type=None + num_class_embeds -> nn.Embedding added to the time embedding
        num_class_embeds=cfg.num_classes + 1 if cfg.num_classes > 0 else None,
    )
    use_spatial_attn(unet)
    return unet


def make_scheduler(cfg: DiffusionConfig, sampler: str = "ddpm"):
    """A diffusers scheduler for `sampler`, on the training noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if sampler not in SAMPLERS:
        raise AigcError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    common = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
    )
    if sampler == "ddpm":
        return DDPMScheduler(**common, variance_type="fixed_small", clip_sample=True)
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=True, set_alpha_to_one=True)
    # pixel-space model: dynamic thresholding keeps predicted x0 in range (as clip_sample does above).
    # "dpm" is the ODE solver (deterministic); "dpm-sde" (SDE-DPM-Solver++, 2M) draws fresh noise
    # from the generator at each step like DDPM, which corrects an imperfect model's errors: on a
    # 30-minute MNIST model at 20 steps its FD was 1.3x 1000-step DDPM's, the ODE's 2.3x (benchmarks.md)
    algorithm = "sde-dpmsolver++" if sampler == "dpm-sde" else "dpmsolver++"
    return DPMSolverMultistepScheduler(
        **common, algorithm_type=algorithm, solver_order=2, thresholding=True, sample_max_value=1.0
    )


def denoise(
    unet,
    scheduler,
    n: int,
    steps: int,
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    null_label: int | None = None,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample n images from noise with `scheduler`; returns (n, C, H, W) in [-1, 1].

    `x_T` (n, C, H, W) replaces the initial noise draw (latent interpolation uses it).

    Classifier-free guidance when `labels` is given and guidance != 1: the batch is doubled
    (conditional, null label) and eps = eps_uncond + w * (eps_cond - eps_uncond).
    """
    from diffusers import DDIMScheduler

    if steps < 1:
        raise AigcError(f"steps must be >= 1, got {steps}")
    c, s = unet.config.in_channels, unet.config.sample_size
    device, dtype = unet.device, unet.dtype
    # 1. start from pure noise x_T ~ N(0, I), drawn from the caller's generator
    if x_T is None:
        x = torch.randn((n, c, s, s), generator=generator, device=device, dtype=dtype)  # (B, C, H, W)
    else:
        x = x_T.to(device=device, dtype=dtype)
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    # DDIM with clip_sample: take the noise implied by the clipped x0 for the step's direction too;
    # diffusers' default keeps the unclipped one, and the mismatch compounds over many steps (on a
    # linear-schedule MNIST model, 100 DDIM steps: FD 2.41 by default, 0.51 with this)
    step_kw = {"use_clipped_model_output": True} if isinstance(scheduler, DDIMScheduler) else {}
    guided = labels is not None and guidance != 1.0
    if guided:
        assert null_label is not None
        labels = torch.cat([labels, torch.full_like(labels, null_label)])  # (2B)
    for t in scheduler.timesteps:
        # 2. predict the noise; with guidance, both halves in one batch
        x_in = torch.cat([x, x]) if guided else x  # (B or 2B, C, H, W)
        x_in = scheduler.scale_model_input(x_in, t)
        eps = unet(x_in, t, class_labels=labels).sample.to(x.dtype)  # fp32 even under bf16 autocast
        if guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        # 3. one reverse step x_t -> x_{t-1} (DDPM draws its variance noise from `generator`)
        x = scheduler.step(eps, t, x, generator=generator, **step_kw).prev_sample
    return x.clamp(-1, 1)


class EMA:
    """Exponential moving average of a module's float parameters and buffers (kept in fp32).

    decay ramps up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the
    random init (as diffusers' EMAModel does).
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        floats, targets = [], []
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                floats.append(self.shadow[k])
                targets.append(v.detach().float())
            else:
                self.shadow[k].copy_(v)
        torch._foreach_lerp_(floats, targets, 1 - d)  # one fused pass instead of ~270 small ops

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.shadow = {k: v.clone().float() for k, v in state.items()}
        self.num_updates = num_updates


def diffusion_loss(
    unet, scheduler, x0: torch.Tensor, labels: torch.Tensor | None, cfg: DiffusionConfig, generator=None
):
    """Noise-prediction loss (Ho et al. eq. 14): || eps - eps_theta(sqrt(a_t) x0 + sqrt(1-a_t) eps, t) ||^2,
    or with prediction_type "v_prediction" the same on v = sqrt(a_t) eps - sqrt(1-a_t) x0."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # (B, C, H, W)
    t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=generator, device=x0.device)  # (B)
    x_t = scheduler.add_noise(x0, noise, t)
    if labels is not None and cfg.label_dropout > 0:
        # label dropout: train the null label too, so guidance has an unconditional model
        drop = torch.rand(b, generator=generator, device=x0.device) < cfg.label_dropout
        labels = torch.where(drop, torch.full_like(labels, cfg.null_label), labels)
    pred = unet(x_t, t, class_labels=labels).sample
    target = scheduler.get_velocity(x0, noise, t) if cfg.prediction_type == "v_prediction" else noise
    return torch.nn.functional.mse_loss(pred.float(), target.float())


__all__ = [
    "EMA",
    "SAMPLERS",
    "SpatialAttnProcessor",
    "DiffusionConfig",
    "build_unet",
    "check_image_size",
    "chunked_attention",
    "denoise",
    "diffusion_loss",
    "make_scheduler",
    "supported_sizes",
    "use_spatial_attn",
]
