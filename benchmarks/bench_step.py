"""Speed of one training iteration of our trainer, and of the user's reference loop on the same models and data.

    python benchmarks/bench_step.py --config configs/demo.yaml [dotted.key=value ...] [--steps N] [--warmup W]
        [--rounds R] [--json] [--peak-tflops F] [--no-reference] [--levers] [--skip-bf16]

One process builds a `Trainer` from the config (+ overrides) and measures iterations that are exactly what
`Trainer.train()` does per iteration without logging, samples, evaluation or checkpoints: n_critic critic steps on
real batches from `trainer.batches`, one generator step, the EMA update and the loop's control read. After W
warm-up iterations of each, ours and the reference loop alternate for R rounds of N iterations; each side's best
round counts (other processes may share the machine). It reports:

- img_per_s: REAL images shown to the critic per second, n_critic * batch / iteration time, timed with the device
  synchronised only before and after the N iterations, as a training run goes;
- reference_img_per_s and ratio = ours / reference: the user's loop (benchmarks/reference_loop.py), with the same
  loss.every as ours (its lazy variant when every > 1), on fresh copies of the same initial G and D, the same
  batch source, batch size and device, in fp32 with PyTorch's default backend flags, as the user would run it;
  like_for_like: whether the ratio compares identical math (math_differences lists what differs: a loss.r other
  than real-and-fake, bf16/fp16 against the reference's fp32);
- critic_step_ms, generator_step_ms, data_ms, ema_and_control_ms: one more pass of N iterations with the device
  synchronised around every phase, so each phase's time is its own (critic_step_ms follows loss.every);
- critic_step_penalised_ms, critic_step_no_penalty_ms and penalty_cost_ratio (their quotient): the product's
  critic step with the penalty forced on and off, alternating, n_critic * N pairs;
- flops_per_image: model FLOPs (torch.utils.flop_counter: matmuls and convolutions, double backward included) of
  whole iterations per real image; mfu = flops_per_image * img_per_s / peak FLOP/s (--peak-tflops, or a datasheet
  table for known GPUs); reference_flops_per_image and flops_ratio = reference / ours, the work the reference does
  in excess, which bounds the speed-up where the device is compute-bound;
- peak_memory_mib: torch.cuda.max_memory_allocated over the phase pass on CUDA; on CPU the process's peak RSS
  (getrusage), which also holds Python, the libraries and the data set (peak_memory_kind says which).

`--levers` adds benchmarks/levers.py: each speed lever measured on and off in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository (trainer, models, benchmarks) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.reference_loop import ReferenceLoop
from models import models_from_config
from trainer.config import Config, load_config
from trainer.loop import Trainer

# Dense (no sparsity) peak tensor-core TFLOP/s from NVIDIA's datasheets, by device-name fragment (first match
# wins, so the specific names come first) and by the precision the matmuls run in.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)
NEVER = 10**12  # a loss.every that no step number below it is a multiple of: the penalty is never taken


# --------------------------------------------------------------------------------------------------------------
# Devices and clocks.


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock measures it (CUDA is asynchronous; CPU is not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], object]) -> float:
    """Seconds `work()` takes, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


class PhaseTimes:
    """Wall time per named phase, the device synchronised at every boundary so that each phase pays its own.

    The synchronisations stall the CUDA queue a little, which is why throughput comes from a separate pass.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start
        self.counts[name] += 1

    def ms(self, name: str) -> float | None:
        return 1000 * self.seconds[name] / self.counts[name] if self.counts[name] else None


def no_phases(_name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or device.type


def precision_of(cfg: Config, device: torch.device) -> str:
    """The precision the matmuls run in: bf16/fp16 under AMP, else tf32 on CUDA when allowed, else fp32."""
    if cfg.train.mixed_precision in ("bf16", "fp16"):
        return cfg.train.mixed_precision
    return "tf32" if device.type == "cuda" and cfg.train.tf32 else "fp32"


def peak_tflops(name: str, precision: str, given: float | None) -> float | None:
    """--peak-tflops if given, else the datasheet figure for a known CUDA device, else None (no MFU)."""
    if given is not None:
        return given
    for fragment, table in PEAK_TFLOPS:
        if fragment in name:
            return table.get(precision)
    return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """(MiB, kind): allocated tensors since the last reset on CUDA; the process's lifetime peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"  # ru_maxrss is KiB on Linux


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# Our trainer.


