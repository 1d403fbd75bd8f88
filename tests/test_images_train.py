"""Image training recipes: 2-step smoke runs per family, exact resume (EMA included), GAN health."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from aigc.data.images import prepare_images
from aigc.errors import AigcError
from aigc.generation.image import ImageGenerator
from aigc.training.image_tasks import GANTask, train_image

TINY = {
    "diffusion": ["model.block_out_channels=[8,16]", "model.attention_levels=[1]", "model.norm_num_groups=4"],
    "vae": ["model.channels=[8,16]", "model.latent_dim=4"],
    "gan": ["model.g_width=8", "model.d_width=8", "model.latent_dim=8", "model.n_layers=2"],
}
COMMON = ["train.batch_size=8", "train.eval_batches=1", "train.warmup_steps=1", "model.steps=2"]


@pytest.fixture
def digits(tmp_path):
    prepare_images("digits", tmp_path / "digits", overrides=["size=8", "limit=120"])
    return tmp_path / "digits"


def _overrides(family, *extra):
    common = [c for c in COMMON if family == "diffusion" or not c.startswith("model.steps")]
    return [*TINY[family], *common, *extra]


@pytest.mark.parametrize(
    "family,extra",
    [
        ("diffusion", ["conditional=true"]),
        ("vae", []),
        ("gan", ["conditional=true", "model.spectral_norm=true"]),
    ],
)
def test_smoke_train_then_generate(family, extra, digits, tmp_path):
    run = tmp_path / "run"
    result = train_image(
        family,
        digits,
        run,
        preset="tiny",
        overrides=_overrides(family, "train.max_steps=2", *extra),
        progress=False,
    )
    assert result.steps == 2
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["family"] == family and cfg["model"]["image_size"] == 8 and cfg["data"]["classes"][0] == "0"
    for name in ("model.safetensors", "metrics.jsonl", "card.md"):
        assert (run / name).is_file(), name
    assert list((run / "samples").glob("*.png"))
    gen = ImageGenerator.load(run)
    out = gen.generate(n=3, seed=0, label=2 if extra else None)
    assert len(out.images) == 3 and out.images[0].size == (8, 8)
    if family == "diffusion":  # the diffusers export sits beside our weights
        assert (run / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert out.params[0]["label"] == 2 and out.params[0]["guidance"] == 3.0


def test_sample_grids_during_training(digits, tmp_path):
    train_image(
        "vae",
        digits,
        tmp_path / "r",
        overrides=_overrides("vae", "train.max_steps=4", "sample_interval=2"),
        progress=False,
    )
    names = sorted(p.name for p in (tmp_path / "r" / "samples").glob("step-*.png"))
    assert names == ["step-0000002.png", "step-0000004.png"]


@pytest.mark.slow
def test_exact_resume_includes_ema(digits, tmp_path):
    """2 steps + resume to 4 == 4 steps straight: weights, EMA (the artifact) and batch cursor."""
    ov = _overrides(
        "diffusion",
        "train.schedule=constant",
        "train.ckpt_interval=2",
        "train.eval_interval=0",
        "model.ema_decay=0.9",
    )
    train_image("diffusion", digits, tmp_path / "a", overrides=[*ov, "train.max_steps=4"], progress=False)
    train_image("diffusion", digits, tmp_path / "b", overrides=[*ov, "train.max_steps=2"], progress=False)
    train_image(
        "diffusion", digits, tmp_path / "b", overrides=[*ov, "train.max_steps=4"], resume=True, progress=False
    )
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000004" / "tensors.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-00000004" / "tensors.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("task.ema.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    ema_a = load_file(str(tmp_path / "a" / "model.safetensors"))
    ema_b = load_file(str(tmp_path / "b" / "model.safetensors"))
    for k in ema_a:
        torch.testing.assert_close(ema_a[k], ema_b[k], atol=0, rtol=0)


def test_gan_logs_health_and_warns_on_collapse(digits, tmp_path, caplog):
    run = tmp_path / "g"
    train_image(
        "gan",
        digits,
        run,
        overrides=_overrides("gan", "train.max_steps=2", "train.log_interval=1"),
        progress=False,
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 2 and {"d_loss", "g_loss", "d_acc", "diversity"} <= set(train[0])
    # the watch itself: D always right for collapse_steps steps -> one warning
    task = GANTask.__new__(GANTask)
    task.suspicious, task.warned, task.step_count = 0, False, 0
    with caplog.at_level(logging.WARNING, logger="aigc.train"):
        for _ in range(GANTask.collapse_steps):
            task._watch(1.0, 0.5)
        task._watch(1.0, 0.5)
    assert [r.message for r in caplog.records if "collapsing" in r.message].__len__() == 1


def test_conditional_needs_labels(tmp_path):
    import numpy as np

    np.savez(tmp_path / "x.npz", images=np.zeros((50, 8, 8), np.uint8))
    prepare_images(str(tmp_path / "x.npz"), tmp_path / "d")
    with pytest.raises(AigcError, match="conditional=true needs labelled data"):
        train_image(
            "diffusion", tmp_path / "d", tmp_path / "r", overrides=[*TINY["diffusion"], "conditional=true"]
        )


def test_image_size_not_supported_by_unet(digits, tmp_path):
    with pytest.raises(AigcError, match=r"image size 8 .* multiples of 16 \(e\.g\. 16, 32, 64.*--set size=N"):
        train_image(
            "diffusion",
            digits,
            tmp_path / "r",
            overrides=["model.block_out_channels=[8,8,8,8,8]", "model.norm_num_groups=4"],
        )


@pytest.mark.parametrize(
    "family,bad,message",
    [
        ("diffusion", "model.num_train_timesteps=0", "num_train_timesteps must be >= 1, got 0"),
        ("diffusion", "model.norm_num_groups=0", "norm_num_groups must be >= 1, got 0"),
        ("diffusion", "model.layers_per_block=0", "layers_per_block must be >= 1, got 0"),
        ("diffusion", "model.block_out_channels=[0,16]", "every block_out_channels entry must be >= 1"),
        ("diffusion", "model.beta_end=2", "0 <= beta_start <= beta_end < 1"),
        ("diffusion", "model.steps=0", "steps must be >= 1, got 0"),
        ("diffusion", "sample_interval=-1", "sample_interval must be >= 0"),
        ("vae", "model.channels=[0,16]", "every channels entry must be >= 1"),
        ("gan", "model.g_width=0", "g_width and d_width must be >= 1"),
        ("gan", "model.d_lr=-1", "d_lr must be > 0"),
        ("gan", "train.betas=[1.5, 0.9]", "betas must be in [0, 1)"),
    ],
)
def test_bad_config_values_are_refused_before_training(family, bad, message, digits, tmp_path):
    with pytest.raises(AigcError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        train_image(
            family, digits, tmp_path / "r", preset="tiny", overrides=_overrides(family, bad), max_steps=2
        )
    assert not (tmp_path / "r").exists()  # no config.json left behind


def test_batch_larger_than_the_training_set_is_refused(digits, tmp_path):
    with pytest.raises(
        AigcError, match=r"train.batch_size=100000 is larger than the training set: 114 train images"
    ):
        train_image("vae", digits, tmp_path / "r", overrides=_overrides("vae", "train.batch_size=100000"))
    assert not (tmp_path / "r").exists()
