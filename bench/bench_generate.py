"""Text decode speed: our engine vs `transformers` `generate`, identical weights, one process.

    python bench/bench_generate.py            # tiny + 124M, batch 1 and 8
    python bench/bench_generate.py --quick    # tiny model only, fewer tokens (a smoke check)

Models are randomly initialised (speed does not depend on what the weights say). Our GPT is
exported to a `LlamaForCausalLM` with the same weights (aigc.export when present; otherwise the
same renaming done here), both sides decode greedily with `ignore_eos`/`min_new_tokens` so each
produces exactly N tokens, and we print tokens/s and the ratio. Medians of a few repeats; the
machine drifts, so only ratios measured in one run mean anything.
"""

from __future__ import annotations

import argparse
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


def hf_tokens_per_s(hf, prompt: torch.Tensor, n: int, repeats: int) -> tuple[float, list[int]]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        times.append(time.perf_counter() - t)
    return prompt.shape[0] * n / statistics.median(times), out[0, prompt.shape[1] :].tolist()


def our_tokens_per_s(dec, prompt: torch.Tensor, n: int, repeats: int) -> tuple[float, list[int]]:
    eng = Engine(dec)
    reqs = [
        Request(row.tolist(), GenerationParams(temperature=0, max_new_tokens=n, ignore_eos=True))
        for row in prompt
    ]
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = eng.generate(reqs)
        times.append(time.perf_counter() - t)
    return prompt.shape[0] * n / statistics.median(times), out[0].tokens


def bench(name: str, cfg: GPTConfig, n: int, batch_sizes: list[int], repeats: int, bf16: bool) -> None:
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    hf = to_llama(model)
    prompt1 = torch.randint(0, cfg.vocab_size, (1, 8))
    print(f"--- {name}: {model.num_params() / 1e6:.1f}M params, {n} new tokens, greedy")
    hf_tokens_per_s(hf, prompt1, 4, 1)  # warm-up: first calls pay one-time setup on both sides
    our_tokens_per_s(GPTDecoder(model), prompt1, 4, 1)
    hf_tps, hf_tokens = hf_tokens_per_s(hf, prompt1, n, repeats)
    ours_tps, our_tokens = our_tokens_per_s(GPTDecoder(model), prompt1, n, repeats)
    same = sum(a == b for a, b in zip(hf_tokens, our_tokens, strict=False))
    print(f"batch 1  HF generate fp32 {hf_tps:8.1f} tok/s | ours fp32 {ours_tps:8.1f} tok/s | ratio {ours_tps / hf_tps:5.2f}x"
          f" | same tokens {same}/{n}")  # fmt: skip
    if bf16:
        hf_b = to_llama(model).to(torch.bfloat16)
        hf_tokens_per_s(hf_b, prompt1, 4, 1)
        hfb_tps, _ = hf_tokens_per_s(hf_b, prompt1, n, repeats)
        ob_tps, _ = our_tokens_per_s(GPTDecoder(model, torch.bfloat16), prompt1, n, repeats)
        print(f"batch 1  HF generate bf16 {hfb_tps:8.1f} tok/s | ours bf16 {ob_tps:8.1f} tok/s | "
              f"ratio vs HF fp32 {ob_tps / hf_tps:5.2f}x, vs HF bf16 {ob_tps / hfb_tps:5.2f}x")  # fmt: skip
        # weight-only int8 (aigc generate text --dtype int8): a quarter of fp32's bytes per token
        oq_tps, oq_tokens = our_tokens_per_s(GPTDecoder(model, torch.int8), prompt1, n, repeats)
        same_q = sum(a == b for a, b in zip(our_tokens, oq_tokens, strict=False))
        print(f"batch 1  ours int8 weights {oq_tps:8.1f} tok/s | ratio vs HF fp32 {oq_tps / hf_tps:5.2f}x, "
              f"vs HF bf16 {oq_tps / hfb_tps:5.2f}x | same greedy tokens as our fp32 {same_q}/{n}")  # fmt: skip
    for B in batch_sizes:
        prompt = torch.randint(0, cfg.vocab_size, (B, 8))
        tps, _ = our_tokens_per_s(GPTDecoder(model), prompt, n, repeats)
        print(f"batch {B}  ours fp32 aggregate {tps:8.1f} tok/s = {tps / ours_tps:5.2f}x our batch-1 figure")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, 64 tokens, 2 repeats")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = GPTConfig(vocab_size=65, block_size=512, n_layer=4, n_head=4, n_embd=128)
    if args.quick:
        bench("tiny (4 layers, 128 wide)", tiny, 64, [8], 2, bf16=False)
        return
    bench("tiny (4 layers, 128 wide)", tiny, 256, [8], 3, bf16=False)
    small = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    bench("GPT-2-small-sized (124M)", small, 64, [], 2, bf16=True)


if __name__ == "__main__":
    main()
