"""Each speed lever of our trainer measured on and off in one process (`bench_step.py --levers`).

A lever is a choice the trainer makes for speed. "on" is what the trainer does (or the faster setting), "off" the
alternative; both sides are measured as real images per second over whole iterations (TrainerLoop.throughput of
bench_step.py), and speedup = on / off. Step variants are subclasses of TrainingSteps defined here; the product
code is never edited.

    a  no penalty graph through G: fakes generated without a graph   vs  fakes with G's graph, not detached
    b  one concatenated critic forward on [real; fake (; points)]    vs  separate forwards and input gradients
    c  fused Adam (skips a non-finite step on the device)            vs  foreach Adam (+ the host read the guard
                                                                         then needs, as the product does it)
    d  no host synchronisation inside a step                         vs  a forced `.item()` after every step
    e  lazy penalty, loss.every=max(config's, 2)                    vs  loss.every=1
    f  bf16 autocast (train.mixed_precision=bf16)                    vs  fp32 (~30x slower on CPUs without AMX or
                                                                         AVX-512 BF16: measured briefly there)
    g  uint8 data set resident on the GPU (data.on_device=yes)       vs  DataLoader workers, pinned memory (CUDA)
    h  channels_last (train.channels_last)                           vs  contiguous (CPU and CUDA)
    i  TF32 matmuls and convolutions (train.tf32)                    vs  full fp32 (CUDA)
    j  torch.compile of G (train.compile_g)                          vs  eager G (CUDA)
    k  cudnn.benchmark (set by the trainer)                          vs  off (CUDA)
    l  torch.compile of D for steps without a penalty                vs  eager D (CPU and CUDA; both sides with
       (train.compile_d)                                                 loss.every=max(config's, 2))

Levers a-e and k share one Trainer and alternate on/off for --lever-rounds rounds (the best round counts: other
processes may share the machine); f-j and l build one Trainer per side, as their settings are fixed at build time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from benchmarks.bench_step import TrainerLoop, build_trainer, release_memory
from trainer import losses
from trainer.data import ArraySource, open_source
from trainer.loop import Trainer
from trainer.steps import StepResult, TrainingSteps

NEEDS_CUDA = "skipped: needs CUDA"


# --------------------------------------------------------------------------------------------------------------
# Step variants (the "off" sides of levers a, b and d).


class _GradEnabled:
    """Calls G with gradients enabled even inside the critic step's `torch.no_grad()`: the fake keeps G's graph."""

    def __init__(self, generator: torch.nn.Module):
        self.generator = generator

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return self.generator(z)


class FakesWithGrad(TrainingSteps):
    """Lever a, off: the product's critic step, but the fakes carry G's graph (not detached), as in the reference.

    The penalty's double backward and the adversarial backward then run through G as well; G's gradients are
    thrown away afterwards, as the reference's `optimizer_G.zero_grad()` does.
    """

    def critic_step(self, real: torch.Tensor, step: int, measure: bool = False) -> StepResult:
        product_nets = self.nets
        self.nets = dataclasses.replace(product_nets, generator_core=_GradEnabled(product_nets.generator))
        try:
            result = super().critic_step(real, step, measure)
        finally:
            self.nets = product_nets
        self.opt_g.zero_grad(set_to_none=True)
        return result


class SeparateForwards(TrainingSteps):
    """Lever b, off: the critic step with one critic forward per group (real, fake, extra penalty points) and one
    input gradient per penalised group, instead of one forward and one `autograd.grad` over the concatenation.

    Same losses and update as the product step. One process only: several forwards of a DDP-wrapped critic before
    one backward are not what DDP supports.
    """

    # The groups whose input gradient the penalty takes; any other site penalises the extra points.
    SITES: ClassVar[dict[str, tuple[str, ...]]] = {
        "real-and-fake": ("real", "fake"),
        "real": ("real",),
        "fake": ("fake",),
    }

    def critic_step(self, real: torch.Tensor, step: int, measure: bool = False) -> StepResult:
        cfg = self.loss_cfg
        with torch.no_grad():
            fake = self.nets.generator_core(self.latents("critic_z", step)).float()
        groups, penalised = {"real": real, "fake": fake}, ()
        if step % cfg.every == 0:
            draw = losses.draw_penalty_points(
                cfg.r, self.global_batch, self.streams.get("penalty", step, self.device), self.device
            )
            pool = torch.cat([real, fake]) if cfg.r in losses.PAIRED_SITES else None  # one process: global batch
            extra = losses.penalty_points(cfg.r, real, fake, draw, self.rows, pool)
            if extra is not None:
                groups["extra"] = extra
            penalised = self.SITES.get(cfg.r, ("extra",))
        inputs = {
            name: x.contiguous(memory_format=self.memory_format).detach().requires_grad_(name in penalised)
            for name, x in groups.items()
        }
        outputs = {name: self.nets.critic(x) for name, x in inputs.items()}  # separate forwards
        loss = losses.critic_adversarial_loss(outputs["real"], outputs["fake"])
        stats = {"loss/critic_adversarial": loss.detach()}
        if penalised:
            grads = [losses.input_gradient(outputs[name], inputs[name], self.loss_scale()) for name in penalised]
            penalty = losses.gradient_penalty(torch.cat(grads), cfg.name, cfg.penalty_weight() * cfg.every, cfg.p)
            loss = loss + penalty
            stats["loss/penalty"] = penalty.detach()
        stats["loss/critic"] = loss.detach()
        self.accelerator.backward(loss)
        return StepResult(stats, self._update(self.opt_d, self.nets.critic_core, measure, "grad_norm/D", stats))


class HostReadEveryStep(TrainingSteps):
    """Lever d, off: a `.item()` of the loss after every step, as loops that print or log every step do.

    On CUDA each read waits until the step has finished, so the host stops queueing work ahead of the GPU.
    """

    def critic_step(self, real: torch.Tensor, step: int, measure: bool = False) -> StepResult:
        result = super().critic_step(real, step, measure)
        result.stats["loss/critic"].item()
        return result

    def generator_step(self, iteration: int, measure: bool = False) -> StepResult:
        result = super().generator_step(iteration, measure)
        result.stats["loss/generator"].item()
        return result


def clone_steps(steps: TrainingSteps, cls: type[TrainingSteps] = TrainingSteps, **changes) -> TrainingSteps:
    """A `cls` over the same nets, optimizers, accelerator and streams as `steps`, with `changes` applied."""
    kwargs = {
        "nets": steps.nets,
        "opt_g": steps.opt_g,
        "opt_d": steps.opt_d,
        "accelerator": steps.accelerator,
        "loss_cfg": steps.loss_cfg,
        "streams": steps.streams,
        "global_batch": steps.global_batch,
        "rows": steps.rows,
        "z_dim": steps.z_dim,
        "channels_last": steps.memory_format == torch.channels_last,
    }
    kwargs.update(changes)
    return cls(**kwargs)


def foreach_adam(trainer: Trainer) -> dict:
    """Lever c, off: Adam with foreach=True (same hyper-parameters, fresh state) for G and D, prepared alike."""
    train = trainer.cfg.train

    def make(module: torch.nn.Module, lr: float):
        adam = torch.optim.Adam(module.parameters(), lr=lr, betas=tuple(train.betas), eps=train.adam_eps, foreach=True)
        return trainer.accelerator.prepare_optimizer(adam, device_placement=False)

    return {"opt_g": make(trainer.nets.generator_core, train.lr_g), "opt_d": make(trainer.nets.critic_core, train.lr_d)}


# --------------------------------------------------------------------------------------------------------------
# Measuring.


@dataclasses.dataclass
class Plan:
    """How long each side is measured."""

    iterations: int  # timed iterations per measurement
    warmup: int  # untimed iterations before each measurement on a freshly built Trainer
    rounds: int  # measurements per side; the best counts
    device: torch.device


def row(key: str, name: str, on: str, off: str, rates: tuple[float, float] | None, status: str = "measured") -> dict:
    on_rate, off_rate = rates or (None, None)
    speedup = on_rate / off_rate if rates else None
    return {"lever": key, "name": name, "on": on, "off": off, "on_img_per_s": on_rate, "off_img_per_s": off_rate,
            "speedup": speedup, "status": status}  # fmt: skip


@contextlib.contextmanager
def swapped_steps(trainer: Trainer, steps: TrainingSteps) -> Iterator[None]:
    saved, trainer.steps = trainer.steps, steps
    try:
        yield
    finally:
        trainer.steps = saved


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    saved, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def alternate(loop: TrainerLoop, on: Callable, off: Callable, plan: Plan) -> tuple[float, float]:
    """(on, off) img/s on one warm Trainer: sides alternate each round, each after a 1-iteration warm-up (the
    switch may allocate optimizer state or pick new kernels); the best round of each side counts."""
    best = {"on": 0.0, "off": 0.0}
    for _ in range(plan.rounds):
        for side, setting in (("on", on), ("off", off)):
            with setting():
                best[side] = max(best[side], loop.throughput(plan.iterations, warmup=1))
    return best["on"], best["off"]


def built_rate(args: argparse.Namespace, run_dir: Path, overrides: list[str], plan: Plan, warmup: int) -> float:
    """img/s of a Trainer built from the config with `overrides` added (the best of plan.rounds), then freed."""
    rate = _best_rate(build_trainer(args.config, [*args.overrides, *overrides], run_dir), plan, warmup)
    release_memory(plan.device)  # the Trainer is unreachable once _best_rate returns
    return rate


def _best_rate(trainer: Trainer, plan: Plan, warmup: int) -> float:
    loop = TrainerLoop(trainer)
    return max(loop.throughput(plan.iterations, warmup if i == 0 else 1) for i in range(plan.rounds))


def built_pair(args, run_dir: Path, on: list[str], off: list[str], plan: Plan, warmup: int | None = None):
    warmup = plan.warmup if warmup is None else warmup
    return built_rate(args, run_dir / "on", on, plan, warmup), built_rate(args, run_dir / "off", off, plan, warmup)


# --------------------------------------------------------------------------------------------------------------
# Lever g's data: the same images as a folder of PNGs (for workers) and as an array (for the GPU).


def data_sources(trainer_cfg, work_dir: Path, limit: int) -> tuple[str, str]:
    """(array source, folder source) holding the config's images, building whichever the config lacks.

    At most `limit` images are written; batches wrap around epochs sooner, which does not change the speed.
    """
    data = trainer_cfg.data
    source = open_source(data.source, data.resolution, data.channels)
    if isinstance(source, ArraySource):
        images = source.images[:limit].cpu().numpy()
        folder = work_dir / "png"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{i:06d}.png", compress_level=1)
        return data.source, str(folder)
    array = work_dir / "images.npy"
    np.save(array, source[list(range(min(limit, len(source))))].numpy())
    return str(array), data.source


# --------------------------------------------------------------------------------------------------------------
# The levers.


def measured(key: str, name: str, on: str, off: str, measure: Callable[[], tuple[float, float]]) -> dict:
    """One lever's row; a lever that fails is reported as failed rather than losing the whole benchmark."""
    try:
        return row(key, name, on, off, measure())
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return row(key, name, on, off, None, f"failed: {type(error).__name__}: {message}")


