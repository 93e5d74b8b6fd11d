"""The WGAN-div objective as pure functions (the math, apart from the orchestration in `trainer/steps.py`).

Wu et al., "Wasserstein Divergence for GANs" (ECCV 2018). As losses to minimise, with r the penalty's sampling
distribution:

    loss_D = E_fake[D(x)] - E_real[D(x)] + k * E_{x~r}[ ||grad_x D(x)||^p ]
    loss_G = -E_z[D(G(z))]

`||g||^p` is `(sum over C,H,W of g^2) ** (p/2)` per sample. WGAN-GP (the baseline) replaces the penalty with
`lambda * E_{x~r}[(||grad_x D(x)|| - 1)^2]` on real-fake interpolates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PENALTY_SITES = ("real-fake-interp", "within-interp", "mixed-interp", "real-and-fake", "fake", "real")
PAIRED_SITES = ("within-interp", "mixed-interp")  # need partners from elsewhere in the global batch


def wasserstein_estimate(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """E_real[D(x)] - E_fake[D(x)]: the critic's estimate of the distance (the quantity D maximises)."""
    return d_real.float().mean() - d_fake.float().mean()


def critic_adversarial_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """mean(D(fake)) - mean(D(real)): the critic's loss without the penalty."""
    return -wasserstein_estimate(d_real, d_fake)


def generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """-mean(D(G(z)))."""
    return -d_fake.float().mean()


def squared_norms(input_grad: torch.Tensor) -> torch.Tensor:
    """Per-sample ||g_i||^2 = sum over (C, H, W) of g_i^2, accumulated in fp32 whatever g's dtype."""
    return input_grad.float().pow(2).flatten(1).sum(dim=1)


def wgan_div_penalty(input_grad: torch.Tensor, k: float, p: float) -> torch.Tensor:
    """k * mean_i ||g_i||^p with ||g_i||^p = (||g_i||^2)^(p/2), in fp32.

    In fp16 `||g||^6` overflows once ||g|| > 6.3; in fp32 it holds up to ||g|| ~ 2.6e6.
    """
    return k * squared_norms(input_grad).pow(p / 2).mean()


def wgan_gp_penalty(input_grad: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * mean_i (||g_i|| - 1)^2, in fp32 (Gulrajani et al. 2017)."""
    return weight * (squared_norms(input_grad).sqrt() - 1).pow(2).mean()


def gradient_penalty(input_grad: torch.Tensor, name: str, k: float, p: float) -> torch.Tensor:
    """The penalty of loss `name` ("wgan-div" or "wgan-gp") on the input gradients `input_grad`."""
    if name == "wgan-div":
        return wgan_div_penalty(input_grad, k, p)
    if name == "wgan-gp":
        return wgan_gp_penalty(input_grad, k)
    raise ValueError(f"unknown loss {name!r}")


# The largest per-sample seed of the penalty's input gradient under fp16 loss scaling: fp16 holds up to 65,504,
# and the seed enters D's backward in fp16 (at its output) before any other factor, so it must stay well inside.
FP16_MAX_SEED = 2.0**14


def input_gradient(
    critic_out: torch.Tensor, critic_in: torch.Tensor, loss_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """grad_x sum_i D(x_i), differentiable (create_graph=True), in fp32 and unscaled.

    Because no layer of D mixes samples, row i of the result is grad_{x_i} D(x_i). Under fp16 loss scaling the
    gradient is taken of `seed * sum_i D(x_i)`, so that small per-layer gradients do not underflow, and multiplied
    by 1/seed out of place (PyTorch's AMP recipe, "gradient penalty"). The seed is the scaled MEAN's, about
    scale / n for n rows (as the adversarial loss, a mean, is scaled), rounded down to a power of two (so that
    scaling and unscaling are exact) and capped at FP16_MAX_SEED: seeding every row with the whole scale (65,536
    at the start) would overflow fp16 at D's output at once.
    `loss_scale` is the scaler's scale as a device tensor, so no host synchronisation is needed.
    """
    if loss_scale is None:
        outputs = critic_out.float().sum()
        seed = None
    else:
        seed = torch.exp2(torch.floor(torch.log2(loss_scale.float() / critic_out.shape[0])))
        seed = torch.clamp(seed, max=FP16_MAX_SEED)
        outputs = (critic_out.float() * seed).sum()
    (grad,) = torch.autograd.grad(outputs, critic_in, create_graph=True)
    grad = grad.float()
    if seed is not None:
        grad = grad * (1.0 / seed)
    return grad


@dataclass
class PenaltyDraw:
    """The random choices behind the penalty points of one global batch of size B (same on every rank).

    eps: (B,) interpolation weights in [0, 1). first/second: (B,) indices into the global pool the pairs are
    drawn from (paired sites only; None otherwise).
    """

    eps: torch.Tensor
    first: torch.Tensor | None = None
    second: torch.Tensor | None = None


def draw_penalty_points(site: str, global_batch: int, generator: torch.Generator, device: torch.device) -> PenaltyDraw:
    """Draw eps and (for paired sites) the pair indices for a global batch, from `generator`.

    within-interp: sample i pairs real_i with real_j (i even) or fake_i with fake_j (i odd), j random; indices
    are into the pool [real; fake] of size 2B. mixed-interp: two random members of the pool [real; fake].
    """
    eps = torch.rand(global_batch, generator=generator, device=device)
    if site == "within-interp":
        own = torch.arange(global_batch, device=device)
        partner = torch.randint(global_batch, (global_batch,), generator=generator, device=device)
        is_fake = (own % 2).bool()
        offset = is_fake.long() * global_batch
        return PenaltyDraw(eps, own + offset, partner + offset)
    if site == "mixed-interp":
        first = torch.randint(2 * global_batch, (global_batch,), generator=generator, device=device)
        second = torch.randint(2 * global_batch, (global_batch,), generator=generator, device=device)
        return PenaltyDraw(eps, first, second)
    return PenaltyDraw(eps)


def interpolate(a: torch.Tensor, b: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """eps_i * a_i + (1 - eps_i) * b_i per sample."""
    eps = eps.view(-1, *([1] * (a.dim() - 1))).to(a.dtype)
    return eps * a + (1 - eps) * b


def penalty_points(
    site: str, real: torch.Tensor, fake: torch.Tensor, draw: PenaltyDraw, rows: slice, pool: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The extra critic inputs where the penalty is taken, for this process's `rows` of the global batch.

    Returns None for sites that are the real or fake samples themselves (real-and-fake, real, fake).
    `real`/`fake` are this process's slices; `pool` is the GLOBAL [real; fake] (2B samples), needed by paired
    sites only. All inputs are detached data.
    """
    if site == "real-fake-interp":
        return interpolate(real, fake, draw.eps[rows])
    if site in PAIRED_SITES:
        return interpolate(pool[draw.first[rows]], pool[draw.second[rows]], draw.eps[rows])
    return None
