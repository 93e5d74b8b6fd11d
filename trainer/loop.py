"""The training loop: build everything, then train (n_critic critic steps, one generator step, EMA, repeat).

`Trainer.__init__` is a short sequence of named builders (accelerator, data, models, optimizers, restore, steps);
`Trainer.train` is the loop, whose iteration body is `train_iteration`. The math lives in `trainer/losses.py`, one
step's mechanics in `trainer/steps.py`, resume in `trainer/checkpoint.py`. Every branch follows the global counters
(iteration, critic steps) that every rank holds identically, and values that steer control flow on one rank only
(a signal) are agreed with a collective.
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
from torch.profiler import record_function

from models import models_from_config
from trainer import augment
from trainer import checkpoint as ckpt
from trainer.config import Config, dump_yaml
from trainer.data import RealBatches, open_source, shard, split_source, to_training_range
from trainer.distributed import agree, make_accelerator, one_outcome
from trainer.ema import ema_beta, update_ema
from trainer.errors import DataError, UserError, process_rank
from trainer.randomness import Streams, stream_seed
from trainer.steps import Nets, TrainingSteps
from trainer.tracking import MetricWindow, Tracker, resolve_wandb_mode, sample_grid, save_png

# DDP compares each gradient's strides with its bucket view; for D's final Linear (out_features = 1) the double
# backward yields a gradient whose stride differs only along the size-1 dimension, a layout-equivalent false alarm.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

# Test hook for failure handling: "RANK:ITERATION" makes that rank raise at the start of that iteration.
FAULT_ENV = "WGAN_DIV_INJECT_FAULT"


@dataclass
class TrainingState:
    """The counters that, with the weights and optimizer states, are the whole state of a run."""

    iteration: int = 0  # generator steps done
    critic_steps: int = 0  # critic steps done (the global batch counter of the critic streams)
    data_position: int = 0  # samples of the global data stream consumed
    skipped_steps: int = 0  # steps skipped for non-finite gradients (fp16 overflow included)
    bad_step_streak: int = 0  # consecutive skipped steps
    critic_bad_streak: int = 0  # consecutive skipped critic steps (generator steps in between do not end it)
    augment_p: float | None = None  # the adapted augmentation probability (augment.target), None before any
    penalty_owed: bool = False  # the last lazy penalty step was skipped: D waits for the next one (steps.py)
    wandb_run_id: str | None = None

    @classmethod
    def from_counters(cls, counters: dict) -> TrainingState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in counters.items() if k in known})


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
        if not self.previous:
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

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
        # Critic steps alone: a D whose every step is skipped (a penalty that keeps overflowing, and the steps the
        # lazy penalty's hold skips after it) while G's steps succeed would otherwise never reach max_bad_steps.
        self.critic_streak = torch.tensor(state.critic_bad_streak, device=device)

    def add(self, skipped: torch.Tensor, critic: bool = False) -> None:
        self.streak = torch.where(skipped, self.streak + 1, 0)
        self.total = self.total + skipped
        if critic:
            self.critic_streak = torch.where(skipped, self.critic_streak + 1, 0)


class ControlChannel:
    """Per-iteration control values (skip counters, a stop request), agreed over ranks with one MAX all-reduce.

    `post` sends this iteration's values without reading them. `read` returns the values to act on now: on CUDA
    those posted one iteration earlier, which an asynchronous copy has brought to the host meanwhile, so the host
    never stalls the GPU's queue to read them; elsewhere the values just posted. Every rank reads the same values
    at the same iteration, so all act alike. `flush` reads the latest values (waiting for them).
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.delayed = accelerator.device.type == "cuda"
        self.pending: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []

    def post(self, values: torch.Tensor) -> None:
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        if not self.delayed:
            self.pending = [(values, None)]
            return
        event = torch.cuda.Event()
        self.pending.append((values.to("cpu", non_blocking=True), event))  # into pinned memory
        event.record()

    def read(self) -> list[float] | None:
        if self.delayed and len(self.pending) < 2:
            return None
        return self._take(self.pending.pop(0))

    def flush(self) -> list[float] | None:
        if not self.pending:
            return None
        latest = self.pending[-1]
        self.pending = []
        return self._take(latest)

    @staticmethod
    def _take(entry: tuple[torch.Tensor, torch.cuda.Event | None]) -> list[float]:
        values, event = entry
        if event is not None:
            event.synchronize()
        return values.tolist()


