"""The training loop: n_critic critic steps, one generator step, EMA, logging, samples, checkpoints.

The math lives in `trainer/losses.py`, one step's mechanics in `trainer/steps.py`; this file orchestrates.
Every branch follows the global counters (iteration, critic steps) that every rank holds identically, and
values that steer control flow on one rank only (a signal) are agreed with a collective.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from models import models_from_config
from trainer import checkpoint as ckpt
from trainer.config import Config, dump_yaml, parse_yaml
from trainer.data import RealBatches, open_source, shard
from trainer.distributed import agree, make_accelerator
from trainer.ema import ema_beta, update_ema
from trainer.errors import ConfigError, UserError, process_rank
from trainer.randomness import Streams, stream_seed
from trainer.steps import Nets, TrainingSteps
from trainer.tracking import MetricWindow, Tracker, sample_grid, save_png

# DDP compares each gradient's strides with its bucket view; for D's final Linear (out_features = 1) the double
# backward yields a gradient whose stride differs only along the size-1 dimension, a layout-equivalent false alarm.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

# Test hook for failure handling: "RANK:ITERATION" makes that rank raise at the start of that iteration.
FAULT_ENV = "WGAN_DIV_INJECT_FAULT"

ARCHITECTURE_KEYS = (
    "model.arch",
    "model.width",
    "model.z_dim",
    "model.g_norm",
    "model.d_norm",
    "data.resolution",
    "data.channels",
)


@dataclass
class TrainingState:
    """The counters that, with the weights and optimizer states, are the whole state of a run."""

    iteration: int = 0  # generator steps done
    critic_steps: int = 0  # critic steps done (the global batch counter of the critic streams)
    data_position: int = 0  # samples of the global data stream consumed
    skipped_steps: int = 0  # steps skipped for non-finite gradients (fp16 overflow included)
    bad_step_streak: int = 0  # consecutive skipped steps
    wandb_run_id: str | None = None


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 ask for a checkpoint at the end of the current iteration, then exit 0.

    A second signal at least a second after the first exits at once (a burst, such as Ctrl-C reaching both the
    launcher and the workers, counts as one).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.first: float | None = None
        self.name = ""
        self.previous = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        now = time.monotonic()
        if self.first is not None and now - self.first >= 1.0:
            os._exit(128 + signum)
        if self.first is None:
            self.first, self.name = now, signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.first is not None


class SkipCounter:
    """Consecutive and total skipped steps, counted on the device so that steps never wait for the host."""

    def __init__(self, state: TrainingState, device: torch.device):
        self.streak = torch.tensor(state.bad_step_streak, device=device)
        self.total = torch.tensor(state.skipped_steps, device=device)

    def add(self, skipped: torch.Tensor) -> None:
        self.streak = torch.where(skipped, self.streak + 1, 0)
        self.total = self.total + skipped


def match_parameter_layout(optimizer) -> None:
    """Give loaded optimizer state the memory layout of its parameter (channels_last after a resume, too).

    Checkpoints store plain contiguous tensors; a fresh Adam state follows its parameter's layout, and fused Adam
    on mixed layouts takes another code path whose rounding differs, which would break bit-exact resume.
    """
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


class ControlChannel:
    """Per-iteration control values (skip counters, a stop request), agreed over ranks with one MAX all-reduce.

    On CUDA the values reach the host by an asynchronous copy that is read one iteration later, so the host never
    stalls the GPU's queue to read them; every rank reads the same values at the same iteration, so all act alike.
    Elsewhere they are read at once.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.delayed = accelerator.device.type == "cuda"
        self.pending: tuple[torch.Tensor, torch.cuda.Event] | None = None

    def post(self, values: torch.Tensor) -> list[float] | None:
        """Send this iteration's values; returns the values to act on now (None when there are none yet)."""
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        if not self.delayed:
            return values.tolist()
        ready = self.flush()
        event = torch.cuda.Event()
        self.pending = (values.to("cpu", non_blocking=True), event)
        event.record()
        return ready

    def flush(self) -> list[float] | None:
        """The values posted last and not read yet (waits for them), or None."""
        if self.pending is None:
            return None
        values, event = self.pending
        self.pending = None
        event.synchronize()
        return values.tolist()


