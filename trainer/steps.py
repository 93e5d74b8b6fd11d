"""One critic step and one generator step: how the losses of `trainer/losses.py` meet DDP, AMP and the streams.

The rules these steps keep (see ../shared/reference/wgan-div.md, "Known traps"):
- Critic step: fakes are generated without a graph by G's unwrapped module (no penalty graph through G, no G
  all-reduce); ONE forward of the DDP-wrapped critic on [real; fake (; penalty points)]; the penalty's gradient
  is `autograd.grad` w.r.t. that INPUT with create_graph=True, which fires none of DDP's parameter hooks; then
  ONE ordinary backward of (adversarial loss + penalty), so DDP all-reduces D's gradients exactly once.
- Critic steps without a penalty (lazy regularisation, loss.every > 1) may run D compiled (train.compile_d):
  `torch.compile` of the same DDP-wrapped critic, so the parameters, the one forward and the one backward, and
  DDP's single all-reduce are those of the eager step. Penalty steps stay eager: AOTAutograd has no double
  backward.
- Generator step: D's unwrapped module with its parameters frozen, so D is neither all-reduced nor given
  gradients; G's DDP wrapper all-reduces G once.
- Every random draw comes from (seed, stream, step) for the GLOBAL batch, and each rank keeps its rows, so N
  processes compute exactly what one process computes on the whole batch.
- fp16: the input gradient is taken of the scaled output and unscaled out of place; the penalty is fp32.
- Augmentation (`augment.policy`): every critic input, real and fake, in both steps, is augmented with draws for
  the global batch; the critic step augments before it builds its penalty points, so the penalty is taken at
  the augmented images the critic sees (see `trainer/augment.py`).
- A step is skipped, on every rank alike and without a host synchronisation, when the all-reduced gradients hold
  a non-finite entry; one mechanism for every precision (see `_update`).

Each phase runs in a named profiler range (`critic_penalty_grad`, ...), so that a trace reads like the algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from trainer import augment, losses
from trainer.randomness import Streams


@dataclass
class StepResult:
    stats: dict[str, torch.Tensor]  # device scalars, read only when logging
    skipped: torch.Tensor  # bool scalar on the device: the update was skipped (identical on every rank)


@dataclass
class Nets:
    """The prepared (possibly DDP-wrapped) networks and their plain modules.

    `generator_fakes` generates the critic step's fakes: the plain G, or its compiled version (train.compile_g).
    `critic_unpenalised` runs the critic steps without a penalty: `critic`, or its compiled version
    (train.compile_d), which shares its parameters and its DDP wrapper.
    """

    generator: nn.Module
    critic: nn.Module
    generator_core: nn.Module
    critic_core: nn.Module
    generator_fakes: nn.Module | None = None
    critic_unpenalised: nn.Module | None = None

    def __post_init__(self):
        if self.generator_fakes is None:
            self.generator_fakes = self.generator_core
        if self.critic_unpenalised is None:
            self.critic_unpenalised = self.critic


def grad_norm(parameters) -> torch.Tensor:
    """sqrt(sum ||grad||^2) over the parameters that have a gradient, as a device scalar (no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def gradients_not_finite(parameters) -> torch.Tensor:
    """Whether any gradient entry is inf or nan, as a device bool (no host sync).

    Reads the largest magnitude (an inf-norm, which cannot overflow as a sum of squares can), so it flags exactly
    the entries GradScaler's own check flags.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    return ~torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))).max())


def block_grad_norms(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Gradient norm per top-level block (`input`, `blocks.0`, ..., `output`) and in total."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, parameter in module.named_parameters():
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
        groups.setdefault(block, []).append(parameter)
    norms = {f"{prefix}/{block}": grad_norm(params) for block, params in groups.items()}
    norms[f"{prefix}/total"] = grad_norm(module.parameters())
    return norms


def hold_while_penalty_owed(parameters, owed: torch.Tensor) -> None:
    """Make this step a skipped one if `owed` (a device bool), by an inf in one gradient entry; no host sync.

    With a lazy penalty (loss.every > 1) a penalty step that is skipped (its gradients overflowed: under fp16 the
    penalty's gradient grows as ||g||^(p-1), and a spike overflows it long before the adversarial part) must not be
    followed by steps without a penalty, or D climbs with nothing to hold its gradients down: on the demo in fp16
    the penalty reached 1e9 within 12 iterations, on an H100 and on the CPU alike. So D waits: the steps in
    between are skipped too (under fp16 each halves the loss scale, which is what lets the penalty through),
    until a penalty step succeeds. Every rank holds the same flag (from all-reduced gradients).
    """
    grad = parameters[0].grad
    owed = torch.as_tensor(owed, device=grad.device)
    grad.view(-1)[:1].add_(torch.where(owed, torch.inf, 0.0).to(grad.dtype))


class TrainingSteps:
    """Critic and generator steps over one set of nets, optimizers and streams.

    `accelerator` provides backward (with the shared fp16 scaler), the scaler itself and gather. `rows` is this
    process's slice of the global batch.
    """

    def __init__(
        self,
        nets: Nets,
        opt_g,
        opt_d,
        accelerator,
        loss_cfg,
        streams: Streams,
        global_batch: int,
        rows: slice,
        z_dim: int,
        channels_last: bool = False,
        augment_policy: list[str] = (),
    ):
        self.nets, self.opt_g, self.opt_d, self.accelerator = nets, opt_g, opt_d, accelerator
        self.loss_cfg, self.streams, self.global_batch, self.rows, self.z_dim = (
            loss_cfg,
            streams,
            global_batch,
            rows,
            z_dim,
        )
        self.device = accelerator.device
        self.critic_parameters = [p for p in nets.critic_core.parameters() if p.requires_grad]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.augment_policy = list(augment_policy)
        self.augment_p: float | torch.Tensor = 1.0  # a device tensor when adapted (the loop owns it)
        self.keep_inputs = False  # keep the last critic step's augmented (real, fake) in `last_inputs`
        self.last_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        # With a lazy penalty, whether the last penalty step was skipped (a device bool; saved in checkpoints).
        self.penalty_owed = torch.zeros((), dtype=torch.bool, device=self.device)

    # ---------------------------------------------------------------------------------------------------------

    def latents(self, stream: str, step: int) -> torch.Tensor:
        z = self.streams.normal(stream, step, (self.global_batch, self.z_dim), self.device)
        return z[self.rows]

    def augmented(self, stream: str, step: int, *sets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each of `sets` (this rank's rows of one global batch each) augmented with draw `step` of `stream`; one
        draw covers all the sets' global batches, so real and fake get independent transforms."""
        if not self.augment_policy:
            return sets
        b, resolution = self.global_batch, sets[0].shape[-1]
        generator = self.streams.get(stream, step, self.device)
        draws = augment.draw(self.augment_policy, len(sets) * b, resolution, self.augment_p, generator, self.device)
        return tuple(
            augment.apply(images, augment.select(draws, slice(k * b + self.rows.start, k * b + self.rows.stop)))
            for k, images in enumerate(sets)
        )

    @torch.no_grad()
    def critic_means(self, heldout: torch.Tensor, step: int) -> torch.Tensor:
        """[mean D(real), mean D(held-out), mean D(fake)] over this rank's rows, by the CURRENT D in one forward
        (no graph, no all-reduce): the last critic step's augmented real and fake (`last_inputs`), and `heldout`
        augmented alike. One D for all three, so that D's shift between updates cannot enter r_v."""
        real, fake = self.last_inputs
        (heldout,) = self.augmented("augment_heldout", step, heldout)
        scores = self.nets.critic_core(torch.cat([real, heldout, fake]).contiguous(memory_format=self.memory_format))
        return scores.float().view(3, -1).mean(dim=1)

    def loss_scale(self) -> torch.Tensor | None:
        scaler = self.accelerator.scaler
        return None if scaler is None else scaler.scale(torch.ones((), device=self.device))

    def critic_step(self, real: torch.Tensor, step: int, measure: bool = False) -> StepResult:
        """One critic update on this process's `real` rows of global batch `step`; returns device scalars."""
        cfg, b = self.loss_cfg, real.shape[0]
        with record_function("critic_fakes"), torch.no_grad():
            fake = self.nets.generator_fakes(self.latents("critic_z", step)).float()
        with record_function("critic_augment"):
            real, fake = self.augmented("augment_critic", step, real, fake)
            if self.keep_inputs:
                self.last_inputs = (real, fake)
        penalise = step % cfg.every == 0
        with record_function("critic_inputs"):
            if penalise:
                draw = losses.draw_penalty_points(
                    cfg.r, self.global_batch, self.streams.get("penalty", step, self.device), self.device
                )
                pool = None
                if cfg.r in losses.PAIRED_SITES:  # partners may live on other ranks: pool the global batch
                    pool = torch.cat([self.accelerator.gather(real), self.accelerator.gather(fake)])
                extra = losses.penalty_points(cfg.r, real, fake, draw, self.rows, pool)
                critic_in = torch.cat([real, fake] if extra is None else [real, fake, extra])
                critic_in = critic_in.contiguous(memory_format=self.memory_format).requires_grad_(True)
                sites = {"real-and-fake": slice(0, 2 * b), "real": slice(0, b), "fake": slice(b, 2 * b)}
                penalty_rows = sites.get(cfg.r, slice(2 * b, 3 * b))
            else:
                critic_in = torch.cat([real, fake]).contiguous(memory_format=self.memory_format)

        with record_function("critic_forward"):
            critic = self.nets.critic if penalise else self.nets.critic_unpenalised
            critic_out = critic(critic_in)
            d_real, d_fake = critic_out[:b], critic_out[b : 2 * b]
            loss = losses.critic_adversarial_loss(d_real, d_fake)
        stats = {
            "loss/critic_adversarial": loss.detach(),
            "critic/real": d_real.detach().float().mean(),
            "critic/fake": d_fake.detach().float().mean(),
        }
        if penalise:
            with record_function("critic_penalty_grad"):
                input_grad = losses.input_gradient(critic_out[penalty_rows], critic_in, self.loss_scale())
                input_grad = input_grad[penalty_rows]
                penalty = losses.gradient_penalty(input_grad, cfg.name, cfg.penalty_weight() * cfg.every, cfg.p)
            loss = loss + penalty
            # Logged as k * mean ||g||^p, without the lazy factor `every` that the loss carries, so that runs with
            # different loss.every compare; averaged over the penalty steps of a log window only.
            stats["loss/penalty"] = penalty.detach() / cfg.every
            if measure:
                norms = losses.squared_norms(input_grad.detach()).sqrt()
                stats["input_grad_norm/mean"], stats["input_grad_norm/max"] = norms.mean(), norms.max()
        stats["loss/critic"] = loss.detach()
        stats["wasserstein"] = -stats["loss/critic_adversarial"]

        # Gradients for D's parameters only: the critic's input is a leaf that requires grad (for the penalty),
        # and without `inputs` the backward would also compute its unused gradient through the first layer.
        with record_function("critic_backward"):
            self.accelerator.backward(loss, inputs=self.critic_parameters)
        with record_function("critic_update"):
            if cfg.every > 1 and not penalise:
                hold_while_penalty_owed(self.critic_parameters, self.penalty_owed)
            skipped = self._update(self.opt_d, self.nets.critic_core, measure, "grad_norm/D", stats)
            if cfg.every > 1 and penalise:
                self.penalty_owed = torch.as_tensor(skipped, device=self.device)
        return StepResult(stats, skipped)

    def generator_step(self, iteration: int, measure: bool = False) -> StepResult:
        """One generator update on fresh z of global batch `iteration`; D is frozen and never all-reduced."""
        critic = self.nets.critic_core
        critic.requires_grad_(False)
        try:
            with record_function("generator_forward"):
                fake = self.nets.generator(self.latents("generator_z", iteration))
            with record_function("generator_augment"):
                (fake,) = self.augmented("augment_generator", iteration, fake)
            with record_function("generator_critic_forward"):
                loss = losses.generator_loss(critic(fake.contiguous(memory_format=self.memory_format)))
            with record_function("generator_backward"):
                self.accelerator.backward(loss)
        finally:
            critic.requires_grad_(True)
        stats = {"loss/generator": loss.detach()}
        with record_function("generator_update"):
            skipped = self._update(self.opt_g, self.nets.generator_core, measure, "grad_norm/G", stats)
        return StepResult(stats, skipped)

    # ---------------------------------------------------------------------------------------------------------

    def _update(self, optimizer, module: nn.Module, measure: bool, prefix: str, stats: dict) -> torch.Tensor:
        """Step unless the gradients hold a non-finite entry; returns whether the step was skipped (a device bool).

        One mechanism for every precision. The flag is read from the gradients AFTER DDP's all-reduce, which are
        bitwise identical on every rank, so every rank skips together without another collective, and it never
        reaches the host. Without a loss scaler it goes to fused Adam as `found_inf`, which then leaves weights,
        moments and step count untouched on the device. With fp16, Accelerate's shared GradScaler finds the same
        entries (its check is also element-wise), skips the same step inside fused Adam and lowers its scale; the
        flag here is what counts the skip (`AcceleratedOptimizer.step_was_skipped` cannot see a skip made inside
        a fused optimizer).
        """
        skipped = gradients_not_finite(module.parameters())
        scale = self.loss_scale()
        if measure:  # before the step, which may change the scale; logged unscaled
            norms = block_grad_norms(module, prefix)
            stats.update(norms if scale is None else {k: v / scale for k, v in norms.items()})
        if scale is None:
            inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer
            if inner.defaults.get("fused"):
                inner.found_inf = skipped.float()
                try:
                    optimizer.step()
                finally:
                    del inner.found_inf
            elif not bool(skipped):  # unfused optimizers cannot skip on the device
                optimizer.step()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return skipped
