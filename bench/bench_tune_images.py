"""Tune an image model on feedback, end to end: does the preferred digit's share rise by >= 30 points?

    python bench/bench_tune_images.py [--train-time 180] [--feedback 400] [--digit 7] [--work DIR]

1. prepare scikit-learn's digits at 16x16 and train a class-conditional diffusion model (`small`
   preset, `--train-time` seconds) as `WORK/models/digits/1`;
2. serve it in process and let a simulated rater that likes one digit (`digit:K@DATA`: P(class K) >=
   0.5 under the data set's feature classifier) rate `--feedback` images generated unconditionally
   (guidance 0 = the null label) through the HTTP API, as a person in the studio would;
3. `tune_images` (rwr) publishes `WORK/models/digits/2` and reports the preferred class's share on
   the same seeds before and after.

Prints one line per stage and the figure. Torch threads: `--threads` (default 1: the machine is
shared). `--reuse` keeps an existing base run and store (re-tunes only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/aigc-bench-tune-images")
    ap.add_argument("--train-time", type=float, default=180.0)
    ap.add_argument("--feedback", type=int, default=400, help="images generated and rated")
    ap.add_argument("--digit", type=int, default=7, help="the class the simulated rater likes")
    ap.add_argument("--tune-steps", type=int, default=None, help="default: tune_images' (300)")
    ap.add_argument("--eval-samples", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="keep WORK's base run and feedback")
    ap.add_argument("--set", action="append", default=[], help="tune overrides, e.g. train.lr=1e-4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import os

    work = Path(args.work)
    os.environ["AIGC_HOME"] = str(work / "home")  # the feature-classifier cache, outputs
    from aigc.data.images import prepare_images
    from aigc.evaluation.scorers import load_scorer
    from aigc.feedback.simulate import Rater, simulate_feedback
    from aigc.feedback.store import Store
    from aigc.serve.app import create_app
    from aigc.serve.settings import Settings
    from aigc.training.image_tasks import train_image
    from aigc.tuning.images import tune_images

    data, models, db, outputs = work / "data", work / "models", work / "aigc.db", work / "outputs"
    base, tuned = models / "digits" / "1", models / "digits" / "2"
    if not args.reuse and work.exists():
        shutil.rmtree(work)
    t0 = time.perf_counter()
    if not (base / "model.safetensors").is_file():
        prepare_images("digits", data, overrides=["size=16"], overwrite=True)
        r = train_image("diffusion", data, base, preset="small", overrides=["conditional=true"],
                        max_time=args.train_time, overwrite=True, progress=False)  # fmt: skip
        print(f"base: {r.steps} steps in {r.elapsed:.0f} s, val_loss {r.best_val_loss:.4f}", flush=True)
    spec = f"digit:{args.digit}@{data}"
    store = Store.open(str(db))
    try:
        if not args.reuse or not store.list_generations(kind="image", limit=1)["data"]:
            t1 = time.perf_counter()
            app = create_app(Settings(models_dirs=[models], db=str(db), outputs_dir=outputs))
            counts = simulate_feedback(app, "digits@1", Rater(load_scorer(spec)), n=args.feedback, kind="image",
                                       params={"guidance": 0.0})  # fmt: skip
            print(f"feedback: {counts['generated']} images rated by {spec}: {counts['liked']} liked "
                  f"({time.perf_counter() - t1:.0f} s)", flush=True)  # fmt: skip
        shutil.rmtree(tuned, ignore_errors=True)
        overrides = [f"tune.eval_samples={args.eval_samples}", f"tune.scorer={spec}", *args.set]
        t2 = time.perf_counter()
        report = tune_images(base, tuned, store=store, method="rwr", overrides=overrides,
                             max_steps=args.tune_steps, progress=False, blobs_dir=outputs)  # fmt: skip
    finally:
        store.close()
    ev = report["eval"]
    print(f"tune: {report['steps']} steps in {report['elapsed_s']:.0f} s ({time.perf_counter() - t2:.0f} s with "
          f"the report); held-out loss {report['heldout_loss_before']:.4f} -> {report['heldout_loss_after']:.4f}")  # fmt: skip
    print(f"class histogram before: {ev['classes']['before_histogram']}")
    print(f"class histogram after:  {ev['classes']['after_histogram']}")
    gain = ev["share_gain_points"]
    print(
        f"FIGURE digit {args.digit} share ({ev['samples']} unconditional samples, same seeds): "
        f"{100 * ev['share_before']:.1f}% -> {100 * ev['share_after']:.1f}% ({gain:+.1f} points; target >= +30) "
        f"total {time.perf_counter() - t0:.0f} s"
    )
    # the conditional model must survive: per-label accuracy with guidance, before and after
    acc = {name: conditional_accuracy(run, data) for name, run in (("before", base), ("after", tuned))}
    print(
        f"conditional accuracy (label 0-9 x 20, guidance 3): {100 * acc['before']:.1f}% -> {100 * acc['after']:.1f}%"
    )
    print(json.dumps({k: report[k] for k in ("feedback", "steps", "elapsed_s")}))
    return 0 if gain >= 30 else 1


def conditional_accuracy(run: Path, data: Path) -> float:
    """Share of class-conditional samples (20 per digit, guidance 3) the data's classifier reads as asked."""
    import numpy as np

    from aigc.data.images import load_prepared_images
    from aigc.evaluation.images import conditional_accuracy as accuracy
    from aigc.evaluation.images import feature_classifier
    from aigc.generation.image import ImageGenerator

    labels = [k for k in range(10) for _ in range(20)]
    out = ImageGenerator.load(run).generate(n=len(labels), seed=1, label=labels, guidance=3.0)
    images = ((out.tensor.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    prepared = load_prepared_images(data)
    model, _ = feature_classifier(prepared.images, prepared.labels)
    return accuracy(model, images, np.array(labels))["accuracy"]


if __name__ == "__main__":
    sys.exit(main())