def fresh_accelerator_state() -> None:
    """Forget Accelerate's process-wide state, so that the next Trainer may use another mixed precision.

    Accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another precision;
    the benchmark builds several Trainers in one (single) process, as tests/test_precision.py does.
    """
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def build_trainer(config: str | Path, overrides: list[str], run_dir: str | Path) -> Trainer:
    """A Trainer from the config and overrides, in a fresh run.dir, with W&B and evaluation off."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # checked before Accelerate's state is reset under a launcher
        raise SystemExit("bench_step.py measures one process: run it with python, not a multi-process launcher.")
    fresh_accelerator_state()
    cfg = load_config(config, [*overrides, f"run.dir={run_dir}", "log.wandb.mode=disabled", "eval.every=0"])
    return Trainer(cfg)


class TrainerLoop:
    """`Trainer.train()`'s iterations (`Trainer.train_iteration` and the control read), without logging, samples,
    evaluation or checkpoints.

    Steps run with measure=False: the extra gradient norms of logging iterations are not part of the steady state.
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    @property
    def images_per_iteration(self) -> int:
        return self.trainer.cfg.train.n_critic * self.trainer.cfg.train.batch_size

    def run(self, iterations: int, phase: Callable[[str], contextlib.AbstractContextManager] = no_phases) -> None:
        trainer = self.trainer
        for _ in range(iterations):
            trainer.train_iteration(phase=phase)
            with phase("control"):
                trainer.apply_control(trainer.control.read())
        trainer.apply_control(trainer.control.flush())  # no control copy left in flight across a measurement
        trainer.window = type(trainer.window)()  # nothing logs here: drop the accumulated statistics

    def throughput(self, iterations: int, warmup: int = 0) -> float:
        """Real images per second over `iterations`, after `warmup` untimed ones; no synchronisation inside."""
        self.run(warmup)
        return iterations * self.images_per_iteration / timed(self.trainer.device, lambda: self.run(iterations))


def penalty_pair_ms(loop: TrainerLoop, count: int) -> tuple[float, float]:
    """Mean ms of a critic step that takes the penalty and of one that does not, over `count` pairs.

    Both are the product's own critic step, on copies of the loss config: loss.every=1 (the penalty on every
    step) and loss.every huge with step numbers that are not multiples of it (never). The two alternate, after one
    untimed pair, so that a load change on a shared machine hits both alike.
    """
    trainer = loop.trainer
    steps, state, device = trainer.steps, trainer.state, trainer.device
    saved = steps.loss_cfg
    configs = {"with": dataclasses.replace(saved, every=1), "without": dataclasses.replace(saved, every=NEVER)}
    totals = {"with": 0.0, "without": 0.0}
    try:
        for i in range(count + 1):
            for side, loss_cfg in configs.items():
                step = state.critic_steps
                assert step % NEVER != 0  # step > 0 here: warm-up and earlier passes came first
                steps.loss_cfg, real = loss_cfg, trainer.batches.next(step)
                seconds = timed(device, lambda real=real, step=step: steps.critic_step(real, step))
                state.critic_steps += 1
                totals[side] += seconds if i else 0.0
    finally:
        steps.loss_cfg = saved
    return 1000 * totals["with"] / count, 1000 * totals["without"] / count


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: every FLOP is counted under "Global", none per module.

    The tracker's module backward hooks raise inside `torch.autograd.grad` ("A leaf node was passed to
    _will_engine_execute_node ..."), which every penalised critic step calls; the total needs no module names.
    """

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


def flops_per_image(run: Callable[[int], object], cfg: Config, images_per_iteration: int) -> float | None:
    """Model FLOPs per real image of `run(iterations)`, over whole iterations covering the lazy-penalty schedule."""
    from torch.utils.flop_counter import FlopCounterMode

    n_critic, every = cfg.train.n_critic, cfg.loss.every
    iterations = math.lcm(n_critic, every) // n_critic  # holds exactly lcm/every penalised critic steps
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # its per-module backward hooks break the penalty's autograd.grad
    try:
        with counter:
            run(iterations)
    except Exception as error:  # e.g. a compiled G that the counter cannot trace: report no FLOPs, not a crash
        print(f"FLOP count failed ({type(error).__name__}: {error}); flops_per_image = null", file=sys.stderr)
        return None
    return counter.get_total_flops() / (iterations * images_per_iteration)


def measure_breakdown(loop: TrainerLoop, steps: int) -> dict:
    """Per-phase times, the penalty's cost, FLOPs and peak memory of our trainer (after the throughput rounds)."""
    device, n_critic = loop.trainer.device, loop.trainer.cfg.train.n_critic
    reset_peak_memory(device)
    phases = PhaseTimes(device)
    loop.run(steps, phases)
    memory, memory_kind = peak_memory_mib(device)
    with_ms, without_ms = penalty_pair_ms(loop, steps * n_critic)
    return {
        "critic_step_ms": phases.ms("critic_step"),
        "critic_step_penalised_ms": with_ms,
        "critic_step_no_penalty_ms": without_ms,
        "penalty_cost_ratio": with_ms / without_ms,
        "generator_step_ms": phases.ms("generator_step"),
        "data_ms": phases.ms("data"),
        "ema_and_control_ms": (phases.seconds["ema"] + phases.seconds["control"]) * 1000 / max(phases.counts["ema"], 1),
        "flops_per_image": flops_per_image(loop.run, loop.trainer.cfg, loop.images_per_iteration),
        "peak_memory_mib": memory,
        "peak_memory_kind": memory_kind,
    }


