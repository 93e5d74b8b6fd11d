"""Run a W&B-format sweep on this machine: every run of its grid (or its random draws), one after another, or one
per GPU on a multi-GPU node; each run in its own run.dir under the sweep's directory; then a table and a chart.

    python -m trainer.sweep configs/sweeps/r_ablation.yaml [--out DIR] [--gpus auto|cpu|0,1,...] [--dry-run]

The same file runs online with no change: `wandb sweep FILE`, then `wandb agent ID` (each agent run writes to
run.dir/<W&B run id>). The file is W&B's sweep format: `program`, `method` (grid, or random with `run_cap`),
`parameters` (`values`, `value`, or a distribution), `metric`, and a `command` that passes the parameters with
`${args_no_hyphens}`, which makes them the trainer's dotted.key=value overrides. The local runner expands the grid
as W&B's sweep engine does (parameters sorted by name, the last one varying fastest).

Each run trains with `eval.at_end=true`, `log.wandb.group=<sweep name>` and `--resume auto`. Run it again with
the same --out after a Ctrl-C (or a crash, or a reboot): finished runs are skipped, interrupted runs resume from
their newest checkpoint, and failed runs stay failed unless --retry-failed. The sweep directory holds
`results.csv` (one row per run, failed ones included), `results.md` (mean and spread per setting) and
`results.png` (the metric per setting, one point per seed).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from trainer.errors import USER_ERROR_EXIT_CODE, ArgumentParser, UserError, plain_warnings, report_user_error

USAGE = "python -m trainer.sweep SWEEP.yaml [--out DIR] [--gpus auto|cpu|0,1,...] [--dry-run] [--retry-failed]"
REPO = Path(__file__).resolve().parents[1]
ARGS_MACRO = "${args_no_hyphens}"
UNSUPPORTED_MACROS = ("${args}", "${args_no_boolean_flags}", "${args_json}", "${args_json_file}", "${args_no_equals}")
SEED_KEY = "run.seed"
STATUS_FILE = "sweep_status.json"
LOG_FILE = "sweep.log"
DISTRIBUTIONS = ("categorical", "constant", "int_uniform", "uniform", "log_uniform_values", "q_uniform")


class SweepError(UserError):
    """A sweep file, or a sweep directory, that cannot be run as it is."""


@dataclasses.dataclass
class Sweep:
    path: Path
    name: str
    method: str
    program: str
    command: list[str]
    parameters: dict[str, dict]  # as in the file
    metric: str
    goal: str
    run_cap: int | None
    text: str  # the file as read: a sweep directory remembers which sweep it holds


@dataclasses.dataclass
class Run:
    index: int
    name: str
    values: dict[str, object]  # parameter -> value, every parameter of the sweep
    overrides: list[str]  # what ${args_no_hyphens} expands to
    iterations: int = 0  # train.iterations of the run's config (its final evaluation is at this iteration)
    status: str = "pending"  # pending, finished, failed, interrupted
    seconds: float = 0.0
    error: str = ""
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# The sweep file.


def _fail(path: Path, message: str) -> SweepError:
    return SweepError(f"Sweep error in '{path}': {message}")


def read_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file (the subset of W&B's format that the local runner runs)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(
            f"Sweep error: the sweep file '{path}' does not exist. Pass a W&B-format sweep YAML, for example "
            f"configs/sweeps/r_ablation.yaml."
        )
    text = path.read_text()
    try:
        data = yaml.safe_load(text)  # as `wandb sweep` reads it, so that both runners see the same values
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _fail(path, f"not valid YAML{where}: {getattr(error, 'problem', None) or error}.") from None
    if not isinstance(data, dict):
        raise _fail(path, "a sweep file is a YAML mapping with program, method, parameters and command.")
    method = data.get("method")
    if method == "bayes":
        raise _fail(path, "method: bayes needs W&B's sweep server (`wandb sweep` + `wandb agent`); the local runner "
                          "runs method: grid or method: random (with run_cap).")  # fmt: skip
    if method not in ("grid", "random"):
        raise _fail(path, f"method = {method!r}; allowed: grid, or random (with run_cap).")
    run_cap = data.get("run_cap")
    if method == "random" and not (isinstance(run_cap, int) and run_cap >= 1):
        raise _fail(path, f"method: random needs run_cap, the number of runs to draw (a positive integer), got "
                          f"{run_cap!r}.")  # fmt: skip
    program = data.get("program")
    if not isinstance(program, str) or not program:
        raise _fail(path, "program is missing: the script each run starts, e.g. program: trainer/run.py.")
    command = data.get("command")
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise _fail(path, f"command must be a list of strings that passes the parameters as dotted overrides, e.g. "
                          f"[${{env}}, python, ${{program}}, --config, configs/demo.yaml, {ARGS_MACRO}].")  # fmt: skip
    used = [c for c in command if c in UNSUPPORTED_MACROS]
    if used or ARGS_MACRO not in command:
        raise _fail(path, f"command must pass the parameters with {ARGS_MACRO} (as dotted.key=value overrides, "
                          f"what trainer/run.py reads){f'; {used[0]} is not supported' if used else ''}.")  # fmt: skip
    parameters = data.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise _fail(path, "parameters must map each dotted config key to {values: [...]} or {value: ...}.")
    for key, spec in parameters.items():
        _check_parameter(path, method, str(key), spec)
    metric = data.get("metric") or {}
    if not isinstance(metric, dict):
        raise _fail(path, f"metric must be a mapping such as {{name: metrics/swd, goal: minimize}}, got {metric!r}.")
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        raise _fail(path, f"metric.goal = {goal!r}; allowed: minimize, maximize.")
    return Sweep(path, str(data.get("name") or path.stem), method, program, command, parameters,
                 str(metric.get("name", "metrics/swd")), goal, run_cap, text)  # fmt: skip


def _check_parameter(path: Path, method: str, key: str, spec: object) -> None:
    if not isinstance(spec, dict):
        raise _fail(path, f"parameter '{key}' must be a mapping such as {{values: [a, b]}} or {{value: a}}, got "
                          f"{spec!r}.")  # fmt: skip
    if "parameters" in spec:
        raise _fail(path, f"parameter '{key}' nests parameters; write each one as a dotted key (loss.k, loss.p).")
    distribution = spec.get("distribution", "categorical" if "values" in spec else "constant" if "value" in spec
                            else None)  # fmt: skip
    if distribution not in DISTRIBUTIONS:
        allowed = ", ".join(DISTRIBUTIONS[2:])
        raise _fail(path, f"parameter '{key}' has distribution {distribution!r}; the local runner takes values, "
                          f"value, or distribution {allowed} (W&B's agent takes the rest).")  # fmt: skip
    if distribution == "categorical" and not (isinstance(spec.get("values"), list) and spec["values"]):
        raise _fail(path, f"parameter '{key}': values must be a non-empty list.")
    if distribution in ("int_uniform", "uniform", "log_uniform_values", "q_uniform"):
        low, high = spec.get("min"), spec.get("max")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if not numbers or not low < high or (distribution == "log_uniform_values" and low <= 0):
            raise _fail(path, f"parameter '{key}' ({distribution}) needs numbers min < max (min > 0 for "
                              f"log_uniform_values), got min={low!r}, max={high!r}.")  # fmt: skip
        if distribution == "int_uniform" and not all(isinstance(v, int) for v in (low, high)):
            raise _fail(path, f"parameter '{key}' (int_uniform) needs integer min and max.")
        if distribution == "q_uniform" and not (isinstance(spec.get("q", 1), (int, float)) and spec.get("q", 1) > 0):
            raise _fail(path, f"parameter '{key}' (q_uniform) needs q > 0.")
    if method == "grid" and distribution in ("uniform", "log_uniform_values"):
        raise _fail(path, f"parameter '{key}' is continuous ({distribution}); method: grid takes values, value, "
                          f"int_uniform or q_uniform (use method: random with run_cap).")  # fmt: skip


def _grid_values(spec: dict) -> list:
    """The values a grid takes for one parameter, as W&B's engine does (int_uniform inclusive, q_uniform not)."""
    distribution = spec.get("distribution", "categorical" if "values" in spec else "constant")
    if distribution == "constant":
        return [spec["value"]]
    if distribution == "int_uniform":
        return list(range(spec["min"], spec["max"] + 1))
    if distribution == "q_uniform":
        q, values, value = spec.get("q", 1), [], spec["min"]
        while value < spec["max"]:
            values.append(value)
            value = spec["min"] + len(values) * q
        return values
    return list(spec["values"])


