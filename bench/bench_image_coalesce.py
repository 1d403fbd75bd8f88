"""Concurrent image requests to one model: coalesced (the server's `ImageQueue`) vs one call each.

R requests of one image each, all sent at once, to a class-conditional UNet of the `mnist-cond`
preset's shape (28 px, 32-64-128 channels; random weights: the cost does not depend on them),
DPM-Solver++ 20 steps, guidance 3. The peer, in the same process and alternating with it, makes
them one call after another, as the route did before requests were coalesced. The queue starts the
first request alone (the model was idle) and the rest together once it ends.

    python bench/bench_image_coalesce.py [--requests 8] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path


def make_run(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from aigc.config import to_dict
    from aigc.models.diffusion import DiffusionConfig, build_unet
    from aigc.utils.io import atomic_write_json

    torch.manual_seed(0)
    cfg = DiffusionConfig(image_size=28, in_channels=1, block_out_channels=(32, 64, 128), attention_levels=(2,),
                          layers_per_block=1, norm_num_groups=8, num_classes=10)  # fmt: skip
    out.mkdir(parents=True)
    data = {"classes": [str(i) for i in range(10)]}
    atomic_write_json(
        out / "config.json", {"family": "diffusion", "model": to_dict(cfg), "train": {}, "data": data}
    )
    save_file(
        {k: v.contiguous() for k, v in build_unet(cfg).state_dict().items()}, str(out / "model.safetensors")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    from aigc.serve.registry import ModelRegistry
    from aigc.serve.routes.images import ImageQueue, run_images
    from aigc.serve.schemas import ImageRequest
    from aigc.serve.settings import Settings

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        make_run(Path(tmp) / "m")
        reg = ModelRegistry(Settings(models_dirs=[Path(tmp)]))
        lm = reg.get("m", "image")
        reqs = [(ImageRequest(model="m", steps=20, sampler="dpm", guidance=3.0, label=i % 10), 100 + i)
                for i in range(args.requests)]  # fmt: skip
        run_images(lm, *reqs[0])  # warm-up (and the dtype choice)

        async def coalesced() -> ImageQueue:
            queue = ImageQueue(lm)
            await asyncio.gather(*[queue.generate(*r) for r in reqs])
            return queue

        alone, together = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            for r in reqs:
                run_images(lm, *r)
            alone.append(time.perf_counter() - t)
            t = time.perf_counter()
            queue = asyncio.run(coalesced())
            together.append(time.perf_counter() - t)
        reg.close()
    a, c = min(alone), min(together)
    n = args.requests
    print(f"{n} concurrent 1-image requests, 28 px UNet, dpm 20 steps, {args.threads} thread(s)")
    print(f"one call each    {a:6.2f} s  {n / a:5.1f} images/s")
    print(f"coalesced        {c:6.2f} s  {n / c:5.1f} images/s  ({queue.calls} calls)  = {a / c:.2f}x")


if __name__ == "__main__":
    main()
