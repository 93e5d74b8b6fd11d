"""Building blocks shared by the DCGAN and ResNet families."""

from __future__ import annotations

import torch
from torch import nn


class PixelNorm(nn.Module):
    """x / sqrt(mean_c x^2 + eps) at every pixel (ProGAN); per sample, so independent of the batch split."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)


def generator_norm(kind: str, channels: int) -> nn.Module:
    """G's normalisation: `batch` (the papers' choice; statistics over the per-process batch), `pixel`, `none`."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "pixel":
        return PixelNorm()
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown generator norm {kind!r}")


def critic_norm(kind: str, channels: int) -> nn.Module:
    """D's normalisation: LayerNorm over (C, H, W) with a per-channel affine (GroupNorm with one group).

    Never BatchNorm: it couples the samples of a batch, so the per-sample input gradient of the penalty would
    depend on the other samples, and a concatenated [real; fake] forward would differ from separate forwards.
    """
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown critic norm {kind!r}")


def channels_at(resolution: int, out_resolution: int, width: int, *, base: int) -> int:
    """Channels of the feature map at `resolution`: doubling as the map halves, capped at 8 * width.

    `base` is the resolution whose map has `width` channels, relative to the output (1: the output itself,
    2: half the output).
    """
    return min(width * out_resolution // (base * resolution), 8 * width)


def log2_int(value: int) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{value} is not a power of two")
    return value.bit_length() - 1
