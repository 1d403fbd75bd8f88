"""UNet training speed: our DiffusionTask step vs the plain diffusers-example loop, one process.

    python bench/bench_unet_train.py                 # 28x28, batch 16, MNIST if found else digits
    python bench/bench_unet_train.py --quick         # fewer steps (a smoke check)
    python bench/bench_unet_train.py --channels 128,128,256,256,512,512 --size 64   # the example's own UNet
    python bench/bench_unet_train.py --threads 1 --peer-bf16   # + the peer under bf16 autocast too
    python bench/bench_unet_train.py --threads 1 --same-loss 200   # our attention trains as diffusers'

Both sides train the same `UNet2DModel` (same config, same initial weights) on the same images with
the same noise-prediction loss. The peer is the loop of diffusers' `examples/unconditional_image_
generation/train_unconditional.py` without accelerate: fp32, a torch DataLoader over float tensors,
`torch.optim.AdamW`, `DDPMScheduler.add_noise`, `F.mse_loss`. Ours is exactly what the Trainer runs
per step: `DiffusionTask.training_step` (bf16 autocast where supported, `SpatialAttnProcessor`:
in training under bf16 diffusers' `AttnProcessor` maths with a chunked, hand-written backward,
contiguous tensors, uint8 images resident in memory, fused AdamW, EMA update included). The peer
keeps diffusers' default attention processor (`AttnProcessor2_0`). Steps alternate one by one
between the sides so machine drift hits both; we print the median images/s of each and the ratio,
by wall clock and by process CPU time (the fairer one on a shared machine with --threads 1).
`--peer-bf16` adds the peer loop under bf16 autocast, to show what the rest of our step buys.

The UNet layout: diffusers' example uses 6 levels (128..512 channels, attention at level 5), which
needs sizes divisible by 32; at 28x28 we keep its shape rules (2 resnets per level, attention on the
second-to-last level) at three levels, (64, 128, 128), the largest that divides 28 (28 -> 14 -> 7).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from aigc.data.images import ImageDataConfig, PreparedImages, find_mnist, read_source
from aigc.models.diffusion import DiffusionConfig, build_unet, make_scheduler
from aigc.training.config import TrainConfig
from aigc.training.image_tasks import DiffusionTask
from aigc.training.task import Context
from aigc.training.trainer import autocast_dtype


def load_images(size: int, limit: int) -> PreparedImages:
    """MNIST (or digits, resized) as uint8 (N, 1, size, size), in memory."""
    from aigc.data.images import _fit_all

    source = "mnist" if find_mnist() else "digits"
    cfg = ImageDataConfig(size=size, limit=limit, fit="pad" if source == "mnist" else "resize")
    images, labels, _ = _fit_all(read_source(source), cfg)
    meta = {"shape": list(images.shape[1:]), "num_classes": 10, "classes": [str(i) for i in range(10)],
            "count": len(images), "source": source, "source_hash": "-"}  # fmt: skip
    return PreparedImages(images, labels, meta, cfg)


def plain_loop(cfg: DiffusionConfig, state: dict, data: PreparedImages, batch: int, bf16: bool = False):
    """The diffusers example's step (fp32, DataLoader, AdamW), as a callable (`bf16`: + autocast)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    unet = build_unet(cfg)
    for m in unet.modules():  # diffusers' own default attention, not our SpatialAttnProcessor
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0())
    unet.load_state_dict(state)
    unet.train()
    sched = make_scheduler(cfg, "ddpm")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    x_all = torch.from_numpy(data.images).float() / 127.5 - 1  # the example normalises to [-1, 1]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_all), batch_size=batch, shuffle=True, drop_last=True
    )
    it = iter(loader)

    def step() -> None:
        nonlocal it
        try:
            (clean,) = next(it)
        except StopIteration:
            it = iter(loader)
            (clean,) = next(it)
        noise = torch.randn(clean.shape)
        t = torch.randint(0, sched.config.num_train_timesteps, (clean.shape[0],)).long()
        noisy = sched.add_noise(clean, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = unet(noisy, t, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def our_loop(
    cfg: DiffusionConfig,
    state: dict,
    data: PreparedImages,
    batch: int,
    precision: str,
    compile: bool = False,
    lr: float = 1e-4,
    diffusers_attention: bool = False,
):
    """DiffusionTask.training_step driven as the Trainer drives it, as a callable returning the loss.

    `diffusers_attention`: with diffusers' `AttnProcessor2_0` instead of our `SpatialAttnProcessor`.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    train = TrainConfig(batch_size=batch, lr=lr, weight_decay=0.0, max_steps=1000, precision=precision)
    task = DiffusionTask(cfg, data, train)
    task.unet.load_state_dict(state)
    for m in task.unet.modules():
        if diffusers_attention and isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0())
    modules = task.modules()
    for m in modules.values():
        m.train()
    device = torch.device("cpu")
    wrapped = (
        {name: torch.compile(m) for name, m in modules.items()} if compile else modules
    )  # as train.compile
    ctx = Context(train, device, wrapped, modules, task.optimizers(train), autocast_dtype(precision, device))
    return lambda: task.training_step(ctx)["loss"]


def same_loss(cfg: DiffusionConfig, state: dict, data: PreparedImages, batch: int, steps: int) -> None:
    """Train ours and ours with diffusers' attention on the same seeds; print mean losses per 25 steps."""
    sides = {
        "SpatialAttnProcessor": our_loop(cfg, state, data, batch, "auto", lr=3e-4),
        "AttnProcessor2_0": our_loop(cfg, state, data, batch, "auto", lr=3e-4, diffusers_attention=True),
    }
    losses: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(steps):
        for name, step in sides.items():
            torch.manual_seed(1000 + i)  # the same noise and timesteps for both
            losses[name].append(step())
        if (i + 1) % 25 == 0:
            print(
                f"steps {i - 23}-{i + 1}: "
                + " | ".join(f"{n} {statistics.mean(v[-25:]):.4f}" for n, v in losses.items())
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--channels", default="64,128,128", help="UNet block_out_channels")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time our step compiled (train.compile=true)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--peer-bf16", action="store_true", help="also time the peer loop under bf16 autocast")
    ap.add_argument("--same-loss", type=int, default=0, metavar="STEPS",
                    help="instead: train STEPS with our attention and with diffusers', same seeds, and print the losses")  # fmt: skip
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.rounds = 3, 1
    channels = tuple(int(c) for c in args.channels.split(","))
    levels = len(channels)
    cfg = DiffusionConfig(
        image_size=args.size, in_channels=1, block_out_channels=channels, layers_per_block=2,
        attention_levels=(levels - 2,) if levels > 1 else (), norm_num_groups=32 if min(channels) % 32 == 0 else 8,
    )  # fmt: skip
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_unet(cfg).state_dict().items()}
    data = load_images(args.size, limit=4096)
    n_params = sum(v.numel() for v in state.values())
    print(f"UNet2DModel {channels}, {n_params / 1e6:.1f}M params, {args.size}x{args.size}, batch {args.batch}, "
          f"{data.meta['source']} ({len(data.images)} images), torch threads {torch.get_num_threads()}")  # fmt: skip
    if args.same_loss:
        return same_loss(cfg, state, data, args.batch, args.same_loss)
    # Steps alternate one by one (plain, ours, plain, ...) so load from other processes hits both
    # sides alike; the median step time of each side gives its images/s.
    sides = {
        "diffusers-example loop": plain_loop(cfg, state, data, args.batch),
        f"ours ({args.precision})": our_loop(cfg, state, data, args.batch, args.precision),
    }
    if args.compile:  # its first step compiles (not timed); the compile time is printed
        sides[f"ours ({args.precision}, compiled)"] = our_loop(
            cfg, state, data, args.batch, args.precision, True
        )
    if args.peer_bf16:
        sides["diffusers-example loop + bf16 autocast"] = plain_loop(cfg, state, data, args.batch, bf16=True)
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    first: dict[str, tuple[float, float]] = {}
    for i in range(2 + args.steps * args.rounds):
        for name, step in sides.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if i == 0:
                first[name] = (time.perf_counter() - t0, time.process_time() - c0)
            if i >= 2:  # the first two steps warm up allocations, kernel choice (and compilation)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    peer = next(iter(sides))
    ours = [n for n in sides if n.startswith("ours")]
    others = [n for n in sides if n not in ours and n != peer]
    for name in ours:
        if "compiled" in name:
            print(f"{name}: first step (compilation) {first[name][0]:.1f} s wall, {first[name][1]:.1f} s CPU")
    for clock, times in (("wall", wall), ("CPU", cpu)):
        rates = {name: args.batch / statistics.median(ts) for name, ts in times.items()}
        print(f"median by {clock} time: " + " | ".join(f"{n} {r:.1f} img/s" for n, r in rates.items()))
        for name in ours:
            print(f"  {name} / peer {rates[name] / rates[peer]:.2f}x"
                  + "".join(f" | / {n} {rates[name] / rates[n]:.2f}x" for n in others))  # fmt: skip


if __name__ == "__main__":
    main()
