"""What a run reports: W&B (through Accelerate's tracker, main process only), the console, sample grids.

Scalars are accumulated as device tensors between logging steps (no host synchronisation), then averaged over
ranks with ONE all-reduce and read once per logging step.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid

from trainer.data import to_uint8


class MetricWindow:
    """Running sums of device scalars since the last log; `reduce` averages them over steps and ranks."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for key, value in stats.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def reduce(self, accelerator) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k].to(accelerator.device) / self.counts[k] for k in keys])
        if accelerator.num_processes > 1:
            means = accelerator.reduce(means, reduction="mean")
        values = dict(zip(keys, means.tolist()))
        self.sums.clear()
        self.counts.clear()
        return values


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """`auto`: W&B's own WANDB_MODE if it is set, else online when logged in, else offline; and disabled when the
    wandb package is not installed (a machine without network may lack it: training must not depend on it)."""
    if mode != "auto":
        return mode
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        return "disabled"
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_logged_in() else "offline"


def sample_grid(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float images in [-1, 1] -> one (H', W', C) uint8 grid, nearly square."""
    grid = make_grid(to_uint8(images).cpu(), nrow=max(1, math.isqrt(images.shape[0] - 1) + 1), padding=2)
    array = grid.permute(1, 2, 0).numpy()
    return array[..., :1] if images.shape[1] == 1 else array


def save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    temporary = path.with_name(path.name + ".tmp")
    image.save(temporary, format="PNG")
    temporary.replace(path)


METRICS_FILE = "metrics.jsonl"

# W&B's transaction log (run-ID.wandb): a 7-byte header (":W&B", magic, version), then LevelDB-log records in
# 32 KiB blocks, each chunk behind a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last).
WANDB_LOG_BLOCK = 32768
# How often W&B writes its buffered records to the .wandb file (its default is 15 s). A process killed with
# SIGKILL loses what is still buffered (W&B's service does not flush when its parent dies), so keep it short.
WANDB_FLUSH_INTERVAL_S = 1.0


def last_logged_step(path: Path) -> int | None:
    """The highest history step written to one .wandb file, or None if it holds no history row.

    Reads what reached the disk, so a segment that was killed counts only the rows it really wrote (a torn last
    record is ignored)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if len(data) < 7:  # killed before its header was written
        return None
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    position, parts, last = 7, None, None
    while position + 7 <= len(data):
        room = WANDB_LOG_BLOCK - position % WANDB_LOG_BLOCK
        _, length, kind = struct.unpack_from("<IHB", data, position) if room >= 7 else (0, 0, 0)
        if kind == 0:  # a block's padding: go on at the next block
            position += room
            continue
        body = data[position + 7 : position + 7 + length]
        if len(body) < length:  # the last chunk was cut off (a killed process)
            break
        position += 7 + length
        if kind in (1, 2):  # full, first
            parts = [body]
        elif parts is not None:  # middle, last
            parts.append(body)
        if kind in (2, 3) or parts is None:
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(b"".join(parts))
        parts = None
        if record.WhichOneof("record_type") != "history":
            continue
        steps = [int(item.value_json) for item in record.history.item if "_step" in (item.key, *item.nested_key)]
        step = record.history.step.num if record.history.HasField("step") else max(steps, default=None)
        if step is not None:
            last = step if last is None else max(last, step)
    return last


def previous_wandb_step(wandb_dir: Path, run_id: str) -> int | None:
    """The highest step any earlier segment of run `run_id` wrote under `wandb_dir` (offline or online)."""
    steps = []
    for path in sorted(Path(wandb_dir).glob(f"*run-*-{run_id}/run-{run_id}.wandb")):
        try:
            steps.append(last_logged_step(path))
        except Exception as error:  # a file we cannot read must not stop the run: say so, and log every step
            print(f"W&B: cannot read {path} ({error}); its steps are not skipped.", file=sys.stderr, flush=True)
    steps = [step for step in steps if step is not None]
    return max(steps) if steps else None


class Tracker:
    """W&B and console output of the main process; every method is a no-op on the other ranks."""

    def __init__(self, accelerator, cfg, run_dir: Path, run_id: str | None, start_iteration: int):
        self.accelerator, self.cfg, self.run_dir = accelerator, cfg, Path(run_dir)
        self.main = accelerator.is_main_process
        self.metrics_write_failed = False
        self.run = None
        self.run_id = run_id
        # W&B's _step is the iteration. Steps below first_step are already in an earlier segment of the run (after
        # a crash, the iterations since the checkpoint are trained again): W&B keeps those rows, and this segment
        # logs them to the console and metrics.jsonl only.
        self.first_step = 0
        self.pending: dict = {}  # one W&B row per iteration: scalars, samples and metrics of `pending_step`
        self.pending_step: int | None = None
        self.total = cfg.train.iterations
        self.bar = None
        self.last_time, self.last_iteration = time.perf_counter(), start_iteration
        if not self.main:
            return
        mode = resolve_wandb_mode(cfg.log.wandb.mode)
        if mode != "disabled":
            self.run_id = self._start_wandb(mode, run_id, start_iteration)
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=start_iteration, unit="it", dynamic_ncols=True, desc="training")

    def _start_wandb(self, mode: str, run_id: str | None, start_iteration: int) -> str:
        import wandb

        init = {
            "dir": str(self.run_dir),
            "mode": mode,
            "name": self.cfg.run.name or self.run_dir.name,
            "entity": self.cfg.log.wandb.entity,
            "group": self.cfg.log.wandb.group,
            # The same id in every segment; "allow" is also recorded in an offline segment, so that `wandb sync`
            # appends it to the run instead of starting the history again.
            "resume": "allow",
        }
        if "x_transaction_log_flush_interval" in getattr(wandb.Settings, "model_fields", {}):
            init["settings"] = wandb.Settings(x_transaction_log_flush_interval=WANDB_FLUSH_INTERVAL_S)
        previous = None
        if run_id:
            init["id"] = run_id
            previous = previous_wandb_step(self.run_dir / "wandb", run_id)
        self.accelerator.init_trackers(
            self.cfg.log.wandb.project, config=self.cfg.to_dict(), init_kwargs={"wandb": init}
        )
        self.run = self.accelerator.get_tracker("wandb", unwrap=True)
        # W&B's _step is the iteration (every row is logged with step=iteration), and charts use `iteration` as
        # their x-axis. An online resume starts at the server's next step (run.step); an offline one at 0, so the
        # earlier segments' files say where they ended.
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")
        self.first_step = max(self.run.step, 0 if previous is None else previous + 1)
        if self.first_step > start_iteration + 1:
            print(
                f"W&B: the previous segment logged up to iteration {self.first_step - 1}, which W&B keeps; iterations "
                f"{start_iteration + 1}-{self.first_step - 1} go to the console and {METRICS_FILE} only.",
                file=sys.stderr,
                flush=True,
            )
        if mode == "offline":
            print(
                f"W&B: offline run in {self.run.dir.removesuffix('/files')}; upload it later with "
                f"`wandb sync {self.run_dir / 'wandb'}/offline-run-*` (all segments of a resumed run in one command).",
                file=sys.stderr,
                flush=True,
            )
        return self.run.id

    def _log(self, iteration: int, values: dict) -> None:
        """Adds to the W&B row of `iteration`; the row is written at the end of the iteration (`advance`)."""
        if self.run is None or iteration < self.first_step:
            return
        if self.pending_step is not None and iteration != self.pending_step:
            self._flush()
        self.pending_step = iteration
        self.pending.update(values)

    def _flush(self) -> None:
        """Writes the pending row with step=iteration and commits it (W&B drops a later row at the same step)."""
        if self.run is not None and self.pending_step is not None and self.pending:
            self.run.log({"iteration": self.pending_step, **self.pending}, step=self.pending_step, commit=True)
        self.pending, self.pending_step = {}, None

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        if not self.main:
            return
        self._log(iteration, values)
        # A window without a penalty step (loss.every > 1 with a short log.every) has no penalty to show: "-".
        penalty = f"{values['loss/penalty']:.3f}" if "loss/penalty" in values else "-"
        summary = (
            f"it {iteration}/{self.total}  kimg {values.get('progress/kimg', 0):.1f}  "
            f"img/s {values.get('speed/img_per_s', 0):.0f}  W {values.get('wasserstein', math.nan):.3f}  "
            f"penalty {penalty}  G {values.get('loss/generator', math.nan):.3f}"
        )
        if "augment/p" in values:
            summary += f"  augment p {values['augment/p']:.3f} r_v {values.get('augment/overfitting', math.nan):.2f}"
        if self.bar is not None:
            self.bar.set_postfix_str(summary.split("  ", 1)[1], refresh=False)
        else:
            print(summary, flush=True)

    def metrics(self, iteration: int, values: dict[str, float]) -> None:
        """An evaluation's metrics: to W&B, appended to run.dir/metrics.jsonl (one JSON object per evaluation, so
        that nothing depends on W&B; after a resume an iteration may appear twice: the later line is the one that
        counts), and printed on a line of their own."""
        if not self.main:
            return
        self._log(iteration, values)
        try:
            with open(self.run_dir / METRICS_FILE, "a+b") as out:
                # A line cut short by a crash must not swallow this one: start on a line of its own.
                out.seek(0, os.SEEK_END)
                cut = out.tell() > 0 and (out.seek(-1, os.SEEK_END), out.read(1))[1] != b"\n"
                out.write((("\n" if cut else "") + json.dumps({"iteration": iteration, **values}) + "\n").encode())
        except OSError as error:  # a full disk must not end the run: the metrics are also on the console (and W&B)
            if not self.metrics_write_failed:
                self.note(f"warning: cannot append to {self.run_dir / METRICS_FILE} ({error}); training goes on, "
                          f"and evaluations are printed below.")  # fmt: skip
            self.metrics_write_failed = True
        shown = "  ".join(f"{key.removeprefix('metrics/')} {value:.4g}" for key, value in sorted(values.items()))
        line = f"eval it {iteration}/{self.total}  {shown}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def images(self, iteration: int, grids: dict[str, np.ndarray]) -> None:
        if not self.main or self.run is None or iteration < self.first_step:
            return
        import wandb

        self._log(iteration, {k: wandb.Image(v) for k, v in grids.items()})

    def advance(self, iteration: int) -> None:
        """The end of an iteration: its W&B row is complete, except the last one's (the final sample grids come
        after it; `close` writes it)."""
        if self.pending_step is not None and iteration < self.total:
            self._flush()
        if self.bar is not None:
            self.bar.update(iteration - self.bar.n)

    def note(self, message: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.main and self.run is not None:
            self._flush()  # the last iteration's row, with the sample grids logged after the loop
            # Not accelerator.end_training(): it also destroys the process group the other ranks still use.
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.run = None
