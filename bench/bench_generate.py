"""Text decode speed: our engine vs `transformers` `generate`, identical weights, one process.

    python bench/bench_generate.py            # tiny + 124M, batch 1 and 8
    python bench/bench_generate.py --quick    # tiny model only, fewer tokens (a smoke check)

Models are randomly initialised (speed does not depend on what the weights say). Our GPT is
exported to a `LlamaForCausalLM` with the same weights (aigc.export when present; otherwise the
same renaming done here), both sides decode greedily with `ignore_eos`/`min_new_tokens` so each
produces exactly N tokens, and we print tokens/s and the ratio. All variants run interleaved, round
by round, in one process; medians of wall and process CPU time (the machine drifts and is shared,
so only ratios measured in one run mean anything). The tiny model also runs our other modes: fp16
weights (`--dtype float16`) and the compiled step (`--compile`, its first call's compile time is
printed), at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from aigc.generation.decoders import GPTDecoder
from aigc.generation.engine import Engine, Request
from aigc.generation.params import GenerationParams
from aigc.models.gpt import GPT, GPTConfig


def to_llama(model: GPT):
    """Our GPT as a transformers LlamaForCausalLM with the same weights (what `aigc export` writes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aigc.export import llama_config
    from aigc.models.hf_causal import to_llama_state

    cfg = {k: v for k, v in llama_config(model.config).items() if k not in ("architectures", "model_type")}
    hf = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    hf.load_state_dict(to_llama_state(model, torch.float32), strict=False)  # strict=False: tied lm_head
    return hf


class Timer:
    """Interleaved timing: `add(name, fn)`, then `run(rounds)` alternates the fns round by round (the
    machine drifts, so A and B must see the same conditions); medians of wall and process CPU time."""

    def __init__(self) -> None:
        self.fns: dict[str, tuple[object, int]] = {}
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self.out: dict[str, list[int]] = {}

    def add(self, name: str, fn, tokens: int) -> None:
        self.fns[name] = (fn, tokens)

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            for name, (fn, _) in self.fns.items():
                w, c = time.perf_counter(), time.process_time()
                self.out[name] = fn()
                self.wall.setdefault(name, []).append(time.perf_counter() - w)
                self.cpu.setdefault(name, []).append(time.process_time() - c)

    def tps(self, name: str) -> tuple[float, float]:
        """(tokens/s by wall time, tokens/s by process CPU time)."""
        n = self.fns[name][1]
        return n / statistics.median(self.wall[name]), n / statistics.median(self.cpu[name])


def hf_fn(hf, prompt: torch.Tensor, n: int):
    def go() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, prompt.shape[1] :].tolist()

    return go


def our_fn(dec, prompt: torch.Tensor, n: int):
    eng = Engine(dec)
    reqs = [
        Request(row.tolist(), GenerationParams(temperature=0, max_new_tokens=n, ignore_eos=True))
        for row in prompt
    ]
    return lambda: eng.generate(reqs)[0].tokens


def fmt(tps: tuple[float, float]) -> str:
    return f"{tps[0]:8.1f} tok/s (cpu {tps[1]:8.1f})"


