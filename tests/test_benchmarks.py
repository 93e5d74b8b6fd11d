"""Benchmarks: bench_step.py runs end to end, and its baseline really is the user's loop.

No timing is asserted here: speed targets are checked by running the benchmarks, never by timed tests.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from benchmarks import bench_step, levers
from benchmarks.levers import FakesWithGrad, SeparateForwards, clone_steps
from benchmarks.reference_loop import ReferenceLoop
from tests.support import REPO, TINY, child_env

SMOKE = ["data.resolution=16", "model.width=8", "train.batch_size=16"]
KEYS = ("img_per_s", "reference_img_per_s", "ratio", "critic_step_ms", "critic_step_no_penalty_ms",
        "penalty_cost_ratio", "generator_step_ms", "iteration_ms", "flops_per_image", "mfu", "peak_memory_mib",
        "device", "device_name", "precision", "batch_size", "n_critic", "steps", "config", "torch_version")  # fmt: skip
POSITIVE = ("img_per_s", "reference_img_per_s", "ratio", "critic_step_ms", "critic_step_no_penalty_ms",
            "penalty_cost_ratio", "generator_step_ms", "iteration_ms", "flops_per_image",
            "peak_memory_mib")  # fmt: skip


def test_bench_step_prints_one_json_object_with_positive_measurements():
    command = [sys.executable, "benchmarks/bench_step.py", "--config", "configs/demo.yaml", *SMOKE,
               "--steps", "1", "--warmup", "1", "--json"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout holds the JSON object and nothing else
    assert set(KEYS) <= set(result)
    for key in POSITIVE:
        assert isinstance(result[key], (int, float)) and result[key] > 0, (key, result[key])
    assert result["mfu"] is None or result["mfu"] > 0  # no peak FLOP/s is known for a CPU unless given
    assert (result["device"], result["batch_size"], result["steps"]) == ("cpu", 16, 1)
    assert result["n_critic"] == 3 and result["precision"] == "fp32"
    # The demo's lazy penalty on both sides: the headline ratio compares identical math.
    assert (result["loss_every"], result["reference_loss_every"]) == (2, 2)
    assert result["like_for_like"] is True and result["math_differences"] == []


def test_a_ratio_at_different_math_says_so():
    cfg = bench_step.load_config(REPO / "configs" / "demo.yaml", ["loss.r=real-fake-interp"])
    differences = bench_step.math_differences(cfg, "bf16")
    assert len(differences) == 2 and "loss.r=real-fake-interp" in differences[0] and "bf16" in differences[1]
    assert bench_step.math_differences(bench_step.load_config(REPO / "configs" / "demo.yaml", []), "fp32") == []
    augmented = bench_step.load_config(REPO / "configs" / "demo.yaml", ["augment.policy=[translation]"])
    assert "augments" in bench_step.math_differences(augmented, "fp32")[0]


@pytest.fixture(scope="module")
def tiny_trainer(tmp_path_factory):
    torch.manual_seed(0)
    trainer = bench_step.build_trainer(REPO / "configs" / "demo.yaml", TINY, tmp_path_factory.mktemp("run"))
    return trainer, bench_step.initial_weights(trainer)


def reference_for(trainer, weights, every: int = 1) -> ReferenceLoop:
    cfg = trainer.cfg
    generator, critic = bench_step.reference_models(cfg, weights, trainer.device)
    return ReferenceLoop(generator, critic, cfg.model.z_dim, cfg.train.n_critic, cfg.train.lr_g, cfg.train.lr_d,
                         trainer.device, cfg.loss.k, cfg.loss.p, every=every)  # fmt: skip


def test_reference_critic_step_runs_the_penalty_graph_through_g_and_ours_does_not(tiny_trainer):
    trainer, weights = tiny_trainer
    reference = reference_for(trainer, weights)
    real = trainer.batches.next(0)

    reference.critic_step(real.clone())
    g_grads = [p.grad for p in reference.generator.parameters()]
    assert all(g is not None for g in g_grads) and any(g.abs().sum() > 0 for g in g_grads)  # fault 1, kept
    before = [p.detach().clone() for p in reference.generator.parameters()]
    reference.generator_step()  # on the critic step's fake and retained graph (fault 2, kept)
    assert any(not torch.equal(a, p) for a, p in zip(before, reference.generator.parameters()))

    trainer.steps.critic_step(real.clone(), 0)
    assert all(p.grad is None for p in trainer.generator_module.parameters())


def test_the_lazy_reference_takes_k_times_every_on_every_nth_step_and_no_penalty_between(tiny_trainer):
    trainer, weights = tiny_trainer
    real = trainer.batches.next(0)

    def critic_loss(every: int, penalised: bool) -> float:
        reference = reference_for(trainer, weights, every=every)
        torch.manual_seed(3)  # the same z every time
        reference.critic_step(real.clone(), penalised=penalised)
        return reference.d_loss.item()

    adversarial, eager, lazy = critic_loss(2, False), critic_loss(1, True), critic_loss(2, True)
    assert eager - adversarial > 0  # same weights and z: the difference is the penalty
    assert lazy - adversarial == pytest.approx(2 * (eager - adversarial), rel=1e-4)

    flags = []
    reference = reference_for(trainer, weights, every=2)
    reference.critic_step = lambda batch, penalised: flags.append(penalised)
    reference.generator_step = lambda: None
    reference.run(lambda i: real, iterations=3, start=0)
    assert flags == [i % 2 == 0 for i in range(3 * trainer.cfg.train.n_critic)]


def test_lever_variants_compute_the_product_critic_loss(tiny_trainer):
    trainer, _ = tiny_trainer
    critic = trainer.nets.critic_core
    start = copy.deepcopy(critic.state_dict())
    real = trainer.batches.next(1)
    losses = []
    for cls in (None, SeparateForwards, FakesWithGrad):
        critic.load_state_dict(start)
        steps = trainer.steps if cls is None else clone_steps(trainer.steps, cls)
        losses.append(steps.critic_step(real.clone(), 0).stats["loss/critic"])  # step 0 takes the penalty
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses[2], losses[0], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in trainer.generator_module.parameters())  # FakesWithGrad drops G's grads


@pytest.mark.parametrize("every, expected", [(1, 2), (2, 2), (4, 4)])
def test_compile_d_lever_compares_like_with_like_and_has_unpenalised_steps(tmp_path, monkeypatch, every, expected):
    sides = []
    monkeypatch.setattr(levers, "built_pair", lambda args, run_dir, on, off, plan, warmup: sides.extend([on, off]))
    args = bench_step.parse_args(["--config", str(REPO / "configs/demo.yaml"), f"loss.every={every}"])
    levers.compile_d_lever(args, tmp_path, levers.Plan(3, 1, 1, torch.device("cpu")))
    assert sides == [[f"loss.every={expected}", "train.compile_d=true"],
                     [f"loss.every={expected}", "train.compile_d=false"]]  # fmt: skip


@pytest.mark.slow
def test_small_data_benchmark_trains_scores_and_writes_its_table_and_grids(tmp_path):
    """benchmarks/small_data.py at a tiny size: two rows (all images; 500 with augmentation), SWD only."""
    out = tmp_path / "small"
    command = [sys.executable, "benchmarks/small_data.py", "--out", str(out), "--iterations", "2", "--images", "32",
               "--kid-images", "0", "--only", "0,2"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == ["0", "2"]
    assert results["2"]["overrides"] == ["data.limit=500", "augment.policy=[translation,cutout]"]
    assert all(r["metrics/swd"] > 0 and "iteration 2" in r["finished"] for r in results.values())
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 4 and "translation + cutout" in table[3]
    assert (out / "grids.png").stat().st_size > 0


def test_time_to_quality_trains_each_side_scores_its_marks_and_writes_the_json_and_the_plot(tmp_path):
    command = [sys.executable, "benchmarks/time_to_quality.py", "--config", "configs/demo.yaml", *SMOKE, "--seconds",
               "1", "--marks", "1", "--num-images", "16", "--every", "1,2", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "time_to_quality.json").read_text())
    assert list(result["sides"]) == ["reference", "ours every=1", "ours every=2"]
    for name, side in result["sides"].items():
        points = side["points"]
        assert points[0]["seconds"] == 0 and points[-1]["seconds"] >= 1 and points[-1]["iterations"] >= 1
        assert all(p["swd"] > 0 for p in points), name
        if side["kind"] == "ours":
            assert all(p["swd_raw"] > 0 for p in points)
    # The target is the reference's final score, which the reference reaches by definition.
    assert result["target"] == result["sides"]["reference"]["points"][-1]["swd"]
    assert result["seconds_to_target"]["reference"] is not None
    assert result["speedup"]["reference"] in (1.0, None)  # None: already there at 0 s (untrained, tiny sizes)
    assert (tmp_path / "time_to_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reaches the target" in done.stdout


def test_seconds_to_target_interpolates_between_marks():
    from benchmarks.time_to_quality import seconds_to

    points = [{"seconds": 0, "swd": 100.0}, {"seconds": 10, "swd": 60.0}, {"seconds": 20, "swd": 20.0}]
    assert seconds_to(points, "swd", 40.0) == pytest.approx(15.0)
    assert seconds_to(points, "swd", 60.0) == 10
    assert seconds_to(points, "swd", 10.0) is None
