"""Music quality end to end: prepare the Bach chorales -> train a GPT -> generate -> measure.

Prints the two figures of issue 9 beside their bars:
  - valid-MIDI share of the generated pieces (target >= 0.99)
  - key-relative pitch-class distance (JS, bits) of generated vs held-out chorales, next to the
    same distance for a unigram baseline sampled from the training histograms (must be larger)

Generation conditions piece i on the key / meter / style of held-out chorale i mod N, so both sets
cover the same keys and meters. Steps that are done are reused (prepared data, a finished run) so
the script can be re-run for more pieces; pass --retrain to train again.

    .venv/bin/python bench/bench_music_quality.py --max-time 400 --n 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-music", help="working directory (data, run, report)")
    ap.add_argument("--max-time", type=float, default=400.0, help="training budget in seconds")
    ap.add_argument("--transpose", type=int, default=3, help="train-split transposition augmentation")
    ap.add_argument("--n", type=int, default=100, help="pieces to generate")
    ap.add_argument("--bars", type=int, default=8)
    ap.add_argument("--batch", type=int, default=25, help="pieces decoded per batch")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrain", action="store_true", help="train again even if the run exists")
    args = ap.parse_args()

    from aigc.data.music import load_prepared_music, prepare_music
    from aigc.evaluation.music import compare, unigram_baseline, valid_midi_share
    from aigc.generation.music import MusicGenerator
    from aigc.training.music import train_music

    out = Path(args.out)
    data, run = out / "bach", out / "run"

    # 1. prepare all chorales once (music21 parses ~3/s; parsed pieces are cached after that)
    t0 = time.perf_counter()
    if not (data / "meta.json").is_file():
        prepare_music("music21:bach", data, overrides=[f"transpose={args.transpose}"], log=print)
    prepared = load_prepared_music(data)
    train_pieces, val_pieces = list(prepared.pieces("train")), list(prepared.pieces("val"))
    print(
        f"data: {len(train_pieces)} train / {len(val_pieces)} held-out pieces ({time.perf_counter() - t0:.0f} s)"
    )

    # 2. train (the `aigc train music` recipe: auto preset for the budget, context 256)
    if args.retrain or not (run / "model.safetensors").is_file():
        r = train_music("music", data, run, max_time=args.max_time, overwrite=True, progress=False, log=print)
        print(f"trained {r.steps} steps in {r.elapsed:.0f} s, best val loss {r.best_val_loss:.4f}")
    cfg = json.loads((run / "config.json").read_text())
    print(f"model: {json.dumps(cfg['model'])}")

    # 3. generate n pieces conditioned like the held-out set, in batches
    gen = MusicGenerator.from_artifact(run)
    t0 = time.perf_counter()
    results = []
    for start in range(0, args.n, args.batch):
        k = min(args.batch, args.n - start)
        ref = val_pieces[(start // args.batch) % len(val_pieces)]
        results += gen.generate(
            n=k, key=ref.key or "C major", meter=ref.meter, style=ref.style, bars=args.bars,
            seed=args.seed + start, temperature=args.temperature, formats=("mid",),
        )  # fmt: skip
    dt = time.perf_counter() - t0
    pieces = [r.piece for r in results]
    finished = sum(r.finish_reason == "stop" for r in results)
    skipped = sum(r.skipped for r in results)
    print(f"generated {len(results)} pieces of {args.bars} bars in {dt:.0f} s; {finished} reached their bars, "
          f"{skipped} ungrammatical events skipped in all")  # fmt: skip

    # 4. measure
    share = valid_midi_share([r.midi for r in results])
    model_cmp = compare(pieces, val_pieces)
    base = unigram_baseline(train_pieces, len(pieces), bars=args.bars, seed=args.seed)
    base_cmp = compare(base, val_pieces)
    print(f"valid MIDI share:            {share:.3f}  (target >= 0.99)")
    print(f"pitch-class distance (JS):   model {model_cmp['pc_distance']:.4f}  vs  unigram baseline "
          f"{base_cmp['pc_distance']:.4f}  (lower is closer to held-out chorales)")  # fmt: skip
    print(f"per-piece pc distance:       model {model_cmp['pc_piece_distance']:.4f}  vs  baseline "
          f"{base_cmp['pc_piece_distance']:.4f}")  # fmt: skip
    print(f"duration distance:           model {model_cmp['duration_distance']:.4f}  vs  baseline "
          f"{base_cmp['duration_distance']:.4f}")  # fmt: skip
    g, ref = model_cmp["generated"], model_cmp["reference"]
    print("statistics (generated | held-out): " + ", ".join(f"{k} {g[k]:.2f} | {ref[k]:.2f}" for k in g))
    report = {"valid_midi_share": share, "model": model_cmp, "baseline": base_cmp, "n": len(results),
              "bars": args.bars, "generate_seconds": dt, "run": str(run)}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    print(f"report: {out / 'report.json'}")


if __name__ == "__main__":
    main()
