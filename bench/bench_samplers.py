"""Sampler quality per step: Fréchet distance of DPM-Solver++ / DDIM / DDPM samples of one run.

    python bench/bench_samplers.py --run runs/mnist-cond --data data/mnist-test --estimate
    python bench/bench_samplers.py --run runs/mnist-cond --data data/mnist-test --n 500 \\
        --samplers dpm:20,ddpm:1000 --guidance 1
    python bench/bench_samplers.py --run R --data D --n 1000 --samplers dpm:10 --dtypes fp32,bf16

Every sampler draws `n` images from the same model (same seed, same labels: they cycle through
the classes), then each set is scored as `aigc eval` scores it: features of the data set's own
classifier (`aigc.evaluation.images.feature_classifier`, trained on the run's training images and
cached), Fréchet distance (FD) to `n` held-out real images (`--data`, e.g. MNIST's test split).
`--real M` takes M held-out images for the reference statistics instead of `n` (the
generated side stays `n`): less noise in every FD at no sampling cost. Two floors say how much of a
gap is noise: real vs real (`n` training images vs the held-out ones) and, with `--noise-seed 1`, every sampler again under another seed. The first sampler is the
reference the others are compared with (ratio = FD / FD of the reference under the same seed).

A sampler may carry scheduler options after its steps, overriding `SAMPLER_OPTIONS`
(aigc.generation.image) for that entry: `dpm-sde:20:use_lu_lambdas=0` is the SDE on diffusers'
default spacing, `dpm:20:use_lu_lambdas=1` the ODE on log-SNR spacing. `--cache DIR` keeps each
sampler's images (uint8, keyed by run, sampler, options, steps, seed, n, dtype, guidance) so the
1000-step DDPM reference is sampled once per seed (~800 CPU-s per 250 images here).

`--seeds 0-7` runs every sampler under each seed (n images each, cached) and then scores each
sampler's n x 8 images together: one FD per sampler at 8x the sample size, the floor at that size,
and a leave-one-seed-out jackknife interval of each ratio.

`--estimate` times one small batch of each sampler and prints the projected cost of the full run
(1000-step DDPM is expensive on a CPU: ~1000 x 2 UNet evaluations per image with guidance).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import numpy as np
import torch

from aigc.data.images import load_prepared_images
from aigc.evaluation.images import (
    conditional_accuracy,
    extract_features,
    feature_classifier,
    frechet_distance,
)
from aigc.generation import image as image_mod
from aigc.generation.image import ImageGenerator
from aigc.utils.io import read_json


def parse_samplers(spec: str) -> list[tuple[str, int, dict]]:
    """ "dpm:20,ddpm:1000,dpm-sde:20:use_lu_lambdas=0" -> [("dpm", 20, {}), ..., ("dpm-sde", 20, {...})]."""
    out = []
    for part in spec.split(","):
        name, steps, *opts = part.strip().split(":")
        kw = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            kw[key] = json.loads(value)  # 0 / 1 / -5.1 / "leading" (quoted)
        out.append((name, int(steps), kw))
    return out


def label(sampler: str, opts: dict) -> str:
    return sampler + "".join(f" {k}={v}" for k, v in opts.items())


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(n, C, H, W) in [-1, 1] -> uint8, as `aigc eval` rounds samples."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a diffusion run directory")
    ap.add_argument("--data", required=True, help="prepared held-out images (e.g. MNIST test split)")
    ap.add_argument("--n", type=int, default=500, help="images per sampler (and real images)")
    ap.add_argument("--samplers", default="dpm:20,ddpm:1000", help="name:steps,... (first = reference)")
    ap.add_argument("--dtypes", default="auto", help="sampling precisions to compare: auto, bf16, fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-seed", type=int, default=None, help="rerun every sampler with this seed too")
    ap.add_argument(
        "--seeds",
        default=None,
        help="seeds to pool (0-3 or 0,2,5): each seed's rows, then every sampler's n x seeds "
        "images scored together, with a leave-one-seed-out jackknife interval of the ratio",
    )
    ap.add_argument("--guidance", type=float, default=None, help="guidance (default: the run's)")
    ap.add_argument(
        "--real",
        type=int,
        default=None,
        help="held-out images for the reference statistics (default: n; more = less noise)",
    )
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--estimate", action="store_true", help="time one batch of each, print the projection")
    ap.add_argument("--cache", default=None, help="directory keeping each sampler's images across runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    samplers = parse_samplers(args.samplers)
    dtypes = args.dtypes.split(",")
    gen = ImageGenerator.load(args.run)
    if gen.family != "diffusion":
        raise SystemExit(f"{args.run} is a {gen.family} run; this benchmark compares diffusion samplers")
    k = gen.config.num_classes
    print(f"run {args.run}: UNet {list(gen.config.block_out_channels)}, {k or 'no'} classes, "
          f"guidance {args.guidance if args.guidance is not None else gen.config.guidance if k else '-'}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip

    def sample(
        sampler: str, steps: int, opts: dict, n: int, seed: int, dtype: str
    ) -> tuple[np.ndarray, list, float, float]:
        guidance = args.guidance if k else None
        key = json.dumps(
            [os.path.abspath(args.run), sampler, opts, steps, seed, n, dtype, guidance, args.batch]
        )
        path = args.cache and os.path.join(args.cache, hashlib.sha1(key.encode()).hexdigest()[:16] + ".npz")
        if path and os.path.exists(path):
            z = np.load(path)
            return z["x"], list(z["labels"]), float(z["cpu"]), float(z["wall"])
        saved = image_mod.SAMPLER_OPTIONS.get(sampler)
        image_mod.SAMPLER_OPTIONS[sampler] = {**(saved or {}), **opts}  # this entry's scheduler options
        try:
            c0, w0 = time.process_time(), time.perf_counter()
            out = gen.generate(n=n, seed=seed, sampler=sampler, steps=steps, guidance=guidance,
                               batch_size=args.batch, dtype=dtype)  # fmt: skip
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        finally:
            image_mod.SAMPLER_OPTIONS.pop(sampler)
            if saved is not None:
                image_mod.SAMPLER_OPTIONS[sampler] = saved
        labels = [p["label"] if p["label"] is not None else -1 for p in out.params]
        x = to_uint8(out.tensor)
        if path:
            os.makedirs(args.cache, exist_ok=True)
            np.savez(path + ".part.npz", x=x, labels=np.array(labels), cpu=cpu, wall=wall)
            os.replace(path + ".part.npz", path)  # a killed run leaves no half-written entry
        return x, labels, cpu, wall

    if args.estimate:
        m = min(args.batch, 50)
        for sampler, steps, opts in samplers:
            for dtype in dtypes:
                _, _, cpu, wall = sample(sampler, min(steps, 20), opts, m, 0, dtype)
                per = cpu / (m * min(steps, 20))
                print(f"{label(sampler, opts)}:{steps} {dtype}: {per * 1e3:.2f} ms CPU per image-step -> n={args.n}: "
                      f"~{per * args.n * steps:.0f} s CPU (measured wall/CPU here {wall / cpu:.1f}x)")  # fmt: skip
        return

    # the feature network of the run's training data (as aigc eval builds it; cached by data hash)
    cfg = read_json(f"{args.run}/config.json")
    train = load_prepared_images(cfg["data"]["dir"])
    held = load_prepared_images(args.data).images
    net, info = feature_classifier(train.images, train.labels)
    rng = np.random.default_rng(0)
    n = min(args.n, len(held), len(train.images))
    m = min(args.real or n, len(held))
    f_held = extract_features(net, held[np.sort(rng.choice(len(held), m, replace=False))])
    f_train = extract_features(net, train.images[np.sort(rng.choice(len(train.images), n, replace=False))])
    floor = frechet_distance(f_train, f_held)
    print(
        f"feature network {info['hash']} (test accuracy {info['test_accuracy']:.3f}); n = {n}, {m} held-out images"
    )
    print(f"floor: real (training) vs real (held out): FD {floor:.3f}")
    print(
        "| sampler | steps | dtype | seed | FD vs held-out | ratio to first | label accuracy | CPU s | wall s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    pool = parse_seeds(args.seeds) if args.seeds else []
    seeds = pool or ([args.seed] if args.noise_seed is None else [args.seed, args.noise_seed])
    runs = [(*s, dtype, seed) for seed in seeds for s in samplers for dtype in dtypes]
    ref = {}  # seed -> FD of the first sampler under that seed
    for sampler, steps, opts, dtype, seed in runs:
        x, labels, cpu, wall = sample(sampler, steps, opts, n, seed, dtype)
        fd = frechet_distance(extract_features(net, x), f_held)
        ref.setdefault(seed, fd)
        acc = f"{conditional_accuracy(net, x, np.array(labels))['accuracy']:.3f}" if k else "-"
        print(f"| {label(sampler, opts)} | {steps} | {dtype} | {seed} | {fd:.3f} | {fd / ref[seed]:.3f} | {acc} | "
              f"{cpu:.0f} | {wall:.0f} |", flush=True)  # fmt: skip
    if pool:
        names = [f"{label(s, o)}:{st} {dtype}" for s, st, o in samplers for dtype in dtypes]
        feats = [
            extract_features(net, np.concatenate([sample(s, st, o, n, seed, dtype)[0] for seed in pool]))
            for s, st, o in samplers
            for dtype in dtypes
        ]
        m_train = min(len(feats[0]), len(train.images))  # a small training set: all of it
        pooled_floor = frechet_distance(
            extract_features(
                net, train.images[np.sort(rng.choice(len(train.images), m_train, replace=False))]
            ),
            f_held,
        )
        report_pooled(names, feats, f_held, pool, pooled_floor)


def parse_seeds(spec: str) -> list[int]:
    """ "0-3" -> [0, 1, 2, 3]; "0,2,5" -> [0, 2, 5]."""
    if "-" in spec:
        lo, hi = spec.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in spec.split(",")]


def report_pooled(
    names: list[str], feats: list[np.ndarray], f_held: np.ndarray, pool: list[int], floor: float
) -> None:
    """FD of each sampler's pooled images, and a leave-one-seed-out jackknife of FD / FD of the first.

    The seeds are independent blocks (image i of every sampler shares its seed and label), so
    dropping one seed from all samplers at once keeps the comparison paired. A bootstrap with
    replacement would duplicate images, which adds to every FD alike and pulls ratios toward 1.
    """
    fds = [frechet_distance(f, f_held) for f in feats]
    k, n = len(pool), len(feats[0]) // len(pool)
    loo = []  # per left-out seed: every sampler's ratio
    for s in range(k):
        rows = np.r_[0 : s * n, (s + 1) * n : k * n]
        ref = frechet_distance(feats[0][rows], f_held)
        loo.append([frechet_distance(f[rows], f_held) / ref for f in feats])
    loo = np.array(loo)
    se = np.sqrt((k - 1) / k * ((loo - loo.mean(axis=0)) ** 2).sum(axis=0))
    print(f"\npooled seeds {', '.join(map(str, pool))} ({k}): n = {len(feats[0])} per sampler; "
          f"floor real vs real at that n: FD {floor:.3f}; ratio +- 1.645 jackknife SE (90 %)")  # fmt: skip
    print("| sampler | FD vs held-out | ratio to first | 90 % interval of the ratio |")
    print("| --- | --- | --- | --- |")
    for name, fd, e in zip(names, fds, se, strict=True):
        r = fd / fds[0]
        print(f"| {name} | {fd:.3f} | {r:.3f} | {r - 1.645 * e:.3f} - {r + 1.645 * e:.3f} |", flush=True)


if __name__ == "__main__":
    main()
