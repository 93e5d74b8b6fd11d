"""Shared helpers for tests: tiny configs, and launching the real CLI on 1 or 2 processes (gloo, CPU)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RUN = str(REPO / "trainer" / "run.py")

# A small, fast model on real data (bundled MNIST) at 16 px; per-sample norms so 1 and N processes agree.
TINY = [
    "data.resolution=16",
    "model.width=8",
    "model.z_dim=16",
    "model.g_norm=none",
    "model.d_norm=layer",
    "train.batch_size=16",
    "train.n_critic=2",
    "log.every=1",
    "log.samples_every=1000",
    "log.grid_size=16",
    "log.wandb.mode=disabled",
]

# Every transform, each applied with probability 1/2 (the critic step augments real and fake with draws for the
# global batch; the penalty points are built from the augmented images).
AUGMENTED = ["augment.policy=[color,translation,cutout,xflip,rotate90,int_translation]", "augment.p=0.5"]
# Every transform with the adaptive probability: p moves every iteration (a tiny target, a fast controller) on a
# signal agreed across ranks, and must be saved and restored exactly.
ADAPTIVE = [AUGMENTED[0], "augment.target=0.000001", "augment.interval=1", "augment.speed_kimg=0.01",
            "augment.heldout=64"]  # fmt: skip


def tiny_config(run_dir: Path, *overrides: str):
    from trainer.config import load_config

    return load_config(REPO / "configs" / "demo.yaml", [*TINY, f"run.dir={run_dir}", *overrides])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"})
    env.pop("WGAN_DIV_INJECT_FAULT", None)
    env.update(extra)
    return env


def launch_command(script: str, nproc: int, port: int | None = None) -> list[str]:
    """`python script` for one process, `torchrun --standalone` for several (what `accelerate launch` runs)."""
    if nproc == 1:
        return [sys.executable, script]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()), script]  # fmt: skip


def run_trainer(run_dir: Path, *overrides: str, nproc: int = 1, resume: str | None = None, timeout: float = 300,
                env: dict | None = None, config: str = "configs/demo.yaml") -> subprocess.CompletedProcess:  # fmt: skip
    """Train with the real CLI on `nproc` processes; returns the finished process (stdout+stderr in .stdout).

    `--resume` goes before the overrides, as a user extending a run writes it (`--resume auto train.iterations=N`).
    """
    args = ["--config", str(REPO / config), *(["--resume", resume] if resume else []), *TINY, f"run.dir={run_dir}",
            *overrides]  # fmt: skip
    return subprocess.run(launch_command(RUN, nproc) + args, cwd=REPO, env=env or child_env(), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def checkpoint_weights(run_dir: Path, iteration: int, name: str) -> torch.Tensor:
    """All tensors of one safetensors file of a checkpoint, flattened into one fp32 vector (sorted by key)."""
    tensors = load_file(Path(run_dir) / "checkpoints" / f"iter-{iteration:07d}" / f"{name}.safetensors")
    return torch.cat([t.flatten().float() for _, t in sorted(tensors.items())])


def launch_direct(args: list[str], nproc: int, log_dir: Path, env: dict | None = None) -> list[subprocess.Popen]:
    """`nproc` trainer processes started as srun starts them: no launcher, ranks from the environment.

    All of them share one new process group (the first process leads it), as a SLURM job step's tasks do, so
    `os.killpg(processes[0].pid, sig)` reaches every rank and its DataLoader workers. Output goes to
    log_dir/rank<r>.log (files, not pipes: a rank blocked on a full pipe would stall its peers).
    """
    port = free_port()
    processes: list[subprocess.Popen] = []
    for rank in range(nproc):
        rank_env = dict(env or child_env())
        rank_env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        group = processes[0].pid if processes else 0

        def join_group(group=group):
            os.setpgid(0, group)

        with open(Path(log_dir) / f"rank{rank}.log", "w") as log:
            processes.append(subprocess.Popen([sys.executable, RUN, *args], cwd=REPO, env=rank_env, stdout=log,
                                              stderr=subprocess.STDOUT, preexec_fn=join_group))  # fmt: skip
    return processes


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit statuses, waiting at most `timeout` seconds in all; processes still running then are killed."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()


# Tensor methods that bring device values to the host: on CUDA each one waits for the device (a host sync).
# (`numpy()` is not one: it cannot be called on a CUDA tensor at all, so only host-side data uses it.)
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu")


@contextlib.contextmanager
def no_host_reads(device: torch.device):
    """Inside, any Python read of a tensor on `device` raises (on CUDA, any synchronisation raises too).

    On CUDA this is torch.cuda.set_sync_debug_mode("error"). On the CPU, where nothing waits, the stand-in is
    to make every method that turns a tensor into Python values raise, so that code that would wait on a GPU is
    caught here as well.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guard(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            if self.device == device:
                raise AssertionError(f"Tensor.{name} read a value back to the host inside the step")
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, guard(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