def _draw(spec: dict, rng: random.Random):
    distribution = spec.get("distribution", "categorical" if "values" in spec else "constant")
    if distribution == "uniform":
        return rng.uniform(spec["min"], spec["max"])
    if distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
    return rng.choice(_grid_values(spec))


def expand(sweep: Sweep) -> list[Run]:
    """Every run of the sweep, in order, named after the parameters that vary."""
    keys = sorted(sweep.parameters)  # W&B's engine sorts them; the last varies fastest
    if sweep.method == "grid":
        combos = list(itertools.product(*(_grid_values(sweep.parameters[k]) for k in keys)))
    else:
        rng = random.Random(0)  # the same draws on every invocation: a resumed sweep finds its runs again
        combos = [tuple(_draw(sweep.parameters[k], rng) for k in keys) for _ in range(sweep.run_cap)]
    varying = [k for i, k in enumerate(keys) if len({_same(c[i]) for c in combos}) > 1]
    short = {k: k.rsplit(".", 1)[-1] for k in varying}
    if len(set(short.values())) < len(short):
        short = {k: k for k in varying}
    runs = []
    for index, combo in enumerate(combos):
        values = dict(zip(keys, combo))
        if sweep.method == "random":
            name = f"run-{index:03d}"
        else:
            name = "_".join(f"{short[k]}={_format(values[k])}" for k in varying) or "run"
            name = directory_name(name)
            if len(name) > 120:  # a file name has at most 255 bytes: keep it readable and unique
                name = f"{name[:100]}_{hashlib.sha1(_same(values).encode()).hexdigest()[:10]}"
        runs.append(Run(index, name, values, [f"{k}={v}" for k, v in values.items()]))  # W&B's own formatting
    # Values that differ only in characters a directory name cannot hold (a b, a-b) must not share a directory.
    counts = collections.Counter(run.name for run in runs)
    for run in runs:
        if counts[run.name] > 1:
            run.name = f"{run.name}_{run.index + 1:03d}"
    return runs


