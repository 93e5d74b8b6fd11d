"""Checks that need a CUDA GPU (skipped elsewhere; `launch/gpu_check.sh` runs them on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

from tests.support import tiny_config

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("fresh_accelerate_state"),
]


def trainer_for(tmp_path, *overrides):
    from trainer.loop import Trainer

    return Trainer(tiny_config(tmp_path, "model.d_norm=none", "loss.p=2", "loss.k=20", *overrides))


def critic_gradients(trainer) -> torch.Tensor:
    trainer.steps._update = lambda optimizer, module, measure, prefix, stats: torch.tensor(False)
    trainer.steps.critic_step(trainer.batches.next(0), 0)
    return torch.cat([p.grad.flatten().float() for _, p in sorted(trainer.nets.critic_core.named_parameters())])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.05), ("fp16", 0.01)])
def test_low_precision_critic_step_matches_fp32(tmp_path, precision, tolerance):
    from accelerate.state import AcceleratorState, PartialState

    reference = critic_gradients(trainer_for(tmp_path / "fp32", "train.tf32=false"))
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    trainer = trainer_for(tmp_path / precision, f"train.mixed_precision={precision}")
    assert (trainer.accelerator.scaler is not None) == (precision == "fp16")
    gradients = critic_gradients(trainer)
    if precision == "fp16":
        gradients = gradients / trainer.accelerator.scaler.get_scale()  # backward was scaled, not yet unscaled
    assert 0 < relative_error(gradients, reference) < tolerance


def test_fp16_training_logs_scale_and_finite_weights(tmp_path):
    trainer = trainer_for(tmp_path, "train.mixed_precision=fp16", "train.iterations=5", "train.channels_last=true")
    state = trainer.train()
    assert state.iteration == 5
    assert trainer.accelerator.scaler.get_scale() > 0
    for p in trainer.nets.critic_core.parameters():
        assert torch.isfinite(p).all()


def test_a_critic_and_generator_step_never_wait_for_the_host(tmp_path):
    """No host synchronisation inside the steps (fp32 and bf16; fp16's scaler reads its overflow flag)."""
    for precision in ("no", "bf16"):
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        trainer = trainer_for(tmp_path / precision, f"train.mixed_precision={precision}", "data.on_device=yes")
        real = trainer.batches.next(0)
        trainer.steps.critic_step(real, 0)  # warm-up: lazy initialisation may synchronise once
        trainer.steps.generator_step(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.steps.critic_step(real, 1)
            trainer.steps.generator_step(1)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_data_resident_on_the_gpu_equals_the_host_path(tmp_path):
    from trainer.data import RealBatches, open_source
    from trainer.randomness import Streams

    batches = {}
    for on_device in (True, False):
        source = open_source("bundled:mnist", 16, 1)
        stream = RealBatches(source, Streams(0), 32, 0, 1, torch.device("cuda"), hflip=True, on_device=on_device)
        batches[on_device] = [stream.next(step) for step in range(3)]
    for a, b in zip(batches[True], batches[False]):
        assert a.device.type == "cuda" and torch.equal(a, b)


def test_compiled_generator_trains(tmp_path):
    trainer = trainer_for(tmp_path, "train.compile_g=true", "train.iterations=2")
    assert trainer.train().iteration == 2