class AdaptiveAugment:
    """ADA's controller of the augmentation probability p (augment.target), on the device and agreed by all ranks.

    Every augment.interval iterations the current D scores the last critic step's augmented training reals and
    fakes and a global batch of held-out real images (augmented alike) in one forward; the three means, averaged
    over ranks in one all-reduce, give the overfitting signal r_v (`augment.overfitting`), and p moves towards
    keeping r_v at the target (`augment.adjust_p`). p stays a device tensor (no host read) and is saved in
    checkpoints.
    """

    def __init__(self, cfg: Config, heldout: torch.Tensor, steps: TrainingSteps, accelerator, p: float):
        self.cfg, self.heldout, self.steps, self.accelerator = cfg, heldout.to(accelerator.device), steps, accelerator
        self.p = torch.tensor(p, dtype=torch.float32, device=accelerator.device)
        steps.augment_p, steps.keep_inputs = self.p, True

    def due(self, iteration: int) -> bool:
        return iteration % self.cfg.augment.interval == 0

    def adjust(self, iteration: int) -> dict[str, torch.Tensor]:
        cfg, steps, acc = self.cfg, self.steps, self.accelerator
        generator = steps.streams.get("heldout_batch", iteration, acc.device)
        picks = torch.randint(len(self.heldout), (steps.global_batch,), generator=generator, device=acc.device)
        means = steps.critic_means(to_training_range(self.heldout[picks[steps.rows]]), iteration)
        if acc.num_processes > 1:  # equal shards: the mean of the ranks' means is the global batch's mean
            torch.distributed.all_reduce(means)
            means = means / acc.num_processes
        overfit = augment.overfitting(*means)
        images = cfg.augment.interval * cfg.train.n_critic * cfg.train.batch_size
        self.p = augment.adjust_p(self.p, overfit, cfg.augment.target, images, cfg.augment.speed_kimg)
        steps.augment_p = self.p
        return {"augment/overfitting": overfit}  # p itself is logged as it is at the log (progress_values)


class SpeedMeter:
    """Real images per second (shown to D) and seconds per iteration since the previous measurement."""

    def __init__(self, iteration: int, images_per_iteration: int):
        self.iteration, self.images_per_iteration, self.time = iteration, images_per_iteration, time.perf_counter()

    def restart(self, iteration: int) -> None:
        """Measure from now on (after work that is not training, such as an evaluation)."""
        self.iteration, self.time = iteration, time.perf_counter()

    def measure(self, iteration: int) -> tuple[float, float]:
        now = time.perf_counter()
        elapsed, iterations = now - self.time, max(iteration - self.iteration, 1)
        self.iteration, self.time = iteration, now
        return iterations * self.images_per_iteration / max(elapsed, 1e-9), elapsed / iterations