def directory_name(text: str) -> str:
    """`text` with every character a directory name should not hold (in a shell, on any filesystem) as "-"."""
    return re.sub(r"[^A-Za-z0-9._=+,-]", "-", text)


def _format(value) -> str:
    """A value as names and tables show it: in full (0.12345 and 0.12346 are two settings), lists joined by ","."""
    if isinstance(value, list):
        return ",".join(_format(v) for v in value)
    return str(value)


def run_command(sweep: Sweep, run: Run, run_dir: Path) -> list[str]:
    """The sweep's command for one run, with the runner's own overrides last (they win)."""
    command = []
    for chunk in sweep.command:
        if chunk == "${env}":
            continue  # W&B's agent writes /usr/bin/env here; the local runner passes the environment itself
        if chunk == ARGS_MACRO:
            command += run.overrides
        elif chunk in ("${interpreter}", "python", "python3"):
            command.append(sys.executable)  # the interpreter (and virtual environment) of the runner
        else:
            command.append(chunk.replace("${program}", sweep.program))
    return [*command, *runner_overrides(sweep, run, run_dir), "--resume", "auto"]


def runner_overrides(sweep: Sweep, run: Run, run_dir: Path) -> list[str]:
    """What the local runner adds to every run; strings JSON-quoted, so that the trainer's YAML parser reads a name
    such as "tiny #2" or "2024" as the string it is."""
    quoted = {"run.dir": str(run_dir), "run.name": f"{sweep.name}/{run.name}", "log.wandb.group": sweep.name}
    return [*(f"{key}={json.dumps(value)}" for key, value in quoted.items()), "eval.at_end=true"]


