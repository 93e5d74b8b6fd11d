"""ResNet G and D of WGAN-GP (Gulrajani et al. 2017), which WGAN-div's released code uses at 64 px.

G: z -> linear 4x4 map -> residual up-blocks (norm, ReLU, nearest x2, 3x3 conv) -> norm, ReLU, 3x3 conv, tanh.
D: 3x3 conv -> residual down-blocks (LayerNorm, ReLU, 3x3 conv, mean-pool) -> ReLU -> linear score.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import channels_at, critic_norm, generator_norm, log2_int


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__()
        self.norm1, self.conv1 = generator_norm(norm, c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = generator_norm(norm, c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.shortcut(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        x = F.interpolate(torch.relu(self.norm1(x)), scale_factor=2.0, mode="nearest")
        x = self.conv2(torch.relu(self.norm2(self.conv1(x))))
        return skip + x


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__()
        self.norm1, self.conv1 = critic_norm(norm, c_in), nn.Conv2d(c_in, c_in, 3, 1, 1)
        self.norm2, self.conv2 = critic_norm(norm, c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.avg_pool2d(self.shortcut(x), 2)
        x = self.conv1(torch.relu(self.norm1(x)))
        x = self.conv2(torch.relu(self.norm2(x)))
        return skip + F.avg_pool2d(x, 2)


class ResNetGenerator(nn.Module):
    def __init__(self, resolution: int, channels: int, width: int, z_dim: int, norm: str):
        super().__init__()
        self.z_dim = z_dim
        ups = log2_int(resolution) - 2
        widths = [channels_at(4 * 2**i, resolution, width, base=1) for i in range(ups + 1)]
        self.input = nn.Linear(z_dim, widths[0] * 16)
        self.blocks = nn.Sequential(*(UpBlock(a, b, norm) for a, b in itertools.pairwise(widths)))
        self.output_norm = generator_norm(norm, widths[-1])
        self.output = nn.Conv2d(widths[-1], channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.input(z).view(z.shape[0], -1, 4, 4))
        return torch.tanh(self.output(torch.relu(self.output_norm(x))))


class ResNetCritic(nn.Module):
    def __init__(self, resolution: int, channels: int, width: int, norm: str):
        super().__init__()
        downs = log2_int(resolution) - 2
        widths = [channels_at(resolution // 2**i, resolution, width, base=1) for i in range(downs + 1)]
        self.input = nn.Conv2d(channels, widths[0], 3, 1, 1)
        self.blocks = nn.Sequential(*(DownBlock(a, b, norm) for a, b in itertools.pairwise(widths)))
        self.output = nn.Linear(widths[-1] * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.blocks(self.input(x)))
        return self.output(x.flatten(1)).squeeze(1)
