"""best_of=4 with the sentiment scorer, no tuning: does the positive share reach >= 90 %?

    python bench/bench_best_of.py [--run DIR] [--classifier DIR] [--train-time 150] [--n 200]

1. the UCI sentiment sentences (amazon, imdb, yelp: 3000 sentences, half positive) from
   `$AIGC_DATA_PATH/text/sentiment` are the corpus of a tiny char GPT (one document per sentence,
   `small` preset with a 128 context, `--train-time` seconds) unless `--run` gives one;
2. the ngram sentiment classifier is trained on the same sentences (80/20 split; its held-out
   accuracy is printed) unless `--classifier` gives one;
3. `--n` unconditional samples plain (sample i: seed 4i) and `--n` with best_of=4 ranked by the
   classifier's P(positive) (sample i: the best of seeds 4i..4i+3, so plain sample i is one of its
   candidates); prints the share the classifier calls positive for both, the mean P(positive),
   and the time per sample.

Torch threads: `--threads` (default 1: the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def uci_files() -> list[Path]:
    for root in [*os.environ.get("AIGC_DATA_PATH", "").split(os.pathsep), "/work/shared/data"]:
        files = sorted((Path(root) / "text" / "sentiment").glob("*_labelled.txt")) if root else []
        if files:
            return files
    sys.exit("UCI sentiment sentences not found: set AIGC_DATA_PATH to the shared data folder")


def train_lm(work: Path, train_time: float) -> Path:
    from aigc.data.labelled import read_many
    from aigc.data.text import prepare_text
    from aigc.training.text import train_text

    data = read_many(uci_files())
    src = work / "uci.jsonl"
    src.write_text("".join(json.dumps({"text": t.strip()}) + "\n" for t in data.texts), encoding="utf-8")
    prepared = work / "uci-data"
    prepare_text(str(src), prepared, overrides=["field=text"], overwrite=True)
    run = work / "uci-gpt"
    t0 = time.perf_counter()
    train_text("gpt", prepared, run, preset="small", overrides=["model.block_size=128", "train.eval_interval=250"],
               max_steps=100_000, max_time=train_time, overwrite=True, progress=False)  # fmt: skip
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    print(f"trained {run} in {time.perf_counter() - t0:.0f} s: {evals[-1]['step']} steps, "
          f"val_loss {min(m['val_loss'] for m in evals):.3f}")  # fmt: skip
    return run


def train_clf(work: Path) -> Path:
    from aigc.evaluation.sentiment import train_classifier

    out = train_classifier(uci_files(), work / "uci-sentiment", overwrite=True)
    test = json.loads((out / "metrics.jsonl").read_text().strip().splitlines()[-1])
    print(f"sentiment classifier {out}: held-out accuracy {test['accuracy']:.3f} on {test['n']}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a text run trained on the UCI sentences (default: train one)")
    ap.add_argument("--classifier", help="a sentiment classifier run (default: train one)")
    ap.add_argument("--work", default="/tmp/aigc-bench-best-of")
    ap.add_argument("--train-time", type=float, default=150.0)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--best-of", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from aigc.evaluation.scorers import load_scorer
    from aigc.evaluation.sentiment import load_classifier
    from aigc.generation import load_generator
    from aigc.generation.best_of import generate_best_of

    run = Path(args.run) if args.run else train_lm(work, args.train_time)
    clf_dir = Path(args.classifier) if args.classifier else train_clf(work)
    clf = load_classifier(clf_dir)
    scorer = load_scorer(f"sentiment:{clf_dir}")
    gen = load_generator(run)
    params = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    k = args.best_of

    # plain: sample i has seed k*i (the first of best_of sample i's candidates)
    t0 = time.perf_counter()
    plain = [gen.generate("", seed=k * i, **params)[0].text for i in range(args.n)]
    t_plain = (time.perf_counter() - t0) / args.n
    t0 = time.perf_counter()
    best = [
        generate_best_of(gen, "", best_of=k, scorer=scorer, seed=k * i, **params)[0].text
        for i in range(args.n)
    ]
    t_best = (time.perf_counter() - t0) / args.n

    rows = {}
    for name, texts, dt in (("plain", plain, t_plain), (f"best_of={k}", best, t_best)):
        p = scorer.score(texts)
        share = clf.positive_share(texts)
        rows[name] = {"positive_share": share, "mean_p_positive": sum(p) / len(p), "s_per_sample": dt}
        print(f"{name:>10}: positive share {share:6.1%}  mean P(positive) {sum(p) / len(p):.3f}  "
              f"{dt * 1000:6.1f} ms/sample")  # fmt: skip
    print("examples (plain | best_of):")
    for a, b in list(zip(plain, best, strict=True))[:5]:
        print(f"  {a.strip()[:70]!r}\n  -> {b.strip()[:70]!r}")
    out = {"run": str(run), "classifier": str(clf_dir), "n": args.n, "best_of": k, **params, "results": rows}
    (work / "best_of.json").write_text(json.dumps(out, indent=2) + "\n")
    ok = rows[f"best_of={k}"]["positive_share"] >= 0.9
    print(f"best_of={k} positive share >= 90 %: {'yes' if ok else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