def base_config(sweep: Sweep) -> str | None:
    """The --config of the sweep's command (None if it has none)."""
    command = sweep.command
    for i, chunk in enumerate(command):
        if chunk == "--config" and i + 1 < len(command):
            return command[i + 1]
        if chunk.startswith("--config="):
            return chunk.split("=", 1)[1]
    return None


def check_runs(sweep: Sweep, runs: list[Run], out: Path) -> None:
    """Load every run's config (with the runner's own overrides) and check the command's program and executable
    before any training: a mistake stops the sweep now, not after hours of runs."""
    from trainer.config import load_config

    program = Path(sweep.program)
    if not program.is_file():
        raise _fail(sweep.path, f"program {sweep.program} does not exist (paths are relative to the directory the "
                                f"sweep is started from, {Path.cwd()}).")  # fmt: skip
    executable = run_command(sweep, runs[0], out / "runs" / runs[0].name)[0]
    if shutil.which(executable) is None:
        raise _fail(sweep.path, f"the command's executable '{executable}' is not on PATH (activate the virtual "
                                f"environment that has it, or write python to use {sys.executable}).")  # fmt: skip

    config = base_config(sweep)
    if config is None:
        raise _fail(sweep.path, "command has no --config PATH; name the base config, e.g. --config configs/demo.yaml.")
    path = Path(config) if Path(config).is_absolute() else Path.cwd() / config
    if not path.is_file():
        raise _fail(sweep.path, f"the command's --config {config} does not exist (paths are relative to the "
                                f"directory the sweep is started from, {Path.cwd()}).")  # fmt: skip
    for run in runs:
        try:
            cfg = load_config(path, [*run.overrides, *runner_overrides(sweep, run, out / "runs" / run.name)])
        except UserError as error:
            raise _fail(sweep.path, f"run {run.index + 1} ({run.name}) has no valid config: {error}") from None
        run.iterations = cfg.train.iterations


# --------------------------------------------------------------------------------------------------------------
# The sweep directory: what is done, what is left.


def prepare_directory(sweep: Sweep, out: Path) -> None:
    """Create the sweep directory, or check that it holds this sweep (a different one would mix results)."""
    copy = out / "sweep.yaml"
    if copy.is_file() and copy.read_text() != sweep.text:
        raise SweepError(
            f"Sweep error: '{out}' holds another sweep (its sweep.yaml differs from '{sweep.path}'), and mixing their "
            f"runs would mix their results. Pass another --out, or delete '{out}' to start this sweep afresh."
        )
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        if not copy.is_file():
            copy.write_text(sweep.text)
    except OSError as error:
        raise SweepError(f"Sweep error: cannot write the sweep directory '{out}' ({error.strerror or error}). "
                         f"Pass --out DIR with a directory this user can write.") from None  # fmt: skip


