"""DCGAN (Radford et al. 2016) with the non-saturating loss (Goodfellow et al. 2014).

Options: spectral normalisation in the discriminator (Miyato et al. 2018) and class conditioning
(generator: label embedding concatenated to z; discriminator: projection, Miyato & Koyama 2018).
Layout follows pytorch/examples `dcgan/main.py`: transposed-conv generator, strided-conv
discriminator, BatchNorm in G, LeakyReLU in D, tanh output in [-1, 1].

Notation: B batch, C channels, S image side, Z latent_dim, s0 = S / 2**n_layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from aigc.errors import AigcError


@dataclass
class GANConfig:
    image_size: int = 32  # S; filled from the data set
    in_channels: int = 1  # C; filled from the data set
    latent_dim: int = 64  # Z
    g_width: int = 64  # generator channels at the last upsampling (doubles per level going up)
    d_width: int = 64  # discriminator channels at the first conv
    n_layers: int = 3  # up/down-samplings; S must be a multiple of 2**n_layers
    spectral_norm: bool = False
    num_classes: int = 0  # > 0: class-conditional G and D
    d_lr: float | None = None  # discriminator learning rate; None = train.lr

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.latent_dim < 1:
            raise ValueError(f"n_layers and latent_dim must be >= 1, got {self.n_layers}, {self.latent_dim}")
        if self.g_width < 1 or self.d_width < 1:
            raise ValueError(f"g_width and d_width must be >= 1, got {self.g_width}, {self.d_width}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.d_lr is not None and not self.d_lr > 0:
            raise ValueError(f"d_lr must be > 0 (or unset: train.lr), got {self.d_lr}")
        m = 2**self.n_layers
        if self.image_size < m or self.image_size % m:
            raise AigcError(
                f"image size {self.image_size} is not supported by a GAN with {self.n_layers} layers: sizes must "
                f"be multiples of {m} (e.g. {', '.join(str(m * k) for k in (2, 4, 8))}); prepare the data with "
                "--set size=N or change model.n_layers"
            )


class Generator(nn.Module):
    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.s0 = cfg.image_size // 2**cfg.n_layers
        widths = [cfg.g_width * 2 ** (cfg.n_layers - 1 - i) for i in range(cfg.n_layers)]  # e.g. 256, 128, 64
        self.embed = nn.Embedding(cfg.num_classes, cfg.latent_dim) if cfg.num_classes else None
        z_in = cfg.latent_dim * (2 if self.embed is not None else 1)
        self.project = nn.Sequential(
            nn.Linear(z_in, widths[0] * self.s0 * self.s0, bias=False),
            nn.Unflatten(1, (widths[0], self.s0, self.s0)),  # state: (w0) x s0 x s0
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        )
        layers = []
        for w, w_next in zip(widths, widths[1:], strict=False):  # state: (w_next) x 2s x 2s
            layers += [
                nn.ConvTranspose2d(w, w_next, 4, 2, 1, bias=False),
                nn.BatchNorm2d(w_next),
                nn.ReLU(True),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], cfg.in_channels, 4, 2, 1), nn.Tanh()]  # (C) x S x S
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, Z) [, labels (B)] -> images (B, C, S, S) in [-1, 1]."""
        if self.embed is not None:
            if labels is None:
                raise AigcError("this GAN is class-conditional: pass a label (--label)")
            z = torch.cat([z, self.embed(labels)], dim=1)  # (B, 2Z)
        return self.net(self.project(z))


class Discriminator(nn.Module):
    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if cfg.spectral_norm else (lambda m: m)
        layers, c_in = [], cfg.in_channels
        for i in range(cfg.n_layers):  # state: (w_i) x S/2^(i+1) x S/2^(i+1)
            w = cfg.d_width * 2**i
            layers.append(sn(nn.Conv2d(c_in, w, 4, 2, 1, bias=i == 0 or cfg.spectral_norm)))
            if i > 0 and not cfg.spectral_norm:  # SN replaces BatchNorm as the stabiliser
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.LeakyReLU(0.2, True))
            c_in = w
        self.features = nn.Sequential(*layers, nn.Flatten())
        s_last = cfg.image_size // 2**cfg.n_layers
        self.head = sn(nn.Linear(c_in * s_last * s_last, 1))
        feat = c_in * s_last * s_last
        self.embed = sn(nn.Embedding(cfg.num_classes, feat)) if cfg.num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, C, S, S) -> real/fake logits (B)."""
        h = self.features(x)  # (B, F)
        out = self.head(h).squeeze(1)  # (B)
        if self.embed is not None:  # projection: + <embed(y), h>
            out = out + (self.embed(labels) * h).sum(dim=1)
        return out


def d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))), with D = sigmoid(logit)."""
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: -log D(G(z)) (strong gradients when D wins)."""
    return F.softplus(-d_fake).mean()


def d_accuracy(d_real: torch.Tensor, d_fake: torch.Tensor) -> float:
    """Share of real logits > 0 and fake logits < 0: near 1.0 for long = D has won (G collapsing)."""
    return 0.5 * ((d_real > 0).float().mean() + (d_fake < 0).float().mean()).item()


class GAN(nn.Module):
    """Holds G and D together so one state dict / safetensors file carries both."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        for m in self.modules():  # DCGAN init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and not config.spectral_norm:
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None, z=None
    ):
        """n images (n, C, S, S) in [-1, 1]; z ~ N(0, I) from `generator` unless given."""
        p = next(self.parameters())
        if z is None:
            z = torch.randn((n, self.config.latent_dim), generator=generator, device=p.device, dtype=p.dtype)
        return self.generator(z, labels)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["GAN", "GANConfig", "Discriminator", "Generator", "d_accuracy", "d_loss", "g_loss"]
