"""N processes compute what one process computes on the whole batch: real 2-process runs (gloo, CPU).

Each multi-process check asserts the world size it ran with, so a launcher that silently started independent
single processes fails the test instead of passing it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.support import (
    ADAPTIVE,
    AUGMENTED,
    REPO,
    RUN,
    TINY,
    checkpoint_weights,
    child_env,
    free_port,
    launch_command,
    run_trainer,
)

pytestmark = pytest.mark.slow

PROBE = str(REPO / "tests" / "scripts" / "step_probe.py")
# D without normalisation and p = 2 keep the gradients O(1) at initialisation while the penalty still moves
# them by ~15%, so an absolute tolerance of 1e-5 is meaningful and the penalty's reduction is exercised.
PROBE_OVERRIDES = ["model.d_norm=none", "loss.p=2", "loss.k=20"]
SITES = ("real-fake-interp", "within-interp", "mixed-interp", "real-and-fake", "fake", "real")
# The probe's critic step without a penalty (demo.yaml has loss.every=2), compiled in the "compiled" probe.
STEPS = (*SITES, "unpenalised")
COMPILE_D = ["train.compile_d=true"]


@pytest.fixture(scope="module", params=["plain", "augmented", "compiled"])
def probe(tmp_path_factory, request):
    out = tmp_path_factory.mktemp(f"probe-{request.param}-")
    extra = {"plain": [], "augmented": AUGMENTED, "compiled": COMPILE_D}[request.param]
    for nproc in (1, 2):
        command = [*launch_command(PROBE, nproc), str(out), str(out / f"run{nproc}"), *PROBE_OVERRIDES, *extra]
        done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    return out


def max_abs_diff(a: dict, b: dict, site: str) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if k.startswith(site + "/"))


@pytest.mark.parametrize("site", STEPS)
def test_critic_gradients_on_two_ranks_equal_the_full_batch_gradient(probe, site):
    assert json.loads((probe / "report_1.json").read_text())["world_size"] == 1
    assert json.loads((probe / "report_2.json").read_text())["world_size"] == 2
    single = load_file(str(probe / "critic_grads_1.safetensors"))
    double = load_file(str(probe / "critic_grads_2.safetensors"))
    assert any(k.startswith(site + "/") for k in single)
    assert max_abs_diff(single, double, site) <= 1e-5


@pytest.mark.parametrize("site", STEPS)
def test_the_comparison_catches_a_missing_all_reduce(probe, site):
    single = load_file(str(probe / "critic_grads_1.safetensors"))
    broken = load_file(str(probe / "critic_grads_broken_2.safetensors"))  # each rank kept its own gradient
    assert max_abs_diff(single, broken, site) > 1e-3


def test_the_penalty_changes_the_gradients_being_compared(probe):
    """Otherwise the site-by-site comparison would only test the adversarial term."""
    single = load_file(str(probe / "critic_grads_1.safetensors"))
    assert max_abs_diff(single, {k.replace("real-and-fake/", "fake/"): v for k, v in single.items()}, "fake") > 1e-2


def test_only_the_compiled_probe_compiles_d(probe):
    for world in (1, 2):
        report = json.loads((probe / f"report_{world}.json").read_text())
        assert report["compiled_d"] is probe.name.startswith("probe-compiled-"), world


@pytest.mark.parametrize("step", ["critic_step", "critic_step_unpenalised"])
def test_critic_step_all_reduces_d_exactly_once_and_not_g(probe, step):
    report = json.loads((probe / "report_2.json").read_text())[step]
    assert report["d_round"] >= 1
    assert report["d_calls"] == report["d_round"]  # one all-reduce round: every bucket of D once
    assert report["g_calls"] == 0  # fakes are generated without G's DDP wrapper


def test_generator_step_neither_reduces_nor_touches_d(probe):
    report = json.loads((probe / "report_2.json").read_text())["generator_step"]
    assert report["d_calls"] == 0
    assert report["d_grads_unchanged"] is True
    assert report["g_calls"] == report["g_round"] >= 1


def relative_gap(run_1, run_2, name: str, iteration: int) -> float:
    """||w_2proc - w_1proc|| / ||w_1proc(it) - w_1proc(it - 1)||: disagreement relative to one iteration's move."""
    final_1 = checkpoint_weights(run_1, iteration, name)
    step = (final_1 - checkpoint_weights(run_1, iteration - 1, name)).norm()
    return ((checkpoint_weights(run_2, iteration, name) - final_1).norm() / step).item()


