"""The Accelerator this trainer runs on, and the few collectives that keep every rank on one schedule."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from trainer.config import Config
from trainer.errors import ConfigError, PeerFailure, UserError

# Tests and `launch/gpu_check.sh --dry-run`: "1" runs train.mixed_precision=fp16 on the CPU (autocast fp16 with a
# CPU GradScaler), the CUDA fp16 path with every piece real but the device.
CPU_FP16_ENV = "WGAN_DIV_CPU_FP16"


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
            "set train.compile_g=true to compile the generator and train.compile_d=true to compile the critic "
            "for its steps without a penalty (loss.every > 1).",
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
            f"ACCELERATE_USE_CPU=1 (or use `accelerate launch --multi_gpu` with it); see launch/README.md.",
            agreed=True,
        )
    if mixed_precision == "fp16" and accelerator.device.type != "cuda":
        if os.environ.get(CPU_FP16_ENV) != "1":
            raise ConfigError(
                f"Config error: train.mixed_precision = fp16 needs a CUDA GPU, but this process runs on "
                f"{accelerator.device.type} (Accelerate would silently train in fp32). Use bf16 or no.",
                agreed=True,
            )
        # What Accelerate does for fp16 on CUDA, on the CPU: prepare() then autocasts the forwards to fp16 and
        # wraps the optimizers with this scaler; backward() scales the loss.
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    if cfg.train.batch_size % accelerator.num_processes:
        n = accelerator.num_processes
        raise ConfigError(
            f"Config error: train.batch_size = {cfg.train.batch_size} (the global batch) does not divide evenly "
            f"over {n} processes. Use a multiple of {n}, e.g. {n * max(1, cfg.train.batch_size // n)}.",
            agreed=True,
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


def gather_text(text: str, processes) -> list[str]:
    """Every rank's `text`, in rank order, on every rank: UTF-8 bytes in two all_gathers, nothing pickled."""
    if processes.num_processes == 1:
        return [text]
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=processes.device)
    lengths = [torch.empty_like(length) for _ in range(processes.num_processes)]
    torch.distributed.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    padded = torch.zeros(max(*sizes, 1), dtype=torch.uint8)
    padded[: data.numel()] = data
    padded = padded.to(processes.device)
    gathered = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(gathered, padded)
    return [bytes(t[:n].cpu().tolist()).decode() for t, n in zip(gathered, sizes)]


@contextlib.contextmanager
def one_outcome(processes) -> Iterator[None]:
    """Run a setup phase on every rank and leave every rank with the same outcome.

    A UserError on some ranks is raised on all of them, agreed (printed once, by rank 0, naming the rank it came
    from unless every rank raised the same); any other exception is re-raised where it happened (with its
    traceback) and stops the other ranks as a PeerFailure. One collective at the end; the body must hold none
    (a rank that failed early would meet the others in a different collective).
    """
    failure: BaseException | None = None
    outcome = ""
    try:
        yield
    except UserError as error:
        failure, outcome = error, "user:" + str(error)
    except Exception as error:
        failure, outcome = error, f"bug:{type(error).__name__}: {error}"
    outcomes = gather_text(outcome, processes)
    failed = [(rank, text) for rank, text in enumerate(outcomes) if text]
    if not failed:
        return
    if failure is not None and not isinstance(failure, UserError):
        raise failure
    user = [(rank, text.removeprefix("user:")) for rank, text in failed if text.startswith("user:")]
    if not user:
        rank, text = failed[0]
        raise PeerFailure(f"rank {rank} failed while setting up ({text.removeprefix('bug:')})")
    rank, message = user[0]
    if len(failed) == len(outcomes) and len({text for _, text in user}) == 1 and isinstance(failure, UserError):
        failure.agreed = True  # every rank raised this very error: keep it (and its type), reported once
        raise failure
    others = len(failed) - 1
    more = f" ({others} other process{'es' if others > 1 else ''} failed too)" if others else ""
    raise UserError(f"[rank {rank}] {message}{more}", agreed=True)


def is_peer_failure(error: BaseException) -> bool:
    """Whether an exception means another process died (so this one should not print its own traceback)."""
    if isinstance(error, (PeerFailure, getattr(torch.distributed, "DistBackendError", ()))):
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
