"""train.compile_d: critic steps without a penalty run a compiled D (inductor, on the CPU here) and train the same
weights as eager D; the penalty steps stay eager (AOTAutograd has no double backward)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.utils import counters

from tests.support import tiny_config

# Compiling D for inductor takes ~20 s on 2 CPU cores.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]


def trained(tmp_path, compile_d: bool, iterations: int = 2):
    from trainer.loop import Trainer

    torch.set_num_threads(1)  # the same reduction order in both runs, and fair to others sharing the machine
    # loss.every=2 with n_critic=2: critic steps 0 and 2 are penalised (eager D), 1 and 3 are not (compiled D).
    cfg = tiny_config(tmp_path / str(compile_d), "loss.every=2", "train.n_critic=2",
                      f"train.compile_d={str(compile_d).lower()}")  # fmt: skip
    trainer = Trainer(cfg)
    try:
        start = {k: v.clone() for k, v in trainer.nets.critic_core.state_dict().items()}
        for _ in range(iterations):
            trainer.train_iteration()
    finally:
        trainer.batches.close()
    return trainer, start


def test_compiled_critic_steps_train_the_same_weights_as_eager(tmp_path):
    counters.clear()
    compiled, start = trained(tmp_path, compile_d=True)
    assert isinstance(compiled.nets.critic_unpenalised, OptimizedModule)
    assert compiled.nets.critic is not compiled.nets.critic_unpenalised  # penalty steps stay eager
    assert counters["frames"]["ok"] >= 1  # the unpenalised steps really went through dynamo
    eager, eager_start = trained(tmp_path, compile_d=False)
    assert eager.nets.critic_unpenalised is eager.nets.critic
    assert all(torch.equal(start[k], eager_start[k]) for k in start)  # the same seed, the same initial D

    # Inductor fuses and orders D's float32 reductions differently, so its gradients differ from eager ones by
    # float rounding (~1e-7 relative); through Adam (lr 5e-4, eps 1e-6 in the demo config) that moves a weight
    # by far less than 1e-6 after 4 critic steps (measured: <1e-8). A real difference (a skipped or repeated
    # update, a wrong loss, a penalty taken on a compiled step) moves weights by about lr per step, 500x more.
    final_c, final_e = compiled.nets.critic_core.state_dict(), eager.nets.critic_core.state_dict()
    for key in final_e:
        torch.testing.assert_close(final_c[key], final_e[key], rtol=0, atol=1e-6, msg=key)
    moved = max((final_e[k] - start[k]).abs().max().item() for k in start)
    assert moved > 100 * 1e-6  # the comparison is not vacuous: D did move
    for key, value in eager.generator_module.state_dict().items():  # G sees D's steps through its own step
        torch.testing.assert_close(compiled.generator_module.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_compile_d_is_off_by_default_and_idle_without_unpenalised_steps(tmp_path):
    from trainer.loop import Trainer

    assert tiny_config(tmp_path / "default").train.compile_d is False
    trainer = Trainer(tiny_config(tmp_path / "every1", "loss.every=1", "train.compile_d=true"))
    trainer.batches.close()
    assert trainer.nets.critic_unpenalised is trainer.nets.critic  # nothing to compile: every step is penalised
