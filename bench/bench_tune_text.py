"""The tune-on-feedback loop for text, end to end and offline, with the figures of issue 11.

    AIGC_DATA_PATH=/work/shared/data OMP_NUM_THREADS=1 python bench/bench_tune_text.py

1. a mixed-sentiment corpus: the 3,000 UCI sentences (Amazon, IMDb, Yelp; half positive), labels
   dropped, one document per sentence -> `aigc data prepare` (char tokenizer);
2. a tiny GPT trained on it (`aigc train gpt --max-time`), published as `models/sent/1`;
3. the ngram sentiment classifier on the same sentences with their labels (`aigc train classifier`);
4. per method (DPO, KTO) a copy of version 1 (`sent-dpo/1`, `sent-kto/1`) and `--rounds` rounds
   of: the server app in process, the store filled by `simulate_feedback` on the newest version
   (the positive-sentiment rater: thumbs up when P(positive) >= 0.5) through `/v1/completions` +
   `/v1/ratings`, then `tune_text` (= `aigc tune --from-feedback`) -> the next version;
5. prints the final version against version 1 on fresh seeds: positive share (target >= 80 %
   from ~50 %), held-out loss change on the val split (<= +10 %) and win rate, and writes
   WORK/results-METHODS.json (with every round's report figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

FILES = ("amazon_cells_labelled.txt", "imdb_labelled.txt", "yelp_labelled.txt")


def data_root() -> Path:
    for c in [
        *os.environ.get("AIGC_DATA_PATH", "").split(os.pathsep),
        str(Path(__file__).resolve().parents[2] / "shared" / "data"),
    ]:
        if c and (Path(c) / "text" / "sentiment" / FILES[0]).is_file():
            return Path(c)
    sys.exit("UCI sentences not found: set AIGC_DATA_PATH to the shared data folder")


def aigc(*args: str, env: dict[str, str]) -> None:
    """One `aigc` command in a subprocess, as a user would type it."""
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "aigc", *args], check=True, env=env, stdout=subprocess.DEVNULL)
    print(f"  aigc {' '.join(args[:2])} ... ({time.time() - t0:.0f} s)", flush=True)


def compare(v1: Path, final: Path, scorer, n: int, data: Path) -> dict:
    """Version 1 vs the final version on the same seeds (fresh seeds, not those of any round's
    report): positive share, win rate (a tie counts half), held-out LM loss on the val split."""
    from aigc.data import load_prepared
    from aigc.generation import load_generator
    from aigc.tuning.losses import heldout_lm_loss

    texts = {}
    for key, run in (("v1", v1), ("final", final)):
        gen = load_generator(run)
        texts[key] = [  # n seeds 777000.. in chunks (n <= 128 per call)
            r.text
            for k in range(0, n, 100)
            for r in gen.generate("", n=min(100, n - k), max_new_tokens=80, temperature=1.0, seed=777_000 + k)
        ]
    s1, s2 = scorer.score(texts["v1"]), scorer.score(texts["final"])
    val = load_prepared(data).val
    losses = [heldout_lm_loss(load_generator(run).model, val, 64, 40, seed=1) for run in (v1, final)]
    return {
        "positive_v1": sum(x > 0.5 for x in s1) / n,
        "positive_final": sum(x > 0.5 for x in s2) / n,
        "win_rate_vs_v1": sum(1.0 if b > a else 0.5 if b == a else 0.0 for a, b in zip(s1, s2, strict=True))
        / n,
        "heldout_loss_v1": losses[0],
        "heldout_loss_final": losses[1],
        "heldout_loss_change": (losses[1] - losses[0]) / losses[0],
        "examples_final": texts["final"][:10],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/aigc-bench-tune-text")
    ap.add_argument("--train-time", type=float, default=180.0, help="seconds of GPT training")
    ap.add_argument("--feedback", type=int, default=600, help="simulated generations rated")
    ap.add_argument("--samples", type=int, default=200, help="samples per model in the report")
    ap.add_argument("--tune-set", action="append", default=[], help="extra --set tune.k=v for both methods")
    ap.add_argument("--methods", default="dpo,kto")
    ap.add_argument("--rounds", type=int, default=5, help="feedback -> tune rounds per method")
    ap.add_argument("--preset", default="loop", help="tuning preset (src/aigc/presets/tune/)")
    ap.add_argument("--fresh", action="store_true", help="retrain the base model and classifier")
    args = ap.parse_args()

    work = Path(args.work)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AIGC_HOME": str(work / "home")}
    os.environ["AIGC_HOME"] = env["AIGC_HOME"]
    root = data_root() / "text" / "sentiment"
    models, base = work / "models", work / "models" / "sent" / "1"
    t_all = time.time()

    # 1-3. corpus, base model, classifier (kept between runs unless --fresh)
    if not base.is_dir():
        sentences = [
            line.rsplit("\t", 1)[0].strip()
            for f in FILES
            for line in (root / f).read_text().splitlines()
            if "\t" in line
        ]
        (work / "corpus.txt").write_text("\n\n".join(s for s in sentences if s) + "\n", encoding="utf-8")
        print(f"corpus: {len(sentences)} sentences", flush=True)
        aigc("data", "prepare", str(work / "corpus.txt"), "--out", str(work / "data"), "--set", "blocks=true",
             "--overwrite", env=env)  # fmt: skip
        aigc("train", "gpt", "--data", str(work / "data"), "--out", str(base), "--max-time", str(args.train_time),
             "--overwrite", env=env)  # fmt: skip
    clf = work / "classifier"
    if not clf.is_dir():
        aigc(
            "train",
            "classifier",
            "--data",
            ",".join(str(root / f) for f in FILES),
            "--out",
            str(clf),
            env=env,
        )
    spec = f"sentiment:{clf}"

    # 4-5. per method: its own copy of version 1 (`sent-dpo`, `sent-kto`), then rounds of
    #      simulate_feedback on the newest version through the in-process server -> aigc tune
    from fastapi.testclient import TestClient

    from aigc.errors import AigcError
    from aigc.evaluation.scorers import load_scorer
    from aigc.feedback.simulate import Rater, simulate_feedback
    from aigc.feedback.store import Store
    from aigc.serve.app import create_app
    from aigc.serve.settings import Settings
    from aigc.tuning.text import tune_text

    scorer = load_scorer(spec)
    overrides = [f"tune.samples={args.samples}", "tune.sample_tokens=80", "tune.prompts=['']", *args.tune_set]
    db = work / "aigc.db"
    for f in work.glob("aigc.db*"):  # the versions are made anew: so is their feedback
        f.unlink()
    results: dict = {
        "settings": {
            "preset": args.preset,
            "overrides": overrides,
            "feedback_per_round": args.feedback,
            "rounds": args.rounds,
        }
    }
    for method in args.methods.split(","):
        if (models / f"sent-{method}").exists():
            shutil.rmtree(models / f"sent-{method}")
        shutil.copytree(base, models / f"sent-{method}" / "1")
    app = create_app(Settings(models_dirs=[models], db=str(db)))
    with TestClient(app) as client, Store.open(str(db)) as store:
        for method in args.methods.split(","):
            name = f"sent-{method}"
            current, rounds, t0 = models / name / "1", [], time.time()
            for r in range(args.rounds):
                time.sleep(
                    1.1
                )  # the server lists its model dirs at most once a second: let it see the new version
                t1 = time.time()
                counts = simulate_feedback(client, f"{name}@{current.name}", Rater(scorer), n=args.feedback,
                                           seed=1000 * r, params={"max_tokens": 80, "temperature": 1.0})  # fmt: skip
                print(f"{name}@{current.name}: {counts['generated']} rated, {counts['liked']} liked "
                      f"({time.time() - t1:.0f} s)", flush=True)  # fmt: skip
                try:
                    rep = tune_text(current, store=store, method=method, preset=args.preset, overrides=overrides, scorer=spec,
                                    progress=False, log=lambda m: print("  " + m, flush=True))  # fmt: skip
                except AigcError as e:  # the guard kept the previous version: the loop ends there
                    print(f"  round {r + 1}: {e}", flush=True)
                    rounds.append({"from": current.name, "refused": str(e)})
                    break
                pr, hl = rep["preferred"], rep["heldout_loss"]
                rounds.append({"from": current.name, "to": Path(rep["run"]).name, "liked_share_rated":
                               counts["liked"] / counts["generated"], "positive_before": pr["before"],
                               "positive_after": pr["after"], "win_rate_vs_previous": rep["win_rate"],
                               "heldout_loss_change": hl["change"], "steps": rep["steps"],
                               "feedback": rep["feedback"]})  # fmt: skip
                current = Path(rep["run"])
            final = compare(base, current, scorer, args.samples, data=work / "data")
            results[method] = {
                "run": str(current),
                "rounds": rounds,
                **final,
                "seconds": round(time.time() - t0, 1),
            }
            print(
                f"{method.upper()} ({args.rounds} round(s)): positive share {final['positive_v1']:.1%} -> "
                f"{final['positive_final']:.1%}, held-out loss {final['heldout_loss_v1']:.4f} -> "
                f"{final['heldout_loss_final']:.4f} ({final['heldout_loss_change']:+.1%}), win rate vs v1 "
                f"{final['win_rate_vs_v1']:.1%} ({time.time() - t0:.0f} s) -> {current}",
                flush=True,
            )
    results["total_seconds"] = round(time.time() - t_all, 1)
    out = work / f"results-{args.methods.replace(',', '-')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
