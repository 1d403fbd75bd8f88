"""Convolutional variational autoencoder (Kingma & Welling 2014), with beta-VAE weighting (Higgins 2017).

Encoder: strided convs -> (mu, logvar) of a diagonal Gaussian q(z|x). Decoder: transposed convs
-> Bernoulli logits p(x|z) over pixel intensities in [0, 1]. Loss = negative ELBO per image:
reconstruction (binary cross-entropy, summed over pixels) + beta * KL(q(z|x) || N(0, I)).

Notation: B batch, C channels, S image side, Z latent_dim, L = len(channels) downsamplings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from aigc.errors import AigcError


def _check_size(size: int, levels: int) -> None:
    m = 2**levels
    if size < m or size % m:
        raise AigcError(
            f"image size {size} is not supported by a VAE with {levels} downsamplings: sizes must be "
            f"multiples of {m} (e.g. {', '.join(str(m * k) for k in (2, 4, 8))}); prepare the data with "
            "--set size=N or change model.channels"
        )


@dataclass
class VAEConfig:
    image_size: int = 32  # S; filled from the data set
    in_channels: int = 1  # C; filled from the data set
    channels: tuple[int, ...] = (32, 64)  # conv widths; each level halves S
    latent_dim: int = 16  # Z
    beta: float = 1.0  # KL weight (1 = the ELBO)

    def __post_init__(self) -> None:
        if not self.channels:
            raise ValueError("channels needs at least one level")
        if any(c < 1 for c in self.channels):
            raise ValueError(f"every channels entry must be >= 1, got {list(self.channels)}")
        if self.latent_dim < 1 or self.beta < 0:
            raise ValueError(f"latent_dim must be >= 1 and beta >= 0, got {self.latent_dim}, {self.beta}")
        _check_size(self.image_size, len(self.channels))


class VAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.s0 = cfg.image_size // 2 ** len(cfg.channels)  # side after the encoder
        enc, c_in = [], cfg.in_channels
        for c in cfg.channels:  # state: (c) x S/2 x S/2 after each level
            enc += [nn.Conv2d(c_in, c, 4, 2, 1), nn.BatchNorm2d(c), nn.SiLU()]
            c_in = c
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        flat = cfg.channels[-1] * self.s0 * self.s0
        self.to_stats = nn.Linear(flat, 2 * cfg.latent_dim)
        self.from_z = nn.Linear(cfg.latent_dim, flat)
        dec = []
        rev = list(reversed(cfg.channels))
        for c, c_next in zip(rev, rev[1:], strict=False):  # state: (c_next) x 2s x 2s
            dec += [nn.ConvTranspose2d(c, c_next, 4, 2, 1), nn.BatchNorm2d(c_next), nn.SiLU()]
        dec += [nn.ConvTranspose2d(rev[-1], cfg.in_channels, 4, 2, 1)]  # logits: (C) x S x S
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, S, S) in [-1, 1] -> mu, logvar (B, Z)."""
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=-1)
        return mu, logvar.clamp(-30, 20)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, Z) -> Bernoulli logits (B, C, S, S)."""
        h = self.from_z(z).view(-1, self.config.channels[-1], self.s0, self.s0)  # (B, c, s0, s0)
        return self.decoder(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, Z) -> images (B, C, S, S) in [-1, 1] (the Bernoulli means)."""
        return torch.sigmoid(self.decode_logits(z)) * 2 - 1

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Negative ELBO per image (mean over the batch) and its parts."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * torch.exp(0.5 * logvar)  # reparameterisation trick, (B, Z)
        logits = self.decode_logits(z)
        target = (x + 1) / 2  # [-1, 1] -> [0, 1]
        recon = (
            F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="sum") / x.shape[0]
        )
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()).float() / x.shape[0]  # closed form
        loss = recon + self.config.beta * kl
        return loss, {"recon": recon.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images from the prior z ~ N(0, I): (n, C, S, S) in [-1, 1]."""
        p = next(self.parameters())
        z = torch.randn((n, self.config.latent_dim), generator=generator, device=p.device, dtype=p.dtype)
        return self.decode(z)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["VAE", "VAEConfig"]
