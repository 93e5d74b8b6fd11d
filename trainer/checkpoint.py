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

import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from trainer.errors import UserError

FORMAT = "wgan-div-trainer/1"
CHECKPOINT_DIR = "checkpoints"
NAME_PATTERN = re.compile(r"^iter-(\d{7,})$")
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


def write_checkpoint(run_dir: Path, iteration: int, contents: CheckpointContents, keep: int) -> Path:
    """Write atomically to run_dir/checkpoints/iter-NNNNNNN, then keep only the newest `keep` checkpoints.

    On any OS error (disk full, permissions) the temporary directory is removed, earlier checkpoints are left
    intact, and a CheckpointError says what happened.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / checkpoint_name(iteration)
    staging = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
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
        if final.exists():  # the same iteration again (e.g. a resumed run that ends at once): swap it out
            trash = root / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
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
    for old in list_checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_staging(run_dir: Path) -> None:
    """Remove temporary directories left by a writer that was killed."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)


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
        manifest = json.loads(manifest_path.read_text())
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
    contents = {}
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
    return CheckpointContents(models, optimizers, training_state, files["config.yaml"].decode())


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


def newest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest and checksums hold; broken ones are skipped with a warning."""
    for path in list_checkpoints(run_dir):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as error:
            warnings.warn(f"skipping checkpoint: {error}", stacklevel=2)
    return None


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """`--resume auto`: the newest valid checkpoint in run_dir or None; `--resume PATH`: PATH, verified."""
    if resume is None:
        return None
    if resume == "auto":
        return newest_valid_checkpoint(run_dir)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(
            f"--resume {resume}: no such checkpoint directory. Pass a checkpoint such as "
            f"{Path(run_dir) / CHECKPOINT_DIR / checkpoint_name(1000)} or --resume auto."
        )
    verify_checkpoint(path)
    return path


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
