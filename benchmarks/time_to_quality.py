"""Quality per second: our trainer and the user's reference loop, each given the same wall-clock budget.

    python benchmarks/time_to_quality.py --config configs/demo.yaml --seconds 240 --out DIR
        [--every 1,2,4] [--marks 8] [--num-images 2000] [--metrics swd[,fid]] [--no-reference] [dotted.key=value ...]

Sides, trained one after another in this process, from the same initial weights, on the same data in the same
order, on the same device:

- `reference`: the loop users copy (benchmarks/reference_loop.py: PyTorch-GAN's WGAN-div loop, fp32, penalty on
  every critic step); its raw G is scored, as it keeps no EMA;
- `ours every=N`, for each N of --every: our trainer with the config and loss.every=N (the penalty on every N-th
  critic step with k multiplied by N, StyleGAN2's lazy regularisation), scored on EMA-G (what the trainer samples
  and evaluates) and, as `*_raw`, on raw G.

The clock counts training only: at each of the --marks evenly spaced marks the device is synchronised, the clock
stops, the generator is scored (SWD on --num-images images against as many real images; FID too when asked and
the Inception file is installed), and the clock starts again. Logging, sample grids and checkpoints are not run.
The score at 0 s is the initial generator's.

From the curves: `target` is the reference's score at its last mark (its quality after the whole budget);
`seconds_to_target` is, for each side, the first training time at which its curve reaches the target (linear
between marks; null if it never does); `speedup` = the reference's seconds_to_target / the side's. Writes
DIR/time_to_quality.json and DIR/time_to_quality.png (score against seconds, every side's curve), and prints a
summary. SWD from one run is noisy (about ±10% between neighbouring marks on the demo): read the curves, not one
point.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository (trainer, models, benchmarks) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.bench_step import build_trainer, initial_weights, pytorch_default_backends, reference_models
from benchmarks.reference_loop import ReferenceLoop
from trainer.metrics import LocalProcess, evaluate_generator

LOWER_IS_BETTER = {"swd": True, "fid": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/).")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="Config overrides for every side.")
    parser.add_argument("--seconds", type=float, required=True, help="Training seconds per side.")
    parser.add_argument("--out", default="runs/time_to_quality", help="Where the JSON and the PNG go.")
    parser.add_argument("--every", default="1,2,4", help="Our sides' loss.every values (default 1,2,4).")
    parser.add_argument("--marks", type=int, default=8, help="Scoring marks after 0 s, evenly spaced (default 8).")
    parser.add_argument("--num-images", type=int, default=2000, help="Images per score (default 2000).")
    parser.add_argument("--metrics", default="swd", help="swd, or swd,fid (FID needs the Inception file).")
    parser.add_argument("--no-reference", action="store_true", help="Only our sides.")
    args = parser.parse_args(argv)
    args.every = [int(v) for v in args.every.split(",") if v]
    args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if args.seconds <= 0 or args.marks < 1 or not args.every or min(args.every) < 1:
        parser.error("--seconds must be positive, --marks at least 1, --every positive integers")
    if not set(args.metrics) <= set(LOWER_IS_BETTER):
        parser.error(f"--metrics: allowed {sorted(LOWER_IS_BETTER)}")
    return args


class Clock:
    """Training seconds: runs only between start() and stop()."""

    def __init__(self):
        self.total, self.started = 0.0, None

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self) -> None:
        self.total += time.perf_counter() - self.started
        self.started = None

    @property
    def seconds(self) -> float:
        return self.total + (0.0 if self.started is None else time.perf_counter() - self.started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_for(
    seconds: float,
    marks: int,
    device: torch.device,
    iterate: Callable[[], None],
    settle: Callable[[], None],
    score: Callable[[], dict],
    images_per_iteration: int,
    label: str,
) -> list[dict]:
    """Run `iterate` (one iteration) until `seconds` of training time, scoring at 0 s and at each mark."""
    clock, iterations, points = Clock(), 0, []

    def record() -> None:
        point = {"seconds": round(clock.seconds, 3), "iterations": iterations,
                 "kimg": iterations * images_per_iteration / 1000, **score()}  # fmt: skip
        points.append(point)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in point.items() if k not in ("seconds", "iterations", "kimg"))
        print(f"  {label:<16} {point['seconds']:7.1f} s  it {iterations:5d}  {shown}", file=sys.stderr, flush=True)

    record()
    for mark in range(1, marks + 1):
        clock.start()
        while clock.seconds < seconds * mark / marks:
            iterate()
            iterations += 1
        settle()
        synchronize(device)
        clock.stop()
        record()
    return points


def scorer(generator: torch.nn.Module, cfg, device: torch.device, args, cache: Path, suffix: str = "") -> Callable:
    def score() -> dict:
        results = evaluate_generator(
            generator, cfg, LocalProcess(device), metrics=args.metrics, num_images=args.num_images, cache_dir=cache
        )
        return {f"{m}{suffix}": results[f"metrics/{m}"] for m in args.metrics}

    return score


def run_ours(args, every: int, work: Path, cache: Path) -> dict:
    trainer = build_trainer(args.config, [*args.overrides, f"loss.every={every}"], work / f"ours-every{every}")
    ema, raw = (scorer(g, trainer.cfg, trainer.device, args, cache, s)
                for g, s in ((trainer.generator_ema, ""), (trainer.generator_module, "_raw")))  # fmt: skip

    def iterate() -> None:  # what Trainer.train() does per iteration, minus logging, samples and checkpoints
        trainer.train_iteration()
        trainer.apply_control(trainer.control.read())

    def settle() -> None:
        trainer.apply_control(trainer.control.flush())
        trainer.window = type(trainer.window)()

    cfg = trainer.cfg
    points = train_for(args.seconds, args.marks, trainer.device, iterate, settle, lambda: {**ema(), **raw()},
                       cfg.train.n_critic * cfg.train.batch_size, f"ours every={every}")  # fmt: skip
    return {"kind": "ours", "loss_every": every, "scored": "EMA-G (and raw G as *_raw)", "points": points}


def run_reference(args, work: Path, cache: Path) -> dict:
    trainer = build_trainer(args.config, [*args.overrides, "loss.every=1"], work / "reference")
    cfg, device = trainer.cfg, trainer.device
    generator, critic = reference_models(cfg, initial_weights(trainer), device)
    loop = ReferenceLoop(generator, critic, cfg.model.z_dim, cfg.train.n_critic, cfg.train.lr_g, cfg.train.lr_d,
                         device, cfg.loss.k, cfg.loss.p)  # fmt: skip
    batch = 0

    def iterate() -> None:
        nonlocal batch
        with pytorch_default_backends(device):
            batch = loop.run(trainer.batches.next, 1, start=batch)

    points = train_for(args.seconds, args.marks, device, iterate, lambda: None,
                       scorer(generator, cfg, device, args, cache), cfg.train.n_critic * cfg.train.batch_size,
                       "reference")  # fmt: skip
    return {"kind": "reference", "loss_every": 1, "scored": "raw G (it keeps no EMA)", "points": points}


def seconds_to(points: list[dict], key: str, target: float) -> float | None:
    """The first training time at which the curve `key` is at or below `target`, linear between marks."""
    for before, after in itertools.pairwise(points):
        if after[key] <= target:
            if before[key] <= target:
                return before["seconds"]
            fraction = (before[key] - target) / (before[key] - after[key])
            return before["seconds"] + fraction * (after["seconds"] - before["seconds"])
    return None


def summarise(result: dict, metric: str) -> None:
    """target, seconds_to_target and speedup (see the module docstring), in place."""
    sides = result["sides"]
    if "reference" not in sides:
        result.update(target=None, seconds_to_target={}, speedup={})
        return
    target = sides["reference"]["points"][-1][metric]
    reach = {name: seconds_to(side["points"], metric, target) for name, side in sides.items()}
    base = reach["reference"]
    result.update(
        target=target,
        seconds_to_target=reach,
        speedup={n: (None if t is None or not base else base / t) for n, t in reach.items()},
    )


def plot(result: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for name, side in result["sides"].items():
        xs = [p["seconds"] for p in side["points"]]
        style = {"color": "black", "linewidth": 2.5} if side["kind"] == "reference" else {"linewidth": 1.8}
        speedup = result["speedup"].get(name)
        label = name + ("" if speedup is None or name == "reference" else f" ({speedup:.2f}x)")
        ax.plot(xs, [p[metric] for p in side["points"]], marker="o", markersize=3, label=label, **style)
    if result.get("target") is not None:
        ax.axhline(result["target"], color="grey", linestyle="--", linewidth=1, label="reference's final score")
    ax.set_xlabel("training seconds (scoring excluded)")
    ax.set_ylabel(f"{metric.upper()} (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"{result['config']}: {metric.upper()} against training time, {result['device_name']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metric = args.metrics[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="time_to_quality_") as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"  # real statistics, shared by the sides
        sides = {}
        if not args.no_reference:
            sides["reference"] = run_reference(args, work, cache)
        for every in args.every:
            sides[f"ours every={every}"] = run_ours(args, every, work, cache)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "seconds": args.seconds,
        "marks": args.marks,
        "num_images": args.num_images,
        "metric": metric,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "torch_version": torch.__version__,
        "sides": sides,
    }
    summarise(result, metric)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    (out / "time_to_quality.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, metric, out / "time_to_quality.png")
    print(summary(result, metric))
    return 0


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        return f"CPU {names[0]} ({len(names)} threads)"
    except (OSError, IndexError):
        return "CPU"


def summary(result: dict, metric: str) -> str:
    lines = [f"time_to_quality: {result['config']} {' '.join(result['overrides'])}, {result['seconds']:g} s per side "
             f"on {result['device_name']}"]  # fmt: skip
    target = result.get("target")
    if target is not None:
        lines.append(f"  target: the reference's final {metric.upper()} {target:.3f}")
    for name, side in result["sides"].items():
        final = side["points"][-1]
        reach = result["seconds_to_target"].get(name)
        speed = result["speedup"].get(name)
        lines.append(
            f"  {name:<16} final {metric} {final[metric]:8.3f} after {final['seconds']:6.1f} s "
            f"({final['kimg']:.0f} kimg)"
            + ("" if target is None else f"; reaches the target at {'never' if reach is None else f'{reach:.0f} s'}")
            + ("" if speed is None or math.isnan(speed) else f" ({speed:.2f}x)")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