class SpeedMeter:
    """Real images per second (shown to D) and seconds per iteration since the previous measurement."""

    def __init__(self, iteration: int, images_per_iteration: int):
        self.iteration, self.images_per_iteration, self.time = iteration, images_per_iteration, time.perf_counter()

    def measure(self, iteration: int) -> tuple[float, float]:
        now = time.perf_counter()
        elapsed, iterations = now - self.time, max(iteration - self.iteration, 1)
        self.iteration, self.time = iteration, now
        return iterations * self.images_per_iteration / max(elapsed, 1e-9), elapsed / iterations


def config_changes(saved: dict, current: dict, prefix: str = "") -> dict[str, tuple]:
    """Dotted keys whose value differs between two config dicts: {key: (saved, current)}."""
    changes = {}
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            changes[prefix + key] = (a, b)
    return changes


def check_resume_compatible(saved_config: dict, cfg: Config, path: Path) -> dict[str, tuple]:
    changes = config_changes(saved_config, cfg.to_dict())
    structural = {k: v for k, v in changes.items() if k in ARCHITECTURE_KEYS}
    if structural:
        described = ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in structural.items())
        raise ckpt.CheckpointError(
            f"Cannot resume from {path}: the architecture changed: {described}. These keys "
            f"must match the checkpoint; learning rates, logging, checkpointing and "
            f"train.iterations may change."
        )
    return changes


