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
        (
            ["--label", "3"],
            "unconditional vae model: --label needs a class-conditional diffusion run (vae runs",
        ),
        (
            ["--guidance", "2"],
            "train one with `aigc train diffusion --set conditional=true` on labelled data",
        ),
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


def test_image_seeds_never_wrap(run_cli, tmp_path):
    """Image i uses seed + i: a seed past 2**63-1, or one whose last image would pass it, is one
    line naming the largest seed for that n (it was silently reduced mod 2**63); the library and
    the server's schema apply the same bound."""
    from pydantic import ValidationError

    from aigc.errors import AigcError
    from aigc.generation.image import ImageGenerator
    from aigc.serve.schemas import ImageRequest
    from serve_helpers import write_image_run

    run = write_image_run(tmp_path / "pix")
    top = 2**63 - 1
    for seed, n, says in (
        ("99999999999999999999", 1, f"allowed: 0..{top}"),
        (str(top), 2, f"allowed: 0..{top - 1} for 2 images"),
        ("-1", 1, "out of range"),
    ):
        code, _, err = run_cli("generate", "image", "-m", run, "-o", tmp_path / "o", "--n", n, "--seed", seed)
        assert code == 1 and says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (
            err
        )
        assert not (tmp_path / "o").exists()
    code, _, err = run_cli("generate", "image", "-m", run, "-o", tmp_path / "o", "--n", "2", "--seed", top - 1,
                           "--steps", "2")  # fmt: skip
    assert code == 0, err
    assert read_png_params(tmp_path / "o" / "image-001.png")["seed"] == top  # the last allowed seed, not 0
    gen = ImageGenerator.load(run)
    with pytest.raises(AigcError, match=f"allowed: 0..{top - 2} for 3 images"):
        gen.generate(n=3, seed=top - 1, steps=1)
    assert ImageRequest(model="m", n=2, seed=top - 1).seed == top - 1
    with pytest.raises(ValidationError, match=f"seed must be <= {top - 1}"):
        ImageRequest(model="m", n=2, seed=top)
    assert all(0 <= ImageRequest(model="m", n=8).random_seed() <= top - 7 for _ in range(100))


def test_conditional_diffusion_card_code_runs_in_diffusers(tmp_path):
    """A class-conditional run's card gives a diffusers loop that runs (DDPMPipeline raises "class_labels
    should be provided" on it) and gives what our own sampler gives for the same labels and seed."""
    import re

    import torch
    from safetensors.torch import load_file

    from aigc.models.diffusion import DiffusionConfig, build_unet, denoise, make_scheduler
    from aigc.training.image_tasks import diffusers_usage, export_diffusers

    cfg = DiffusionConfig(image_size=8, block_out_channels=(8, 16), attention_levels=(1,), norm_num_groups=4,
                          num_classes=3, num_train_timesteps=20, steps=20, guidance=2.0)  # fmt: skip
    torch.manual_seed(0)
    weights = build_unet(cfg).state_dict()
    run = tmp_path / "run"
    export_diffusers(cfg, weights, run / "diffusers")
    text = diffusers_usage(cfg)
    assert "--label" in text and "DDPMPipeline.from_pretrained" not in text
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1).replace("RUN", str(run))
    scope: dict = {}
    exec(code, scope)  # the card's code, as a user pastes it
    images = scope["images"]
    assert images.shape == (3, 1, 8, 8) and scope["labels"].tolist() == [0, 1, 2]
    unet = build_unet(cfg).eval()
    unet.load_state_dict(load_file(str(run / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors")))
    with torch.no_grad():
        ours = denoise(unet, make_scheduler(cfg, "ddpm"), 3, 20, torch.Generator().manual_seed(0),
                       labels=torch.tensor([0, 1, 2]), guidance=2.0, null_label=3)  # fmt: skip
    assert torch.allclose((ours + 1) / 2, images, atol=1e-5)
    uncond = DiffusionConfig(
        image_size=8, block_out_channels=(8, 16), attention_levels=(1,), norm_num_groups=4
    )
    assert "DDPMPipeline.from_pretrained(RUN/diffusers)" in diffusers_usage(uncond)


def test_image_options_out_of_range_are_refused(run_cli, tmp_path):
    """--scale 0 (wrote unscaled PNGs) and a negative --guidance (sampled away from the class) are one line."""
    from serve_helpers import write_image_run

    run = write_image_run(tmp_path / "pix", classes=["a", "b"])
    for args, says in (
        (["--scale", "0"], "--scale 0 is out of range; allowed: 1..32"),
        (["--guidance", "-3"], "--guidance -3.0 is out of range; allowed: a number >= 0"),
        (["--guidance", "nan"], "--guidance nan is out of range"),
    ):
        code, _, err = run_cli("generate", "image", "-m", run, "-o", tmp_path / "o", "--steps", "1", *args)
        assert code == 1 and says in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "o").exists()
    code, _, err = run_cli("generate", "image", "-m", run, "-o", tmp_path / "o", "--steps", "1", "--n", "2",
                           "--guidance", "0")  # fmt: skip
    assert code == 0, err  # 0: unconditional samples, as the server allows
