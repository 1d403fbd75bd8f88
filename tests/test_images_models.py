"""Image model families: shapes, losses against reference formulas, guidance, EMA, size checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aigc.config import from_dict, list_presets, load_preset
from aigc.errors import AigcError
from aigc.models.diffusion import EMA, DiffusionConfig, build_unet, denoise, diffusion_loss, make_scheduler
from aigc.models.gan import GAN, GANConfig, d_accuracy, d_loss, g_loss
from aigc.models.vae import VAE, VAEConfig
from aigc.training.image_tasks import RUN_CONFIGS

TINY_UNET = {"block_out_channels": (8, 16), "attention_levels": (1,), "norm_num_groups": 4, "image_size": 8}


@pytest.mark.parametrize("family", ["diffusion", "vae", "gan"])
def test_every_preset_parses(family):
    names = list_presets(family)
    assert {"tiny", "small", "base"} <= set(names)
    for name in names:
        raw = load_preset(family, name)
        raw["model"] = {
            **raw.get("model", {}),
            "image_size": 32 if family != "diffusion" or name != "mnist-cond" else 28,
        }
        from_dict(RUN_CONFIGS[family], raw)


def test_unet_size_check_names_the_sizes():
    with pytest.raises(AigcError, match=r"image size 28 .* multiples of 8 \(e\.g\. 8, 16, 32"):
        DiffusionConfig(image_size=28, block_out_channels=(16, 32, 32, 32))
    DiffusionConfig(image_size=28, block_out_channels=(16, 32, 32))  # 28 -> 14 -> 7 and back


def _with_default_attention(unet):
    """The same UNet with diffusers' own AttnProcessor2_0 (the oracle for SpatialAttnProcessor)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    for m in unet.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0())
    return unet


def test_spatial_attention_matches_diffusers_processor():
    """Oracle: our attention processor == diffusers' AttnProcessor2_0, in fp32 and, within bf16
    rounding, under bf16 autocast; gradients too (training runs it)."""
    from aigc.models.diffusion import SpatialAttnProcessor

    torch.manual_seed(0)
    cfg = DiffusionConfig(
        **{**TINY_UNET, "block_out_channels": (16, 32), "norm_num_groups": 8}, num_classes=3
    )
    ours = build_unet(cfg)
    procs = {type(m.processor) for m in ours.modules() if hasattr(m, "processor")}
    assert procs == {SpatialAttnProcessor}
    ref = _with_default_attention(build_unet(cfg))
    ref.load_state_dict(ours.state_dict())
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 3])
    a, b = ours(x, t, class_labels=y).sample, ref(x, t, class_labels=y).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a16, b16 = ours(x, t, class_labels=y).sample, ref(x, t, class_labels=y).sample
    assert a16.dtype == torch.bfloat16
    assert (a16.float() - b.detach()).abs().max() < 0.05 and (b16.float() - b.detach()).abs().max() < 0.05


def _classic_attention(q, k, v, scale):
    """diffusers' `AttnProcessor` maths under bf16 autocast (upcast_softmax), through autograd."""
    s = torch.baddbmm(
        q.new_empty(q.shape[0], q.shape[1], k.shape[1]), q, k.transpose(1, 2), beta=0, alpha=scale
    )
    return torch.bmm(s.float().softmax(-1).to(q.dtype), v)


