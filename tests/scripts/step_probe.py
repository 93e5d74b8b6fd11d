"""Probe one critic step and one generator step on 1 or N processes (run by tests/test_distributed.py).

    python tests/scripts/step_probe.py OUT_DIR RUN_DIR [overrides...]            # one process
    torchrun --nproc_per_node 2 tests/scripts/step_probe.py OUT_DIR RUN_DIR ...  # two processes

For every penalty site r it computes the critic step's gradients of D from the same initial weights and the
same global batch and saves them (rank 0) to OUT_DIR/critic_grads_<world>.safetensors, and those of a critic step
without a penalty (critic step 1 with loss.every > 1; a compiled D with train.compile_d) under "unpenalised/".
With several processes it also saves the gradients of a deliberately broken variant (DDP's all-reduce skipped
with no_sync) and counts DDP communication-hook calls: during both kinds of critic step, and during the
generator step for both D and G.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support import tiny_config

from trainer.loop import Trainer
from trainer.losses import PENALTY_SITES

UNPENALISED = "unpenalised"  # the key prefix of the critic step without a penalty


def counting_hook(counter: list[int]):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        counter[0] += 1
        return allreduce_hook(None, bucket)

    return hook


def main() -> None:
    out_dir, run_dir, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    cfg = tiny_config(run_dir, *overrides)
    trainer = Trainer(cfg)
    acc, steps, nets = trainer.accelerator, trainer.steps, trainer.nets
    world = acc.num_processes
    steps._update = lambda optimizer, module, measure, prefix, stats: False  # keep the gradients for inspection
    initial = copy.deepcopy(nets.critic_core.state_dict())
    real = trainer.batches.next(0)

    def critic_grads(site: str, broken: bool = False) -> dict[str, torch.Tensor]:
        nets.critic_core.load_state_dict(initial)
        step = 1 if site == UNPENALISED else 0  # step 0 is penalised for every loss.every, step 1 only for 1
        steps.loss_cfg = dataclasses.replace(cfg.loss, r=cfg.loss.r if site == UNPENALISED else site)
        if broken:
            with nets.critic.no_sync():
                steps.critic_step(real, step)
        else:
            steps.critic_step(real, step)
        grads = {f"{site}/{name}": p.grad.detach().contiguous() for name, p in nets.critic_core.named_parameters()}
        nets.critic_core.zero_grad(set_to_none=True)
        return grads

    assert cfg.loss.every > 1, "the probe needs critic steps without a penalty"
    grads, broken = {}, {}
    for site in (*PENALTY_SITES, UNPENALISED):
        grads.update(critic_grads(site))
        if world > 1:
            broken.update(critic_grads(site, broken=True))
    steps.loss_cfg = cfg.loss
    report = {"world_size": world, "compiled_d": nets.critic_unpenalised is not nets.critic}

    if world > 1:
        d_calls, g_calls = [0], [0]
        nets.critic.register_comm_hook(None, counting_hook(d_calls))
        nets.generator.register_comm_hook(None, counting_hook(g_calls))
        # One all-reduce round of each net, for reference: a plain backward through its DDP wrapper.
        nets.critic(torch.cat([real, real])).sum().backward()
        d_round = d_calls[0]
        nets.critic_core.zero_grad(set_to_none=True)
        nets.generator(steps.latents("generator_z", 0)).sum().backward()
        g_round = g_calls[0]
        nets.generator_core.zero_grad(set_to_none=True)
        d_calls[0] = g_calls[0] = 0

        for key, step in (("critic_step", 0), ("critic_step_unpenalised", 1)):
            steps.critic_step(real, step)
            report[key] = {"d_calls": d_calls[0], "g_calls": g_calls[0], "d_round": d_round}
            nets.critic_core.zero_grad(set_to_none=True)
            d_calls[0] = g_calls[0] = 0

        sentinel = {name: torch.full_like(p, 7.0) for name, p in nets.critic_core.named_parameters()}
        for name, p in nets.critic_core.named_parameters():
            p.grad = sentinel[name].clone()
        steps.generator_step(0)
        unchanged = all(torch.equal(p.grad, sentinel[name]) for name, p in nets.critic_core.named_parameters())
        report["generator_step"] = {"d_calls": d_calls[0], "g_calls": g_calls[0], "g_round": g_round,
                                    "d_grads_unchanged": unchanged}  # fmt: skip

    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(grads, str(out_dir / f"critic_grads_{world}.safetensors"))
        if broken:
            save_file(broken, str(out_dir / f"critic_grads_broken_{world}.safetensors"))
        (out_dir / f"report_{world}.json").write_text(json.dumps(report))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
