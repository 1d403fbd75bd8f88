"""ImageGenerator: diffusers interop (DDPMPipeline, StableDiffusion via hf:), bad requests, PNG/GIF outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from aigc.config import to_dict
from aigc.errors import AigcError
from aigc.generation.image import ImageGenerator
from aigc.generation.image_io import make_grid, read_png_params
from aigc.models.diffusion import DiffusionConfig, build_unet
from aigc.models.gan import GAN, GANConfig
from aigc.training.image_tasks import export_diffusers
from aigc.utils.io import atomic_write_json


def make_run(path, family: str, model_cfg, state: dict, classes: list[str]):
    """A run directory as training writes it (config.json + model.safetensors), without training."""
    path.mkdir(parents=True)
    atomic_write_json(
        path / "config.json",
        {"family": family, "model": to_dict(model_cfg), "train": {}, "data": {"classes": classes}},
    )
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def make_uncond_run(tmp_path, prediction_type: str = "epsilon"):
    torch.manual_seed(0)
    cfg = DiffusionConfig(
        image_size=8,
        block_out_channels=(8, 16),
        attention_levels=(1,),
        norm_num_groups=4,
        prediction_type=prediction_type,
    )
    unet = build_unet(cfg)
    run = make_run(tmp_path / "uncond", "diffusion", cfg, unet.state_dict(), [])
    export_diffusers(cfg, unet.state_dict(), run / "diffusers")
    return run


@pytest.fixture
def uncond_run(tmp_path):
    return make_uncond_run(tmp_path)


@pytest.fixture
def cond_run(tmp_path):
    torch.manual_seed(0)
    cfg = DiffusionConfig(
        image_size=8, block_out_channels=(8, 16), attention_levels=(1,), norm_num_groups=4, num_classes=3
    )
    return make_run(tmp_path / "cond", "diffusion", cfg, build_unet(cfg).state_dict(), ["cat", "dog", "owl"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_same_images_as_diffusers_ddpm_pipeline(tmp_path, prediction_type):
    """Oracle: our DDPM loop == DDPMPipeline.from_pretrained on the exported artifact, same seed."""
    from diffusers import DDPMPipeline

    uncond_run = make_uncond_run(tmp_path, prediction_type)

    ours = ImageGenerator.load(uncond_run).generate(
        n=2, seed=7, sampler="ddpm", steps=6, dtype="fp32", seed_per_image=False
    )  # one generator for the call, as the pipeline draws
    pipe = DDPMPipeline.from_pretrained(uncond_run / "diffusers")
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=6, output_type="np"
    ).images
    got = (
        ((ours.tensor + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    )  # the pipeline's (x / 2 + 0.5) in NHWC
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert ours.params[0]["sampler"] == "ddpm" and ours.params[0]["seed"] == 7
    cfg = json.loads((uncond_run / "config.json").read_text())["model"]
    assert pipe.scheduler.config.prediction_type == cfg["prediction_type"]  # the export carries it


bf16 = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 kernels"
)


@bf16
def test_bf16_sampling_matches_fp32(cond_run):
    """dtype="bf16" (what "auto" takes where bf16 is faster) runs the UNet under autocast; x, guidance and the
    solver stay fp32, so the images stay close to the exact fp32 path; both are recorded."""
    gen = ImageGenerator.load(cond_run)
    kw = dict(n=4, seed=3, label="dog", guidance=3.0, sampler="dpm", steps=5)
    exact = gen.generate(**kw, dtype="fp32")
    fast = gen.generate(**kw, dtype="bf16")
    assert fast.tensor.dtype == torch.float32
    assert (fast.tensor - exact.tensor).abs().mean() < 0.02
    assert not torch.equal(fast.tensor, exact.tensor)  # it really ran in bf16
    assert exact.params[0]["dtype"] == "fp32" and fast.params[0]["dtype"] == "bf16"
    from aigc.training.trainer import auto_bf16

    auto = gen.generate(**kw)  # auto: bf16 where this CPU's bf16 matmul beats fp32
    want = "bf16" if auto_bf16(torch.device("cpu")) else "fp32"
    assert auto.params[0]["dtype"] == want
    same = fast if want == "bf16" else exact
    torch.testing.assert_close(auto.tensor, same.tensor, atol=0, rtol=0)  # deterministic


def test_dtype_option_errors(cond_run, tmp_path):
    gen = ImageGenerator.load(cond_run)
    with pytest.raises(AigcError, match="unknown dtype 'fp16'; valid: auto, bf16, fp32"):
        gen.generate(n=1, dtype="fp16")
    torch.manual_seed(0)
    cfg = GANConfig(image_size=8, latent_dim=4, g_width=4, d_width=4, n_layers=2)
    g_run = make_run(tmp_path / "gan", "gan", cfg, GAN(cfg).generator.state_dict(), [])
    gan = ImageGenerator.load(g_run)
    with pytest.raises(AigcError, match="--dtype bf16 applies to our diffusion runs; this is a gan model"):
        gan.generate(n=1, dtype="bf16")
    assert "dtype" not in gan.generate(n=1, dtype="fp32").params[0]


def test_samplers_and_seeds(uncond_run):
    gen = ImageGenerator.load(uncond_run)
    a = gen.generate(n=2, seed=1, sampler="dpm", steps=3).tensor
    torch.testing.assert_close(a, gen.generate(n=2, seed=1, sampler="dpm", steps=3).tensor, atol=0, rtol=0)
    assert not torch.equal(a, gen.generate(n=2, seed=2, sampler="dpm", steps=3).tensor)
    assert not torch.equal(a, gen.generate(n=2, seed=1, sampler="ddim", steps=3).tensor)
    # dpm-sde: SDE-DPM-Solver++ draws its step noise from the call's generator, so a seed repeats
    sde = gen.generate(n=2, seed=1, sampler="dpm-sde", steps=3)
    assert sde.params[0]["sampler"] == "dpm-sde"
    torch.testing.assert_close(sde.tensor, gen.generate(n=2, seed=1, sampler="dpm-sde", steps=3).tensor)
    assert not torch.equal(sde.tensor, a)
    # batching does not change the result: one generator runs through the batches
    assert gen.generate(n=3, seed=1, sampler="ddim", steps=2, batch_size=2).tensor.shape == (3, 1, 8, 8)


def _oracle(gen, algorithm: str, steps: int, seed: int, **options) -> torch.Tensor:
    """Our denoise loop on a diffusers DPM-Solver++ scheduler built here from its documented options."""
    from diffusers import DPMSolverMultistepScheduler

    from aigc.models.diffusion import denoise

    cfg = gen.config
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type="epsilon",
        algorithm_type=algorithm, solver_order=2, thresholding=True, sample_max_value=1.0, **options,
    )  # fmt: skip
    with torch.no_grad():
        return denoise(gen.model, sched, 2, steps, torch.Generator().manual_seed(seed))


def test_sampler_options_reach_the_scheduler(uncond_run, monkeypatch):
    """SAMPLER_OPTIONS (the measured per-sampler scheduler settings) are what generate() samples with."""
    from aigc.generation.image import SAMPLER_OPTIONS, sampler_scheduler

    gen = ImageGenerator.load(uncond_run)
    gen.config.beta_schedule = "squaredcos_cap_v2"  # the schedule the options were measured on
    # defaults: diffusers' linspace timesteps for both DPM-Solver++ samplers (nothing beat them)
    assert sampler_scheduler(gen.config, "dpm-sde").config.algorithm_type == "sde-dpmsolver++"
    assert sampler_scheduler(gen.config, "dpm").config.use_lu_lambdas is False
    one = dict(dtype="fp32", seed_per_image=False)  # one generator for the call, as the oracle draws
    sde = gen.generate(n=2, seed=4, sampler="dpm-sde", steps=5, **one).tensor
    torch.testing.assert_close(sde, _oracle(gen, "sde-dpmsolver++", 5, 4), atol=1e-6, rtol=0)
    monkeypatch.setitem(SAMPLER_OPTIONS, "dpm-sde", {"use_lu_lambdas": True})
    lu = gen.generate(n=2, seed=4, sampler="dpm-sde", steps=5, **one).tensor
    torch.testing.assert_close(
        lu, _oracle(gen, "sde-dpmsolver++", 5, 4, use_lu_lambdas=True), atol=1e-6, rtol=0
    )
    assert (sde - lu).abs().max() > 1e-3  # the option changed the walk
    # any entry reaches the scheduler, e.g. the ODE on log-SNR spacing with the Heun-style update
    monkeypatch.setitem(SAMPLER_OPTIONS, "dpm", {"use_lu_lambdas": True, "solver_type": "heun"})
    ode = gen.generate(n=2, seed=4, sampler="dpm", steps=5, **one).tensor
    oracle = _oracle(gen, "dpmsolver++", 5, 4, use_lu_lambdas=True, solver_type="heun")
    torch.testing.assert_close(ode, oracle, atol=1e-6, rtol=0)


def test_bad_requests(uncond_run, cond_run):
    u, c = ImageGenerator.load(uncond_run), ImageGenerator.load(cond_run)
    with pytest.raises(AigcError, match="unknown sampler 'euler'; valid samplers: ddpm, ddim, dpm"):
        u.generate(sampler="euler")
    with pytest.raises(AigcError, match="unconditional diffusion model: --guidance"):
        u.generate(guidance=3.0)
    with pytest.raises(AigcError, match="unconditional diffusion model: --label"):
        u.generate(label=1)
    with pytest.raises(AigcError, match=r"label 3 is outside the classes 0..2 \(names: cat, dog, owl\)"):
        c.generate(label=3)
    with pytest.raises(AigcError, match="label 'emu' is outside"):
        c.generate(label="emu")
    with pytest.raises(AigcError, match="steps must be >= 1, got 0"):
        c.generate(steps=0)
    with pytest.raises(AigcError, match="not a model directory"):
        ImageGenerator.load(uncond_run / "nope")


def test_conditional_labels_by_index_or_name(cond_run):
    c = ImageGenerator.load(cond_run)
    a = c.generate(n=2, seed=0, label="dog", guidance=2.0, steps=2)
    b = c.generate(n=2, seed=0, label=1, guidance=2.0, steps=2)
    torch.testing.assert_close(a.tensor, b.tensor)
    assert [p["label"] for p in a.params] == [1, 1]
    cycle = c.generate(n=4, seed=0, steps=2)  # no label: cycle through the classes
    assert [p["label"] for p in cycle.params] == [0, 1, 2, 0]
    mixed = c.generate(n=3, seed=0, label=[2, "cat", 1], steps=2)  # one label per image
    assert [p["label"] for p in mixed.params] == [2, 0, 1]
    with pytest.raises(AigcError, match="2 labels for n=3 images"):
        c.generate(n=3, label=[1, 2])
    with pytest.raises(AigcError, match="label 5 is outside"):
        c.generate(n=2, label=[0, 5])


def test_png_params_grid_and_gif(cond_run, tmp_path):
    gen = ImageGenerator.load(cond_run)
    out = gen.generate(n=4, seed=5, label=2, guidance=3.0, sampler="ddim", steps=2)
    paths = out.save(tmp_path / "o", scale=2)
    assert [p.name for p in paths] == [
        "image-000.png",
        "image-001.png",
        "image-002.png",
        "image-003.png",
        "grid.png",
    ]
    params = read_png_params(paths[1])
    assert {k: params[k] for k in ("model", "seed", "sampler", "steps", "guidance", "label")} == {
        "model": "cond",
        "seed": 6,
        "sampler": "ddim",
        "steps": 2,
        "guidance": 3.0,
        "label": 2,
    }  # fmt: skip  (image i: seed + i)
    with Image.open(paths[0]) as im:
        assert im.size == (16, 16) and im.text["sampler"] == "ddim" and im.text["label"] == "2"
    with Image.open(paths[-1]) as im:
        assert im.size == ((2 * (8 + 2) + 2) * 2,) * 2 and json.loads(im.text["parameters"])["seed"] == 5
    frames, p = gen.animate(frames=5, seed=0, label=1, steps=2)
    gif = gen.save_animation(frames, p, tmp_path / "o" / "walk.gif", scale=2)
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 5 and im.size == (16, 16)
    assert p["sampler"] == "dpm" and p["label"] == 1


def test_grid_layout():
    imgs = [Image.new("L", (4, 4), v) for v in (10, 20, 30)]
    grid = make_grid(imgs, nrow=2, pad=1)
    assert grid.size == (2 * 5 + 1, 2 * 5 + 1)
    assert grid.getpixel((1, 1)) == 10 and grid.getpixel((6, 1)) == 20 and grid.getpixel((1, 6)) == 30


def test_gan_interpolation_is_smooth(tmp_path):
    torch.manual_seed(0)
    cfg = GANConfig(image_size=8, latent_dim=8, g_width=8, d_width=8, n_layers=2)
    run = make_run(tmp_path / "gan", "gan", cfg, GAN(cfg).generator.state_dict(), [])
    gen = ImageGenerator.load(run)
    with pytest.raises(AigcError, match="--sampler/--steps apply to diffusion"):
        gen.generate(sampler="dpm")
    frames, _ = gen.animate(frames=12, keyframes=2, seed=0)
    a = np.stack([np.asarray(f, dtype=np.float32) for f in frames])
    steps = np.abs(np.diff(a, axis=0)).mean(axis=(1, 2))
    assert steps.max() < np.abs(a[0] - a[6]).mean()  # neighbours closer than the far keyframe


def _tiny_sd_pipeline(path):
    """A StableDiffusionPipeline from tiny random parts (no hub), saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )  # fmt: skip
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
        )
    )  # fmt: skip
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16, pad_token="!"
    )
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(path / "sd")
    return path / "sd"


