"""Mixed precision: the penalty stays correct under loss scaling, fp16 and bf16; the non-finite guard."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tests.support import tiny_config
from trainer import losses
from trainer.errors import ConfigError, UserError
from trainer.randomness import Streams
from trainer.steps import Nets, TrainingSteps


def tiny_critic(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.GroupNorm(1, 4), nn.LeakyReLU(0.2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 1), nn.Flatten(0))  # fmt: skip


def penalty_of(critic, x, scale=None, k=2.0, p=6.0):
    x = x.clone().requires_grad_(True)
    grad = losses.input_gradient(critic(x), x, scale)
    return losses.wgan_div_penalty(grad, k, p)


def test_penalty_under_a_loss_scale_of_2_16_equals_the_unscaled_penalty():
    critic, x = tiny_critic(), torch.randn(6, 1, 8, 8)
    plain = penalty_of(critic, x)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaled = penalty_of(critic, x, scaler.scale(torch.ones(())))
    assert scaler.get_scale() == 2.0**16
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=0)
    # The trap the unscaling avoids: the scaled gradient's penalty is off by scale^p.
    x_grad = x.clone().requires_grad_(True)
    raw = torch.autograd.grad(critic(x_grad).sum() * 2.0**16, x_grad)[0]
    assert losses.wgan_div_penalty(raw, 2.0, 6.0) > plain * 1e20


def test_gradient_of_the_scaled_penalty_matches_after_unscaling():
    """The parameter gradient of (scaled) penalty, divided by the scale, equals the fp32 one."""
    critic, x = tiny_critic(), torch.randn(6, 1, 8, 8)
    params = [p for name, p in critic.named_parameters() if name != "4.bias"]  # the output bias has no input grad
    plain = torch.autograd.grad(penalty_of(critic, x), params)
    scale = torch.tensor(2.0**16)
    scaled = torch.autograd.grad(penalty_of(critic, x, scale) * scale, params)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(b / scale, a, rtol=1e-5, atol=1e-12)


def test_fp16_gradient_of_norm_10_gives_a_finite_correct_penalty():
    grad = torch.zeros(3, 1, 8, 8, dtype=torch.float16)
    grad[:, 0, 0, 0], grad[:, 0, 1, 1] = 6.0, 8.0  # ||g|| = 10 per sample, so ||g||^6 = 1e6 > fp16 max 65504
    assert torch.isinf(grad.pow(2).sum(dim=(1, 2, 3)).pow(3)).all()  # the naive fp16 computation overflows
    penalty = losses.wgan_div_penalty(grad, k=2.0, p=6.0)
    assert penalty.dtype == torch.float32
    torch.testing.assert_close(penalty, torch.tensor(2e6), rtol=1e-5, atol=0)


def test_fp16_autocast_critic_with_input_gradient_norm_10_gives_a_finite_penalty():
    linear = nn.Linear(64, 1, bias=False)
    with torch.no_grad():
        linear.weight.fill_(10.0 / 8.0)  # ||grad_x D|| = ||w|| = 10 for every sample
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        out = linear(x).squeeze(1)
        assert out.dtype == torch.float16
    penalty = losses.wgan_div_penalty(losses.input_gradient(out, x, torch.tensor(1024.0)), k=2.0, p=6.0)
    assert math.isfinite(penalty.item())
    torch.testing.assert_close(penalty, torch.tensor(2e6), rtol=2e-3, atol=0)


# --------------------------------------------------------------------------------------------------------------
# Whole critic steps: with a GradScaler (the fp16 recipe, on CPU in fp32) and in bf16 (through Accelerate).


class ScalerAccelerator:
    """The parts of an Accelerator a TrainingSteps uses, with a real GradScaler (fp16's recipe on the CPU)."""

    device = torch.device("cpu")
    num_processes = 1

    def __init__(self, scaler):
        self.scaler = scaler
        self.optimizer_step_was_skipped = False

    def backward(self, loss, **kwargs):
        (self.scaler.scale(loss) if self.scaler else loss).backward(**kwargs)

    def gather(self, tensor):
        return tensor


class ScaledOptimizer:
    """What Accelerate's AcceleratedOptimizer does with the shared scaler: step through it, then update it."""

    def __init__(self, optimizer, accelerator):
        self.optimizer, self.accelerator = optimizer, accelerator

    def step(self):
        scaler = self.accelerator.scaler
        if scaler is None:
            self.optimizer.step()
            return
        before = scaler.get_scale()
        scaler.step(self.optimizer)
        scaler.update()
        self.accelerator.optimizer_step_was_skipped = scaler.get_scale() < before

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def one_critic_step(tmp_path, scaler=None, site="real-fake-interp", nan=False, fused=False):
    cfg = tiny_config(tmp_path, f"loss.r={site}")
    from models import models_from_config

    torch.manual_seed(0)
    generator, critic = models_from_config(cfg)
    if nan:
        critic.output.register_forward_hook(lambda module, args, out: out * float("nan"))
    accelerator = ScalerAccelerator(scaler)
    opt_d = ScaledOptimizer(torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.0, 0.9), fused=fused), accelerator)
    opt_g = ScaledOptimizer(torch.optim.Adam(generator.parameters(), lr=1e-3), accelerator)
    steps = TrainingSteps(Nets(generator, critic, generator, critic), opt_g, opt_d, accelerator, cfg.loss,
                          Streams(0), 8, slice(0, 8), cfg.model.z_dim)  # fmt: skip
    before = copy.deepcopy(critic.state_dict())
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    result = steps.critic_step(real, 0, measure=True)
    return critic, before, result, opt_d.optimizer


