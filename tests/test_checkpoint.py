"""Checkpoints: safetensors only, atomic, verified, exact resume, preemption-safe."""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support import ADAPTIVE, REPO, RUN, TINY, child_env, launch_command, run_trainer
from trainer import checkpoint as ckpt

FILES = ("generator", "generator_ema", "critic", "optimizer_generator", "optimizer_critic")


def tiny_contents(value: float = 1.0) -> ckpt.CheckpointContents:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    state = {k: torch.full_like(v, value) for k, v in model.state_dict().items()}
    return ckpt.CheckpointContents(
        models={"generator": state, "generator_ema": state, "critic": state},
        optimizers={"optimizer_generator": optimizer.state_dict(), "optimizer_critic": optimizer.state_dict()},
        training_state={"counters": {"iteration": 1}},
        config_yaml="run: {}\n",
    )


def assert_same_files(run_a: Path, run_b: Path, iteration: int) -> None:
    """Every tensor of every safetensors file of two checkpoints is bit-identical."""
    from safetensors.torch import load_file

    for name in FILES:
        a = load_file(run_a / "checkpoints" / f"iter-{iteration:07d}" / f"{name}.safetensors")
        b = load_file(run_b / "checkpoints" / f"iter-{iteration:07d}" / f"{name}.safetensors")
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key}"


# --------------------------------------------------------------------------------------------------------------
# The format: contents, verification, atomic writes.


def test_optimizer_state_round_trips_through_tensors_and_json():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.9))
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
    tensors, metadata = ckpt.optimizer_to_tensors(optimizer.state_dict())
    restored = torch.optim.Adam(model.parameters(), lr=1e-3)
    restored.load_state_dict(ckpt.optimizer_from_tensors(tensors, metadata))
    assert restored.param_groups[0]["betas"] == (0.0, 0.9)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], restored.state[p][key])


def test_written_checkpoint_verifies_and_reads_back(tmp_path):
    path = ckpt.write_checkpoint(tmp_path, 7, tiny_contents(2.0), keep=3)
    assert path.name == "iter-0000007"
    manifest = ckpt.verify_checkpoint(path)
    assert set(manifest["files"]) >= {f"{n}.safetensors" for n in FILES}
    contents = ckpt.read_checkpoint(path)
    assert torch.equal(contents.models["critic"]["weight"], torch.full((2, 3), 2.0))
    assert contents.training_state["counters"]["iteration"] == 1


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for iteration in range(1, 6):
        ckpt.write_checkpoint(tmp_path, iteration, tiny_contents(), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter-0000005", "iter-0000004"]


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete_manifest", "delete_file"])
def test_damaged_checkpoint_is_detected_and_auto_falls_back(tmp_path, damage):
    older = ckpt.write_checkpoint(tmp_path, 1, tiny_contents(1.0), keep=5)
    newer = ckpt.write_checkpoint(tmp_path, 2, tiny_contents(2.0), keep=5)
    target = newer / "critic.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "alter":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete_manifest":
        (newer / "manifest.json").unlink()
    else:
        target.unlink()
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.verify_checkpoint(newer)
    assert str(newer) in str(error.value)
    if damage in ("truncate", "alter", "delete_file"):
        assert "critic.safetensors" in str(error.value)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert ckpt.resolve_resume(tmp_path, "auto") == older
    with pytest.raises(ckpt.CheckpointError):
        ckpt.resolve_resume(tmp_path, str(newer))


class _Exploit:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_a_checkpoint_is_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    path = ckpt.write_checkpoint(tmp_path / "run", 1, tiny_contents(), keep=2)
    payload = pickle.dumps(_Exploit(marker))
    for name in ("training_state.pt", "optimizer.pt", "rng_state.pkl", "scaler.pt"):
        (path / name).write_bytes(payload)
    ckpt.read_checkpoint(path)
    # A pickle disguised as one of our files, with a manifest updated to match, is rejected, not unpickled.
    import hashlib
    import json

    (path / "optimizer_critic.safetensors").write_bytes(payload)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["optimizer_critic.safetensors"] = {"size": len(payload),
                                                         "sha256": hashlib.sha256(payload).hexdigest()}  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="not a valid safetensors file"):
        ckpt.read_checkpoint(path)
    assert not marker.exists()


