"""The Accelerator this trainer runs on, and the few collectives that keep every rank on one schedule."""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from trainer.config import Config
from trainer.errors import ConfigError


def resolve_mixed_precision(cfg: Config) -> str:
    """train.mixed_precision, checked against the launcher's --mixed_precision (ACCELERATE_MIXED_PRECISION).

    `accelerate launch` always exports its value, "no" by default, so only a launcher value other than "no" that
    disagrees with the config is an error; otherwise the config decides.
    """
    wanted = cfg.train.mixed_precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher not in ("no", wanted):
        raise ConfigError(
            f"Config error: the launcher asks for --mixed_precision {launcher} but "
            f"train.mixed_precision = {wanted}. Make them agree: drop the launcher flag (the config "
            f"decides) or pass train.mixed_precision={launcher}."
        )
    return wanted


# torch 2.14 deprecates DDP's broadcast_buffers for forward_sync_buffers, which Accelerate 1.15 cannot pass yet;
# for our nets they mean the same (D has no buffers, G's start equal), so the notice is noise.
warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)


def make_accelerator(cfg: Config, log_with: str | None = None) -> Accelerator:
    mixed_precision = resolve_mixed_precision(cfg)
    if os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() not in ("no", ""):
        warnings.warn(
            "ignoring the launcher's --dynamo_backend: the critic's double backward cannot be compiled; "
            "set train.compile_g=true to compile the generator.",
            stacklevel=2,
        )
    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=False,  # every parameter of G and D is used in every forward
        # D has no buffers; G's BatchNorm running statistics are only read in eval mode (sample grids, metrics),
        # which the main process does from its own copy. Broadcasting them would add a collective to every
        # forward for nothing that training reads.
        broadcast_buffers=False,
    )
    # A bounded collective timeout: if a peer dies where the launcher cannot kill its siblings (multi-node),
    # the others stop within this time instead of PyTorch's 30-minute default.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    accelerator = Accelerator(
        mixed_precision=mixed_precision, log_with=log_with, dynamo_backend="no", kwargs_handlers=[ddp, timeout]
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate set up "
            f"{accelerator.num_processes}: each process would train alone on its own copy. On CPU, export "
            f"ACCELERATE_USE_CPU=1 (or use `accelerate launch --multi_gpu` with it); see launch/README.md."
        )
    if mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise ConfigError(
            f"Config error: train.mixed_precision = fp16 needs a CUDA GPU, but this process runs on "
            f"{accelerator.device.type} (Accelerate would silently train in fp32). Use bf16 or no."
        )
    return accelerator


def agree(flag: bool, processes, require_all: bool = False) -> bool:
    """One value of `flag` for every rank: whether any rank (or, with require_all, every rank) has it True.

    One small all-reduce (MAX or MIN); no collective on one process. `processes` is an Accelerator or anything
    with `device` and `num_processes`.
    """
    if processes.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=processes.device)
    op = torch.distributed.ReduceOp.MIN if require_all else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(value, op=op)
    return bool(value.item())


def is_peer_failure(error: BaseException) -> bool:
    """Whether an exception means another process died (so this one should not print its own traceback)."""
    if isinstance(error, getattr(torch.distributed, "DistBackendError", ())):
        return True
    text = str(error)
    return any(
        marker in text
        for marker in (
            "Connection closed by peer",
            "Connection reset by peer",
            "Broken pipe",
            "NCCL communicator was aborted",
            "Socket Timeout",
            "ProcessGroupGloo",
            "Watchdog caught collective operation timeout",
        )
    )
