"""Checkpoints: safetensors and JSON only, written atomically, verified by checksums before they are used.

Layout of `run.dir/checkpoints/iter-NNNNNNN/`:

    generator.safetensors            G's parameters and buffers
    generator_ema.safetensors        EMA-G's parameters and buffers
    critic.safetensors               D's parameters
    optimizer_generator.safetensors  Adam state of G, flattened ("state.<param>.<key>"); hyper-parameters as
    optimizer_critic.safetensors     JSON metadata
    training_state.json              counters (iteration, critic steps, data position), loss-scaler state,
                                     W&B run id; the random streams are counter-based and need no state
    config.yaml                      the resolved config
    manifest.json                    size and SHA-256 of every file above; written last

A checkpoint is written to a temporary directory beside its final place, every file flushed to disk, then
renamed into place, so a crash or `kill -9` at any moment leaves either the complete checkpoint or none.
Loading uses only `safetensors` and `json`: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from trainer.errors import UserError

FORMAT = "wgan-div-trainer/1"
CHECKPOINT_DIR = "checkpoints"
NAME_PATTERN = re.compile(r"^iter-(\d{7,})$")
# .tmp-iter-N-HOST-PID-HEX (a write), .trash-... (the previous copy in a swap), .pruned-... (a deletion)
STAGING_PATTERN = re.compile(r"^\.(tmp|trash|pruned)-(iter-\d{7,})(?:-(.+)-(\d+))?-[0-9a-f]{8}$")
# Tests and the fault soak: "NAME" makes a checkpoint write end the process abruptly at that point (see _crash_point).
CRASH_ENV = "WGAN_DIV_CRASH_AT"
# The keys that fix the shapes of the networks: they must match the checkpoint being resumed.
ARCHITECTURE_KEYS = (
    "model.arch",
    "model.width",
    "model.z_dim",
    "model.g_norm",
    "model.d_norm",
    "data.resolution",
    "data.channels",
)
MANIFEST = "manifest.json"
MODEL_FILES = ("generator", "generator_ema", "critic")
OPTIMIZER_FILES = ("optimizer_generator", "optimizer_critic")


class CheckpointError(UserError):
    """A checkpoint that is incomplete, altered, or does not fit this run."""


def checkpoint_name(iteration: int) -> str:
    return f"iter-{iteration:07d}"


# --------------------------------------------------------------------------------------------------------------
# Flattening optimizer state into tensors + JSON.


def optimizer_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An optimizer state_dict as safetensors tensors plus JSON metadata (param_groups, non-tensor values)."""
    tensors, scalars = {}, {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    metadata = {"param_groups": json.dumps(state_dict["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, metadata


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in json.loads(metadata["scalars"]).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = json.loads(metadata["param_groups"])
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------------------------------------------
# Writing.


def _write_synced(path: Path, data: bytes) -> dict:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _staging_name(kind: str, name: str) -> str:
    """A hidden name for a directory in the middle of being written, swapped or deleted, naming its writer."""
    return f".{kind}-{name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _writer_alive(match: re.Match) -> bool:
    """Whether the process that named a staging directory is still running (only knowable on its own host)."""
    host, pid = match.group(3), match.group(4)
    if host != socket.gethostname() or pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError, IndexError):
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True


def _crash_point(name: str) -> None:
    """End the process like a power cut or `kill -9` here if CRASH_ENV names this point (tests only)."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass
class CheckpointContents:
    """Everything a checkpoint holds, in memory."""

    models: dict[str, dict[str, torch.Tensor]]  # file stem -> state_dict (MODEL_FILES)
    optimizers: dict[str, dict]  # file stem -> optimizer state_dict (OPTIMIZER_FILES)
    training_state: dict
    config_yaml: str
    digest: str = ""  # SHA-256 of the manifest (set when read): identifies the checkpoint across ranks


def write_checkpoint(run_dir: Path, iteration: int, contents: CheckpointContents, keep: int) -> Path:
    """Write atomically to run_dir/checkpoints/iter-NNNNNNN, then keep only the newest `keep` checkpoints.

    On any OS error (disk full, permissions) the temporary directory is removed, earlier checkpoints are left
    intact, and a CheckpointError says what happened.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / checkpoint_name(iteration)
    staging = root / _staging_name("tmp", final.name)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        manifest = {"format": FORMAT, "iteration": iteration, "created": time.time(), "files": {}}
        metadata = {"format": FORMAT}
        for stem, state_dict in contents.models.items():
            tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
            manifest["files"][f"{stem}.safetensors"] = _write_synced(
                staging / f"{stem}.safetensors", save_safetensors_bytes(tensors, metadata=metadata)
            )
        for stem, state_dict in contents.optimizers.items():
            tensors, optimizer_metadata = optimizer_to_tensors(state_dict)
            manifest["files"][f"{stem}.safetensors"] = _write_synced(
                staging / f"{stem}.safetensors",
                save_safetensors_bytes(tensors, metadata={**metadata, **optimizer_metadata}),
            )
        manifest["files"]["training_state.json"] = _write_synced(
            staging / "training_state.json", json.dumps(contents.training_state, indent=2).encode()
        )
        manifest["files"]["config.yaml"] = _write_synced(staging / "config.yaml", contents.config_yaml.encode())
        _write_synced(staging / MANIFEST, json.dumps(manifest, indent=2).encode())
        _fsync_dir(staging)
        _crash_point("staging-complete")
        if final.exists():  # the same iteration again: swap it out (recover_interrupted_writes mends a crash here)
            trash = root / _staging_name("trash", final.name)
            final.rename(trash)
            _crash_point("between-renames")
            staging.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(final)
        _fsync_dir(root)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(
            f"Could not write the checkpoint {final}: {error.strerror or error}. Earlier "
            f"checkpoints in {root} are intact; free space or fix permissions, then resume "
            f"with --resume auto."
        ) from None
    # Every checkpoint here belongs to this run's history (restore() set the others aside), so the highest
    # iterations are the newest; the one just written is never removed.
    for old in list_checkpoints(run_dir)[keep:]:
        if old != final:
            _remove(old)
    return final


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint so that a crash midway never leaves a half-deleted `iter-N` behind: it is renamed to a
    hidden `.pruned-*` name first (one atomic step), which listing ignores and the next start removes."""
    doomed = checkpoint.with_name(_staging_name("pruned", checkpoint.name))
    try:
        checkpoint.rename(doomed)
    except OSError:
        return
    _crash_point("pruning")
    shutil.rmtree(doomed, ignore_errors=True)


def recover_interrupted_writes(run_dir: Path) -> list[str]:
    """Mend what a writer that was killed left behind; returns one note per checkpoint recovered.

    A complete staging directory (`.tmp-iter-N-*`, verified) whose checkpoint is missing is the newest state of
    iteration N: a crash came after it was written, before or between the renames; it is renamed into place.
    Failing that, the previous copy of a same-iteration swap (`.trash-iter-N-*`) is put back. Everything else
    (incomplete staging, copies no longer needed, checkpoints whose pruning was interrupted) is removed. A
    directory whose writer is still running on this host (another run in the same run.dir) is left alone.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    notes = []
    leftovers = sorted(p for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-", ".pruned-")))
    for path in sorted(leftovers, key=lambda p: not p.name.startswith(".tmp-")):  # newer states first
        match = STAGING_PATTERN.match(path.name)
        if match and _writer_alive(match):
            continue
        final = root / match.group(2) if match and match.group(1) != "pruned" else None
        if final is not None and not final.exists():
            with contextlib.suppress(CheckpointError, OSError):
                verify_checkpoint(path)
                path.rename(final)
                notes.append(f"recovered {final} from an interrupted checkpoint write")
        shutil.rmtree(path, ignore_errors=True)
    return notes


# --------------------------------------------------------------------------------------------------------------
# Finding, verifying and reading.


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories under run_dir, newest (highest iteration) first; completeness is not checked."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _verified_files(path: Path) -> tuple[dict, dict[str, bytes]]:
    """Check the manifest and every file's size and SHA-256; return the manifest and the files' bytes.

    Each file is read once: the bytes that were hashed are the bytes that get parsed.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"The checkpoint {path} does not exist (a checkpoint is a directory such as "
            f"run.dir/checkpoints/iter-0001000)."
        )
    manifest_path = path / MANIFEST
    try:
        manifest_bytes = manifest_path.read_bytes()
        manifest = json.loads(manifest_bytes)
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"The checkpoint {path} is incomplete: it has no {MANIFEST}.") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"The checkpoint {path} has an unreadable {MANIFEST}.") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"The checkpoint {path} has format {manifest.get('format')!r}; this trainer reads {FORMAT!r}."
        )
    expected = {f"{stem}.safetensors" for stem in MODEL_FILES + OPTIMIZER_FILES} | {
        "training_state.json",
        "config.yaml",
    }
    missing = sorted(expected - set(files))
    if missing:
        raise CheckpointError(f"The checkpoint {path} lists no {', '.join(missing)} in its manifest.")
    contents = {MANIFEST: manifest_bytes}
    for name, record in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"The checkpoint {path} is missing {name}.")
        data = file.read_bytes()
        if len(data) != record["size"]:
            raise CheckpointError(
                f"The checkpoint file {file} has {len(data)} bytes, but the manifest "
                f"says {record['size']}: it is truncated or was altered."
            )
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise CheckpointError(
                f"The checkpoint file {file} does not match its SHA-256 in the manifest: it was altered or corrupted."
            )
        contents[name] = data
    return manifest, contents


def verify_checkpoint(path: Path) -> dict:
    """Check the manifest and every file's size and SHA-256; return the manifest or raise CheckpointError."""
    return _verified_files(path)[0]


def _parse_safetensors(data: bytes, file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = load_safetensors_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError) as error:
        raise CheckpointError(f"The checkpoint file {file} is not a valid safetensors file ({error}).") from None
    return tensors, metadata


def read_checkpoint(path: Path) -> CheckpointContents:
    """Verify, then read a checkpoint: safetensors and JSON only (a stray .pt or pickle file is never opened)."""
    path = Path(path)
    _, files = _verified_files(path)
    models = {stem: _parse_safetensors(files[f"{stem}.safetensors"], path / f"{stem}.safetensors")[0]
              for stem in MODEL_FILES}  # fmt: skip
    optimizers = {}
    for stem in OPTIMIZER_FILES:
        tensors, metadata = _parse_safetensors(files[f"{stem}.safetensors"], path / f"{stem}.safetensors")
        optimizers[stem] = optimizer_from_tensors(tensors, metadata)
    training_state = json.loads(files["training_state.json"])
    digest = hashlib.sha256(files[MANIFEST]).hexdigest()
    return CheckpointContents(models, optimizers, training_state, files["config.yaml"].decode(), digest)


def read_generator(path: Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Only the (EMA) generator's weights and the config, for sampling and evaluation."""
    path = Path(path)
    _, files = _verified_files(path)
    name = f"{'generator_ema' if ema else 'generator'}.safetensors"
    tensors, _ = _parse_safetensors(files[name], path / name)
    return tensors, files["config.yaml"].decode()


def load_generator(path: Path, ema: bool = True, device: str | torch.device = "cpu"):
    """(G or EMA-G built from the checkpoint's config, in eval mode on `device`, that Config)."""
    from models import build_generator
    from trainer.config import config_from_dict, parse_yaml

    path = Path(path)
    state, config_yaml = read_generator(path, ema=ema)
    cfg = config_from_dict(parse_yaml(config_yaml), origin=f"'{path / 'config.yaml'}'")
    m, d = cfg.model, cfg.data
    generator = build_generator(m.arch, d.resolution, d.channels, m.width, m.z_dim, m.g_norm)
    check_state_dict_fits("generator_ema" if ema else "generator", state, generator, path)
    generator.load_state_dict(state)
    return generator.eval().requires_grad_(False).to(device), cfg


def newest_valid_checkpoint(run_dir: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint whose manifest and checksums hold; broken ones are skipped (with a warning)."""
    for path in list_checkpoints(run_dir):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as error:
            if warn:
                warnings.warn(f"skipping checkpoint: {error}", stacklevel=2)
    return None


def resolve_resume(run_dir: Path, resume: str | None, warn: bool = True) -> Path | None:
    """`--resume auto`: the newest valid checkpoint in run_dir or None; `--resume PATH`: PATH, verified.

    Without --resume, a run_dir that already holds checkpoints is an error (a fresh start would overwrite them).
    """
    if resume is None:
        existing = list_checkpoints(run_dir)
        if existing:
            raise UserError(
                f"run.dir = '{run_dir}' already holds checkpoints (newest: {existing[0].name}). Pass "
                f"--resume auto to continue that run, or choose another run.dir; a fresh start there would "
                f"overwrite them."
            )
        return None
    if resume == "auto":
        found = newest_valid_checkpoint(run_dir, warn)
        existing = list_checkpoints(run_dir)
        if found is None and existing:
            reasons = []
            for path in existing[:3]:
                try:
                    verify_checkpoint(path)
                except CheckpointError as error:
                    reasons.append(str(error))
            raise CheckpointError(
                f"--resume auto: run.dir = '{run_dir}' holds checkpoints, but none is complete ({' '.join(reasons)}). "
                f"Not starting over silently: pass --resume PATH with a checkpoint you trust (set-aside ones such "
                f"as abandoned-iter-N qualify), or move {Path(run_dir) / CHECKPOINT_DIR} away for a fresh start."
            )
        return found
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(
            f"--resume {resume}: no such checkpoint directory. Pass a checkpoint such as "
            f"{Path(run_dir) / CHECKPOINT_DIR / checkpoint_name(1000)} or --resume auto."
        )
    verify_checkpoint(path)
    return path


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


def check_resume_compatible(saved_config: dict, current_config: dict, path: Path) -> dict[str, tuple]:
    """The config changes since the checkpoint; a CheckpointError if any of them changes the architecture."""
    changes = config_changes(saved_config, current_config)
    structural = {k: v for k, v in changes.items() if k in ARCHITECTURE_KEYS}
    if structural:
        described = ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in structural.items())
        raise CheckpointError(
            f"Cannot resume from {path}: the architecture changed: {described}. These keys "
            f"must match the checkpoint; learning rates, logging, checkpointing and "
            f"train.iterations may change."
        )
    return changes


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


def _set_aside(path: Path, prefix: str) -> Path:
    """Rename a checkpoint to PREFIX-iter-N (a name that listing, --resume auto and pruning ignore)."""
    target = path.with_name(f"{prefix}-{path.name}")
    number = 2
    while target.exists():
        target, number = path.with_name(f"{prefix}-{path.name}-{number}"), number + 1
    path.rename(target)
    return target


def set_aside_other_histories(run_dir: Path, resumed: Path | None) -> list[str]:
    """Move aside every checkpoint of run_dir that a run resumed from `resumed` must never prune or resume from.

    Those are the checkpoints at or after the resumed iteration other than the resumed one itself: after a
    rollback (`--resume` to an older checkpoint) they belong to the abandoned future and become
    `abandoned-iter-N`; the damaged ones that `--resume auto` skipped become `damaged-iter-N`. Nothing is deleted.
    Returns one note per checkpoint moved.
    """
    resumed_iteration = -1
    if resumed is not None:
        match = NAME_PATTERN.match(Path(resumed).name)
        resumed_iteration = int(match.group(1)) if match else -1
    notes = []
    for path in list_checkpoints(run_dir):
        iteration = int(NAME_PATTERN.match(path.name).group(1))
        if iteration < resumed_iteration or (resumed is not None and path.resolve() == Path(resumed).resolve()):
            continue
        try:
            verify_checkpoint(path)
            prefix, why = "abandoned", "it is not older than the checkpoint resumed from"
        except CheckpointError:
            prefix, why = "damaged", "it is incomplete or damaged"
        target = _set_aside(path, prefix)
        notes.append(f"moved {path.name} aside to {target.name} ({why}); delete it when you no longer need it")
    return notes


@dataclass
class Resume:
    """What restore() found and did: the checkpoint (None for a fresh start), its counters, config changes, notes."""

    path: Path | None = None
    counters: dict = field(default_factory=dict)
    config_changes: dict[str, tuple] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def restore(
    resume: str | None,
    run_dir: Path,
    config: dict,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    scaler,
    processes,
) -> Resume:
    """Resume a run, in one place: find and verify the checkpoint, check that it fits, agree across ranks, load.

    `resume` is None (a fresh start; an error if run_dir holds checkpoints; nothing in run_dir is touched),
    "auto" (the newest valid checkpoint in run_dir after mending interrupted writes, a fresh start if there is no
    checkpoint at all, an error if there are only damaged ones) or a checkpoint path. Every rank finds and reads
    the checkpoint itself (no file system is assumed shared), checks the architecture keys of `config` and every
    tensor shape against `modules`; a problem on any rank stops every rank with one message. The ranks then
    compare what they found (name and manifest digest), so nodes that see different run directories cannot
    silently train from different states. The main process moves aside the checkpoints that are not part of the
    resumed history (see set_aside_other_histories). Then weights (into `modules`, the plain nn.Modules),
    optimizer states (their hyper-parameters stay those of the optimizers given, i.e. the config's), the loss
    scaler's state, and the counters (returned) are loaded. Must be called on every rank at the same point; only
    safetensors and JSON are read.
    """
    from trainer.distributed import gather_text, one_outcome

    recovered = []
    with one_outcome(processes):  # first, so that every rank then sees the mended directory
        if processes.is_main_process and resume is not None:
            recovered = recover_interrupted_writes(run_dir)
    path, contents, changes = None, None, {}
    with one_outcome(processes):
        path = resolve_resume(run_dir, resume, warn=False)
        if path is not None:
            contents = read_checkpoint(path)
            changes = check_resume_compatible(_saved_config(contents, path), config, path)
            for name, module in modules.items():
                check_state_dict_fits(name, contents.models[name], module, path)
    identity = "a fresh start" if contents is None else f"{path.name} (manifest {contents.digest[:12]})"
    identities = gather_text(identity, processes)
    if len(set(identities)) > 1:
        found = ", ".join(f"rank {rank}: {text}" for rank, text in enumerate(identities))
        raise CheckpointError(
            f"The processes did not find the same checkpoint to resume from ({found}). run.dir = '{run_dir}' must "
            f"be on a file system that every node sees (see launch/README.md), or pass --resume PATH with a "
            f"checkpoint present on every node.",
            agreed=True,
        )
    result = Resume(path=path, config_changes=changes, notes=recovered)
    if processes.is_main_process and resume is not None:
        result.notes += set_aside_other_histories(run_dir, path)
    if contents is None:
        return result
    for name, module in modules.items():
        module.load_state_dict(contents.models[name])
    for name, optimizer in optimizers.items():
        configured = [{k: g[k] for k in ("lr", "betas", "eps")} for g in optimizer.param_groups]
        optimizer.load_state_dict(contents.optimizers[name])
        for group, hyper in zip(optimizer.param_groups, configured):
            group.update(hyper)
        match_parameter_layout(getattr(optimizer, "optimizer", optimizer))
    if scaler is not None and contents.training_state.get("scaler"):
        scaler.load_state_dict(contents.training_state["scaler"])
    result.counters = dict(contents.training_state["counters"])
    return result


def _saved_config(contents: CheckpointContents, path: Path) -> dict:
    from trainer.config import parse_yaml

    try:
        saved = parse_yaml(contents.config_yaml)
    except Exception:
        saved = None
    if not isinstance(saved, dict):
        raise CheckpointError(f"The checkpoint {path} has an unreadable config.yaml.")
    return saved


def check_state_dict_fits(name: str, saved: dict[str, torch.Tensor], module: torch.nn.Module, path: Path) -> None:
    """Raise a CheckpointError naming every key whose presence or shape differs between checkpoint and model."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = sorted(k for k in set(saved) & set(expected) if tuple(saved[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or reshaped:
        parts = []
        if reshaped:
            parts.append(
                "shapes differ for "
                + ", ".join(
                    f"{k} (checkpoint {tuple(saved[k].shape)}, config {tuple(expected[k].shape)})" for k in reshaped[:5]
                )
            )
        if missing:
            parts.append("missing from the checkpoint: " + ", ".join(missing[:5]))
        if unexpected:
            parts.append("not in this model: " + ", ".join(unexpected[:5]))
        raise CheckpointError(
            f"The checkpoint {path} does not fit the {name} this config builds: "
            f"{'; '.join(parts)}. Resume with the model.* and data.resolution/channels settings "
            f"the checkpoint was trained with (see its config.yaml)."
        )