@pytest.mark.parametrize("chunk", [3, 7])
def test_chunked_attention_forward_and_backward(chunk):
    """Oracle: `_ChunkedAttention` computes diffusers' bf16 attention; its hand-written gradients
    are as close to the fp64 truth as autograd's through the same bf16 maths. Chunks that do not
    divide N give the same results."""
    from aigc.models.diffusion import _ChunkedAttention

    torch.manual_seed(0)
    n, length, d, scale = 7, 10, 8, 8**-0.5
    q, k, v = (torch.randn(n, length, d).mul(2).bfloat16().requires_grad_() for _ in range(3))
    g = torch.randn(n, length, d).bfloat16()
    out = _ChunkedAttention.apply(q, k, v, scale, chunk)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = _classic_attention(q, k, v, scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)  # softmax rounding only
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    truth = F.scaled_dot_product_attention(q64, k64, v64, scale=scale)
    true_grads = torch.autograd.grad(truth, (q64, k64, v64), g.double())
    for ours, theirs, exact in zip(grads, ref_grads, true_grads, strict=True):
        err, ref_err = ((x.double() - exact).norm() / exact.norm() for x in (ours, theirs))
        assert err < 2 * ref_err + 1e-3 and err < 0.03, (err, ref_err)
    other = _ChunkedAttention.apply(q, k, v, scale, 4)  # another chunking
    torch.testing.assert_close(other, out, atol=1e-2, rtol=0)
    for a, b in zip(torch.autograd.grad(other, (q, k, v), g), grads, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_spatial_attention_trains_like_diffusers_attn_processor_in_bf16():
    """Oracle: under bf16 autocast with gradients (training), our processor gives diffusers'
    `AttnProcessor` outputs and, within bf16 rounding, its gradients."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    cfg = DiffusionConfig(
        **{**TINY_UNET, "block_out_channels": (16, 32), "norm_num_groups": 8}, num_classes=3
    )
    ours, ref = build_unet(cfg), build_unet(cfg)
    for m in ref.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor())
    ref.load_state_dict(ours.state_dict())
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(x, t, class_labels=y).sample, ref(x, t, class_labels=y).sample
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    a.float().square().sum().backward()
    b.float().square().sum().backward()
    ga = torch.cat([p.grad.flatten() for p in ours.parameters()])
    gb = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert (ga - gb).norm() / gb.norm() < 0.02


def test_conditional_unet_uses_the_label_and_null_row():
    cfg = DiffusionConfig(**TINY_UNET, num_classes=3)
    unet = build_unet(cfg).eval()
    assert unet.class_embedding.num_embeddings == 4  # 3 classes + the null label
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    a = unet(x, t, class_labels=torch.tensor([0, 0])).sample
    b = unet(x, t, class_labels=torch.tensor([1, cfg.null_label])).sample
    assert a.shape == (2, 1, 8, 8) and not torch.allclose(a, b)


def test_classifier_free_guidance_formula():
    """guidance w=0 is the unconditional model, w=1 the conditional one (oracle: plain sampling)."""
    cfg = DiffusionConfig(**TINY_UNET, num_classes=3)
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    with torch.no_grad():  # make the class embedding matter
        unet.class_embedding.weight.normal_(0, 3)
    labels = torch.tensor([0, 2])

    def run(lab, w):
        g = torch.Generator().manual_seed(1)
        return denoise(unet, make_scheduler(cfg, "ddim"), 2, 3, g, lab, w, cfg.null_label)

    with torch.no_grad():
        uncond = run(torch.full((2,), cfg.null_label), 1.0)
        cond = run(labels, 1.0)
        torch.testing.assert_close(run(labels, 0.0), uncond, atol=1e-5, rtol=0)
        guided = run(labels, 3.0)
    assert not torch.allclose(guided, cond, atol=1e-3) and not torch.allclose(cond, uncond, atol=1e-3)


def test_ddim_steps_from_the_clipped_x0_and_its_implied_noise():
    """With clip_sample, a DDIM step goes from the clipped x0 along the noise that x0 implies
    (x_prev = sqrt(a') x0c + sqrt(1 - a') (x - sqrt(a) x0c) / sqrt(1 - a)), not along the model's
    unclipped noise: the two disagree whenever x0 is clipped, and 100 steps compound it."""
    from types import SimpleNamespace

    cfg = DiffusionConfig(**TINY_UNET)
    sched = make_scheduler(cfg, "ddim")

    def eps_at(t) -> torch.Tensor:  # the first (noisiest) step predicts an x0 far out of range
        return torch.full((1, 1, 4, 4), -3.0 if int(t) > 600 else 0.2)

    class Fake:
        config = SimpleNamespace(in_channels=1, sample_size=4)
        device, dtype = torch.device("cpu"), torch.float32

        def __call__(self, x, t, class_labels=None):
            return SimpleNamespace(sample=eps_at(t))

    x_T = torch.full((1, 1, 4, 4), 0.5)
    got = denoise(Fake(), sched, 1, 3, torch.Generator(), x_T=x_T)

    def by_hand(implied: bool) -> torch.Tensor:
        ac, ts, x = sched.alphas_cumprod, [int(t) for t in sched.timesteps], x_T
        for k, t in enumerate(ts):
            a, a_prev = ac[t], ac[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0)
            eps = eps_at(t)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            if implied:
                eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x.clamp(-1, 1)

    assert len(sched.timesteps) == 3 and not torch.allclose(by_hand(True), by_hand(False), atol=1e-2)
    torch.testing.assert_close(got, by_hand(True), atol=1e-5, rtol=0)


def test_sampler_names_map_to_diffusers_schedulers():
    cfg = DiffusionConfig(**TINY_UNET)
    assert make_scheduler(cfg, "dpm").config.algorithm_type == "dpmsolver++"
    sde = make_scheduler(cfg, "dpm-sde")
    assert sde.config.algorithm_type == "sde-dpmsolver++" and sde.config.thresholding
    assert type(make_scheduler(cfg, "ddim")).__name__ == "DDIMScheduler"


def test_denoise_rejects_bad_steps_and_sampler():
    cfg = DiffusionConfig(**TINY_UNET)
    with pytest.raises(AigcError, match="unknown sampler 'euler'; valid samplers: ddpm, ddim, dpm"):
        make_scheduler(cfg, "euler")
    with pytest.raises(AigcError, match="steps must be >= 1"):
        denoise(build_unet(cfg), make_scheduler(cfg), 1, 0, torch.Generator())


def test_diffusion_loss_is_noise_mse():
    cfg = DiffusionConfig(**TINY_UNET, label_dropout=0.0)
    unet, sched = build_unet(cfg), make_scheduler(cfg)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    loss = diffusion_loss(unet, sched, x0, None, cfg, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the same draws, by hand: eq. (14) of Ho et al.
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    torch.testing.assert_close(loss, F.mse_loss(unet(x_t, t).sample, noise), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_v_prediction_loss_targets_the_velocity():
    cfg = DiffusionConfig(**TINY_UNET, label_dropout=0.0, prediction_type="v_prediction")
    unet, sched = build_unet(cfg), make_scheduler(cfg)
    assert sched.config.prediction_type == "v_prediction"
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    loss = diffusion_loss(unet, sched, x0, None, cfg, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # by hand: v = sqrt(abar) eps - sqrt(1 - abar) x0
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(loss, F.mse_loss(unet(x_t, t).sample, v), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionConfig(**TINY_UNET, prediction_type="sample")


def test_ema_update_rule():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.9)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    d = min(0.9, 2 / 11)  # warm-up ramp (1 + n) / (10 + n) at n = 1
    torch.testing.assert_close(ema.shadow["weight"], d * before["weight"] + (1 - d) * m.weight)
    other = torch.nn.Linear(2, 2)
    ema.copy_to(other)
    torch.testing.assert_close(other.weight, ema.shadow["weight"])


def test_vae_elbo_against_torch_distributions():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(image_size=8, channels=(8, 16), latent_dim=4, beta=0.5)).eval()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    loss, parts = vae(x, generator=torch.Generator().manual_seed(0))
    mu, logvar = vae.encode(x)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum() / 3
    torch.testing.assert_close(parts["kl"], kl, atol=1e-4, rtol=1e-4)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0))
    logits = vae.decode_logits(mu + eps * (0.5 * logvar).exp())
    recon = -torch.distributions.Bernoulli(logits=logits, validate_args=False).log_prob((x + 1) / 2).sum() / 3
    torch.testing.assert_close(parts["recon"], recon, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(loss, recon + 0.5 * kl, atol=1e-3, rtol=1e-4)
    assert vae.sample(5, torch.Generator().manual_seed(0)).shape == (5, 1, 8, 8)
    assert vae.reconstruct(x).abs().max() <= 1


def test_vae_size_check():
    with pytest.raises(AigcError, match="multiples of 8"):
        VAEConfig(image_size=28, channels=(8, 16, 32))


@pytest.mark.parametrize("sn", [False, True])
def test_gan_shapes_losses_and_conditioning(sn):
    cfg = GANConfig(
        image_size=16, latent_dim=8, g_width=8, d_width=8, n_layers=2, spectral_norm=sn, num_classes=3
    )
    gan = GAN(cfg).eval()
    z, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    x = gan.generator(z, y)
    assert x.shape == (4, 1, 16, 16) and x.abs().max() <= 1
    logits = gan.discriminator(x, y)
    assert logits.shape == (4,)
    assert not torch.allclose(gan.generator(z, torch.tensor([1, 1, 1, 1])), x)
    real, fake = torch.randn(5), torch.randn(5)
    bce = F.binary_cross_entropy_with_logits  # oracle: the textbook BCE form
    torch.testing.assert_close(d_loss(real, fake), bce(real, torch.ones(5)) + bce(fake, torch.zeros(5)))
    torch.testing.assert_close(g_loss(fake), bce(fake, torch.ones(5)))
    assert d_accuracy(torch.tensor([1.0, -1.0]), torch.tensor([-1.0, -1.0])) == 0.75
    with pytest.raises(AigcError, match="class-conditional"):
        gan.generator(z)


def test_gan_size_check():
    with pytest.raises(AigcError, match=r"image size 28 .* multiples of 8"):
        GANConfig(image_size=28, n_layers=3)
    GANConfig(image_size=28, n_layers=2)
