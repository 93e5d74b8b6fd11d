"""User-facing errors: one clear paragraph, exit status 2, no traceback.

A `UserError` is raised for anything the user can fix (a config key, a path, a value). `run.py` catches it,
prints the message once and exits with status 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import textwrap
from pathlib import Path

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake the user can fix; the message is the whole report (one paragraph, no traceback)."""


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


def format_paragraph(message: str, width: int = 100) -> str:
    return "\n".join(textwrap.wrap(" ".join(message.split()), width=width))


def process_rank() -> int:
    """This process's global rank as the launcher set it (0 when not distributed); valid before any init."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def report_user_error(error: UserError) -> None:
    """Print the paragraph once (rank 0 only: every rank hits the same config error) and quiet the launcher."""
    if process_rank() == 0:
        print(f"error: {format_paragraph(str(error))}", file=sys.stderr, flush=True)
    _quiet_accelerate_launcher()


def _quiet_accelerate_launcher() -> None:
    """End a parent `accelerate launch` (or torchrun) before it turns our exit status into a Python traceback.

    Without `--quiet`, accelerate's launcher re-raises a failed child as `CalledProcessError` (one process) or
    `ChildFailedError` (torchrun), each with a traceback that buries the one line that matters. For a user mistake
    we have already printed that line, so we end the launcher: SIGTERM for the plain launcher, SIGKILL for the
    torchrun agent (its SIGTERM handler raises). Only ever done to a parent whose command line is
    `accelerate launch` or torchrun; every other rank hits the same user error and exits by itself.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    parent = os.getppid()
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    head = argv[:4]
    accelerate = any(a.endswith(b"accelerate") for a in head) and b"launch" in argv
    accelerate = accelerate or b"accelerate.commands.launch" in head
    torchrun = any(a.endswith(b"torchrun") for a in head) or b"torch.distributed.run" in head
    if not (accelerate or torchrun) or b"--quiet" in argv or b"-q" in argv:
        return
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    with contextlib.suppress(OSError):
        os.kill(parent, signal.SIGKILL if under_torchrun else signal.SIGTERM)
