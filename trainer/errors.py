"""User-facing errors: one clear paragraph, exit status 2, no traceback.

A `UserError` is raised for anything the user can fix (a config key, a path, a value). The CLIs catch it, print
the message and exit with status 2. Everything else is a bug and keeps its traceback.

Who prints it, with several processes:
- an error found before the processes are connected (command line, config file) is the same on every rank, so
  local rank 0 of each node prints it;
- an error the ranks agreed on (`agreed=True`: raised alike on every rank after a collective) is printed by rank 0;
- any other error (a corrupt image read by one rank) is printed by the rank that raised it, tagged `[rank r]`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import textwrap
import time
import warnings
from pathlib import Path

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake the user can fix; the message is the whole report (one paragraph, no traceback).

    `agreed`: every rank raised this error together, so one report (rank 0's) is enough.
    """

    def __init__(self, message: str = "", *, agreed: bool = False):
        super().__init__(message)
        self.agreed = agreed


class PeerFailure(Exception):
    """Another process failed; this one stops without a traceback of its own (the failing one prints its own)."""


class ConfigError(UserError):
    """A bad config file, key or value."""


class DataError(UserError):
    """A missing, empty or unreadable data source."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose own errors follow the CLI contract too: one paragraph ending in the usage, exit 2."""

    def __init__(self, *args, usage_line: str, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.usage_line = usage_line

    def error(self, message: str):
        raise UserError(f"{message}. Usage: {self.usage_line}.")


def plain_warnings() -> None:
    """Show warnings as one line, `warning: MESSAGE`, not Python's file, line number and source line: the CLIs'
    output is for their users."""
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"


def format_paragraph(message: str, width: int = 100) -> str:
    # Never inside a word: a path or key broken at a hyphen could not be copied back from the terminal.
    words = " ".join(message.split())
    return "\n".join(textwrap.wrap(words, width=width, break_on_hyphens=False, break_long_words=False))


def process_rank() -> int:
    """This process's global rank as the launcher set it (0 when not distributed); valid before any init."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else default


def processes_connected() -> bool:
    """Whether this process has joined a process group (so the ranks could have agreed on an error)."""
    distributed = sys.modules.get("torch.distributed")
    return bool(distributed is not None and distributed.is_available() and distributed.is_initialized())


def report_user_error(error: UserError) -> None:
    """Print the paragraph where it belongs (see the module docstring), then quiet the launcher if that is safe."""
    rank, world = process_rank(), _env_int("WORLD_SIZE", 1)
    connected = processes_connected()
    everywhere = world == 1 or error.agreed or not connected  # every rank stops with this same error
    if not everywhere:
        printer, tag = True, f"[rank {rank}] "
    elif connected:
        printer, tag = rank == 0, ""
    else:
        printer, tag = _env_int("LOCAL_RANK", 0) == 0, ""
    if printer:
        print(f"{tag}error: {format_paragraph(str(error))}", file=sys.stderr, flush=True)
    if everywhere:
        _end_launcher_quietly()


def _launcher_kind(parent: int) -> str | None:
    """'torchrun' (an elastic agent: torchrun, or accelerate launch with several processes), 'accelerate' (its
    one-process launcher) or None, from the parent's command line."""
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    head = argv[:4]
    accelerate = any(a.endswith(b"accelerate") for a in head) and b"launch" in argv
    accelerate = accelerate or b"accelerate.commands.launch" in head
    torchrun = any(a.endswith(b"torchrun") for a in head) or b"torch.distributed.run" in head
    if torchrun or (accelerate and "TORCHELASTIC_RUN_ID" in os.environ):
        return "torchrun"
    return "accelerate" if accelerate else None


def _launcher_is_quiet(parent: int) -> bool:
    with contextlib.suppress(OSError):
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
        return b"--quiet" in argv or b"-q" in argv
    return False


def stop_when_the_launcher_dies() -> None:
    """Under `accelerate launch` or torchrun, have the kernel send this process SIGTERM if its launcher dies.

    torchrun starts each rank in a session of its own, so a signal to the launcher's process group reaches the
    launcher only: it forwards SIGTERM, but dies of SIGUSR1 (SLURM's usual warning signal), as of `kill -9`, and
    its ranks would train on as orphans. With PR_SET_PDEATHSIG they get SIGTERM instead: they finish the
    iteration, write a checkpoint and exit 0, as on any preemption. Linux only; a no-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    if _launcher_kind(parent) is None:
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def _live_children_of(parent: int) -> set[int]:
    """Pids of the running (not yet exited) child processes of `parent`, from /proc."""
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
                if int(ppid) == parent and state not in ("Z", "X"):
                    children.add(int(entry.name))
    return children


def _end_launcher_quietly(wait_s: float = 10.0) -> None:
    """End a parent `accelerate launch` or torchrun before it turns our exit status into a Python traceback.

    Without this, accelerate's launcher re-raises a failed child as `CalledProcessError` (one process) and torchrun
    as `ChildFailedError`, each with a traceback that buries the paragraph already printed. Called only when every
    rank stops with the same error; local rank 0 first waits (up to `wait_s`) until its sibling processes have
    exited, so that no peer is left behind without its launcher, ignoring the SIGTERM the launcher may send it
    meanwhile. Then SIGTERM for accelerate's one-process launcher, SIGKILL for an elastic agent (its SIGTERM
    handler raises and prints). The shell then sees the launcher's status (143 or 137): a launcher cannot pass on
    a child's 2. Nothing is done under any other parent (python, srun, a shell), or with `--quiet`.
    """
    if _env_int("LOCAL_RANK", 0) != 0:
        return
    parent = os.getppid()
    kind = _launcher_kind(parent)
    if kind is None or _launcher_is_quiet(parent):
        return
    # Ignored from here on: the launcher may stop us while we wait, and its death sends us SIGTERM (see
    # stop_when_the_launcher_dies); this process is on its way out with status 2 anyway.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    deadline = time.monotonic() + wait_s
    while _live_children_of(parent) - {os.getpid()} and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        os.kill(parent, signal.SIGKILL if kind == "torchrun" else signal.SIGTERM)
    # Leave at once, before the shell (which now has its prompt back) sees more output from an orphan.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(USER_ERROR_EXIT_CODE)