# --------------------------------------------------------------------------------------------------------------
# The reference loop.


def initial_weights(trainer: Trainer) -> tuple[dict, dict]:
    """CPU copies of G's and D's weights as built (call before any step): the reference starts from them."""
    return tuple(
        {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        for module in (trainer.generator_module, trainer.nets.critic_core)
    )


def reference_models(cfg: Config, weights: tuple[dict, dict], device: torch.device):
    """Fresh, unwrapped fp32 G and D with the given weights, contiguous, on `device`: what the user would have.

    Rebuilt rather than deep-copied, so that no Accelerate autocast wrapper or compiled module comes along.
    """
    generator, critic = models_from_config(cfg)
    generator.load_state_dict(weights[0])
    critic.load_state_dict(weights[1])
    return generator.to(device).train(), critic.to(device).train()


@contextlib.contextmanager
def pytorch_default_backends(device: torch.device) -> Iterator[None]:
    """PyTorch's default CUDA backend flags (the Trainer changes them process-wide), restored afterwards.

    The user's loop runs with the defaults: no TF32 matmuls, TF32 cuDNN convolutions, no cudnn.benchmark.
    """
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


class ReferenceRunner:
    """The user's loop on fresh copies of the trainer's initial G and D, fed by the trainer's batch source."""

    def __init__(self, trainer: Trainer, weights: tuple[dict, dict]):
        cfg, self.trainer, self.batch = trainer.cfg, trainer, 0
        generator, critic = reference_models(cfg, weights, trainer.device)
        # The same loss.every as ours (the reference's lazy variant), so that the ratio compares identical math.
        self.loop = ReferenceLoop(generator, critic, cfg.model.z_dim, cfg.train.n_critic, cfg.train.lr_g,
                                  cfg.train.lr_d, trainer.device, cfg.loss.k, cfg.loss.p,
                                  every=cfg.loss.every)  # fmt: skip
        self.images_per_iteration = cfg.train.n_critic * cfg.train.batch_size

    def run(self, iterations: int) -> None:
        with pytorch_default_backends(self.trainer.device):
            self.batch = self.loop.run(self.trainer.batches.next, iterations, start=self.batch)

    def throughput(self, iterations: int) -> float:
        return iterations * self.images_per_iteration / timed(self.trainer.device, lambda: self.run(iterations))

    def measure(self) -> dict:
        """FLOPs per real image and peak memory of one iteration (after the throughput rounds)."""
        flops = flops_per_image(self.run, self.trainer.cfg, self.images_per_iteration)
        reset_peak_memory(self.trainer.device)
        self.run(1)
        return {
            "reference_flops_per_image": flops,
            "reference_peak_memory_mib": peak_memory_mib(self.trainer.device)[0],
        }


def throughput_rounds(loop: TrainerLoop, reference: ReferenceRunner | None, steps: int, rounds: int) -> dict:
    """Real img/s of ours and of the reference, alternating for `rounds` rounds of `steps` iterations each.

    Each side's best round counts: on a shared machine, a load spike then slows one round, not the result.
    """
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(loop.throughput(steps))
        if reference is not None:
            theirs.append(reference.throughput(steps))
    best = max(ours)
    result = {"img_per_s": best, "iteration_ms": 1000 * loop.images_per_iteration / best, "rounds_img_per_s": ours,
              "reference_img_per_s": None, "reference_iteration_ms": None, "reference_rounds_img_per_s": theirs,
              "ratio": None}  # fmt: skip
    if theirs:
        result["reference_img_per_s"] = max(theirs)
        result["reference_iteration_ms"] = 1000 * reference.images_per_iteration / max(theirs)
        result["ratio"] = best / max(theirs)
    return result


# --------------------------------------------------------------------------------------------------------------
# The command line.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/).")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="Config overrides.")
    parser.add_argument("--steps", type=int, default=20, help="Measured iterations per pass (default 20).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed iterations first (default 3).")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds of ours and the reference, "
                        "--steps iterations each; the best round of each counts (default 2).")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of the summary.")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Peak TFLOP/s of the device for MFU.")
    parser.add_argument("--no-reference", action="store_true", help="Do not run the user's reference loop.")
    parser.add_argument("--levers", action="store_true", help="Also measure each speed lever on and off.")
    parser.add_argument("--lever-steps", type=int, default=None, help="Measured iterations per lever side "
                        "(default: half of --steps, at least 3).")  # fmt: skip
    parser.add_argument("--lever-rounds", type=int, default=2, help="Alternating on/off rounds per lever; the "
                        "best of them counts, as other processes may share the machine (default 2).")  # fmt: skip
    parser.add_argument("--skip-bf16", action="store_true", help="Skip the bf16 lever (about 30x slower on CPU).")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")
    if args.lever_steps is None:
        args.lever_steps = max(3, args.steps // 2)
    return args


def math_differences(cfg: Config, precision: str) -> list[str]:
    """How our run's math differs from the reference's (empty: the ratio compares identical math).

    The reference takes the WGAN-div penalty on the real and fake samples, with our k, p and loss.every, in fp32.
    Layouts, kernels and the rest of the levers are not math: they are what the ratio is meant to measure.
    """
    differences = []
    if cfg.loss.name != "wgan-div":
        differences.append(f"ours is {cfg.loss.name}, the reference WGAN-div")
    if cfg.loss.r != "real-and-fake":
        differences.append(f"ours takes the penalty at loss.r={cfg.loss.r}, the reference at the real and fake samples")
    if precision in ("bf16", "fp16"):
        differences.append(f"ours runs in {precision}, the reference in fp32")
    if cfg.augment.policy:
        policy = ", ".join(cfg.augment.policy)
        differences.append(f"ours augments the critic's inputs ({policy}), the reference does not")
    return differences


def benchmark(args: argparse.Namespace) -> dict:
    """Everything bench_step.py measures, as one dict (the JSON it prints)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_step_") as run_dir:
        trainer = build_trainer(args.config, args.overrides, Path(run_dir) / "run")
        cfg, device = trainer.cfg, trainer.device
        weights = initial_weights(trainer)
        name, precision = device_name(device), precision_of(cfg, device)
        result = {
            "config": str(args.config),
            "overrides": list(args.overrides),
            "device": device.type,
            "device_name": name,
            "precision": precision,
            "batch_size": cfg.train.batch_size,
            "n_critic": cfg.train.n_critic,
            "loss_every": cfg.loss.every,
            "reference_loss_every": None if args.no_reference else cfg.loss.every,
            "math_differences": math_differences(cfg, precision),
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "torch_version": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
        }
        loop = TrainerLoop(trainer)
        reference = None if args.no_reference else ReferenceRunner(trainer, weights)
        loop.run(args.warmup)
        if reference is not None:
            reference.run(args.warmup)
        result.update(throughput_rounds(loop, reference, args.steps, args.rounds))
        result["like_for_like"] = None if reference is None else not result["math_differences"]
        result.update(measure_breakdown(loop, args.steps))
        peak = peak_tflops(name, precision, args.peak_tflops)
        achieved = None if result["flops_per_image"] is None else result["flops_per_image"] * result["img_per_s"]
        result["peak_tflops"] = peak
        result["achieved_tflops"] = None if achieved is None else achieved / 1e12
        result["mfu"] = None if achieved is None or peak is None else achieved / (peak * 1e12)
        result.update(reference_flops_per_image=None, reference_peak_memory_mib=None, flops_ratio=None)
        if reference is not None:
            result.update(reference.measure())
            if result["flops_per_image"] and result["reference_flops_per_image"]:
                result["flops_ratio"] = result["reference_flops_per_image"] / result["flops_per_image"]
        del trainer, loop, reference
        release_memory(device)
        if args.levers:
            from benchmarks import levers

            result["levers"] = levers.run_levers(args, Path(run_dir), device)
    result["wall_s"] = time.perf_counter() - started
    return result


def _fmt(value, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def summary(result: dict) -> str:
    """The human-readable report."""
    r = result
    gflop = lambda key: r[key] and r[key] / 1e9  # noqa: E731
    if r["like_for_like"] is None:
        math = "n/a"
    elif r["like_for_like"]:
        math = "identical math: same models, data, batch, loss.r and loss.every"
    else:
        math = "NOT like for like: " + "; ".join(r["math_differences"])
    lines = [
        f"bench_step: {r['config']} {' '.join(r['overrides'])}".rstrip(),
        f"  device      {r['device']} ({r['device_name']}), {r['precision']}, torch {r['torch_version']}",
        f"  run         batch {r['batch_size']}, n_critic {r['n_critic']}, loss.every {r['loss_every']}; best of "
        f"{r['rounds']} rounds of {r['steps']} iterations after {r['warmup']} warm-up",
        f"  ours        {_fmt(r['img_per_s'])} real img/s, {_fmt(r['iteration_ms'])} ms per iteration",
        f"  reference   {_fmt(r['reference_img_per_s'])} real img/s, {_fmt(r['reference_iteration_ms'])} ms per "
        f"iteration",
        f"  ratio       {_fmt(r['ratio'], 'x', 2)} (ours / reference; {math})",
        f"  FLOPs ratio the reference does {_fmt(r['flops_ratio'], 'x', 2)} our FLOPs per image",
        f"  critic step {_fmt(r['critic_step_ms'], '', 2)} ms; penalised {_fmt(r['critic_step_penalised_ms'], '', 2)} "
        f"vs no penalty {_fmt(r['critic_step_no_penalty_ms'], '', 2)} ms: x{_fmt(r['penalty_cost_ratio'], '', 2)}",
        f"  G step      {_fmt(r['generator_step_ms'], ' ms', 2)}; data {_fmt(r['data_ms'], ' ms', 2)} per batch; "
        f"EMA + control {_fmt(r['ema_and_control_ms'], ' ms', 2)} per iteration",
        f"  FLOPs       {_fmt(gflop('flops_per_image'), '', 3)} GFLOP per real image (reference "
        f"{_fmt(gflop('reference_flops_per_image'), '', 3)}); {_fmt(r['achieved_tflops'], '', 3)} TFLOP/s achieved; "
        f"MFU {_fmt(r['mfu'] and 100 * r['mfu'], '%', 2)} of {_fmt(r['peak_tflops'])} TFLOP/s peak",
        f"  memory      {_fmt(r['peak_memory_mib'])} MiB ({r['peak_memory_kind']})",
    ]
    if "levers" in r:
        from benchmarks.levers import lever_table

        lines += ["", lever_table(r["levers"])]
    lines.append(f"  took {r['wall_s']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # With --json, stdout carries the JSON object only: anything the trainer or libraries print goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = benchmark(args)
    print(json.dumps(result, indent=2) if args.json else summary(result), flush=True)
    return 0


if __name__ == "__main__":
    # Run the package's copy of this module (benchmarks.bench_step), the one levers.py imports, so that both
    # share one set of classes and functions.
    from benchmarks import bench_step

    sys.exit(bench_step.main())
