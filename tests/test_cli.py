"""Subprocess tests of the real CLI: user mistakes give one paragraph on stderr, exit code 2 and no traceback.

Each training-path subprocess imports torch (seconds), so the suite keeps to eight subprocesses in all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RUN = [sys.executable, "trainer/run.py"]
ACCELERATE_MODULE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
ACCELERATE_SCRIPT = Path(sys.executable).with_name("accelerate")
DATA_CONFIG = "configs/ffhq64.yaml" if (REPO / "configs" / "ffhq64.yaml").is_file() else "configs/demo.yaml"
MISSING_DATA = "/nonexistent/ffhq"


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", **extra)
    return env


def run(command: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(part) for part in command],
        cwd=REPO,
        env=environment(**extra_env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def flat(text: str) -> str:
    """The message with its line wrapping undone."""
    return " ".join(text.split())


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    output = f"--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"
    assert result.returncode == 2, output
    assert "Traceback" not in result.stdout and "Traceback" not in result.stderr, output
    message = flat(result.stderr)
    assert message.startswith("error: "), output
    assert [line.startswith("error: ") for line in result.stderr.splitlines()].count(True) == 1, output  # printed once
    for needle in needles:
        assert needle in message, f"{needle!r} missing from:\n{output}"
    return message


# ------------------------------------------------------------------------------------------------------------
# Config mistakes: fail before torch is imported, so these are fast.


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = assert_user_error(run([*RUN, "--config", missing]), str(missing), "does not exist")
    assert "--config" in message


def test_malformed_yaml(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("data:\n  source: bundled:mnist\ntrain:\n  batch_size: [8\n  n_critic: 5\n")
    assert_user_error(run([*RUN, "--config", config]), str(config), "not valid YAML", "at line ")


def test_unknown_key_via_override():
    assert_user_error(
        run([*RUN, "--config", "configs/demo.yaml", "train.batch_sise=8"]),
        "command-line override 'train.batch_sise=8'",
        "unknown key 'train.batch_sise'",
        "Did you mean 'train.batch_size'?",
    )


def test_bad_override_value():
    assert_user_error(
        run([*RUN, "--config", "configs/demo.yaml", "train.batch_size=-1"]),
        "command-line override 'train.batch_size=-1'",
        "train.batch_size = -1",
        "allowed: integer >= 1",
    )


# ------------------------------------------------------------------------------------------------------------
# A missing data set: found only once training starts (after torch and accelerate are imported).


def data_args(tmp_path: Path) -> list[str]:
    return ["--config", DATA_CONFIG, f"data.source={MISSING_DATA}", f"run.dir={tmp_path / 'run'}"]


@pytest.mark.slow
def test_missing_data_source(tmp_path):
    assert_user_error(run([*RUN, *data_args(tmp_path)]), f"data.source = '{MISSING_DATA}' does not exist")
    assert not (tmp_path / "run" / "checkpoints").exists()


def assert_quiet_launcher_failure(result: subprocess.CompletedProcess) -> None:
    combined = result.stdout + result.stderr
    output = f"--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"
    assert result.returncode != 0, output
    assert f"data.source = '{MISSING_DATA}' does not exist" in flat(result.stderr), output
    assert "Traceback" not in combined, output


@pytest.mark.slow
@pytest.mark.skipif(not ACCELERATE_SCRIPT.is_file(), reason="no `accelerate` console script next to the interpreter")
def test_missing_data_source_under_accelerate_launch_script(tmp_path):
    # The documented form, `accelerate launch trainer/run.py ...`.
    result = run([ACCELERATE_SCRIPT, "launch", "--num_processes", "1", "--cpu", "trainer/run.py", *data_args(tmp_path)])
    assert_quiet_launcher_failure(result)


@pytest.mark.slow
def test_missing_data_source_under_accelerate_launch_module(tmp_path):
    result = run([*ACCELERATE_MODULE, "trainer/run.py", *data_args(tmp_path)], ACCELERATE_USE_CPU="1")
    assert_quiet_launcher_failure(result)


@pytest.mark.slow
def test_an_unwritable_run_dir_is_a_clear_error(tmp_path):
    result = run([*RUN, "--config", "configs/demo.yaml", "run.dir=/proc/wgan-div-run", "train.iterations=1"])
    assert_user_error(result, "run.dir = '/proc/wgan-div-run' cannot be written to")


# ------------------------------------------------------------------------------------------------------------
# A successful tiny run writes the resolved config, a sample grid and a complete checkpoint.


@pytest.mark.slow
def test_tiny_training_run(tmp_path):
    run_dir = tmp_path / "run"
    result = run(
        [
            *RUN,
            "--config",
            "configs/demo.yaml",
            "train.iterations=3",
            f"run.dir={run_dir}",
            "log.wandb.mode=disabled",
            "data.resolution=16",
            "model.width=8",
            "train.batch_size=16",
        ]
    )
    output = f"--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"
    assert result.returncode == 0, output
    assert "Traceback" not in result.stdout + result.stderr, output

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["iterations"] == 3 and config["train"]["batch_size"] == 16
    assert config["data"]["resolution"] == 16 and config["model"]["width"] == 8
    assert config["data"]["source"] == "bundled:mnist"

    sample = run_dir / "samples" / "iter-0000003.png"
    assert sample.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from safetensors import safe_open

    checkpoint = run_dir / "checkpoints" / "iter-0000003"
    for stem in ("generator", "generator_ema", "critic"):
        with safe_open(str(checkpoint / f"{stem}.safetensors"), framework="numpy") as tensors:
            assert len(list(tensors.keys())) > 0, stem
