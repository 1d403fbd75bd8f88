"""A small CNN image classifier: the feature network for image metrics on small data sets.

FID with ImageNet-Inception features says little about 28x28 digits, so image metrics use the
penultimate layer of a classifier trained on the data set itself (as in the GAN literature on
MNIST, e.g. the "MNIST FID" with a LeNet-style network). Three stride-2 conv stages, global
average pooling, one hidden layer whose activations are the features.

Notation: B batch, C channels, H x W image size, F feature_dim, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ImageClassifierConfig:
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    width: int = 32  # channels of the first conv stage; doubled at each of the next two
    feature_dim: int = 128

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError("num_classes must be >= 2")
        if self.image_size < 8:
            raise ValueError("image_size must be >= 8")


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    # conv 3x3 stride 2 halves H and W; GroupNorm (not BatchNorm) so eval == train behaviour
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class ImageClassifier(nn.Module):
    def __init__(self, config: ImageClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(
            _stage(config.in_channels, w),  # state: (w) x H/2 x W/2
            _stage(w, 2 * w),  # state: (2w) x H/4 x W/4
            _stage(2 * w, 4 * w),  # state: (4w) x H/8 x W/8
        )
        self.fc = nn.Linear(4 * w, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> features (B, F)."""
        h = self.body(x)  # (B, 4w, H/8, W/8)
        h = h.mean(dim=(2, 3))  # (B, 4w) global average pool
        return F.silu(self.fc(h))  # (B, F)

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (B, C, H, W) -> (logits (B, K), cross-entropy loss | None)."""
        logits = self.head(self.features(x))  # (B, K)
        loss = F.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