def shared_trainer_levers(args: argparse.Namespace, run_dir: Path, plan: Plan) -> list[dict]:
    """Levers a-e and k, on one Trainer built from the config (freed afterwards)."""
    rows = _shared_levers(build_trainer(args.config, args.overrides, run_dir), plan)
    release_memory(plan.device)
    return rows


def _shared_levers(trainer: Trainer, plan: Plan) -> list[dict]:
    loop, steps, cfg = TrainerLoop(trainer), trainer.steps, trainer.cfg
    loop.run(plan.warmup)
    product = contextlib.nullcontext

    def variant(cls: type[TrainingSteps] = TrainingSteps, **changes) -> Callable:
        return lambda: swapped_steps(trainer, clone_steps(steps, cls, **changes))

    def every(n: int) -> Callable:
        return variant(loss_cfg=dataclasses.replace(cfg.loss, every=n))

    def versus(on: Callable, off: Callable) -> Callable[[], tuple[float, float]]:
        return lambda: alternate(loop, on, off, plan)

    rows = [
        measured("a", "no penalty graph through G", "fakes without a graph (ours)", "fakes with G's graph "
                 "(reference)", versus(product, variant(FakesWithGrad))),
        measured("b", "one concatenated critic forward", "one forward on [real; fake] (ours)",
                 "separate forwards and input gradients", versus(product, variant(SeparateForwards))),
        measured("c", "fused Adam", "fused, skips on the device (ours)", "foreach, skip decided on the host",
                 lambda: versus(product, variant(**foreach_adam(trainer)))()),
        measured("d", "no host sync inside a step", "no host read (ours)", "a .item() after every step",
                 versus(product, variant(HostReadEveryStep))),
        measured("e", "lazy penalty", f"loss.every={max(cfg.loss.every, 2)}", "loss.every=1",
                 versus(every(max(cfg.loss.every, 2)), every(1))),
    ]  # fmt: skip
    if trainer.device.type == "cuda":
        rows.append(measured("k", "cudnn.benchmark", "on (ours)", "off",
                             versus(lambda: cudnn_benchmark(True), lambda: cudnn_benchmark(False))))  # fmt: skip
    else:
        rows.append(row("k", "cudnn.benchmark", "on (ours)", "off", None, NEEDS_CUDA))
    return rows


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX-512 BF16), by /proc/cpuinfo (Linux only)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def built_levers(args: argparse.Namespace, run_dir: Path, plan: Plan) -> list[dict]:
    """Levers f-j and l, each side on its own freshly built Trainer."""
    cuda = plan.device.type == "cuda"
    rows = []
    if args.skip_bf16:
        rows.append(row("f", "bf16 autocast", "bf16", "fp32", None, "skipped: --skip-bf16"))
    else:
        # A CPU without bf16 instructions runs bf16 ~30x slower: measure it once, briefly, there.
        fast = cuda or cpu_has_bf16()
        short = plan if fast else dataclasses.replace(plan, iterations=min(plan.iterations, 2), rounds=1)
        bf16, fp32 = ["train.mixed_precision=bf16"], ["train.mixed_precision=no"]
        warmup = plan.warmup if fast else 1
        rows.append(measured("f", "bf16 autocast", "bf16", "fp32",
                             lambda: built_pair(args, run_dir / "f", bf16, fp32, short, warmup)))  # fmt: skip
    if cuda:
        cfg = build_cfg(args, run_dir)
        workers = cfg.data.workers or 4
        rows.append(measured("g", "GPU-resident data", "uint8 on the GPU", f"{workers} workers, pinned memory",
                             lambda: data_lever(args, cfg, run_dir / "g", workers, plan)))  # fmt: skip
        for key, name, setting, warmup in (
            ("i", "TF32", "train.tf32", plan.warmup),
            ("j", "torch.compile of G", "train.compile_g", max(plan.warmup, 3)),  # the first calls compile
        ):
            on, off = [f"{setting}=true"], [f"{setting}=false"]
            rows.append(measured(key, name, "on", "off",
                                 lambda on=on, off=off, key=key, warmup=warmup: built_pair(
                                     args, run_dir / key, on, off, plan, warmup)))  # fmt: skip
    else:
        rows.append(row("g", "GPU-resident data", "uint8 on the GPU", "DataLoader workers, pinned", None, NEEDS_CUDA))
        for key, name in (("i", "TF32"), ("j", "torch.compile of G")):
            rows.append(row(key, name, "on", "off", None, NEEDS_CUDA))
    # channels_last speeds up oneDNN's CPU convolutions too, so it is measured everywhere.
    on, off = ["train.channels_last=true"], ["train.channels_last=false"]
    rows.append(measured("h", "channels_last", "on", "off",
                         lambda: built_pair(args, run_dir / "h", on, off, plan, plan.warmup)))  # fmt: skip
    # Inductor also writes C++ kernels for the CPU, so compiling D is measured everywhere.
    rows.append(measured("l", "torch.compile of D, no penalty", "on", "off",
                         lambda: compile_d_lever(args, run_dir / "l", plan)))  # fmt: skip
    return sorted(rows, key=lambda r: r["lever"])


