"""How cost grows past one machine: what DDP all-reduces per step, what that costs on 2 CPU processes, and a
model of N GPUs on NVLink, InfiniBand and 10 GbE.

    python benchmarks/scaling.py [--configs configs/demo.yaml,configs/mnist32.yaml,configs/ffhq64.yaml]
        [dotted.key=value ...] [--steps N] [--warmup W] [--no-timing] [--json] [--out DIR]

Per config it reports:

- sizes (at the config's true sizes, plus any overrides given on the command line): D's and G's parameter
  counts and their fp32 gradient bytes, 4 x parameters, which is what DDP all-reduces (under bf16/fp16 autocast the
  parameters and so the gradients stay fp32); the DDP buckets of each, in reduction order, both as computed here
  from the parameter sizes the way DDP's reducer assigns them (parameters in reverse registration order; the first
  bucket closes at 1 MiB, the others at 25 MiB, a bucket closing once it reaches its cap) and as read from a real
  DDP reducer after its bucket rebuild (a 1-process gloo group, 3 forward/backward passes); so the bytes
  all-reduced per critic step (D's gradients, exactly once: see trainer/steps.py) and per generator step (G's);
- timing (unless --no-timing): the trainer's own iterations (`Trainer.train_iteration`, as bench_step.py runs them)
  on 1 process at the global batch B, on 1 process at B/2, and on 2 real gloo processes (torchrun --standalone,
  world size asserted) at the same global batch B, each process with one thread (OMP_NUM_THREADS=1): one process
  stands for one GPU. Critic and generator step times, the time inside their DDP backward, the iteration, and a
  bare all-reduce of D's and G's gradient sizes on the 2 processes. From these: speedup = t1(B) / t2(B),
  efficiency = speedup / 2, and the measured communication cost per step = t2(B) - t1(B/2) (the all-reduce as
  exposed, plus any wait for the slower process). ffhq64 is timed at a reduced size (TIMING_OVERRIDES: 32 px, width
  16, MNIST as 3-channel data): its byte counts are at the true size;
- model: predicted img/s and efficiency of ffhq64 on 1, 8, 32 and 64 GPUs at global batch 64 and 512, for
  NVLink, InfiniBand and 10 GbE (see `predict`, whose assumptions the README section states). The single-GPU
  anchor is an input (`--anchor FILE`: a bench_step.py --json output on ffhq64); the default is the H100 figures
  measured with bench_step.py (ANCHORS). The model's sizes come from --model-config (ffhq64), with the command
  line's overrides when that config is also among --configs (the smoke test's tiny sizes), at its true size
  otherwise.

--json prints one JSON object; --out DIR writes DIR/scaling.json and DIR/scaling.md (the tables).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository (trainer, models, benchmarks) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
FIRST_BUCKET_BYTES = 1 * MIB  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
BUCKET_BYTES = 25 * MIB  # DDP's default bucket_cap_mb = 25
DEFAULT_CONFIGS = "configs/demo.yaml,configs/mnist32.yaml,configs/ffhq64.yaml"

# Timing at a size a 2-core CPU runs in seconds; the byte counts never use these.
TIMING_OVERRIDES = {
    "ffhq64": ["data.source=bundled:mnist", "data.resolution=32", "model.width=16"],
}
# Every timed run: no W&B, no evaluation, no checkpoints, no sample grids.
QUIET = ["log.wandb.mode=disabled", "eval.every=0", "checkpoint.every=1000000000", "log.samples_every=1000000000"]

# Bus bandwidth (NCCL's busbw: the per-GPU rate at which a ring all-reduce moves 2 (N-1)/N x bytes), bytes/s.
NVLINK = 450e9  # within a node of 8 H100s (NVLink 4, about 450 GB/s of the 900 GB/s bidirectional)
LINKS = {"nvlink": NVLINK, "infiniband": 50e9, "10gbe": 1.25e9}  # across nodes: 400 Gb/s IB, 10 GbE per node
INTER_NODE = ("infiniband", "10gbe")
GPUS_PER_NODE = 8
GPU_COUNTS = (1, 8, 32, 64)
MODEL_BATCHES = (64, 512)


@dataclass(frozen=True)
class Anchor:
    """One GPU's measured iteration on the ffhq64 models: the input of the model."""

    name: str
    device: str
    batch: int
    n_critic: int
    iteration_ms: float
    critic_share: float  # fraction of the iteration spent in critic steps (the rest: generator step, EMA, control)


