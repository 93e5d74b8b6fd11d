"""User inputs of the data and sampling CLIs: `python -m trainer.prepare` stopped by signals, killed, given a
resolution training rejects or an OUT that exists; `python -m trainer.sample` given a bad --out, a missing GPU or a
run directory.

Subprocesses (each imports torch, seconds): three of trainer.prepare, one training run (shared by the sample tests)
and one of trainer.sample; the other cases call the CLIs' `main` in this process.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import REPO, child_env, run_trainer
from trainer import prepare, sample
from trainer.data import open_source, to_uint8

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")


def flat(text: str) -> str:
    """A message with its line wrapping undone (textwrap also breaks lines after the hyphens of paths)."""
    return " ".join(text.replace("-\n", "-").split())


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------
# python -m trainer.prepare: stop signals, SIGKILL, stale temporary files.


def slow_source(root: Path, count: int = 1000) -> Path:
    """`count` small PNG files (5 KB) of 1024 x 1024 pixels: each takes tens of milliseconds to decode and resize,
    so a run with 2 workers lasts many seconds and is surely stopped while its workers decode. Writing them is quick."""
    gradient = np.zeros((1024, 1024, 3), dtype=np.uint8)
    gradient[..., 0] = np.arange(1024) % 256
    data = png(gradient)
    root.mkdir(parents=True)
    for index in range(count):
        (root / f"{index:04d}.png").write_bytes(data)
    return root


def start_prepare(src: Path, out: Path) -> subprocess.Popen:
    """The real CLI with 2 decoding workers, in a process group of its own (so that killpg reaches only it)."""
    command = [sys.executable, "-m", "trainer.prepare", str(src), str(out), "--resolution", "16", "--workers", "2"]
    return subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def state(pid: int) -> str | None:
    """The process's state letter from /proc (R, S, Z, ...), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    return state(pid) not in (None, "Z", "X")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.partial"))


def wait_for_workers(process: subprocess.Popen, out: Path, timeout: float = 60) -> list[int]:
    """Wait until the run has created its temporary file and started its 2 workers, and they have decoded a while."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"trainer.prepare ended before it could be stopped:\n{process.communicate()}")
        workers = children(process.pid)
        if partials(out) and len(workers) >= 2:
            time.sleep(0.5)
            return workers
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"trainer.prepare did not start 2 workers within {timeout} s:\n{process.communicate()}")


def wait_until_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [pid for pid in pids if alive(pid)]


@pytest.mark.slow
@pytest.mark.parametrize(("target", "sig"), [("main process", signal.SIGTERM), ("process group", signal.SIGHUP)])
def test_prepare_stopped_by_a_signal_removes_its_temporary_file_quietly(tmp_path, target, sig):
    # SIGTERM to the main process alone (kill PID) used to kill it at once: its workers printed BrokenPipeError
    # tracebacks and a hidden .partial of the full array size stayed. SIGHUP to the whole group (a closed terminal).
    src = slow_source(tmp_path / "src")
    out = tmp_path / "out" / "data.npy"
    process = start_prepare(src, out)
    workers = wait_for_workers(process, out)
    if target == "main process":
        os.kill(process.pid, sig)
    else:
        os.killpg(process.pid, sig)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + sig, f"exit status {process.returncode}\n{stderr}"
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert [line for line in stderr.splitlines() if "stopped" in line] == [
        f"stopped by {sig.name}; nothing was written (the temporary file was removed)."
    ], stderr
    assert "wrote" not in stdout
    assert list(out.parent.iterdir()) == []  # neither OUT nor the temporary file
    assert wait_until_gone(workers) == []


@pytest.mark.slow
def test_a_killed_prepare_leaves_a_temporary_file_that_the_next_run_removes(tmp_path, capsys):
    src = slow_source(tmp_path / "src")
    out = tmp_path / "out" / "data.npy"
    process = start_prepare(src, out)
    workers = wait_for_workers(process, out)
    process.kill()  # SIGKILL: nothing can clean up
    _, stderr = process.communicate(timeout=60)  # returns once the workers have let go of stderr too
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr  # they ended with the main process
    assert wait_until_gone(workers) == []
    [stale] = partials(out)
    assert stale.stat().st_size > 1000 * 3 * 16 * 16  # the whole array's size
    # A temporary file of a live process (another run writing the same OUT) and one of another OUT stay.
    live = out.parent / f".{out.name}.{os.getppid()}-0123abcd.partial"
    other = out.parent / f".other.npy.{process.pid}-0123abcd.partial"
    live.write_bytes(b"in progress")
    other.write_bytes(b"not ours")

    assert prepare.main([str(src), str(out), "--resolution", "16", "--limit", "3", "--workers", "0"]) == 0
    err = flat(capsys.readouterr().err)
    assert f"removed '{stale}'" in err and f"process {process.pid} no longer exists" in err, err
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, live.name, other.name])
    assert np.load(out).shape == (3, 3, 16, 16)


# --------------------------------------------------------------------------------------------------------------
# python -m trainer.prepare: arguments.


def test_prepare_resolution_must_be_one_that_training_accepts(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for index in range(3):
        (src / f"{index}.png").write_bytes(png(np.full((20, 24, 3), 40 * index, dtype=np.uint8)))
    out = tmp_path / "data.npy"
    for resolution in (48, 8, 2048):
        assert prepare.main([str(src), str(out), "--resolution", str(resolution), "--workers", "0"]) == 2
        err = flat(capsys.readouterr().err)
        assert err.startswith(f"error: --resolution {resolution}: ") and "Traceback" not in err, err
        assert "power of two" in err and "allowed: 16, 32, 64, 128, 256, 512 or 1024." in err, err
        assert list(tmp_path.iterdir()) == [src]
    # An allowed one writes an array that training then opens.
    assert prepare.main([str(src), str(out), "--resolution", "32", "--workers", "0"]) == 0
    assert len(open_source(str(out), 32, 3)) == 3


def test_prepare_refuses_to_replace_an_existing_out_without_overwrite(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for index in range(4):
        (src / f"{index}.png").write_bytes(png(np.full((16, 16, 3), 50 * index, dtype=np.uint8)))
    out = tmp_path / "data.npy"
    out.write_bytes(b"an array prepared yesterday")
    assert prepare.main([str(src), str(out), "--resolution", "16", "--workers", "0"]) == 2
    err = flat(capsys.readouterr().err)
    assert f"OUT = '{out}' already exists" in err and "--overwrite" in err and "Traceback" not in err, err
    assert out.read_bytes() == b"an array prepared yesterday"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npy", "src"]  # no temporary file either
    # With --overwrite it is replaced by the new array.
    assert prepare.main([str(src), str(out), "--resolution", "16", "--workers", "0", "--overwrite"]) == 0
    np.testing.assert_array_equal(np.load(out)[:, 0, 0, 0], [0, 50, 100, 150])


# --------------------------------------------------------------------------------------------------------------
# python -m trainer.sample


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A run directory with one checkpoint (iter-0000001) of the tiny 16 px model, trained by the real CLI."""
    run_dir = tmp_path_factory.mktemp("run")
    done = run_trainer(run_dir, "train.iterations=1")
    assert done.returncode == 0, done.stdout
    return run_dir


