"""Generator and critic networks: `build_generator` / `build_critic` from the `model` and `data` config."""

from __future__ import annotations

from torch import nn

from models.dcgan import DCGANCritic, DCGANGenerator
from models.resnet import ResNetCritic, ResNetGenerator

GENERATORS = {"dcgan": DCGANGenerator, "resnet": ResNetGenerator}
CRITICS = {"dcgan": DCGANCritic, "resnet": ResNetCritic}


def build_generator(arch: str, resolution: int, channels: int, width: int, z_dim: int, norm: str) -> nn.Module:
    return GENERATORS[arch](resolution=resolution, channels=channels, width=width, z_dim=z_dim, norm=norm)


def build_critic(arch: str, resolution: int, channels: int, width: int, norm: str) -> nn.Module:
    return CRITICS[arch](resolution=resolution, channels=channels, width=width, norm=norm)


def models_from_config(cfg) -> tuple[nn.Module, nn.Module]:
    """(G, D) as the config describes them, on the CPU, in fp32."""
    m, d = cfg.model, cfg.data
    generator = build_generator(m.arch, d.resolution, d.channels, m.width, m.z_dim, m.g_norm)
    critic = build_critic(m.arch, d.resolution, d.channels, m.width, m.d_norm)
    return generator, critic


__all__ = ["build_critic", "build_generator", "models_from_config"]
