"""Shared helpers for tests: tiny configs, and launching the real CLI on 1 or 2 processes (gloo, CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
    """Train with the real CLI on `nproc` processes; returns the finished process (stdout+stderr in .stdout)."""
    args = ["--config", str(REPO / config), *TINY, f"run.dir={run_dir}", *overrides]
    if resume:
        args += ["--resume", resume]
    return subprocess.run(launch_command(RUN, nproc) + args, cwd=REPO, env=env or child_env(), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def checkpoint_weights(run_dir: Path, iteration: int, name: str) -> torch.Tensor:
    """All tensors of one safetensors file of a checkpoint, flattened into one fp32 vector (sorted by key)."""
    tensors = load_file(Path(run_dir) / "checkpoints" / f"iter-{iteration:07d}" / f"{name}.safetensors")
    return torch.cat([t.flatten().float() for _, t in sorted(tensors.items())])