# Measured with benchmarks/bench_step.py on an NVIDIA H100 80GB HBM3, configs/ffhq64.yaml (batch 64, n_critic 4,
# loss.every 1): bf16 iteration 280.8 ms (911 img/s), critic step (penalty) 69.3 ms, generator step 22.2 ms;
# fp32 (TF32) iteration 430.3 ms (595 img/s), no per-phase figures: the bf16 split is assumed.
H100_BF16_CRITIC_MS, H100_BF16_GENERATOR_MS = 69.3, 22.2
H100_CRITIC_SHARE = 4 * H100_BF16_CRITIC_MS / (4 * H100_BF16_CRITIC_MS + H100_BF16_GENERATOR_MS)
ANCHORS = (
    Anchor("bf16", "NVIDIA H100 80GB HBM3", 64, 4, 280.8, H100_CRITIC_SHARE),
    Anchor("fp32 (tf32)", "NVIDIA H100 80GB HBM3", 64, 4, 430.3, H100_CRITIC_SHARE),
)


# --------------------------------------------------------------------------------------------------------------
# What DDP all-reduces.


def parameter_bytes(module) -> list[int]:
    """fp32 gradient bytes of each trainable parameter, in registration order."""
    return [4 * p.numel() for p in module.parameters() if p.requires_grad]


def ddp_buckets(sizes: list[int], first_cap: int = FIRST_BUCKET_BYTES, cap: int = BUCKET_BYTES) -> list[int]:
    """Bucket byte sizes in reduction order, as DDP's reducer assigns them after its rebuild.

    Parameters are taken in reverse registration order (about the order their gradients become ready); a bucket
    takes parameters until it holds at least its cap (the first bucket's cap is 1 MiB, the others' 25 MiB), so a
    parameter larger than a cap gets a bucket of its own (shared with the small ones before it).
    """
    buckets, current = [], 0
    for size in reversed(sizes):
        current += size
        if current >= (first_cap if not buckets else cap):
            buckets.append(current)
            current = 0
    if current:
        buckets.append(current)
    return buckets


