"""Exponential moving average of G's weights, parameterised by a half-life in images (StyleGAN2-ADA style)."""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(batch_size: int, half_life_kimg: float, rampup: float, images_seen: int) -> float:
    """beta = 0.5 ** (batch_size / half_life_images): the EMA halves the weight of old G every half-life.

    With ramp-up, half_life_images = min(half_life_kimg * 1000, rampup * images_seen), so the EMA is not
    dominated by the random initial G early on. A half-life of 0 gives beta = 0 (EMA-G = G).
    """
    half_life = half_life_kimg * 1000
    if rampup > 0:
        half_life = min(half_life, rampup * images_seen)
    if half_life <= 0:
        return 0.0
    return 0.5 ** (batch_size / half_life)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model for parameters; buffers (BatchNorm statistics) are copied."""
    ema_params = list(ema.parameters())
    model_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - beta)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)