def test_a_failed_write_keeps_earlier_checkpoints_and_says_why(tmp_path, monkeypatch):
    good = ckpt.write_checkpoint(tmp_path, 1, tiny_contents(), keep=1)
    real_write = ckpt._write_synced
    calls = []

    def disk_full_on_third_file(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_synced", disk_full_on_third_file)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device") as error:
        ckpt.write_checkpoint(tmp_path, 2, tiny_contents(), keep=1)
    assert "intact" in str(error.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter-0000001"]
    ckpt.verify_checkpoint(good)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------------------------------------------
# Resume through the real CLI.


@pytest.mark.slow
@pytest.mark.parametrize("nproc, augmentation", [(1, "plain"), (2, "plain"), (2, "adaptive")])
def test_resume_is_exact(tmp_path, nproc, augmentation):
    """4 iterations straight == 2 iterations, stop, resume to 4: bit-identical (n_critic 2, mid-epoch); with
    every augmentation and the adaptive probability (moved every iteration) as well."""
    common = ("checkpoint.every=2", "checkpoint.keep=5", "train.n_critic=2", "data.hflip=true")
    common += tuple(ADAPTIVE) if augmentation == "adaptive" else ()
    assert run_trainer(tmp_path / "straight", "train.iterations=4", *common, nproc=nproc).returncode == 0
    assert run_trainer(tmp_path / "resumed", "train.iterations=2", *common, nproc=nproc).returncode == 0
    done = run_trainer(tmp_path / "resumed", "train.iterations=4", *common, nproc=nproc, resume="auto")
    assert done.returncode == 0, done.stdout
    assert "resumed from" in done.stdout and "iteration 2" in done.stdout
    assert "train.iterations: 2 -> 4" in done.stdout  # the change is logged
    assert_same_files(tmp_path / "straight", tmp_path / "resumed", 4)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_auto_continues(tmp_path):
    """Five SIGKILLs (checkpoint writes included: one every iteration), then the run finishes as if never killed."""
    overrides = ("train.iterations=150", "checkpoint.every=1", "checkpoint.keep=2")
    straight = run_trainer(tmp_path / "straight", *overrides)
    assert straight.returncode == 0, straight.stdout
    run_dir = tmp_path / "killed"
    command = [*launch_command(RUN, 1), "--config", str(REPO / "configs/demo.yaml"), *TINY, f"run.dir={run_dir}",
               *overrides, "--resume", "auto"]  # fmt: skip
    rng = random.Random(0)
    kills = 0
    while kills < 5:
        newest_before = ckpt.newest_valid_checkpoint(run_dir)
        process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)  # fmt: skip
        # Kill once training is under way (after the first iteration's line), at a random moment after that.
        line = process.stdout.readline()
        while line and not re.match(r"it \d+/150", line):
            recovered = re.search(r"recovered (\S+) from an interrupted checkpoint write", line)
            if recovered:  # the kill came after a checkpoint's files were complete, before its rename: it counts
                newest_before = Path(recovered.group(1))
            if newest_before is not None and "resumed from" in line:
                assert newest_before.name in line, line  # continued from the newest complete checkpoint
            line = process.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        if process.returncode == 0:  # finished before the kill landed
            break
        kills += 1
        assert process.returncode == -signal.SIGKILL
        newest = ckpt.newest_valid_checkpoint(run_dir)
        assert newest is not None
    assert kills == 5
    final = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stdout + final.stderr
    assert_same_files(tmp_path / "straight", run_dir, 150)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_0(tmp_path):
    command = [*launch_command(RUN, 1), "--config", str(REPO / "configs/demo.yaml"), *TINY, f"run.dir={tmp_path}",
               "train.iterations=100000", "checkpoint.every=100000"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    line = process.stdout.readline()
    while line and not line.startswith("it 3/"):
        line = process.stdout.readline()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "SIGTERM received: checkpoint written at iteration" in output
    iteration = int(re.search(r"checkpoint written at iteration (\d+)", output).group(1))
    assert iteration >= 3
    newest = ckpt.newest_valid_checkpoint(tmp_path)
    assert newest.name == f"iter-{iteration:07d}"
    resumed = run_trainer(tmp_path, f"train.iterations={iteration + 1}", "checkpoint.every=100000", resume="auto")
    assert resumed.returncode == 0, resumed.stdout
    assert f"at iteration {iteration}" in resumed.stdout


@pytest.mark.slow
def test_resume_rules_are_clear_errors(tmp_path):
    assert run_trainer(tmp_path, "train.iterations=1").returncode == 0
    changed = run_trainer(tmp_path, "train.iterations=2", "model.width=16", resume="auto")
    assert changed.returncode == 2
    assert "model.width" in changed.stdout and "Traceback" not in changed.stdout
    fresh = run_trainer(tmp_path, "train.iterations=2")
    assert fresh.returncode == 2
    assert "--resume auto" in fresh.stdout and "iter-0000001" in fresh.stdout
    missing = run_trainer(tmp_path, "train.iterations=2", resume=str(tmp_path / "checkpoints" / "iter-0000099"))
    assert missing.returncode == 2 and "iter-0000099" in missing.stdout
    assert ckpt.verify_checkpoint(tmp_path / "checkpoints" / "iter-0000001")  # nothing saved was lost


def test_sample_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    from trainer.sample import main

    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_sample_cli_on_a_trained_checkpoint(tmp_path):
    assert run_trainer(tmp_path, "train.iterations=1").returncode == 0
    out = tmp_path / "grid.png"
    done = subprocess.run([sys.executable, "-m", "trainer.sample", "--checkpoint",
                           str(tmp_path / "checkpoints" / "iter-0000001"), "--n", "9", "--out", str(out)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    from PIL import Image

    assert Image.open(out).size[0] > 16 * 3
    assert os.path.getsize(out) > 0
