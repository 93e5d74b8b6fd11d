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


class LayerNorm2d(nn.GroupNorm):
    """LayerNorm over (C, H, W) per sample with a per-channel affine: GroupNorm with one group.

    On CUDA, `native_group_norm` works on NCHW only, so a channels_last input would be converted to NCHW and back
    around every norm, in the forward, the backward and the penalty's double backward. For such inputs the same
    normalisation is computed from reductions and element-wise ops in fp32 (GroupNorm's autocast precision),
    which keep the input's layout and have double backwards of their own. Same parameters, same state_dict.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(1, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return layout_preserving_layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


def layout_preserving_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """(x - mean) / sqrt(var + eps) * weight_c + bias_c, mean and biased var over (C, H, W) per sample, in fp32."""
    x = x.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    centred = x - mean
    var = centred.pow(2).mean(dim=(1, 2, 3), keepdim=True)
    return centred * torch.rsqrt(var + eps) * weight.float().view(1, -1, 1, 1) + bias.float().view(1, -1, 1, 1)


def critic_norm(kind: str, channels: int) -> nn.Module:
    """D's normalisation: LayerNorm over (C, H, W) with a per-channel affine (LayerNorm2d).

    Never BatchNorm: it couples the samples of a batch, so the per-sample input gradient of the penalty would
    depend on the other samples, and a concatenated [real; fake] forward would differ from separate forwards.
    """
    if kind == "layer":
        return LayerNorm2d(channels)
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