def compile_d_lever(args: argparse.Namespace, run_dir: Path, plan: Plan) -> tuple[float, float]:
    """Lever l: the critic steps without a penalty through a compiled D vs eager D. Both sides take the penalty
    every max(loss.every, 2) steps, so that there are such steps; the penalty steps are eager on both."""
    every = f"loss.every={max(build_cfg(args, run_dir).loss.every, 2)}"
    on, off = [every, "train.compile_d=true"], [every, "train.compile_d=false"]
    return built_pair(args, run_dir, on, off, plan, max(plan.warmup, 3))  # the first unpenalised steps compile


def data_lever(args: argparse.Namespace, cfg, work_dir: Path, workers: int, plan: Plan) -> tuple[float, float]:
    """Lever g: the same images as an array kept on the GPU vs a folder of PNGs decoded by DataLoader workers."""
    array, folder = data_sources(cfg, work_dir, limit=max(8 * cfg.train.batch_size, 4096))
    on = [f"data.source={array}", "data.on_device=yes"]
    off = [f"data.source={folder}", "data.on_device=no", f"data.workers={workers}"]
    return built_pair(args, work_dir, on, off, plan)


def build_cfg(args: argparse.Namespace, run_dir: Path):
    from trainer.config import load_config

    return load_config(args.config, [*args.overrides, f"run.dir={run_dir}"])