def test_stable_diffusion_through_hf_prefix(tmp_path):
    sd = _tiny_sd_pipeline(tmp_path)
    gen = ImageGenerator.load(f"hf:{sd}")
    assert gen.family == "hf" and gen.is_text_to_image
    out = gen.generate(n=1, seed=0, prompt="a cat", steps=2, size=32, guidance=2.0)
    assert len(out.images) == 1 and out.images[0].size == (32, 32) and out.images[0].mode == "RGB"
    again = gen.generate(n=1, seed=0, prompt="a cat", steps=2, size=32, guidance=2.0)
    np.testing.assert_array_equal(np.asarray(out.images[0]), np.asarray(again.images[0]))
    dpm = gen.generate(n=1, seed=0, prompt="a cat", steps=2, size=32, sampler="dpm")
    assert dpm.params[0]["sampler"] == "dpm" and dpm.params[0]["prompt"] == "a cat"
    paths = out.save(tmp_path / "o", grid=False)
    assert read_png_params(paths[0])["prompt"] == "a cat"
    with pytest.raises(AigcError, match="not class-conditional"):
        gen.generate(label=1)
    with pytest.raises(AigcError, match="cannot load diffusers pipeline"):
        ImageGenerator.load(f"hf:{tmp_path / 'missing'}")
