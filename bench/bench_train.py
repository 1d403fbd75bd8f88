"""Training throughput: our Trainer vs Hugging Face GPT2LMHeadModel in a plain PyTorch loop.

Same dims on both sides (nanoGPT's CPU recipe: 4 layers, 4 heads, 128 wide, context 64, batch 12,
char vocab 65), measured in one run, alternating, so machine drift hits both alike:

- ours: `aigc.training.text.train_text` (the real `aigc train gpt` path: bf16 autocast where the CPU
  has it, fused AdamW, clipping, LR schedule, logging) on tiny Shakespeare, tokens/s as logged
  in metrics.jsonl (evaluation excluded);
- the same with `train.compile=true` (torch.compile; the auto preset turns it on from 300 s budgets);
- peer: `GPT2LMHeadModel` fp32 with AdamW, clipping and the same random batches, timed per step.

    python bench/bench_train.py [--steps 300] [--rounds 2]

Target (issue "Text models and trainer"): ours >= 2.5x the peer's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DIMS = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
BATCH = 12


def prepared_corpus(root: Path) -> Path:
    from aigc.data import prepare_text
    from aigc.data.sources import find_builtin

    source = "shakespeare" if find_builtin("shakespeare") else "python-stdlib"
    out = root / "data"
    prepare_text(source, out, overrides={"tokenizer": "char"})
    return out


def ours(data: Path, root: Path, steps: int, tag: str, compile_: bool = False) -> float:
    from aigc.training.text import train_text

    over = [f"model.{k}={v}" for k, v in DIMS.items()] + [
        f"train.batch_size={BATCH}",
        "train.eval_interval=0",
        "train.eval_batches=1",
        "train.ckpt_interval=0",
        "train.log_interval=10",
        "sample.tokens=1",
        f"train.compile={str(compile_).lower()}",
    ]
    run = root / f"run-{tag}"
    train_text(
        "gpt", data, run, preset="small", overrides=over, max_steps=steps, progress=False, overwrite=True
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if r.get("kind") == "train" and r.get("step", 0) > 20]
    return statistics.median(rates)


def peer(data: Path, steps: int) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    meta = json.loads((data / "meta.json").read_text())
    train = np.memmap(data / "train.bin", dtype=meta["dtype"], mode="r")
    cfg = GPT2Config(
        vocab_size=meta["vocab_size"],
        n_positions=DIMS["block_size"],
        n_embd=DIMS["n_embd"],
        n_layer=DIMS["n_layer"],
        n_head=DIMS["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    T = DIMS["block_size"]
    times = []
    for step in range(steps):
        ix = rng.integers(0, len(train) - T - 1, BATCH)
        x = torch.from_numpy(np.stack([train[i : i + T] for i in ix]).astype(np.int64))
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= 20:
            times.append(time.perf_counter() - t0)
    return BATCH * T / statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("AIGC_HOME", tempfile.mkdtemp(prefix="aigc-bench-home-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; dims {DIMS}, batch {BATCH}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepared_corpus(root)
        results: dict[str, list[float]] = {"ours": [], "ours+compile": [], "hf": []}
        for r in range(args.rounds):
            results["hf"].append(peer(data, args.steps))
            results["ours"].append(ours(data, root, args.steps, str(r)))
            # train.compile=true: what `aigc train gpt --max-time 300+` uses (the auto preset); the
            # logged rate skips the first 20 steps, so the one-time compile is not in it
            results["ours+compile"].append(ours(data, root, args.steps, f"{r}c", compile_=True))
            print(f"round {r}: ours {results['ours'][-1]:,.0f} tok/s, ours compiled {results['ours+compile'][-1]:,.0f}"
                  f" tok/s, HF GPT2 fp32 {results['hf'][-1]:,.0f} tok/s")  # fmt: skip
    h = statistics.median(results["hf"])
    for name in ("ours", "ours+compile"):
        o = statistics.median(results[name])
        print(f"{name:13s} {o:,.0f} tokens/s vs HF GPT2LMHeadModel fp32 {h:,.0f} tokens/s -> ratio {o / h:.2f}x "
              "(target >= 2.5x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
