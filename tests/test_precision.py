"""Mixed precision: the penalty stays correct under loss scaling, fp16 and bf16; the non-finite guard."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.support import tiny_config
from trainer import losses
from trainer.errors import ConfigError, UserError


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
# Whole steps through the real path: Trainer, Accelerate's AcceleratedOptimizer, fused Adam and, for fp16, a real
# GradScaler at its default initial scale (on the CPU: autocast fp16 and GradScaler("cpu"), CPU_FP16_ENV).


def build(tmp_path, *overrides, fp16: bool = False, monkeypatch=None):
    from accelerate.state import AcceleratorState, PartialState

    from trainer.distributed import CPU_FP16_ENV
    from trainer.loop import Trainer

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    if fp16:
        if torch.cuda.is_available():
            pytest.skip("the CPU stand-in for fp16; tests/test_cuda.py runs the real one")
        monkeypatch.setenv(CPU_FP16_ENV, "1")
        overrides = (*overrides, "train.mixed_precision=fp16")
    return Trainer(tiny_config(tmp_path, *overrides))


def poison_critic(trainer) -> None:
    """D's output becomes nan: every gradient of both steps is non-finite."""
    trainer.nets.critic_core.output.register_forward_hook(lambda module, args, out: out * float("nan"))


def state_copy(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("site", ["real-and-fake", "real-fake-interp"])
def test_fp16_penalty_at_the_default_initial_scale_is_finite_and_equals_fp32(tmp_path, monkeypatch, site):
    """ffhq64's ResNet D, whose parameter gradients fit fp16 at the default scale of 2^16 (|g| < 0.6 in fp32):
    the step must not be skipped. The tiny DCGAN's do not (|g| up to 17): the scaler backs off first, as it
    should; test_a_healthy_fp16_run_trains_and_its_skips_match_the_scale covers that path."""
    overrides = (f"loss.r={site}", "loss.every=1", "model.arch=resnet", "model.width=16")
    reference = build(tmp_path / "fp32", *overrides)
    expected = reference.steps.critic_step(reference.batches.next(0), 0, measure=True)
    trainer = build(tmp_path / "fp16", *overrides, fp16=True, monkeypatch=monkeypatch)
    scaler = trainer.accelerator.scaler
    assert scaler is not None and scaler.get_scale() == 2.0**16  # GradScaler's default initial scale
    before = state_copy(trainer.nets.critic_core)
    result = trainer.steps.critic_step(trainer.batches.next(0), 0, measure=True)
    penalty = result.stats["loss/penalty"]
    assert torch.isfinite(penalty) and not bool(result.skipped)
    assert scaler.get_scale() == 2.0**16  # no overflow, so the scaler did not back off
    torch.testing.assert_close(penalty, expected.stats["loss/penalty"], rtol=0.05, atol=0)
    torch.testing.assert_close(result.stats["input_grad_norm/mean"], expected.stats["input_grad_norm/mean"],
                               rtol=0.02, atol=0)  # fmt: skip
    print(f"penalty fp16 {penalty.item():.4e} fp32 {expected.stats['loss/penalty'].item():.4e}")
    moved = [k for k, v in trainer.nets.critic_core.state_dict().items() if not torch.equal(v, before[k])]
    assert moved  # the first step updated D
    # Gradient norms are logged unscaled, comparable with fp32's.
    torch.testing.assert_close(result.stats["grad_norm/D/total"], expected.stats["grad_norm/D/total"], rtol=0.05,
                               atol=0)  # fmt: skip


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_fp16_overflow_steps_are_counted_and_max_bad_steps_stops_the_run(tmp_path, monkeypatch):
    """The skip counter sees overflows that GradScaler skips inside fused Adam (step_was_skipped cannot)."""
    trainer = build(tmp_path, "train.iterations=50", "train.max_bad_steps=3", "checkpoint.every=1", fp16=True,
                    monkeypatch=monkeypatch)  # fmt: skip
    poison_critic(trainer)
    weights = state_copy(trainer.nets.critic_core)
    with pytest.raises(UserError, match="3 consecutive steps had non-finite gradients"):
        trainer.train()
    assert trainer.state.skipped_steps == 3  # 2 critic steps and 1 generator step
    # Each skip halved the scale: the scaler and the counter saw the same steps.
    assert trainer.accelerator.scaler.get_scale() == 2.0**16 * 0.5**trainer.state.skipped_steps
    for key, value in weights.items():
        assert torch.equal(trainer.nets.critic_core.state_dict()[key], value), key
    assert not list((tmp_path / "checkpoints").glob("iter-*"))  # nothing saved from the diverged state


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_healthy_fp16_run_trains_and_its_skips_match_the_scale(tmp_path, monkeypatch):
    trainer = build(tmp_path, "train.iterations=4", fp16=True, monkeypatch=monkeypatch)
    weights = state_copy(trainer.generator_module)
    state = trainer.train()
    assert state.iteration == 4
    changed = [k for k, v in trainer.generator_module.state_dict().items() if not torch.equal(v, weights[k])]
    assert changed
    assert trainer.accelerator.scaler.get_scale() == 2.0**16 * 0.5**state.skipped_steps


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_non_finite_gradients_skip_the_step_on_the_device_and_leave_weights_and_adam_alone(tmp_path):
    """fp32: the flag goes to fused Adam (under Accelerate's wrapper) as found_inf; nothing moves."""
    trainer = build(tmp_path)
    poison_critic(trainer)
    before = state_copy(trainer.nets.critic_core)
    result = trainer.steps.critic_step(trainer.batches.next(0), 0)
    assert result.skipped.dtype == torch.bool and bool(result.skipped)
    for key, value in before.items():
        assert torch.equal(trainer.nets.critic_core.state_dict()[key], value)
    for state in trainer.opt_d.optimizer.state.values():
        assert state["step"].item() == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert all(p.grad is None for p in trainer.nets.critic_core.parameters())


def critic_gradients(trainer):
    trainer.steps._update = lambda optimizer, module, measure, prefix, stats: False
    trainer.steps.critic_step(trainer.batches.next(0), 0)
    return {n: p.grad.clone() for n, p in trainer.nets.critic_core.named_parameters()}


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_bf16_critic_step_matches_fp32_within_bf16_precision(tmp_path):
    """Tolerance: the relative L2 error of D's gradient is at most 5%, bf16 keeping 8 significant bits."""
    overrides = ("model.d_norm=none", "loss.p=2", "loss.k=20")
    reference = critic_gradients(build(tmp_path / "fp32", *overrides))
    trainer = build(tmp_path / "bf16", *overrides, "train.mixed_precision=bf16")
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


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_after_a_skipped_lazy_penalty_step_d_waits_for_the_next_penalty_step(tmp_path, monkeypatch, fp16):
    """loss.every=2 (steps 0, 2, 4, ... take the penalty). Step 0's penalty overflows (made inf here, as a spike
    does under fp16): D must not take the penalty-free steps that follow until a penalty step succeeds, else it
    climbs with nothing holding its gradients (the demo in fp16 reached a penalty of 1e9 in 12 iterations)."""
    from trainer.loop import Trainer

    trainer = build(tmp_path, "loss.every=2", "checkpoint.every=1", fp16=fp16, monkeypatch=monkeypatch)
    real_penalty, spike = losses.gradient_penalty, [True]

    def penalty(*args):
        value = real_penalty(*args)
        if spike:  # the first call only
            spike.pop()
            return value * math.inf
        return value

    monkeypatch.setattr(losses, "gradient_penalty", penalty)
    before = state_copy(trainer.nets.critic_core)
    skipped = [bool(trainer.steps.critic_step(trainer.batches.next(step), step).skipped) for step in range(2)]
    assert skipped == [True, True]  # the spiked penalty step, then the held step
    for key, value in before.items():
        assert torch.equal(trainer.nets.critic_core.state_dict()[key], value), key
    # The hold survives a checkpoint: a resumed run still waits.
    trainer.checkpoint()
    resumed = Trainer(trainer.cfg, resume="auto")
    assert bool(resumed.steps.penalty_owed)
    for step in range(2, 12):
        skipped.append(bool(trainer.steps.critic_step(trainer.batches.next(step), step).skipped))
    for step in range(1, 12, 2):  # a step without the penalty runs only after a successful penalty step
        assert skipped[step] or not skipped[step - 1], skipped
    assert not all(skipped[2:]), skipped  # the hold ends (under fp16 once the scale lets the penalty through)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_the_logged_penalty_is_k_mean_norm_p_whatever_loss_every(tmp_path):
    """The loss carries k * every * mean ||g||^p on every every-th step; the log shows k * mean ||g||^p."""
    logged = {}
    for every in (1, 4):
        trainer = build(tmp_path / f"every{every}", f"loss.every={every}")
        logged[every] = trainer.steps.critic_step(trainer.batches.next(0), 0).stats["loss/penalty"]
    torch.testing.assert_close(logged[4], logged[1], rtol=1e-5, atol=0)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_penalty_that_keeps_failing_stops_the_run_at_max_bad_steps_though_g_trains(tmp_path, monkeypatch):
    """Every penalty step non-finite, the held steps between them skipped, every generator step fine: the run must
    stop at max_bad_steps critic steps, not freeze D silently to the end."""
    from trainer.loop import Trainer

    trainer = Trainer(tiny_config(tmp_path, "loss.every=2", "train.n_critic=2", "train.iterations=50",
                                  "train.max_bad_steps=5", "checkpoint.every=1000"))  # fmt: skip
    real_penalty = losses.gradient_penalty
    monkeypatch.setattr(losses, "gradient_penalty", lambda *args: real_penalty(*args) * math.inf)
    with pytest.raises(UserError, match=r"[56] consecutive critic steps \(D's penalty kept failing\)"):
        trainer.train()  # read once per iteration of 2 critic steps: stops at the first read of 5 or more
    assert trainer.state.iteration == 3