def run_levers(args: argparse.Namespace, work_dir: Path, device: torch.device) -> list[dict]:
    """All levers as rows {lever, name, on, off, on_img_per_s, off_img_per_s, speedup, status}, sorted a-l.

    `device` is the one the trainer runs on (bench_step's main measurement found it).
    """
    plan = Plan(iterations=args.lever_steps, warmup=args.warmup, rounds=max(1, args.lever_rounds), device=device)
    rows = shared_trainer_levers(args, work_dir / "levers_shared", plan)
    rows += built_levers(args, work_dir / "levers_built", plan)
    return sorted(rows, key=lambda r: r["lever"])


def lever_table(rows: list[dict]) -> str:
    """The lever table: lever, on img/s, off img/s, speedup (on / off), status."""

    def number(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [f"  {'lever':<36} {'on img/s':>10} {'off img/s':>10} {'speedup':>8}  status / on vs off"]
    for r in rows:
        detail = r["status"] if r["status"] != "measured" else f"{r['on']} vs {r['off']}"
        rates = f"{number(r['on_img_per_s'], ',.1f'):>10} {number(r['off_img_per_s'], ',.1f'):>10}"
        lines.append(f"  {r['lever'] + ' ' + r['name']:<36} {rates} {number(r['speedup'], '.2f'):>8}  {detail}")
    return "\n".join(lines)