class Trainer:
    """Builds everything a run needs from its config, then trains."""

    def __init__(self, cfg: Config, resume: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        # Only the main process (global rank 0) ever touches W&B.
        use_wandb = cfg.log.wandb.mode != "disabled" and process_rank() == 0
        self.accelerator = make_accelerator(cfg, log_with="wandb" if use_wandb else None)
        acc = self.accelerator
        self.device = acc.device
        if cfg.train.batch_size % acc.num_processes:
            raise ConfigError(
                f"Config error: train.batch_size = {cfg.train.batch_size} (the global batch) does not "
                f"divide evenly over {acc.num_processes} processes. Use a multiple of "
                f"{acc.num_processes}, e.g. {acc.num_processes * max(1, cfg.train.batch_size // acc.num_processes)}."
            )
        self.source = open_source(cfg.data.source, cfg.data.resolution, cfg.data.channels)
        if len(self.source) < cfg.train.batch_size:
            warnings.warn(
                f"data.source holds {len(self.source)} images, fewer than one global batch "
                f"({cfg.train.batch_size}); batches repeat images within an epoch boundary.",
                stacklevel=2,
            )
        if cfg.eval.every and "fid" in cfg.eval.metrics:  # fail now, not at the first evaluation hours later
            from trainer.metrics import resolve_inception_path

            resolve_inception_path(cfg.eval.inception)
        self.state = TrainingState()
        self.streams = Streams(cfg.run.seed)

        if cfg.model.g_norm == "batch" and acc.num_processes > 1 and not cfg.train.sync_batchnorm:
            self.note(
                f"model.g_norm = batch with {acc.num_processes} processes: G's batch statistics are per "
                f"process (over {cfg.train.batch_size // acc.num_processes} samples), so results depend on the "
                f"process count. Use model.g_norm=pixel or none for results independent of it, or "
                f"train.sync_batchnorm=true on CUDA."
            )

        torch.manual_seed(stream_seed(cfg.run.seed, "init"))
        generator, critic = models_from_config(cfg)
        generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)

        self.resume_path = ckpt.resolve_resume(self.run_dir, resume)
        existing = ckpt.list_checkpoints(self.run_dir)
        if resume is None and existing:
            raise UserError(
                f"run.dir = '{self.run_dir}' already holds checkpoints (newest: {existing[0].name}). Pass "
                f"--resume auto to continue that run, or choose another run.dir; a fresh start there would "
                f"overwrite them."
            )
        contents = None
        if self.resume_path is not None:
            contents = ckpt.read_checkpoint(self.resume_path)
            self.config_changes = check_resume_compatible(parse_yaml(contents.config_yaml), cfg, self.resume_path)
            for name, module in (("generator", generator), ("generator_ema", generator_ema), ("critic", critic)):
                ckpt.check_state_dict_fits(name, contents.models[name], module, self.resume_path)
                module.load_state_dict(contents.models[name])
            known = {f.name for f in dataclasses.fields(TrainingState)}
            self.state = TrainingState(**{k: v for k, v in contents.training_state["counters"].items() if k in known})

        if cfg.train.sync_batchnorm and acc.num_processes > 1 and self.device.type == "cuda":
            generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator)
        memory_format = torch.channels_last if cfg.train.channels_last else None
        if memory_format is not None:
            generator, critic, generator_ema = (
                m.to(memory_format=memory_format) for m in (generator, critic, generator_ema)
            )
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
            torch.backends.cudnn.allow_tf32 = cfg.train.tf32
            torch.backends.cudnn.benchmark = True

        adam = {"betas": tuple(cfg.train.betas), "eps": cfg.train.adam_eps}
        adam["fused"] = True  # one kernel per step, and it can skip a non-finite step on the device
        opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.train.lr_g, **adam)
        opt_d = torch.optim.Adam(critic.parameters(), lr=cfg.train.lr_d, **adam)
        generator, critic, self.opt_g, self.opt_d = acc.prepare(generator, critic, opt_g, opt_d)
        self.generator_ema = generator_ema.to(self.device)
        self.generator_module = generator_core = acc.unwrap_model(generator)  # never compiled: clean state_dict keys
        if cfg.train.compile_g:
            generator_core = torch.compile(generator_core)
            generator = torch.compile(generator)
        self.nets = Nets(generator, critic, generator_core, acc.unwrap_model(critic))

        if contents is not None:
            self.opt_g.load_state_dict(contents.optimizers["optimizer_generator"])
            self.opt_d.load_state_dict(contents.optimizers["optimizer_critic"])
            for optimizer, lr in ((self.opt_g, cfg.train.lr_g), (self.opt_d, cfg.train.lr_d)):
                for group in optimizer.param_groups:  # hyper-parameters come from the config, not the checkpoint
                    group.update(lr=lr, betas=tuple(cfg.train.betas), eps=cfg.train.adam_eps)
            match_parameter_layout(self.opt_g)
            match_parameter_layout(self.opt_d)
            if acc.scaler is not None and contents.training_state.get("scaler"):
                acc.scaler.load_state_dict(contents.training_state["scaler"])

        self.steps = TrainingSteps(
            self.nets,
            self.opt_g,
            self.opt_d,
            acc,
            cfg.loss,
            self.streams,
            cfg.train.batch_size,
            shard(cfg.train.batch_size, acc.process_index, acc.num_processes),
            cfg.model.z_dim,
            channels_last=memory_format is not None,
        )
        on_device = cfg.data.on_device == "yes" or (
            cfg.data.on_device == "auto"
            and self.device.type == "cuda"
            and getattr(self.source, "nbytes", 1 << 40) <= 4 << 30
        )
        self.batches = RealBatches(
            self.source,
            self.streams,
            cfg.train.batch_size,
            acc.process_index,
            acc.num_processes,
            self.device,
            position=self.state.data_position,
            hflip=cfg.data.hflip,
            workers=cfg.data.workers,
            on_device=on_device,
        )
        self.sample_z = self.streams.normal("sample_z", 0, (cfg.log.grid_size, cfg.model.z_dim), self.device)

    # ---------------------------------------------------------------------------------------------------------

    def note(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)

    def prepare_run_dir(self) -> None:
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_staging(self.run_dir)
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg.to_dict()))
        self.accelerator.wait_for_everyone()

    def checkpoint(self) -> Path | None:
        """Write a checkpoint from the main process while the others wait; every rank learns if it failed."""
        acc, error = self.accelerator, None
        path = None
        if acc.is_main_process:
            contents = ckpt.CheckpointContents(
                models={
                    "generator": self.generator_module.state_dict(),
                    "generator_ema": self.generator_ema.state_dict(),
                    "critic": self.nets.critic_core.state_dict(),
                },
                optimizers={
                    "optimizer_generator": self.opt_g.state_dict(),
                    "optimizer_critic": self.opt_d.state_dict(),
                },
                training_state={
                    "counters": dataclasses.asdict(self.state),
                    "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                },
                config_yaml=dump_yaml(self.cfg.to_dict()),
            )
            try:
                self._check_finite_weights()
                path = ckpt.write_checkpoint(self.run_dir, self.state.iteration, contents, self.cfg.checkpoint.keep)
            except UserError as caught:
                error = caught
        if agree(error is not None, acc):
            raise error or UserError("The main process could not write a checkpoint (its message is above).")
        return path

    def evaluate(self) -> dict[str, float]:
        """cfg.eval.metrics of EMA-G, computed by all ranks together (each generates its share)."""
        from trainer.metrics import evaluate_generator

        if self.accelerator.num_processes > 1:  # BatchNorm statistics are per process: use the main one's
            for buffer in self.generator_ema.buffers():
                torch.distributed.broadcast(buffer, src=0)
        return evaluate_generator(self.generator_ema, self.cfg, self.accelerator)

    def _check_finite_weights(self) -> None:
        for name, module in (
            ("G", self.generator_module),
            ("EMA-G", self.generator_ema),
            ("D", self.nets.critic_core),
        ):
            for key, tensor in module.state_dict().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise UserError(
                        f"Not writing a checkpoint at iteration {self.state.iteration}: {name}'s "
                        f"{key} holds non-finite values. The last checkpoint in "
                        f"{self.run_dir / ckpt.CHECKPOINT_DIR} is the newest good state; lower the "
                        f"learning rates or change train.mixed_precision and resume from it."
                    )

    @torch.no_grad()
    def write_samples(self) -> dict:
        """Grids of G and EMA-G on the fixed z; PNGs under samples/ (EMA-G) and samples/raw/ (G)."""
        if not self.accelerator.is_main_process:
            return {}
        grids = {}
        generator = self.generator_module
        was_training = generator.training
        generator.eval()
        try:
            for key, module in (("samples/ema", self.generator_ema), ("samples/generator", generator)):
                images = torch.cat([module(z) for z in self.sample_z.split(256)])
                grids[key] = sample_grid(images.float())
        finally:
            generator.train(was_training)
        name = f"{ckpt.checkpoint_name(self.state.iteration)}.png"
        save_png(grids["samples/ema"], self.run_dir / "samples" / name)
        save_png(grids["samples/generator"], self.run_dir / "samples" / "raw" / name)
        return grids

    # ---------------------------------------------------------------------------------------------------------

    def train(self) -> TrainingState:
        """n_critic critic steps, one generator step, EMA; then log, sample, evaluate, checkpoint as scheduled."""
        cfg, acc, state = self.cfg, self.accelerator, self.state
        self.prepare_run_dir()
        tracker = Tracker(acc, cfg, self.run_dir, state.wandb_run_id, state.iteration)
        state.wandb_run_id = tracker.run_id
        if self.resume_path is not None:
            tracker.note(f"resumed from {self.resume_path} at iteration {state.iteration}")
            for key, (old, new) in self.config_changes.items():
                tracker.note(f"config changed since the checkpoint: {key}: {old!r} -> {new!r}")
        signals, window, skips = StopSignals(), MetricWindow(), SkipCounter(state, self.device)
        control = ControlChannel(acc)
        signals.install()
        speed = SpeedMeter(state.iteration, cfg.train.n_critic * cfg.train.batch_size)
        last_checkpoint = state.iteration if self.resume_path is not None else -1
        fault = os.environ.get(FAULT_ENV, "").split(":")
        started, first_iteration = time.perf_counter(), state.iteration
        try:
            while state.iteration < cfg.train.iterations:
                if fault == [str(acc.process_index), str(state.iteration)]:
                    raise RuntimeError(f"injected fault on rank {acc.process_index} at iteration {state.iteration}")
                log_now = (state.iteration + 1) % cfg.log.every == 0 or state.iteration + 1 == cfg.train.iterations
                for _ in range(cfg.train.n_critic):
                    real = self.batches.next(state.critic_steps)
                    result = self.steps.critic_step(real, state.critic_steps, measure=log_now)
                    state.critic_steps += 1
                    state.data_position = self.batches.position
                    window.add(result.stats)
                    skips.add(result.skipped)
                result = self.steps.generator_step(state.iteration, measure=log_now)
                window.add(result.stats)
                skips.add(result.skipped)
                images_seen = (state.iteration + 1) * cfg.train.batch_size  # by G
                beta = ema_beta(cfg.train.batch_size, cfg.train.ema, cfg.train.ema_rampup, images_seen)
                update_ema(self.generator_ema, self.generator_module, beta)
                state.iteration += 1

                flags = [
                    skips.streak.float(),
                    skips.total.float(),
                    torch.tensor(float(signals.requested), device=self.device),
                ]
                stop = self.apply_control(control.post(torch.stack(flags)))
                if log_now:
                    tracker.scalars(state.iteration, {**window.reduce(acc), **self.progress_values(speed)})
                if state.iteration % cfg.log.samples_every == 0:
                    tracker.images(state.iteration, self.write_samples())
                if cfg.eval.every and state.iteration % cfg.eval.every == 0:
                    tracker.scalars(state.iteration, self.evaluate())
                if state.iteration % cfg.checkpoint.every == 0 or stop:
                    stop = self.apply_control(control.flush()) or stop  # exact counters in the checkpoint
                    self.checkpoint()
                    last_checkpoint = state.iteration
                tracker.advance(state.iteration)
                if stop:
                    tracker.note(f"{signals.name or 'a signal'} received: checkpoint written at iteration "
                                 f"{state.iteration}; resume with --resume auto.")  # fmt: skip
                    break
            else:
                self.apply_control(control.flush())
                if last_checkpoint != state.iteration:
                    self.checkpoint()
                if state.iteration % cfg.log.samples_every != 0:
                    tracker.images(state.iteration, self.write_samples())
                tracker.note(self.summary(started, first_iteration))
        finally:
            signals.restore()
            tracker.close()
        acc.wait_for_everyone()
        return state

    def apply_control(self, values: list[float] | None) -> bool:
        """Act on control values read by the host: keep the counters; raise after too many bad steps.

        Returns whether to stop (a signal reached some rank).
        """
        if values is None:
            return False
        streak, total, stop = values
        self.state.bad_step_streak, self.state.skipped_steps = int(streak), int(total)
        if streak >= self.cfg.train.max_bad_steps:
            raise UserError(
                f"Stopping at iteration {self.state.iteration}: {int(streak)} consecutive steps had non-finite "
                f"gradients and were skipped (train.max_bad_steps = {self.cfg.train.max_bad_steps}). Nothing was "
                f"saved from the diverged state; the newest checkpoint in {self.run_dir / ckpt.CHECKPOINT_DIR} is "
                f"intact. Lower lr_d/lr_g, raise loss.k, or use bf16 instead of fp16."
            )
        return bool(stop)

    def summary(self, started: float, first_iteration: int) -> str:
        """One line at the end of training (also what launch/gpu_check.sh collects)."""
        seconds, iterations = time.perf_counter() - started, max(self.state.iteration - first_iteration, 1)
        images = iterations * self.cfg.train.n_critic * self.cfg.train.batch_size
        scale = self.accelerator.scaler.get_scale() if self.accelerator.scaler is not None else None
        return (
            f"finished: iteration {self.state.iteration}, precision {self.cfg.train.mixed_precision}, "
            f"{seconds / iterations:.4f} s/iteration, {images / seconds:.0f} img/s, skipped steps "
            f"{self.state.skipped_steps}, loss scale {scale if scale is not None else 'none'}, "
            f"checkpoint {ckpt.list_checkpoints(self.run_dir)[0] if self.accelerator.is_main_process else ''}"
        )

    def progress_values(self, speed: SpeedMeter) -> dict[str, float]:
        state, acc = self.state, self.accelerator
        img_per_s, s_per_iteration = speed.measure(state.iteration)
        values = {
            "progress/kimg": state.critic_steps * self.cfg.train.batch_size / 1000,  # real images shown to D
            "progress/iteration": state.iteration,
            "speed/img_per_s": img_per_s,
            "speed/s_per_iteration": s_per_iteration,
            "lr/generator": self.opt_g.param_groups[0]["lr"],
            "lr/critic": self.opt_d.param_groups[0]["lr"],
            "amp/skipped_steps": state.skipped_steps,
        }
        if acc.scaler is not None:
            values["amp/scale"] = acc.scaler.get_scale()
        if self.device.type == "cuda":
            values["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return values


def train(cfg: Config, resume: str | None = None) -> TrainingState:
    return Trainer(cfg, resume).train()
