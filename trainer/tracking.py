"""What a run reports: W&B (through Accelerate's tracker, main process only), the console, sample grids.

Scalars are accumulated as device tensors between logging steps (no host synchronisation), then averaged over
ranks with ONE all-reduce and read once per logging step.
"""

from __future__ import annotations

import json
import math
import netrc
import os
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


class Tracker:
    """W&B and console output of the main process; every method is a no-op on the other ranks."""

    def __init__(self, accelerator, cfg, run_dir: Path, run_id: str | None, start_iteration: int):
        self.accelerator, self.cfg, self.run_dir = accelerator, cfg, Path(run_dir)
        self.main = accelerator.is_main_process
        self.metrics_write_failed = False
        self.run = None
        self.run_id = run_id
        self.total = cfg.train.iterations
        self.bar = None
        self.last_time, self.last_iteration = time.perf_counter(), start_iteration
        if not self.main:
            return
        mode = resolve_wandb_mode(cfg.log.wandb.mode)
        if mode != "disabled":
            self.run_id = self._start_wandb(mode, run_id)
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=start_iteration, unit="it", dynamic_ncols=True, desc="training")

    def _start_wandb(self, mode: str, run_id: str | None) -> str:

        init = {
            "dir": str(self.run_dir),
            "mode": mode,
            "name": self.cfg.run.name or self.run_dir.name,
            "entity": self.cfg.log.wandb.entity,
            "group": self.cfg.log.wandb.group,
            "resume": "allow",
        }
        if run_id:
            init["id"] = run_id
        self.accelerator.init_trackers(
            self.cfg.log.wandb.project, config=self.cfg.to_dict(), init_kwargs={"wandb": init}
        )
        self.run = self.accelerator.get_tracker("wandb", unwrap=True)
        # Charts use the iteration as x-axis; W&B's own step stays monotonic across resumes.
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")
        if mode == "offline":
            print(
                f"W&B: offline run in {self.run.dir.removesuffix('/files')}; upload it later with "
                f"`wandb sync {self.run_dir / 'wandb'}/offline-run-*`.",
                file=sys.stderr,
                flush=True,
            )
        return self.run.id

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        if not self.main:
            return
        if self.run is not None:
            self.run.log({"iteration": iteration, **values})
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
        if self.run is not None:
            self.run.log({"iteration": iteration, **values})
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
        if not self.main or self.run is None:
            return
        import wandb

        self.run.log({"iteration": iteration, **{k: wandb.Image(v) for k, v in grids.items()}})

    def advance(self, iteration: int) -> None:
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
            # Not accelerator.end_training(): it also destroys the process group the other ranks still use.
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.run = None