def expected_images(run_dir: Path, n: int, seed: int) -> torch.Tensor:
    from trainer.checkpoint import load_generator

    generator, cfg = load_generator(run_dir / "checkpoints" / "iter-0000001")
    return sample.generate(generator, cfg.model.z_dim, n, seed, "cpu")


@pytest.mark.slow
def test_sample_out_and_device_mistakes_are_one_paragraph(trained_run, tmp_path, capsys):
    checkpoint = str(trained_run / "checkpoints" / "iter-0000001")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    plain = tmp_path / "samples"  # a file without a suffix
    plain.write_text("keep me too")
    jpg = tmp_path / "grid.jpg"
    cases = {
        notes: [f"--out {notes}: a path with a suffix is a file, and only .png is written", "directory"],
        jpg: [f"--out {jpg}: a path with a suffix is a file", f"--out {tmp_path / 'grid.png'}", "directory"],
        plain: [f"--out {plain}: exists and is a file, not a directory", ".png"],
    }
    for out, needles in cases.items():
        assert sample.main(["--checkpoint", checkpoint, "--n", "4", "--out", str(out)]) == 2
        err = flat(capsys.readouterr().err)
        assert err.startswith("error: ") and "Traceback" not in err, err
        for needle in needles:
            assert needle in err, err
    assert notes.read_text() == "keep me" and plain.read_text() == "keep me too"
    assert not jpg.exists()  # not turned into a directory
    if not torch.cuda.is_available():
        grid = tmp_path / "grid.png"
        assert sample.main(["--checkpoint", checkpoint, "--out", str(grid), "--device", "cuda"]) == 2
        err = flat(capsys.readouterr().err)
        assert err.startswith("error: --device cuda: no CUDA GPU is available here") and "--device cpu" in err, err
        assert not grid.exists()


@pytest.mark.slow
def test_sample_takes_a_run_directory_and_writes_in_batches(trained_run, tmp_path, capsys):
    # The directory form through the real CLI: 300 images cross the 256-image batch boundary.
    folder = tmp_path / "samples"
    done = subprocess.run([sys.executable, "-m", "trainer.sample", "--checkpoint", str(trained_run), "--n", "300",
                           "--seed", "3", "--device", "cpu", "--out", str(folder)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "iter-0000001" in done.stdout
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{index:06d}.png" for index in range(300)]
    written = np.stack([np.asarray(Image.open(folder / name)) for name in names])
    expected = to_uint8(expected_images(trained_run, 300, 3))[:, 0].numpy()  # 1 channel: (N, H, W) PNGs
    assert written.shape == expected.shape == (300, 16, 16)
    assert np.abs(written.astype(int) - expected).max() <= 1  # (float rounding may differ between processes)
    # The grid form, in this process: the uint8 images of generate() in one grid.
    from trainer.tracking import sample_grid

    grid = tmp_path / "grid.png"
    assert sample.main(["--checkpoint", str(trained_run), "--n", "10", "--seed", "3", "--out", str(grid)]) == 0
    np.testing.assert_array_equal(
        np.asarray(Image.open(grid)), sample_grid(expected_images(trained_run, 10, 3))[..., 0]
    )
    # A trailing slash means a folder, even when the name has a dot in it.
    dotted = tmp_path / "samples.v2"
    assert sample.main(["--checkpoint", str(trained_run), "--n", "3", "--out", f"{dotted}/"]) == 0
    assert sorted(p.name for p in dotted.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    # Batches of any size give the images of one batch: z is drawn for all n at once.
    from trainer.checkpoint import load_generator

    generator, cfg = load_generator(trained_run / "checkpoints" / "iter-0000001")
    batched = torch.cat(list(sample.generate_batches(generator, cfg.model.z_dim, 10, 3, "cpu", batch=3)))
    torch.testing.assert_close(batched, sample.generate(generator, cfg.model.z_dim, 10, 3, "cpu"))