@pytest.mark.parametrize("augmentation", ["plain", "adaptive", "compiled"])
def test_two_processes_train_the_same_weights_as_one(tmp_path, augmentation):
    # loss.every=2 (demo.yaml): with compile_d, critic steps 1, 3 and 5 run the compiled D
    overrides = ["train.iterations=3", "train.n_critic=2", "checkpoint.every=1", "checkpoint.keep=5"]
    overrides += {"plain": [], "adaptive": ADAPTIVE, "compiled": COMPILE_D}[augmentation]
    for nproc in (1, 2):
        done = run_trainer(tmp_path / f"p{nproc}", *overrides, nproc=nproc)
        assert done.returncode == 0, done.stdout
    for name in ("generator", "critic", "generator_ema"):
        assert relative_gap(tmp_path / "p1", tmp_path / "p2", name, 3) <= 1e-3, name
    if augmentation == "adaptive":  # the same p on both at every iteration, and one the controller moved
        p = [[training_state(tmp_path / f"p{n}", i)["counters"]["augment_p"] for i in (1, 2, 3)] for n in (1, 2)]
        assert p[0] == p[1] and max(p[0]) > 0, p
    # The measure is sensitive: a run that saw a different batch order is far apart.
    done = run_trainer(tmp_path / "other_seed", *overrides, "run.seed=1")
    assert done.returncode == 0, done.stdout
    assert relative_gap(tmp_path / "p1", tmp_path / "other_seed", "critic", 3) > 1


def training_state(run_dir, iteration: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"iter-{iteration:07d}" / "training_state.json").read_text())


def test_two_launchers_as_two_nodes_train_together(tmp_path):
    """Two `accelerate launch` processes, --num_machines 2 --machine_rank 0/1, rendezvous on 127.0.0.1."""
    port = free_port()
    launchers, logs = [], []
    for machine_rank in (0, 1):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                   "--machine_rank", str(machine_rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", RUN,
                   "--config", str(REPO / "configs/demo.yaml"), *TINY, f"run.dir={tmp_path / 'run'}",
                   "train.iterations=2"]  # fmt: skip
        logs.append(tmp_path / f"node{machine_rank}.log")
        # Files, not pipes: a launcher blocked on a full pipe would stall its peer in a collective.
        with open(logs[-1], "w") as log:
            launchers.append(subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=log,
                                              stderr=subprocess.STDOUT))  # fmt: skip
    try:
        for launcher in launchers:
            launcher.wait(timeout=180)
    finally:
        for launcher in launchers:
            launcher.kill()
    outputs = [log.read_text() for log in logs]
    assert [p.returncode for p in launchers] == [0, 0], outputs
    assert (tmp_path / "run" / "checkpoints" / "iter-0000002" / "manifest.json").is_file()
    assert "it 2/2" in outputs[0]  # the main process (machine 0) reports; machine 1 does not
    assert "it 2/2" not in outputs[1]


def test_a_failing_rank_ends_the_whole_job_quickly(tmp_path):
    start = time.monotonic()
    done = run_trainer(tmp_path, "train.iterations=50", nproc=2, timeout=120,
                       env=child_env(WGAN_DIV_INJECT_FAULT="1:2"))  # fmt: skip
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert done.stdout.count("injected fault on rank 1 at iteration 2") == 1, done.stdout


def test_a_global_batch_that_does_not_divide_is_a_clear_error(tmp_path):
    done = run_trainer(tmp_path, "train.batch_size=15", nproc=2, timeout=120)
    assert done.returncode != 0
    assert "train.batch_size = 15" in done.stdout and "2 processes" in done.stdout
    assert "Traceback" not in done.stdout