class Trainer:
    """Builds everything a run needs from its config, then trains."""

    def __init__(self, cfg: Config, resume: str | None = None, signals: StopSignals | None = None):
        self.cfg, self.run_dir = cfg, Path(cfg.run.dir)
        self.signals = signals or StopSignals()  # installed by train(), or earlier by the caller
        self.streams = Streams(cfg.run.seed)
        # Only the main process (global rank 0) ever touches W&B.
        use_wandb = resolve_wandb_mode(cfg.log.wandb.mode) != "disabled" and process_rank() == 0
        self.accelerator = acc = make_accelerator(cfg, log_with="wandb" if use_wandb else None)
        self.device = acc.device
        with one_outcome(acc):  # a mistake found by any rank stops every rank, reported once
            self.source = self.build_source()
            generator, critic = self.build_models()
            self.prepare_run_dir()
        self.warn_about_batch_statistics()
        generator, critic, generator_ema = self.set_layout(generator, critic)
        opt_g, opt_d = self.build_optimizers(generator, critic)
        generator, critic, self.opt_g, self.opt_d = acc.prepare(generator, critic, opt_g, opt_d)
        self.generator_module = acc.unwrap_model(generator)  # never compiled: clean state_dict keys
        self.generator_ema = generator_ema.to(self.device)
        self.nets = self.build_nets(generator, critic)
        self.resumed = ckpt.restore(
            resume,
            self.run_dir,
            cfg.to_dict(),
            modules={
                "generator": self.generator_module,
                "generator_ema": self.generator_ema,
                "critic": self.nets.critic_core,
            },
            optimizers={"optimizer_generator": self.opt_g, "optimizer_critic": self.opt_d},
            scaler=acc.scaler,
            processes=acc,
        )
        self.state = TrainingState.from_counters(self.resumed.counters)
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
            channels_last=cfg.train.channels_last,
            augment_policy=cfg.augment.policy,
        )
        self.steps.augment_p = cfg.augment.p
        self.steps.penalty_owed = torch.tensor(self.state.penalty_owed, device=self.device)
        self.adaptive = None
        if cfg.augment.target is not None:
            start_p = self.state.augment_p if self.state.augment_p is not None else 0.0
            self.adaptive = AdaptiveAugment(cfg, self.heldout, self.steps, acc, start_p)
        self.batches = self.build_batches()
        self.sample_z = self.streams.normal("sample_z", 0, (cfg.log.grid_size, cfg.model.z_dim), self.device)
        self.window = MetricWindow()
        self.skips, self.control = SkipCounter(self.state, self.device), ControlChannel(acc)

    # --- builders, in the order __init__ calls them -----------------------------------------------------------

    def build_source(self):
        cfg = self.cfg
        source = open_source(cfg.data.source, cfg.data.resolution, cfg.data.channels)
        from trainer.metrics import PR_NEIGHBOURS, load_inception, needs_inception

        evaluates = cfg.eval.every or cfg.eval.at_end
        if evaluates and "pr" in cfg.eval.metrics and len(source) < PR_NEIGHBOURS + 1:
            raise DataError(
                f"data.source = '{cfg.data.source}' holds {len(source)} images; precision/recall (pr in "
                f"eval.metrics) needs at least {PR_NEIGHBOURS + 1}. Drop pr from eval.metrics."
            )
        heldout = cfg.augment.heldout if cfg.augment.target is not None else 0
        total = len(source)
        source, self.heldout = split_source(source, cfg.data.limit, heldout, f"data.source = '{cfg.data.source}'")
        if len(source) < cfg.train.batch_size:
            kept = "" if len(source) == total else f" (of its {total}, after data.limit and augment.heldout)"
            warnings.warn(
                f"data.source leaves {len(source)} images for training{kept}, fewer than one global batch "
                f"({cfg.train.batch_size}); batches repeat images within an epoch boundary.",
                stacklevel=2,
            )
        if evaluates and needs_inception(cfg.eval.metrics):  # fail now, not at the first evaluation hours later
            load_inception(cfg.eval.inception, self.device)  # loaded once per process, kept for the evaluations
        return source

    def build_models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        torch.manual_seed(stream_seed(self.cfg.run.seed, "init"))
        return models_from_config(self.cfg)

    def prepare_run_dir(self) -> None:
        """The main process creates run.dir and checks that it can write there (a UserError naming it otherwise).

        Nothing else is touched before the resume checks have passed: a refused start changes nothing.
        """
        if not self.accelerator.is_main_process:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise UserError(
                f"run.dir = '{self.run_dir}' cannot be written to ({error.strerror or error}: "
                f"{error.filename or self.run_dir}). Set run.dir to a directory this user can create and write, "
                f"e.g. run.dir=runs/my-run."
            ) from None

    def warn_about_batch_statistics(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        if cfg.model.g_norm == "batch" and acc.num_processes > 1 and not cfg.train.sync_batchnorm:
            self.note(
                f"model.g_norm = batch with {acc.num_processes} processes: G's batch statistics are per "
                f"process (over {cfg.train.batch_size // acc.num_processes} samples), so results depend on the "
                f"process count. Use model.g_norm=pixel or none for results independent of it, or "
                f"train.sync_batchnorm=true on CUDA."
            )

    def set_layout(self, generator, critic):
        """SyncBatchNorm, channels_last and backend flags; returns (G, D, EMA-G)."""
        cfg = self.cfg
        generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)  # plain BatchNorm: never synced
        if cfg.train.sync_batchnorm and self.accelerator.num_processes > 1 and self.device.type == "cuda":
            generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator)
            self.note(
                "train.sync_batchnorm: PyTorch's SyncBatchNorm makes the host wait for the GPU in every forward of "
                "G (it reads the gathered sample counts), so the host cannot run ahead; model.g_norm=pixel or none "
                "gives results independent of the process count without it."
            )
        if cfg.train.channels_last:
            generator, critic, generator_ema = (
                m.to(memory_format=torch.channels_last) for m in (generator, critic, generator_ema)
            )
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
            torch.backends.cudnn.allow_tf32 = cfg.train.tf32
            torch.backends.cudnn.benchmark = True
        return generator, critic, generator_ema

    def build_optimizers(self, generator, critic):
        train = self.cfg.train
        # fused: one kernel per step, and it can skip a non-finite step on the device (steps._update)
        adam = {"betas": tuple(train.betas), "eps": train.adam_eps, "fused": True}
        return (
            torch.optim.Adam(generator.parameters(), lr=train.lr_g, **adam),
            torch.optim.Adam(critic.parameters(), lr=train.lr_d, **adam),
        )

    def build_nets(self, generator, critic) -> Nets:
        acc, cfg, fakes, unpenalised = self.accelerator, self.cfg, None, None
        if cfg.train.compile_g:
            fakes = torch.compile(self.generator_module)
            generator = torch.compile(generator)
        if cfg.train.compile_d and cfg.loss.every == 1:
            self.note("train.compile_d: every critic step has a penalty (loss.every = 1), so D stays eager.")
        elif cfg.train.compile_d:
            # The DDP wrapper itself is compiled: its forward stays eager (it prepares the reducer), the inner
            # critic is compiled, and the one ordinary backward fires DDP's hooks, so D is all-reduced once as in
            # the eager step. Penalty steps keep the eager `critic` (no double backward in AOTAutograd).
            unpenalised = torch.compile(critic)
        return Nets(
            generator, critic, self.generator_module, acc.unwrap_model(critic), fakes, critic_unpenalised=unpenalised
        )

    def build_batches(self) -> RealBatches:
        cfg, acc = self.cfg, self.accelerator
        on_device = cfg.data.on_device == "yes" or (
            cfg.data.on_device == "auto"
            and self.device.type == "cuda"
            and getattr(self.source, "nbytes", 1 << 40) <= 4 << 30
        )
        return RealBatches(
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

    # ---------------------------------------------------------------------------------------------------------

    def note(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)

    def checkpoint(self) -> Path | None:
        """Write a checkpoint from the main process while the others wait; every rank learns if it failed."""
        acc, error = self.accelerator, None
        path = None
        if self.adaptive is not None:
            self.state.augment_p = float(self.adaptive.p)
        self.state.penalty_owed = bool(self.steps.penalty_owed)
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
            error = error or UserError("The main process could not write a checkpoint (its message is above).")
            error.agreed = True  # every rank stops with it; the main process's message is the one printed
            raise error
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

    def train_iteration(self, measure: bool = False, phase=record_function) -> None:
        """One iteration: n_critic critic steps, one generator step, the EMA, and this iteration's control values.

        Device work only: nothing here reads a value back to the host (the control values are read by the loop,
        see ControlChannel). `measure` adds the gradient norms that logging iterations report. Each phase runs in
        `phase(name)`: a named profiler range, or the benchmark's per-phase clock.
        """
        cfg, state = self.cfg, self.state
        for _ in range(cfg.train.n_critic):
            with phase("data"):
                real = self.batches.next(state.critic_steps)
            with phase("critic_step"):
                result = self.steps.critic_step(real, state.critic_steps, measure=measure)
                self.window.add(result.stats)
                self.skips.add(result.skipped, critic=True)
            state.critic_steps += 1
            state.data_position = self.batches.position
        with phase("generator_step"):
            result = self.steps.generator_step(state.iteration, measure=measure)
            self.window.add(result.stats)
            self.skips.add(result.skipped)
        if self.adaptive is not None and self.adaptive.due(state.iteration + 1):
            with phase("augment_adjust"):
                self.window.add(self.adaptive.adjust(state.iteration + 1))
        with phase("ema"):
            images_seen = (state.iteration + 1) * cfg.train.batch_size  # by G
            beta = ema_beta(cfg.train.batch_size, cfg.train.ema, cfg.train.ema_rampup, images_seen)
            update_ema(self.generator_ema, self.generator_module, beta)
        state.iteration += 1
        with phase("control"):
            stop = torch.full((), float(self.signals.requested), device=self.device)  # a fill: no host copy
            skips = self.skips
            self.control.post(
                torch.stack([skips.streak.float(), skips.critic_streak.float(), skips.total.float(), stop])
            )

    def train(self) -> TrainingState:
        """Train to cfg.train.iterations: iterations, then log, sample, evaluate, checkpoint as scheduled."""
        cfg, acc, state = self.cfg, self.accelerator, self.state
        if acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg.to_dict()))
        tracker = Tracker(acc, cfg, self.run_dir, state.wandb_run_id, state.iteration)
        state.wandb_run_id = tracker.run_id
        for message in self.resumed.notes:
            tracker.note(message)
        if self.resumed.path is not None:
            tracker.note(f"resumed from {self.resumed.path} at iteration {state.iteration}")
            for key, (old, new) in self.resumed.config_changes.items():
                tracker.note(f"config changed since the checkpoint: {key}: {old!r} -> {new!r}")
            if self.resumed.config_changes.get("augment.target", (0, 0))[0] is None:
                tracker.note(
                    "augment.target was added at this resume: its held-out images were trained on before, so D may "
                    "score them like training images and r_v will understate its overfitting. Start a run with "
                    "augment.target to keep them out from the beginning."
                )
        self.signals.install()
        speed = SpeedMeter(state.iteration, cfg.train.n_critic * cfg.train.batch_size)
        last_checkpoint = state.iteration if self.resumed.path is not None else -1
        fault = os.environ.get(FAULT_ENV, "").split(":")
        started, first_iteration = time.perf_counter(), state.iteration
        evaluated_at = None
        try:
            while state.iteration < cfg.train.iterations:
                if fault == [str(acc.process_index), str(state.iteration)]:
                    raise RuntimeError(f"injected fault on rank {acc.process_index} at iteration {state.iteration}")
                log_now = (state.iteration + 1) % cfg.log.every == 0 or state.iteration + 1 == cfg.train.iterations
                self.train_iteration(measure=log_now)
                stop = self.apply_control(self.control.read())
                if log_now:
                    tracker.scalars(state.iteration, {**self.window.reduce(acc), **self.progress_values(speed)})
                if state.iteration % cfg.log.samples_every == 0:
                    tracker.images(state.iteration, self.write_samples())
                if state.iteration % cfg.checkpoint.every == 0 or stop:
                    stop = self.apply_control(self.control.flush()) or stop  # exact counters in the checkpoint
                    self.checkpoint()
                    last_checkpoint = state.iteration
                # After the checkpoint, so that a failed evaluation loses no training; not when stopping (the
                # grace period of a preemption is for the checkpoint).
                if cfg.eval.every and state.iteration % cfg.eval.every == 0 and not stop:
                    tracker.metrics(state.iteration, self.evaluate())
                    evaluated_at = state.iteration
                    speed.restart(state.iteration)  # the next img/s measures training, not the evaluation
                tracker.advance(state.iteration)
                if stop:
                    tracker.note(f"{self.signals.name or 'a signal'} received: checkpoint written at iteration "
                                 f"{state.iteration}; resume with --resume auto.")  # fmt: skip
                    break
            else:
                self.apply_control(self.control.flush())
                if last_checkpoint != state.iteration:
                    self.checkpoint()
                if state.iteration % cfg.log.samples_every != 0:
                    tracker.images(state.iteration, self.write_samples())
                summary = self.summary(started, first_iteration)  # the training's speed, without the evaluation
                if cfg.eval.at_end and evaluated_at != state.iteration:
                    tracker.metrics(state.iteration, self.evaluate())
                tracker.note(summary)
        finally:
            self.signals.restore()
            self.batches.close()
            tracker.close()
        acc.wait_for_everyone()
        return state

    def apply_control(self, values: list[float] | None) -> bool:
        """Act on control values read by the host: keep the counters; raise after too many bad steps.

        Returns whether to stop (a signal reached some rank).
        """
        if values is None:
            return False
        streak, critic_streak, total, stop = values
        self.state.bad_step_streak, self.state.skipped_steps = int(streak), int(total)
        self.state.critic_bad_streak = int(critic_streak)
        if max(streak, critic_streak) >= self.cfg.train.max_bad_steps:
            what = "steps" if streak >= critic_streak else "critic steps (D's penalty kept failing)"
            raise UserError(
                f"Stopping at iteration {self.state.iteration}: {int(max(streak, critic_streak))} consecutive {what} "
                f"had non-finite gradients and were skipped (train.max_bad_steps = {self.cfg.train.max_bad_steps}). "
                f"Nothing was "
                f"saved from the diverged state; the newest checkpoint in {self.run_dir / ckpt.CHECKPOINT_DIR} is "
                f"intact. Lower lr_d/lr_g, raise loss.k, or use bf16 instead of fp16.",
                agreed=True,
            )
        return bool(stop)

    def summary(self, started: float, first_iteration: int) -> str:
        """One line at the end of training (also what launch/gpu_check.sh collects)."""
        if self.state.iteration == first_iteration:  # resumed at the end: no speed to report
            return (f"finished: iteration {self.state.iteration}, precision {self.cfg.train.mixed_precision}: already "
                    f"trained to train.iterations; nothing to do")  # fmt: skip
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
        if self.adaptive is not None:
            values["augment/p"] = float(self.adaptive.p)  # the p in use now (a log is a host read anyway)
        if self.device.type == "cuda":
            values["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return values


def train(cfg: Config, resume: str | None = None) -> TrainingState:
    """Build, then train. The stop signals are handled from the start: one that arrives while the run is being
    built (a slow data listing, W&B, a restore) stops it after its first iteration, with a checkpoint."""
    signals = StopSignals()
    signals.install()
    try:
        return Trainer(cfg, resume, signals).train()
    finally:
        signals.restore()
