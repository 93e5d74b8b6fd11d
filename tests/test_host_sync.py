"""The loop never waits for the device inside an iteration: the CPU stand-in for CUDA's sync debug mode.

A GPU runs ahead of the host only if the host never reads a device value back while it queues work. On CUDA,
tests/test_cuda.py runs this with torch.cuda.set_sync_debug_mode("error"); here every Tensor method that turns a
tensor into Python values raises during the measured iterations (tests.support.no_host_reads). The iterations go
through the real loop body (`Trainer.train_iteration`): RealBatches (an in-memory array, or a folder of PNGs
read by DataLoader workers), penalised and unpenalised critic steps, the generator step, the EMA and the posting
of the control values; the one host read per iteration, of the control values, happens outside, as in `train()`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import no_host_reads, tiny_config


def build(tmp_path, monkeypatch, precision: str, *overrides: str):
    from trainer.distributed import CPU_FP16_ENV
    from trainer.loop import Trainer

    if precision == "fp16":
        monkeypatch.setenv(CPU_FP16_ENV, "1")
    return Trainer(tiny_config(tmp_path / "run", f"train.mixed_precision={precision}", *overrides))


def png_folder(path, count: int = 40):
    path.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(path / f"{index:02d}.png")
    return path


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize(
    "precision, source",
    [
        ("no", "array"),
        ("no", "folder"),
        ("fp16", "array"),
        ("no", "array-augmented"),
        ("fp16", "folder-augmented"),
        ("no", "array-compiled"),
    ],
)
def test_iterations_never_read_a_device_value(tmp_path, monkeypatch, precision, source):
    if torch.cuda.is_available():
        pytest.skip("tests/test_cuda.py runs this with CUDA's sync debug mode")
    overrides = ["loss.every=2", "train.n_critic=3", "data.hflip=true", "loss.r=mixed-interp"]
    if source.endswith("augmented"):  # every transform, with the adaptive p adjusted every iteration
        overrides += ["augment.policy=[color,translation,cutout,xflip,rotate90,int_translation]",
                      "augment.target=0.5", "augment.interval=1", "augment.heldout=8"]  # fmt: skip
    if source.endswith("compiled"):  # the unpenalised critic steps run a compiled D (it compiles in the warm-up)
        overrides += ["train.compile_d=true"]
    if source.startswith("folder"):
        overrides += [f"data.source={png_folder(tmp_path / 'images')}", "data.workers=2"]
    trainer = build(tmp_path, monkeypatch, precision, *overrides)
    try:
        trainer.train_iteration(measure=True)  # warm-up: workers start, lazy state is created
        trainer.apply_control(trainer.control.read())
        for iteration in range(3):
            with no_host_reads(trainer.device):
                trainer.train_iteration(measure=iteration == 1)  # a logging iteration too
            trainer.apply_control(trainer.control.read())  # the loop's one read per iteration
        assert trainer.state.iteration == 4 and trainer.state.critic_steps == 12
    finally:
        trainer.batches.close()


def test_the_guard_catches_a_read():
    """The stand-in is not vacuous: each of these reads raises inside it."""
    value = torch.ones(())
    for read in (lambda: value.item(), lambda: bool(value), lambda: float(value), lambda: value.tolist()):
        with no_host_reads(torch.device("cpu")), pytest.raises(AssertionError, match="read a value back"):
            read()
    assert value.item() == 1.0  # restored afterwards