def hold_the_directory(out: Path):
    """An exclusive lock on out/.lock for the runner's lifetime: a second runner on the same directory would train
    the same runs into the same files. Released by the kernel when the process ends, however it ends."""
    import fcntl

    handle = open(out / ".lock", "a+")  # noqa: SIM115 - kept open: the lock lives as long as the file is open
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise SweepError(
            f"Sweep error: another runner ({holder}) is running the sweep in '{out}'; two would train the same runs "
            f"into the same files. Wait for it to finish, or stop it (Ctrl-C) and run this command again."
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
    handle.flush()
    return handle


def final_metrics(run_dir: Path, iteration: int) -> dict[str, float] | None:
    """The evaluation at `iteration` in run_dir/metrics.jsonl (the later line wins), or None."""
    found = None
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(entry, dict) and entry.get("iteration") == iteration:
            found = {k: v for k, v in entry.items() if k != "iteration"}
    return found


def load_status(run: Run, run_dir: Path) -> None:
    """Fill the run's status from its directory: finished if its final evaluation is there."""
    try:
        saved = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        saved = {}
    if not isinstance(saved, dict):  # valid JSON, but not what the runner writes
        saved = {}
    run.seconds, run.error = float(saved.get("seconds", 0.0)), str(saved.get("error", ""))
    metrics = final_metrics(run_dir, run.iterations)
    if metrics is not None:
        run.status, run.metrics = "finished", metrics
    elif saved.get("status") == "failed":
        run.status = "failed"
    elif saved:
        run.status = "interrupted"


def save_status(run: Run, run_dir: Path) -> None:
    state = {"status": run.status, "seconds": round(run.seconds, 1), "error": run.error, "values": run.values}
    temporary = run_dir / (STATUS_FILE + ".tmp")
    temporary.write_text(json.dumps(state, default=str, indent=1))
    temporary.replace(run_dir / STATUS_FILE)


def last_error(log: Path) -> str:
    """Why a run failed: the trainer's last error paragraph (`error: ...` to the end of its log), else the log's last
    line (a traceback's exception)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    starts = [i for i, line in enumerate(lines) if re.match(r"(\[rank \d+\] )?error: ", line)]
    message = " ".join(lines[starts[-1] :]) if starts else (lines[-1] if lines else "")
    return message[:600]


# --------------------------------------------------------------------------------------------------------------
# Running.


def devices(choice: str) -> list[str | None]:
    """One slot per GPU to use (its CUDA_VISIBLE_DEVICES value), or [None]: one run at a time, as configured."""
    if choice == "cpu":
        return [None]
    if choice != "auto":
        ids = [d.strip() for d in choice.split(",") if d.strip()]
        if not ids or not all(d.isdigit() for d in ids):
            raise SweepError(f"--gpus {choice}: allowed are auto, cpu, or comma-separated GPU indices (e.g. 0,1,2,3).")
        return ids
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    return ids if len(ids) > 1 else [None]  # one GPU or none: nothing to pin


def _die_with_parent() -> None:
    """In the child: SIGTERM if the runner dies (the trainer then writes a checkpoint and exits), Linux only."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


class Runner:
    """Starts the pending runs on free slots, watches them, and forwards a stop request once."""

    def __init__(self, sweep: Sweep, runs: list[Run], out: Path, slots: list[str | None]):
        self.sweep, self.runs, self.out, self.slots = sweep, runs, out, slots
        self.active: dict[int, tuple[Run, subprocess.Popen, float]] = {}  # by slot index (a GPU may have several)
        self.stopping = 0

    def run_dir(self, run: Run) -> Path:
        return self.out / "runs" / run.name

    def request_stop(self, signum, _frame) -> None:
        self.stopping += 1
        how = "now" if self.stopping > 1 else "after a checkpoint"
        print(f"sweep: {signal.Signals(signum).name}: stopping the running runs {how}; run the same command "
              f"again to continue.", file=sys.stderr, flush=True)  # fmt: skip
        for _run, process, _started in self.active.values():
            # The runs have sessions of their own (a Ctrl-C reaches only the runner): one SIGINT each asks for a
            # checkpoint; a second Ctrl-C sends another, which the trainer takes as "exit at once".
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)

    def start(self, run: Run, index: int, position: str) -> None:
        slot = self.slots[index]
        run_dir = self.run_dir(run)
        run_dir.mkdir(parents=True, exist_ok=True)
        command = run_command(self.sweep, run, run_dir)
        env = dict(os.environ)
        for key in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):
            env.pop(key, None)  # not a W&B agent run: keep run.dir as given
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        env.setdefault("PYTHONUNBUFFERED", "1")
        log = open(run_dir / LOG_FILE, "a")  # noqa: SIM115 - the child writes to it until it exits
        pinned = f"CUDA_VISIBLE_DEVICES={slot} " if slot is not None else ""
        log.write(f"\n=== sweep: {time.strftime('%Y-%m-%d %H:%M:%S')}: {pinned}{shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        log.close()
        run.status, run.error = "running", ""
        save_status(run, run_dir)
        self.active[index] = (run, process, time.perf_counter())
        where = f" on GPU {slot}" if slot is not None else ""
        print(f"sweep: [{position}] {run.name}: started{where} (log: {run_dir / LOG_FILE})", flush=True)

    def finish(self, index: int, position: str) -> None:
        run, process, started = self.active.pop(index)
        run_dir = self.run_dir(run)
        run.seconds += time.perf_counter() - started
        metrics = final_metrics(run_dir, run.iterations)
        if metrics is not None:
            run.status, run.metrics = "finished", metrics
            shown = "  ".join(f"{k.removeprefix('metrics/')} {v:.4g}" for k, v in sorted(metrics.items()))
            print(f"sweep: [{position}] {run.name}: finished in {run.seconds:.0f} s  {shown}", flush=True)
        elif process.returncode == 0 or self.stopping:
            run.status = "interrupted"
            print(f"sweep: [{position}] {run.name}: stopped; it resumes from its checkpoint next time", flush=True)
        else:
            run.status = "failed"
            if process.returncode < 0:  # no last words: the kernel or someone else ended it
                name = signal.Signals(-process.returncode).name
                run.error = (f"killed by {name} (signal {-process.returncode}; the out-of-memory killer sends SIGKILL)"
                             f"; --retry-failed resumes it from its newest checkpoint")  # fmt: skip
            else:
                run.error = last_error(run_dir / LOG_FILE)
            print(f"sweep: [{position}] {run.name}: FAILED (exit {process.returncode}): {run.error}", flush=True)
        save_status(run, run_dir)

    def execute(self, todo: list[Run]) -> None:
        queue, total, done = list(todo), len(todo), 0
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while queue or self.active:
                for index in range(len(self.slots)):
                    if index not in self.active and queue and not self.stopping:
                        self.start(queue.pop(0), index, f"{done + len(self.active) + 1}/{total}")
                for index, (_run, process, _started) in list(self.active.items()):
                    if process.poll() is not None:
                        done += 1
                        self.finish(index, f"{done}/{total}")
                        write_results(self.sweep, self.runs, self.out, chart=False)
                if self.stopping and not self.active:
                    break
                time.sleep(0.5)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------------------
# Results.


def setting_keys(sweep: Sweep, runs: list[Run]) -> list[str]:
    """The parameters that vary across runs, other than the seed: what a 'setting' is."""
    keys = sorted(sweep.parameters)
    return [k for k in keys if k != SEED_KEY and len({_same(r.values[k]) for r in runs}) > 1]


def write_results(sweep: Sweep, runs: list[Run], out: Path, chart: bool = True) -> list[str]:
    """results.csv, results.md and (chart=True) results.png; returns the paths written."""
    metric_names = sorted({k for r in runs for k in r.metrics})
    parameter_keys = sorted(sweep.parameters)
    rows = []
    for run in runs:
        row = {"run": run.name, "status": run.status, **{k: run.values[k] for k in parameter_keys}}
        row.update({m: run.metrics.get(m, "") for m in metric_names})
        row.update({"seconds": round(run.seconds, 1), "error": run.error})
        rows.append(row)
    written = []
    temporary = out / "results.csv.tmp"
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(out / "results.csv")
    written.append(str(out / "results.csv"))
    (out / "results.md").write_text(results_markdown(sweep, runs))
    written.append(str(out / "results.md"))
    if chart:
        png = write_chart(sweep, runs, out / "results.png")
        if png:
            written.append(png)
    return written


def _same(value) -> str:
    """A hashable identity of a parameter value (values may be lists, as train.betas)."""
    return json.dumps(value, sort_keys=True, default=str)


def _distinct(values) -> list:
    return list({_same(v): v for v in values}.values())


def grouped(sweep: Sweep, runs: list[Run]) -> list[tuple[tuple, list[Run]]]:
    """(setting values, its runs) in the order of the runs; a setting is the values of setting_keys."""
    keys = setting_keys(sweep, runs)
    groups: dict[str, tuple[tuple, list[Run]]] = {}
    for run in runs:
        setting = tuple(run.values[k] for k in keys)
        groups.setdefault(_same(setting), (setting, []))[1].append(run)
    return list(groups.values())


def results_markdown(sweep: Sweep, runs: list[Run]) -> str:
    """One row per setting: the metric's mean over the finished seeds, its spread, each seed's value."""
    keys, metric = setting_keys(sweep, runs), sweep.metric
    short = metric.removeprefix("metrics/")
    lines = [
        f"Sweep `{sweep.name}` ({sweep.path}): {sum(r.status == 'finished' for r in runs)} of {len(runs)} runs "
        f"finished; {short} of the EMA generator at each run's last iteration ({sweep.goal}).",
        "",
        "| " + " | ".join([*keys, f"{short} mean", "spread (max - min)", "per seed", "runs"]) + " |",
        "| " + " | ".join(["---"] * (len(keys) + 4)) + " |",
    ]
    for setting, members in grouped(sweep, runs):
        values = [r.metrics[metric] for r in members if r.status == "finished" and metric in r.metrics]
        mean = f"{sum(values) / len(values):.4g}" if values else "-"
        spread = f"{max(values) - min(values):.3g}" if len(values) > 1 else "-"
        each = ", ".join(_cell(r, metric) for r in members)
        counts = f"{len(values)}/{len(members)}"
        lines.append("| " + " | ".join([*(_format(v) for v in setting), mean, spread, each, counts]) + " |")
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- `{r.name}`: {r.error or 'no message'}" for r in failed]
    return "\n".join(lines) + "\n"


def _cell(run: Run, metric: str) -> str:
    seed = run.values.get(SEED_KEY)
    label = f"seed {seed}: " if seed is not None else ""
    if run.status == "finished" and metric in run.metrics:
        return f"{label}{run.metrics[metric]:.4g}"
    return f"{label}{run.status}"


def write_chart(sweep: Sweep, runs: list[Run], path: Path) -> str | None:
    """The metric per setting: a bar at the mean over seeds, a dot per seed, failed runs marked with x."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sweep: matplotlib is not installed, so there is no results.png (pip install matplotlib).",
              file=sys.stderr)  # fmt: skip
        return None
    keys, metric = setting_keys(sweep, runs), sweep.metric
    # With two setting keys, the one with more values is the x-axis and the other the colour (r x loss, k x p).
    hue_key = None
    if len(keys) == 2:
        counts = [len({_same(r.values[k]) for r in runs}) for k in keys]
        x_key, hue_key = (keys[0], keys[1]) if counts[0] >= counts[1] else (keys[1], keys[0])
        x_values = _distinct(r.values[x_key] for r in runs)
        hues = _distinct(r.values[hue_key] for r in runs)
    else:
        x_values = [s for s, _ in grouped(sweep, runs)]
        hues = [None]
    width = 0.8 / len(hues)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(x_values) * max(1, len(hues)) ** 0.5 + 2), 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    floor = min([r.metrics[metric] for r in runs if metric in r.metrics] or [0.0])
    for h, hue in enumerate(hues):
        for i, x in enumerate(x_values):
            if hue_key is None:
                members = [r for r in runs if _same(tuple(r.values[k] for k in keys)) == _same(x)]
            else:
                members = [
                    r for r in runs if _same(r.values[x_key]) == _same(x) and _same(r.values[hue_key]) == _same(hue)
                ]
            values = [r.metrics[metric] for r in members if r.status == "finished" and metric in r.metrics]
            position = i - 0.4 + width * (h + 0.5)
            colour = colours[h % len(colours)]
            if values:
                label = f"{hue_key}={_format(hue)}" if hue_key and i == 0 else None
                axes.bar(position, sum(values) / len(values), width * 0.9, color=colour, alpha=0.45, label=label)
                axes.scatter([position] * len(values), values, color=colour, s=18, zorder=3)
            failed = sum(r.status == "failed" for r in members)  # not the ones still to run
            if failed:
                axes.scatter([position] * failed, [floor] * failed, marker="x", color="black", zorder=4)
    if hue_key is None:
        labels = ["\n".join(_format(v) for v in x) for x in x_values] if keys else ["all runs"]
    else:
        labels = [_format(x) for x in x_values]
    axes.set_xticks(range(len(x_values)), labels, fontsize=8)
    axes.set_xlabel(x_key if hue_key else ", ".join(keys))
    axes.set_ylabel(f"{metric} ({'lower' if sweep.goal == 'minimize' else 'higher'} is better)")
    seeds = len({r.values.get(SEED_KEY) for r in runs})
    axes.set_title(f"{sweep.name}: bar = mean over {seeds} seed(s), dots = seeds, x = failed", fontsize=10)
    if hue_key is not None and axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    finished = [r.metrics[metric] for r in runs if r.status == "finished" and metric in r.metrics]
    if finished and min(finished) > 0 and max(finished) > 4 * min(finished):
        axes.set_yscale("log")  # a setting that broke down must not flatten the differences between the others
    axes.grid(axis="y", alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)


# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, usage_line=USAGE)
    parser.add_argument("sweep", help="W&B-format sweep YAML (see configs/sweeps/).")
    parser.add_argument("--out", default=None, help="Sweep directory (default: runs/sweeps/<sweep name>).")
    parser.add_argument(
        "--gpus",
        default="auto",
        help="auto (one run per visible GPU), cpu, or GPU indices 0,1,... "
        "(an index given twice runs two runs on that GPU at once)",
    )
    parser.add_argument("--dry-run", action="store_true", help="Check every run's config, list the runs, and stop.")
    parser.add_argument("--retry-failed", action="store_true", help="Run failed runs again (from their checkpoint).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    plain_warnings()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        sweep = read_sweep(args.sweep)
        runs = expand(sweep)
        out = Path(args.out or f"runs/sweeps/{directory_name(sweep.name)}")
        check_runs(sweep, runs, out)
        if args.dry_run:
            for run in runs:
                command = shlex.join(run_command(sweep, run, out / "runs" / run.name))
                print(f"{run.index + 1:3d}  {run.name}:  {command}")
            print(f"{len(runs)} runs; every config is valid.")
            return 0
        slots = devices(args.gpus)
        prepare_directory(sweep, out)
        lock = hold_the_directory(out)  # noqa: F841 - held until the process exits
        runner = Runner(sweep, runs, out, slots)
        for run in runs:
            load_status(run, runner.run_dir(run))
        todo = [r for r in runs if r.status != "finished" and (r.status != "failed" or args.retry_failed)]
        skipped = sum(r.status == "finished" for r in runs)
        kept_failed = sum(r.status == "failed" for r in runs) if not args.retry_failed else 0
        print(f"sweep {sweep.name}: {len(runs)} runs in {out}: {skipped} finished, {kept_failed} failed (kept; "
              f"--retry-failed runs them again), {len(todo)} to run, "
              f"{'one per GPU: ' + ','.join(slots) if slots != [None] else 'one at a time'}.", flush=True)  # fmt: skip
        runner.execute(todo)
        written = write_results(sweep, runs, out)
        left = [r for r in runs if r.status not in ("finished", "failed")]
        failed = [r for r in runs if r.status == "failed"]
        print(f"sweep {sweep.name}: {len(runs) - len(left) - len(failed)} finished, {len(failed)} failed, "
              f"{len(left)} left; results: {', '.join(written)}", flush=True)  # fmt: skip
        if left:
            given = sys.argv[1:] if argv is None else argv
            again = shlex.join([Path(sys.executable).name, "-m", "trainer.sweep", *given])
            print(f"sweep: run `{again}` again to "
                  f"finish the {len(left)} runs left.", flush=True)  # fmt: skip
            return 130 if runner.stopping else 1
        return 1 if failed else 0
    except UserError as error:
        report_user_error(error)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:  # before any run started (while the configs were being checked)
        return 130


if __name__ == "__main__":
    sys.exit(main())