@pytest.mark.parametrize("site", ["real-fake-interp", "real-and-fake"])
def test_a_scaled_critic_step_updates_d_like_an_unscaled_one(tmp_path, site):
    plain, _, plain_result, _ = one_critic_step(tmp_path, None, site)
    scaled, _, scaled_result, _ = one_critic_step(tmp_path, torch.amp.GradScaler("cpu", init_scale=2.0**16), site)
    assert not scaled_result.skipped
    torch.testing.assert_close(scaled_result.stats["loss/penalty"], plain_result.stats["loss/penalty"], rtol=1e-5,
                               atol=1e-7)  # fmt: skip
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(scaled.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_non_finite_gradients_skip_the_step_and_leave_weights_and_adam_alone(tmp_path):
    critic, before, result, optimizer = one_critic_step(tmp_path, None, nan=True)
    assert result.skipped
    for key, value in before.items():
        assert torch.equal(critic.state_dict()[key], value)
    assert not optimizer.state  # Adam never stepped
    assert all(p.grad is None for p in critic.parameters())


def test_fused_adam_skips_a_non_finite_step_on_the_device(tmp_path):
    """The trainer's path: the skip flag goes to fused Adam as found_inf; nothing moves, not even the step count."""
    critic, before, result, optimizer = one_critic_step(tmp_path, None, nan=True, fused=True)
    assert result.skipped.device.type == "cpu" and result.skipped.dtype == torch.bool and bool(result.skipped)
    for key, value in before.items():
        assert torch.equal(critic.state_dict()[key], value)
    for state in optimizer.state.values():
        assert state["step"].item() == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    healthy, before, result, optimizer = one_critic_step(tmp_path, None, fused=True)
    assert not bool(result.skipped)
    assert not torch.equal(healthy.state_dict()["output.weight"], before["output.weight"])
    assert all(state["step"].item() == 1 for state in optimizer.state.values())


def test_an_fp16_overflow_is_reported_as_a_skipped_step(tmp_path):
    *_, result, _ = one_critic_step(tmp_path, torch.amp.GradScaler("cpu", init_scale=2.0**16), nan=True)
    assert result.skipped


def critic_gradients(trainer):
    trainer.steps._update = lambda optimizer, module, measure, prefix, stats: False
    trainer.steps.critic_step(trainer.batches.next(0), 0)
    return {n: p.grad.clone() for n, p in trainer.nets.critic_core.named_parameters()}


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_bf16_critic_step_matches_fp32_within_bf16_precision(tmp_path):
    """Tolerance: the relative L2 error of D's gradient is at most 5%, bf16 keeping 8 significant bits."""
    from accelerate.state import AcceleratorState, PartialState

    from trainer.loop import Trainer

    overrides = ("model.d_norm=none", "loss.p=2", "loss.k=20")
    reference = critic_gradients(Trainer(tiny_config(tmp_path / "fp32", *overrides)))
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    trainer = Trainer(tiny_config(tmp_path / "bf16", *overrides, "train.mixed_precision=bf16"))
    assert trainer.accelerator.mixed_precision == "bf16"
    low = critic_gradients(trainer)
    flat = torch.cat([v.flatten() for _, v in sorted(reference.items())])
    flat_low = torch.cat([v.flatten() for _, v in sorted(low.items())])
    error = ((flat_low - flat).norm() / flat.norm()).item()
    print(f"bf16 vs fp32 relative L2 error of D's gradient: {error:.2e}")
    assert 0 < error < 0.05  # > 0: bf16 autocast really ran


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_the_guard_stops_after_max_bad_steps_and_saves_nothing(tmp_path):
    from trainer.loop import Trainer

    trainer = Trainer(tiny_config(tmp_path, "train.iterations=50", "train.max_bad_steps=3", "checkpoint.every=1"))
    trainer.nets.critic_core.output.register_forward_hook(lambda module, args, out: out * float("nan"))
    with pytest.raises(UserError, match="3 consecutive steps had non-finite gradients") as error:
        trainer.train()
    assert "train.max_bad_steps = 3" in str(error.value)
    assert trainer.state.skipped_steps == 3
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    from trainer.loop import Trainer

    trainer = Trainer(tiny_config(tmp_path, "train.iterations=1"))
    trainer.prepare_run_dir()
    with torch.no_grad():
        next(trainer.nets.critic_core.parameters())[0] = float("inf")
    with pytest.raises(UserError, match="non-finite"):
        trainer.checkpoint()
    assert not list((tmp_path / "checkpoints").glob("iter-*"))


def test_launcher_precision_must_agree_with_the_config(tmp_path, monkeypatch):
    from trainer.distributed import resolve_mixed_precision

    cfg = tiny_config(tmp_path, "train.mixed_precision=bf16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match=r"fp16.*bf16"):
        resolve_mixed_precision(cfg)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch's default: the config decides
    assert resolve_mixed_precision(cfg) == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_mixed_precision(cfg) == "bf16"


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_fp16_without_cuda_is_a_clear_error(tmp_path):
    from trainer.distributed import make_accelerator

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        make_accelerator(tiny_config(tmp_path, "train.mixed_precision=fp16"))
