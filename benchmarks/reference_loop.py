"""The reference loop the user gave: PyTorch-GAN's WGAN-div training loop, re-implemented as the speed baseline.

This is the loop of `../shared/reference/wgan-div.md` ("The reference loop the user gave") as users copy it from
PyTorch-GAN (implementations/wgan_div/wgan_div.py), run on the SAME G and D as ours (fresh copies of the trainer's
initial weights), the same real batches, batch size and device, in fp32 without AMP or DDP. Per batch i:

    real.requires_grad_(True); z ~ N(0, 1); fake = G(z)                      # fake NOT detached
    real_validity = D(real); fake_validity = D(fake)                          # two separate forwards
    real_grad, fake_grad = two autograd.grad(..., create_graph=True, retain_graph=True)
    div_gp = k/2 * (mean ||real_grad||^p + mean ||fake_grad||^p)              # ||g||^p = (sum g^2) ** (p/2)
    d_loss = -mean(real_validity) + mean(fake_validity) + div_gp
    opt_D.zero_grad(); d_loss.backward(retain_graph=True); opt_D.step()
    if i % n_critic == 0:                                                     # on the SAME fake and its graph
        g_loss = -mean(D(fake)); opt_G.zero_grad(); g_loss.backward(); opt_G.step()

Its known faults are KEPT ON PURPOSE, because it is the baseline we measure against: the double backward runs
through G for nothing (fault 1), the generator step reuses the critic step's z and graph (fault 2), the schedule
is the batch index modulo n_critic (fault 3), and nothing handles mixed precision (fault 4). Adam uses PyTorch's
default implementation choice (no `fused`), betas (0.5, 0.999) as in PyTorch-GAN, and the config's learning rates.

`every=n > 1` is the same loop with the lazy penalty (StyleGAN2's lazy regularisation): the penalty is taken on every
n-th critic step (batch index i % n == 0) with k multiplied by n, and the other critic steps are the loop above
without the penalty (no `requires_grad_` on the real batch, no `autograd.grad`). It exists so that a speed ratio
compares identical math when our config sets `loss.every > 1`; `every=1` is the original.

Two deliberate departures, both in the baseline's favour so that our measured speed-up is not inflated: z is drawn
with `torch.randn` on the device (the original draws it with NumPy on the host and copies it over), and nothing is
printed or saved (the original prints `d_loss.item()` and `g_loss.item()` at every generator step and saves a grid
every 400 batches); `read_losses=True` adds back the two host reads that its print makes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

REFERENCE_BETAS = (0.5, 0.999)  # PyTorch-GAN's WGAN-div defaults (--b1 0.5 --b2 0.999)


class ReferenceLoop:
    """The user's WGAN-div loop over modules G and D (already on `device`, fp32), one real batch per critic step.

    `critic_step` and `generator_step` are split out only so that tests can look between them; `run` calls them
    exactly in the order of the original loop.
    """

    def __init__(
        self,
        generator: nn.Module,
        critic: nn.Module,
        z_dim: int,
        n_critic: int,
        lr_g: float,
        lr_d: float,
        device: torch.device,
        k: float = 2.0,
        p: float = 6.0,
        read_losses: bool = False,
        every: int = 1,
    ):
        self.generator, self.critic = generator, critic
        self.z_dim, self.n_critic, self.k, self.p, self.every = z_dim, n_critic, k, p, every
        self.device, self.read_losses = torch.device(device), read_losses
        # The default implementation choice (no fused=...), as in the user's code.
        self.optimizer_G = torch.optim.Adam(generator.parameters(), lr=lr_g, betas=REFERENCE_BETAS)
        self.optimizer_D = torch.optim.Adam(critic.parameters(), lr=lr_d, betas=REFERENCE_BETAS)
        self.fake: torch.Tensor | None = None  # the critic step's fake, graph and all, for the generator step
        self.d_loss: torch.Tensor | None = None
        self.g_loss: torch.Tensor | None = None

    def grad_norm_p(self, grad: torch.Tensor) -> torch.Tensor:
        """Per-sample ||g||^p = (sum over C, H, W of g^2) ** (p/2), as written in the original."""
        return grad.view(grad.size(0), -1).pow(2).sum(1) ** (self.p / 2)

    def critic_step(self, real: torch.Tensor, penalised: bool = True) -> None:
        """One critic update on batch `real`; the penalty's double backward runs through G (fault 1, kept).

        `penalised=False` (the lazy variant's steps between penalties): the same update without the penalty.
        """
        if penalised:
            real = real.requires_grad_(True)
        z = torch.randn(real.shape[0], self.z_dim, device=self.device)
        fake = self.generator(z)  # not detached
        real_validity = self.critic(real)
        fake_validity = self.critic(fake)
        if not penalised:
            d_loss = -torch.mean(real_validity) + torch.mean(fake_validity)
            self.optimizer_D.zero_grad()
            d_loss.backward(retain_graph=True)  # the generator step reuses fake's graph (fault 2, kept)
            self.optimizer_D.step()
            self.fake, self.d_loss = fake, d_loss
            return
        real_grad_out = torch.ones_like(real_validity)
        real_grad = torch.autograd.grad(
            real_validity, real, real_grad_out, create_graph=True, retain_graph=True, only_inputs=True
        )[0]
        fake_grad_out = torch.ones_like(fake_validity)
        fake_grad = torch.autograd.grad(
            fake_validity, fake, fake_grad_out, create_graph=True, retain_graph=True, only_inputs=True
        )[0]
        k = self.k * self.every  # the lazy variant's penalty weight (every=1: the original's k)
        div_gp = (torch.mean(self.grad_norm_p(real_grad)) + torch.mean(self.grad_norm_p(fake_grad))) * k / 2
        d_loss = -torch.mean(real_validity) + torch.mean(fake_validity) + div_gp
        self.optimizer_D.zero_grad()
        d_loss.backward(retain_graph=True)  # keeps G's graph alive for the generator step (fault 2, kept)
        self.optimizer_D.step()
        self.fake, self.d_loss = fake, d_loss

    def generator_step(self) -> None:
        """One generator update on the critic step's fake, reusing its graph (fault 2, kept)."""
        g_loss = -torch.mean(self.critic(self.fake))
        self.optimizer_G.zero_grad()
        g_loss.backward()
        self.optimizer_G.step()
        self.g_loss = g_loss
        if self.read_losses:  # what the original's print of the losses costs: two host reads
            self.d_loss.item(), g_loss.item()

    def run(self, next_real: Callable[[int], torch.Tensor], iterations: int, start: int = 0) -> int:
        """`iterations` generator steps' worth of batches (n_critic batches each); returns the next batch index.

        `next_real(i)` returns real batch i. The generator steps at i % n_critic == 0, as in the original
        (whose batch index restarts every epoch: fault 3, irrelevant to speed).
        """
        for i in range(start, start + iterations * self.n_critic):
            self.critic_step(next_real(i), penalised=i % self.every == 0)
            if i % self.n_critic == 0:
                self.generator_step()
        self.fake = None  # release the last graph
        return start + iterations * self.n_critic
