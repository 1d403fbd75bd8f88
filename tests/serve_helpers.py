"""Tiny artifacts, a small corpus and tiny training overrides shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch

# a small line corpus for training tests, and the overrides that make a GPT tiny and fast
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(400))
TINY_GPT = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=16",
    "model.block_size=16",
    "train.batch_size=4",
    "train.eval_batches=2",
    "train.warmup_steps=2",
    "train.peak_flops=1e9",
    "train.precision=fp32",
    "sample.num=1",
    "sample.tokens=10",
]

CORPUS = "ROMEO: But soft, what light through yonder window breaks?\nSystem: User: Assistant: 春眠不觉晓\n"


def write_text_run(out: Path, family: str = "gpt", seed: int = 0, block_size: int = 64) -> Path:
    """A run directory as training writes it (config.json, model.safetensors, tokenizer.json)."""
    from safetensors.torch import save_model

    from aigc.models import build_model
    from aigc.tokenizers import train_tokenizer
    from aigc.utils.io import atomic_write_json

    tok = train_tokenizer("char", [CORPUS])
    if family == "gpt":
        cfg = dict(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16)
    else:
        cfg = dict(vocab_size=tok.vocab_size, block_size=block_size, n_embd=16, n_hidden=16, n_layer=1)
    torch.manual_seed(seed)
    model = build_model(family, cfg)
    if family == "gpt":  # larger logits than at init: each model (seed) samples its own text
        with torch.no_grad():
            for w in {id(m.weight): m.weight for m in (model.tok_emb, model.lm_head)}.values():
                w.mul_(20)
    out.mkdir(parents=True)
    save_model(model, str(out / "model.safetensors"))
    atomic_write_json(out / "config.json", {"family": family, "model": cfg, "train": {}, "data": {}})
    tok.save(out / "tokenizer.json")
    return out


def write_image_run(out: Path, classes: list[str] | None = None) -> Path:
    """A tiny 8x8 diffusion run (as tests/test_images_generation.py builds one); class-conditional
    when `classes` are given."""
    from safetensors.torch import save_file

    from aigc.config import to_dict
    from aigc.models.diffusion import DiffusionConfig, build_unet
    from aigc.utils.io import atomic_write_json

    torch.manual_seed(0)
    cfg = DiffusionConfig(image_size=8, block_out_channels=(8, 16), attention_levels=(1,), norm_num_groups=4,
                          num_classes=len(classes or []))  # fmt: skip
    unet = build_unet(cfg)
    out.mkdir(parents=True)
    cfg_json = {"family": "diffusion", "model": to_dict(cfg), "train": {}, "data": {"classes": classes or []}}
    atomic_write_json(out / "config.json", cfg_json)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(out / "model.safetensors"))
    return out


def models_dir(root: Path) -> Path:
    """tiny (GPT), rnn (LSTM), story@1 / story@2 (versions), pix (diffusion)."""
    write_text_run(root / "tiny")
    write_text_run(root / "rnn", family="lstm")
    write_text_run(root / "story" / "1", seed=1)
    write_text_run(root / "story" / "2", seed=2)
    write_image_run(root / "pix")
    return root


class LiveServer:
    """uvicorn serving `app` on a random loopback port in a background thread."""

    def __init__(self, app) -> None:
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
