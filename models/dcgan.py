"""DCGAN-style G and D, as used by WGAN-GP and WGAN-div for their convolutional baselines.

G: z -> linear 4x4 map -> stride-2 transposed convolutions (norm, ReLU) -> tanh image.
D: stride-2 convolutions (LeakyReLU 0.2, LayerNorm after the first) -> linear score. No sigmoid: a critic.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from models.layers import channels_at, critic_norm, generator_norm, log2_int


class DCGANGenerator(nn.Module):
    def __init__(self, resolution: int, channels: int, width: int, z_dim: int, norm: str):
        super().__init__()
        self.z_dim = z_dim
        ups = log2_int(resolution) - 2
        widths = [channels_at(4 * 2**i, resolution, width, base=2) for i in range(ups)]
        self.input = nn.Linear(z_dim, widths[0] * 16)
        self.input_norm = generator_norm(norm, widths[0])
        blocks = []
        for c_in, c_out in itertools.pairwise(widths):
            blocks.append(
                nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), generator_norm(norm, c_out), nn.ReLU())
            )
        self.blocks = nn.Sequential(*blocks)
        self.output = nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.input(z).view(z.shape[0], -1, 4, 4)
        x = torch.relu(self.input_norm(x))
        return torch.tanh(self.output(self.blocks(x)))


class DCGANCritic(nn.Module):
    def __init__(self, resolution: int, channels: int, width: int, norm: str):
        super().__init__()
        downs = log2_int(resolution) - 2
        widths = [channels_at(resolution // 2**i, resolution, width, base=2) for i in range(1, downs + 1)]
        self.input = nn.Sequential(nn.Conv2d(channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2))
        blocks = []
        for c_in, c_out in itertools.pairwise(widths):
            blocks.append(nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1), critic_norm(norm, c_out), nn.LeakyReLU(0.2)))
        self.blocks = nn.Sequential(*blocks)
        self.output = nn.Linear(widths[-1] * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.blocks(self.input(x)).flatten(1)).squeeze(1)