def reducer_buckets(module, loss_of, inputs_of, passes: int = 3) -> list[int]:
    """Bucket byte sizes of a real DDP reducer (1-process gloo group) after `passes` forward/backward passes.

    DDP (find_unused_parameters=False) starts with one bucket and rebuilds them in the order the gradients became
    ready during the first backward; the rebuild takes effect at the second forward.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with warnings.catch_warnings():  # torch 2.14's notice about broadcast_buffers (see trainer/distributed.py)
            warnings.simplefilter("ignore", FutureWarning)
            ddp = DistributedDataParallel(module, broadcast_buffers=False)
        for _ in range(passes):
            loss_of(ddp(inputs_of())).backward()
        data = ddp._get_ddp_logging_data()
        text = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes", "")
        return [int(x) for x in str(text).split(",") if x.strip()]
    finally:
        if owned:
            dist.destroy_process_group()


def sizes_of(config: str, overrides: list[str], real_reducer: bool = True) -> dict:
    """Parameters, gradient bytes and DDP buckets of D and G at the config's sizes (plus `overrides`)."""
    import torch

    from models import models_from_config
    from trainer.config import load_config

    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    generator, critic = models_from_config(cfg)
    out = {}
    for name, module in (("D", critic), ("G", generator)):
        sizes = parameter_bytes(module)
        entry = {
            "parameters": sum(sizes) // 4,
            "gradient_bytes": sum(sizes),
            "buckets_computed": ddp_buckets(sizes),
        }
        if real_reducer:
            if name == "D":
                shape = (1, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
                entry["buckets_reducer"] = reducer_buckets(module, lambda y: y.mean(), lambda s=shape: torch.randn(s))
            else:
                shape = (2, cfg.model.z_dim)
                entry["buckets_reducer"] = reducer_buckets(
                    module, lambda y: y.square().mean(), lambda s=shape: torch.randn(s)
                )
        buckets = entry.get("buckets_reducer") or entry["buckets_computed"]
        entry["bucket_count"] = len(buckets)
        out[name] = entry
    out["bytes_per_critic_step"] = out["D"]["gradient_bytes"]
    out["bytes_per_generator_step"] = out["G"]["gradient_bytes"]
    out["bytes_per_iteration"] = cfg.train.n_critic * out["D"]["gradient_bytes"] + out["G"]["gradient_bytes"]
    out["n_critic"] = cfg.train.n_critic
    out["batch_size"] = cfg.train.batch_size
    return out


# --------------------------------------------------------------------------------------------------------------
# The model.


def ring_allreduce_seconds(nbytes: float, n: int, bus_bandwidth: float) -> float:
    """A ring all-reduce of `nbytes` over `n` ranks: each rank sends and receives 2 (n-1)/n x nbytes."""
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / bus_bandwidth


def bus_bandwidth(n: int, inter_node: str, gpus_per_node: int = GPUS_PER_NODE) -> float:
    """NVLink within one node; across nodes the ring crosses the slower link, which then sets the pace."""
    return LINKS["nvlink"] if n <= gpus_per_node else LINKS[inter_node]


def exposed_seconds(buckets: list[int], n: int, bandwidth: float, overlap_window_s: float) -> float:
    """Communication the step waits for: every bucket but the last may hide under `overlap_window_s` of backward;
    the last bucket (the first layers' gradients, ready only when the backward ends) never does."""
    if n <= 1 or not buckets:
        return 0.0
    times = [ring_allreduce_seconds(b, n, bandwidth) for b in buckets]
    return max(0.0, sum(times[:-1]) - overlap_window_s) + times[-1]


def compute_seconds(anchor_s: float, anchor_batch: int, per_gpu_batch: float, floor_batch: float) -> float:
    """Compute time at a per-GPU batch: linear in the batch, but never below the time of `floor_batch` samples
    (a GPU at tiny batches is bound by kernel launches, not FLOPs)."""
    return anchor_s * max(per_gpu_batch, floor_batch) / anchor_batch


def predict(
    anchor: Anchor,
    d_buckets: list[int],
    g_buckets: list[int],
    global_batch: int,
    n: int,
    inter_node: str = "infiniband",
    floor_batch: float = 8,
    critic_overlap: float = 0.6,
    generator_overlap: float = 0.25,
) -> dict:
    """Predicted iteration time, img/s and efficiency of `n` GPUs at a fixed global batch.

    Each GPU computes global_batch / n samples (`compute_seconds`); per critic step D's buckets, per generator step
    G's, are all-reduced (`ring_allreduce_seconds` at `bus_bandwidth`), overlapping with the part of the step in
    which DDP's hooks fire: `critic_overlap` of the critic step (the final backward, after the penalty's
    autograd.grad) and `generator_overlap` of the generator step (G's part of the backward, after D's).
    Efficiency = iteration(1 GPU) / (n x iteration(n GPUs)), both at the same global batch.
    """

    def iteration(count: int) -> tuple[float, float, float]:
        per_gpu = global_batch / count
        iteration_s = anchor.iteration_ms / 1000
        critic = compute_seconds(
            iteration_s * anchor.critic_share / anchor.n_critic, anchor.batch, per_gpu, floor_batch
        )
        generator = compute_seconds(iteration_s * (1 - anchor.critic_share), anchor.batch, per_gpu, floor_batch)
        bandwidth = bus_bandwidth(count, inter_node)
        exposed_d = exposed_seconds(d_buckets, count, bandwidth, critic_overlap * critic)
        exposed_g = exposed_seconds(g_buckets, count, bandwidth, generator_overlap * generator)
        compute = anchor.n_critic * critic + generator
        return compute + anchor.n_critic * exposed_d + exposed_g, compute, anchor.n_critic * exposed_d + exposed_g

    one, _, _ = iteration(1)
    total, compute, exposed = iteration(n)
    return {
        "gpus": n,
        "global_batch": global_batch,
        "per_gpu_batch": global_batch / n,
        "inter_node": inter_node if n > GPUS_PER_NODE else "nvlink",
        "iteration_ms": 1000 * total,
        "compute_ms": 1000 * compute,
        "exposed_comm_ms": 1000 * exposed,
        "img_per_s": anchor.n_critic * global_batch / total,
        "efficiency": one / (n * total),
    }


def model_tables(
    sizes: dict, anchors, floor_batch: float, critic_overlap: float, generator_overlap: float
) -> list[dict]:
    """Predictions for every anchor, global batch, GPU count and inter-node link."""
    d_buckets = sizes["D"].get("buckets_reducer") or sizes["D"]["buckets_computed"]
    g_buckets = sizes["G"].get("buckets_reducer") or sizes["G"]["buckets_computed"]
    rows = []
    for anchor in anchors:
        for batch in MODEL_BATCHES:
            for n in GPU_COUNTS:
                for link in INTER_NODE:
                    row = predict(
                        anchor, d_buckets, g_buckets, batch, n, link, floor_batch, critic_overlap, generator_overlap
                    )
                    rows.append({"anchor": anchor.name, **row, "link": link})
    return rows


# --------------------------------------------------------------------------------------------------------------
# Timing on this CPU: 1 process vs 2 (gloo) at the same global batch.


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WGAN_DIV_INJECT_FAULT"):
        env.pop(key, None)
    return env


def run_worker(config: str, overrides: list[str], nproc: int, steps: int, warmup: int, timeout: float) -> dict:
    """One timing run; returns rank 0's figures.

    One process runs here, with one thread (importing torch and the trainer again would cost a subprocess 10-20 s);
    several run under `torchrun --standalone`, each with OMP_NUM_THREADS=1.
    """
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        overrides = [*overrides, f"run.dir={Path(tmp) / 'run'}", *QUIET]
        if nproc == 1:
            return one_process(config, overrides, steps, warmup)
        result = Path(tmp) / "result.json"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            str(Path(__file__).resolve()),
            "--worker",
            "--config",
            config,
            "--world",
            str(nproc),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--result",
            str(result),
            *overrides,
        ]
        done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not result.exists():
            raise RuntimeError(f"timing run failed ({' '.join(command)}):\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
        return json.loads(result.read_text())


def one_process(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """A 1-process timing run in this process, on one thread (as each process of a multi-process run has)."""
    import torch

    from benchmarks.bench_step import fresh_accelerator_state

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fresh_accelerator_state()
    try:
        return time_trainer(config, overrides, 1, steps, warmup)
    finally:
        fresh_accelerator_state()
        torch.set_num_threads(threads)


class BackwardClock:
    """Seconds spent inside `accelerator.backward` (where DDP's all-reduce hooks fire), per phase."""

    def __init__(self, accelerator):
        self.seconds: dict[str, float] = {}
        self.phase = None
        self.original = accelerator.backward

        def backward(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                if self.phase is not None:
                    self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + time.perf_counter() - start

        accelerator.backward = backward


def worker(args: argparse.Namespace) -> int:
    """Inside each process of a multi-process timing run: rank 0 writes the figures to args.result."""
    from accelerate.state import PartialState

    result = time_trainer(args.config, args.overrides, args.world, args.steps, args.warmup)
    if PartialState().is_main_process:
        Path(args.result).write_text(json.dumps(result))
    PartialState().wait_for_everyone()
    return 0


def time_trainer(config: str, overrides: list[str], world_size: int, steps: int, warmup: int) -> dict:
    """Build the Trainer, time `steps` iterations after `warmup`, and (on several processes) bare all-reduces."""
    import torch
    import torch.distributed as dist

    from benchmarks.bench_step import PhaseTimes, TrainerLoop
    from trainer.config import load_config
    from trainer.loop import Trainer

    cfg = load_config(config, overrides)
    trainer = Trainer(cfg)
    acc = trainer.accelerator
    world = dist.get_world_size() if dist.is_initialized() else 1
    if acc.num_processes != world_size or world != world_size:
        raise SystemExit(f"expected {world_size} processes, Accelerate has {acc.num_processes}, gloo {world}")
    loop, clock = TrainerLoop(trainer), BackwardClock(acc)
    loop.run(warmup)

    phases = PhaseTimes(trainer.device)

    @contextlib.contextmanager
    def phase(name: str):
        clock.phase = name
        with phases(name):
            yield
        clock.phase = None

    start = time.perf_counter()
    loop.run(steps, phase)
    iteration_s = (time.perf_counter() - start) / steps

    allreduce_ms = {}
    buckets = {}
    if world > 1:
        for name, module, wrapped in (
            ("D", trainer.nets.critic_core, trainer.nets.critic),
            ("G", trainer.generator_module, trainer.nets.generator),
        ):
            flat = torch.zeros(sum(p.numel() for p in module.parameters() if p.requires_grad))
            times = []
            for _ in range(6):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(flat)
                times.append(time.perf_counter() - t0)
            allreduce_ms[name] = 1000 * statistics.median(times[1:])
            data = wrapped._get_ddp_logging_data()
            text = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes", "")
            buckets[name] = [int(x) for x in str(text).split(",") if x.strip()]

    n_critic = cfg.train.n_critic
    result = {
        "processes": world,
        "batch_size": cfg.train.batch_size,
        "per_process_batch": cfg.train.batch_size // world,
        "n_critic": n_critic,
        "steps": steps,
        "iteration_ms": 1000 * iteration_s,
        "img_per_s": n_critic * cfg.train.batch_size / iteration_s,
        "critic_step_ms": phases.ms("critic_step"),
        "generator_step_ms": phases.ms("generator_step"),
        "critic_backward_ms": 1000 * clock.seconds.get("critic_step", 0.0) / max(phases.counts["critic_step"], 1),
        "generator_backward_ms": 1000
        * clock.seconds.get("generator_step", 0.0)
        / max(phases.counts["generator_step"], 1),
        "allreduce_ms": allreduce_ms or None,
        "timed_buckets": buckets or None,
        "parameters": {
            "D": sum(p.numel() for p in trainer.nets.critic_core.parameters()),
            "G": sum(p.numel() for p in trainer.generator_module.parameters()),
        },
    }
    return result


def timing_of(config: str, overrides: list[str], steps: int, warmup: int, timeout: float, rounds: int = 1) -> dict:
    """1 process at B, 1 process at B/2, 2 processes at B; the derived efficiency and communication cost.

    The three runs alternate for `rounds` rounds and each keeps its fastest round (the machine may be shared: a
    burst of load from another process should not decide the comparison).
    """
    from trainer.config import load_config

    batch = load_config(config, overrides).train.batch_size
    plans = {
        "one_process": (overrides, 1),
        "one_process_half_batch": ([*overrides, f"train.batch_size={batch // 2}"], 1),
        "two_processes": (overrides, 2),
    }
    runs: dict[str, dict] = {}
    for round_ in range(rounds):
        print(f"  timing {Path(config).stem}, round {round_ + 1}/{rounds}: 1 process at {batch} and {batch // 2}, "
              f"2 processes at {batch}", file=sys.stderr, flush=True)  # fmt: skip
        for key, (run_overrides, nproc) in plans.items():
            run = run_worker(config, run_overrides, nproc, steps, warmup, timeout)
            if key not in runs or run["iteration_ms"] < runs[key]["iteration_ms"]:
                runs[key] = run
    one, half, two = runs["one_process"], runs["one_process_half_batch"], runs["two_processes"]
    derived = {
        "speedup": one["iteration_ms"] / two["iteration_ms"],
        "efficiency": one["iteration_ms"] / (2 * two["iteration_ms"]),
        "critic_step_comm_ms": two["critic_step_ms"] - half["critic_step_ms"],
        "generator_step_comm_ms": two["generator_step_ms"] - half["generator_step_ms"],
        "iteration_comm_ms": two["iteration_ms"] - half["iteration_ms"],
        "half_batch_compute_ratio": half["iteration_ms"] / one["iteration_ms"],
    }
    allreduce = two.get("allreduce_ms") or {}
    if "D" in allreduce:  # 2 ranks: a ring moves 2 (N-1)/N = 1 x bytes per rank
        derived["gloo_bus_bandwidth_bytes_per_s"] = 4 * two["parameters"]["D"] / (allreduce["D"] / 1000)
    return {"overrides": overrides, "batch_size": batch, "rounds": rounds, **runs, "derived": derived}


# --------------------------------------------------------------------------------------------------------------
# Report.


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def markdown(result: dict) -> str:
    lines = ["## Bytes all-reduced (fp32 gradients, DDP buckets at bucket_cap_mb=25, first bucket 1 MiB)", ""]
    lines += [
        "| config | D params | D bytes / critic step | D buckets | G params | G bytes / generator step | "
        "G buckets | n_critic | bytes / iteration |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in result["configs"].items():
        s = entry["sizes"]
        d, g = s["D"], s["G"]
        lines.append(
            f"| {name} | {d['parameters']:,} | {_mb(d['gradient_bytes'])} | {d['bucket_count']} | "
            f"{g['parameters']:,} | {_mb(g['gradient_bytes'])} | {g['bucket_count']} | {s['n_critic']} | "
            f"{_mb(s['bytes_per_iteration'])} |"
        )
    timed = {k: v["timing"] for k, v in result["configs"].items() if v.get("timing")}
    if timed:
        lines += ["", "## Measured on this CPU: 1 process vs 2 gloo processes, same global batch, 1 thread each", ""]
        lines += [
            "| config (timed size) | batch | critic step 1p / 1p@B/2 / 2p (ms) | generator step (ms) | "
            "iteration (ms) | img/s 1p / 2p | speedup | efficiency | comm / critic step (ms) | "
            "bare all-reduce D / G (ms) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, t in timed.items():
            one, half, two, der = t["one_process"], t["one_process_half_batch"], t["two_processes"], t["derived"]
            ar, nan = two.get("allreduce_ms") or {}, float("nan")
            size = " ".join(t["overrides"]) or "true size"
            lines.append(
                f"| {name} ({size}) | {t['batch_size']} | {one['critic_step_ms']:.1f} / {half['critic_step_ms']:.1f}"
                f" / {two['critic_step_ms']:.1f} | {one['generator_step_ms']:.1f} / "
                f"{half['generator_step_ms']:.1f} / {two['generator_step_ms']:.1f} | {one['iteration_ms']:.0f} / "
                f"{half['iteration_ms']:.0f} / {two['iteration_ms']:.0f} | {one['img_per_s']:.0f} / "
                f"{two['img_per_s']:.0f} | {der['speedup']:.2f} | {der['efficiency']:.2f} | "
                f"{der['critic_step_comm_ms']:.1f} | {ar.get('D', nan):.2f} / {ar.get('G', nan):.2f} |"
            )
    model = result.get("model")
    if model:
        for anchor in model["anchors"]:
            lines += [
                "",
                f"## Predicted {model['name']}, {anchor['name']} ({anchor['device']}: {anchor['iteration_ms']} ms "
                f"per iteration at batch {anchor['batch']}): img/s (efficiency)",
                "",
            ]
            lines += [
                "| global batch | GPUs | per-GPU batch | compute (ms/iter) | NVLink, then InfiniBand: img/s "
                "(efficiency), exposed comm ms/iter | NVLink, then 10 GbE | efficiency with linear compute "
                "(no floor): IB / 10 GbE |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            for batch in MODEL_BATCHES:
                for n in GPU_COUNTS:
                    rows, linear = (
                        {
                            r["link"]: r
                            for r in model[key]
                            if r["anchor"] == anchor["name"] and r["global_batch"] == batch and r["gpus"] == n
                        }
                        for key in ("predictions", "predictions_linear_compute")
                    )
                    ib, eth = rows["infiniband"], rows["10gbe"]
                    lines.append(
                        f"| {batch} | {n} | {batch / n:g} | {ib['compute_ms']:.1f} | {ib['img_per_s']:,.0f} "
                        f"({ib['efficiency']:.2f}), {ib['exposed_comm_ms']:.1f} | {eth['img_per_s']:,.0f} "
                        f"({eth['efficiency']:.2f}), {eth['exposed_comm_ms']:.1f} | "
                        f"{linear['infiniband']['efficiency']:.2f} / {linear['10gbe']['efficiency']:.2f} |"
                    )
    return "\n".join(lines) + "\n"


def load_anchor(path: str) -> Anchor:
    """An anchor from a bench_step.py --json output (its iteration, critic and generator step times)."""
    data = json.loads(Path(path).read_text())
    n, critic, generator = data["n_critic"], data["critic_step_ms"], data["generator_step_ms"]
    return Anchor(
        data.get("precision", "measured"),
        data.get("device_name", "?"),
        data["batch_size"],
        n,
        data["iteration_ms"],
        n * critic / (n * critic + generator),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="Overrides for every config.")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="Comma-separated config files.")
    parser.add_argument("--steps", type=int, default=4, help="Measured iterations per timing run (default 4).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed iterations first (default 1).")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds of the three timing runs; each "
                        "keeps its fastest (default 2).")  # fmt: skip
    parser.add_argument("--no-timing", action="store_true", help="Sizes and the model only.")
    parser.add_argument("--full-size-timing", action="store_true", help="Time at the true sizes (slow for ffhq64).")
    parser.add_argument("--model-config", default="configs/ffhq64.yaml", help="Sizes the model uses (ffhq64).")
    parser.add_argument(
        "--anchor",
        action="append",
        default=None,
        help="bench_step.py --json output(s) to use as the single-GPU anchor (default: H100).",
    )
    parser.add_argument(
        "--floor-batch", type=float, default=8, help="Per-GPU batch below which compute stops shrinking (default 8)."
    )
    parser.add_argument(
        "--critic-overlap",
        type=float,
        default=0.6,
        help="Fraction of a critic step that can hide the all-reduce (its final backward; default 0.6).",
    )
    parser.add_argument(
        "--generator-overlap",
        type=float,
        default=0.25,
        help="Fraction of a generator step that can hide the all-reduce (G's backward; default 0.25).",
    )
    parser.add_argument("--timeout", type=float, default=600, help="Seconds per timing run.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of the tables.")
    parser.add_argument("--out", default=None, help="Write scaling.json and scaling.md into this folder.")
    # Internal: one process of a timing run.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.floor_batch <= 0:
        parser.error("--steps and --rounds must be at least 1, --warmup at least 0, --floor-batch positive")
    if not (0 <= args.critic_overlap <= 1 and 0 <= args.generator_overlap <= 1):
        parser.error("--critic-overlap and --generator-overlap are fractions between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    result: dict = {"torch_version": torch.__version__, "cpu_threads_per_process": 1, "configs": {}}
    for config in configs:
        name = Path(config).stem
        print(f"{name}: sizes", file=sys.stderr, flush=True)
        entry = {"config": config, "sizes": sizes_of(config, args.overrides)}
        if not args.no_timing:
            extra = [] if args.full_size_timing else TIMING_OVERRIDES.get(name, [])
            entry["timing"] = timing_of(
                config, [*args.overrides, *extra], args.steps, args.warmup, args.timeout, args.rounds
            )
        result["configs"][name] = entry
    anchors = [load_anchor(p) for p in args.anchor] if args.anchor else list(ANCHORS)
    model_name = Path(args.model_config).stem
    if model_name in result["configs"]:  # measured above, with the same overrides
        sizes = result["configs"][model_name]["sizes"]
    else:
        sizes = sizes_of(args.model_config, [])
    result["model"] = {
        "config": args.model_config,
        "name": model_name,
        "sizes": {k: sizes[k] for k in ("bytes_per_critic_step", "bytes_per_generator_step")}
        | {"D_buckets": sizes["D"]["buckets_reducer"], "G_buckets": sizes["G"]["buckets_reducer"]},
        "anchors": [asdict(a) for a in anchors],
        "assumptions": {
            "links_bus_bandwidth_bytes_per_s": LINKS,
            "gpus_per_node": GPUS_PER_NODE,
            "floor_batch": args.floor_batch,
            "critic_overlap": args.critic_overlap,
            "generator_overlap": args.generator_overlap,
        },
        "predictions": model_tables(sizes, anchors, args.floor_batch, args.critic_overlap, args.generator_overlap),
        "predictions_linear_compute": model_tables(sizes, anchors, 1, args.critic_overlap, args.generator_overlap),
    }
    text = markdown(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaling.json").write_text(json.dumps(result, indent=1))
        (out / "scaling.md").write_text(text)
    print(json.dumps(result) if args.json else text, end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
