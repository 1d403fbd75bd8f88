"""`aigc data prepare --kind image`, `aigc train gan|vae|diffusion`, `aigc generate image` end to end."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from aigc.generation.image_io import read_png_params


def test_generate_image_help(run_cli):
    code, out, _ = run_cli("generate", "image", "--help")
    assert code == 0
    for flag in ("--label", "--guidance", "--sampler", "--steps", "--seed", "--animate", "--prompt"):
        assert flag in out


def test_prepare_train_generate_animate(run_cli, tmp_path):
    data, run, imgs = tmp_path / "data", tmp_path / "run", tmp_path / "imgs"
    code, out, err = run_cli(
        "data", "prepare", "digits", "--kind", "image", "--out", data, "--set", "size=8", "--set", "limit=100"
    )
    assert code == 0, err
    code, out, err = run_cli(
        "train", "gan", "--data", data, "--out", run, "--preset", "tiny", "--max-steps", "2",
        "--set", "model.n_layers=2", "--set", "train.batch_size=8", "--set", "conditional=true",
    )  # fmt: skip
    assert code == 0, err
    assert "trained gan: 2 steps" in out
    code, out, err = run_cli(
        "generate", "image", "--model", run, "--n", "4", "--label", "3", "--seed", "9", "--out", imgs
    )
    assert code == 0, err
    assert sorted(p.name for p in imgs.iterdir()) == ["grid.png"] + [f"image-00{i}.png" for i in range(4)]
    params = read_png_params(imgs / "image-002.png")
    assert params["seed"] == 9 + 2 and params["label"] == 3 and params["model"] == "run"  # image i: seed + i
    code, _, err = run_cli("generate", "image", "--model", run, "--n", "4", "--out", imgs)
    assert code == 1 and "--overwrite" in err
    code, out, err = run_cli(
        "generate", "image", "--model", run, "--n", "6", "--animate", "--out", tmp_path / "gif"
    )
    assert code == 0, err
    with Image.open(tmp_path / "gif" / "animation.gif") as im:
        assert im.n_frames == 6


def test_bad_generate_requests_exit_1(run_cli, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    assert (
        run_cli(
            "data",
            "prepare",
            "digits",
            "--kind",
            "image",
            "--out",
            data,
            "--set",
            "size=8",
            "--set",
            "limit=60",
        )[0]
        == 0
    )
    code, _, err = run_cli(
        "train",
        "vae",
        "--data",
        data,
        "--out",
        run,
        "--preset",
        "tiny",
        "--max-steps",
        "1",
        "--set",
        "train.batch_size=8",
    )
    assert code == 0, err
    for args, message in [
        (["--sampler", "euler"], "unknown sampler 'euler'; valid samplers: ddpm, ddim, dpm"),
        (["--label", "3"], "unconditional vae model: --label"),
        (["--guidance", "2"], "unconditional vae model: --guidance"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--dtype", "fp16"], "unknown dtype 'fp16'; valid: auto, bf16, fp32"),
        (["--dtype", "bf16"], "--dtype bf16 applies to our diffusion runs; this is a vae model"),
    ]:
        code, _, err = run_cli("generate", "image", "--model", run, "--out", tmp_path / "o", *args)
        assert code == 1 and message in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "o").exists()


@pytest.mark.slow  # trains the feature network of the eval (~10 s on a loaded 2-core machine)
def test_diffusion_dtype_option_is_recorded(run_cli, tmp_path):
    """`--dtype fp32` on generate and eval: the PNG params and the eval protocol record it."""
    data, run = tmp_path / "data", tmp_path / "run"
    code, _, err = run_cli(
        "data", "prepare", "digits", "--kind", "image", "--out", data, "--set", "size=8", "--set", "limit=200"
    )
    assert code == 0, err
    code, _, err = run_cli(
        "train", "diffusion", "--data", data, "--out", run, "--preset", "tiny", "--max-steps", "1",
        "--set", "train.batch_size=8", "--set", "conditional=true",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(
        "generate",
        "image",
        "--model",
        run,
        "--n",
        "2",
        "--steps",
        "2",
        "--dtype",
        "fp32",
        "--out",
        tmp_path / "o",
    )
    assert code == 0, err
    assert read_png_params(tmp_path / "o" / "image-001.png")["dtype"] == "fp32"
    code, out, err = run_cli(
        "eval", "--model", run, "--n", "8", "--steps", "2", "--dtype", "fp32", "--out", tmp_path / "ev" / "r.json",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["protocol"]["sampler"]["dtype"] == "fp32"


def test_train_rejects_unsupported_size(run_cli, tmp_path):
    data = tmp_path / "data"
    assert (
        run_cli(
            "data",
            "prepare",
            "digits",
            "--kind",
            "image",
            "--out",
            data,
            "--set",
            "limit=50",
            "--set",
            "size=10",
        )[0]
        == 0
    )
    code, _, err = run_cli("train", "diffusion", "--data", data, "--out", tmp_path / "r", "--preset", "small")
    assert code == 1 and "image size 10 is not supported" in err and "multiples of 4" in err