def bench(
    name: str, cfg: GPTConfig, n: int, batch_sizes: list[int], repeats: int, bf16: bool, modes: bool
) -> None:
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    hf = to_llama(model)
    prompt1 = torch.randint(0, cfg.vocab_size, (1, 8))
    print(f"--- {name}: {model.num_params() / 1e6:.1f}M params, {n} new tokens, greedy; "
          f"{torch.get_num_threads()} torch threads; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    # our decoders: (label, dtype, compile); fp16 = fp16 weights through fbgemm, fp32 compute
    kinds = [("fp32", None, False)]
    if modes:
        kinds += [
            ("fp16w", torch.float16, False),
            ("fp32+compile", None, True),
            ("fp16w+compile", torch.float16, True),
        ]
    t = Timer()
    t.add("hf", hf_fn(hf, prompt1, n), n)
    for label, dtype, compile in kinds:
        dec = GPTDecoder(model, dtype, compile=compile)
        for B in [1, *batch_sizes]:
            prompt = torch.randint(0, cfg.vocab_size, (B, 8)) if B > 1 else prompt1
            fn = our_fn(dec, prompt, n)
            w = time.perf_counter()
            our_fn(dec, prompt[:, :4], 4)()  # warm-up: one-time setup (and the compile) on both sides
            if compile:
                print(f"  {label} batch {B}: first call (compiling) {time.perf_counter() - w:.1f} s")
            t.add(f"{label} b{B}", fn, B * n)
    hf_fn(hf, prompt1, 4)()
    if bf16:
        hf_b = to_llama(model).to(torch.bfloat16)
        hf_fn(hf_b, prompt1, 4)()
        t.add("hf bf16", hf_fn(hf_b, prompt1, n), n)
        t.add("bf16 b1", our_fn(GPTDecoder(model, torch.bfloat16), prompt1, n), n)
        # weight-only int8 (aigc generate text --dtype int8): a quarter of fp32's bytes per token
        t.add("int8 b1", our_fn(GPTDecoder(model, torch.int8), prompt1, n), n)
    t.run(repeats)
    hf_tps = t.tps("hf")
    ours = t.tps("fp32 b1")
    same = sum(a == b for a, b in zip(t.out["hf"], t.out["fp32 b1"], strict=False))
    print(f"batch 1  HF generate fp32 {hf_tps[0]:8.1f} tok/s | ours fp32 {ours[0]:8.1f} tok/s | ratio {ours[0] / hf_tps[0]:5.2f}x"
          f" | same tokens {same}/{n}")  # fmt: skip
    if bf16:
        hfb, ob, oq = t.tps("hf bf16"), t.tps("bf16 b1"), t.tps("int8 b1")
        print(f"batch 1  HF generate bf16 {hfb[0]:8.1f} tok/s | ours bf16 {ob[0]:8.1f} tok/s | "
              f"ratio vs HF fp32 {ob[0] / hf_tps[0]:5.2f}x, vs HF bf16 {ob[0] / hfb[0]:5.2f}x")  # fmt: skip
        same_q = sum(a == b for a, b in zip(t.out["fp32 b1"], t.out["int8 b1"], strict=False))
        print(f"batch 1  ours int8 weights {oq[0]:8.1f} tok/s | ratio vs HF fp32 {oq[0] / hf_tps[0]:5.2f}x, "
              f"vs HF bf16 {oq[0] / hfb[0]:5.2f}x | same greedy tokens as our fp32 {same_q}/{n}")  # fmt: skip
    for B in batch_sizes:
        tps = t.tps(f"fp32 b{B}")
        print(
            f"batch {B}  ours fp32 aggregate {tps[0]:8.1f} tok/s = {tps[0] / ours[0]:5.2f}x our batch-1 figure"
        )
    if not modes:
        return
    # every mode, wall and CPU time; ratios by wall time (CPU-time ratios in brackets)
    print(f"HF generate fp32 batch 1: {fmt(hf_tps)}")
    best1 = max(t.tps(f"{label} b1")[0] for label, _, _ in kinds)
    for label, _, _ in kinds:
        one = t.tps(f"{label} b1")
        same = sum(a == b for a, b in zip(t.out["fp32 b1"], t.out[f"{label} b1"], strict=False))
        print(f"  {label:14s} batch 1: {fmt(one)} = {one[0] / hf_tps[0]:5.2f}x HF [{one[1] / hf_tps[1]:5.2f}x cpu]"
              f" | greedy tokens as fp32 {same}/{n}")  # fmt: skip
        for B in batch_sizes:
            tb = t.tps(f"{label} b{B}")
            print(f"  {label:14s} batch {B}: {fmt(tb)} = {tb[0] / one[0]:5.2f}x its batch 1 "
                  f"[{tb[1] / one[1]:5.2f}x cpu], {tb[0] / best1:5.2f}x our best batch 1")  # fmt: skip
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, 64 tokens, 2 repeats")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--no-modes", action="store_true", help="skip fp16 weights and compiled modes (no compiling)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = GPTConfig(vocab_size=65, block_size=512, n_layer=4, n_head=4, n_embd=128)
    if args.quick:
        bench("tiny (4 layers, 128 wide)", tiny, 64, [8], 3, bf16=False, modes=not args.no_modes)
        return
    bench("tiny (4 layers, 128 wide)", tiny, 256, [8], 5, bf16=False, modes=not args.no_modes)
    small = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    bench("GPT-2-small-sized (124M)", small, 64, [], 2, bf16=True, modes=False)


if __name__ == "__main__":
    main()
