"""What a run reports to W&B (offline, read back with `wandb leet inspect --json`) and to the console."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import REPO, RUN, TINY, child_env, run_trainer
from trainer.tracking import last_logged_step

pytestmark = pytest.mark.slow

SCALARS = [
    "loss/critic", "loss/penalty", "loss/generator", "loss/critic_adversarial", "wasserstein", "critic/real",
    "critic/fake", "grad_norm/D/total", "grad_norm/D/input", "grad_norm/D/blocks.0", "grad_norm/D/output",
    "grad_norm/G/total", "grad_norm/G/input", "input_grad_norm/mean", "input_grad_norm/max", "lr/generator",
    "lr/critic", "speed/img_per_s", "speed/s_per_iteration", "progress/kimg", "amp/skipped_steps",
]  # fmt: skip


def offline_runs(run_dir: Path) -> list[Path]:
    """The offline W&B runs under run.dir (one per segment of a resumed run), oldest first."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert runs, f"no offline run under {run_dir / 'wandb'}"
    return runs


def inspect(offline_run: Path) -> list[dict]:
    """The records of one offline run's .wandb file, as `wandb leet inspect --json` prints them."""
    wandb_cli = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    done = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(offline_run)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def wandb_records(run_dir: Path) -> list[dict]:
    return [record for run in offline_runs(run_dir) for record in inspect(run)]


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def segments(run_dir: Path) -> list[list[dict]]:
    """The history rows of each offline segment of a run, oldest first."""
    return [history(inspect(run)) for run in offline_runs(run_dir)]


def run_ids(records: list[dict]) -> set[str]:
    return {r["run"]["run_id"] for r in records if r["type"] == "run"}


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("wandb_run")
    overrides = ("log.wandb.mode=offline", "train.iterations=4", "log.every=2", "log.samples_every=2",
                 "checkpoint.every=2")  # fmt: skip
    done = run_trainer(run_dir, *overrides, env=child_env(WANDB_MODE="offline"))
    assert done.returncode == 0, done.stdout
    return run_dir, done.stdout


def test_offline_run_lives_in_run_dir_and_holds_every_dashboard_scalar(offline_run):
    run_dir, output = offline_run
    rows = history(wandb_records(run_dir))
    logged = set().union(*rows)
    missing = [key for key in SCALARS if key not in logged]
    assert not missing, f"not logged: {missing}"
    iterations = [row["iteration"] for row in rows if "wasserstein" in row]
    assert iterations == [2, 4]
    assert [row["_step"] for row in rows] == [row["iteration"] for row in rows] == [2, 4]  # one row per iteration
    assert "wandb sync" in output  # says once how to upload the offline run


def test_config_is_logged(offline_run):
    run_dir, _ = offline_run
    records = wandb_records(run_dir)
    config = next(r["config"]["update"] for r in records if r["type"] == "config" and "train" in r["config"]["update"])
    assert config["train"]["iterations"] == 4
    assert config["loss"]["name"] == "wgan-div"


def test_sample_grids_are_logged_as_non_black_images_and_saved_as_png(offline_run):
    run_dir, _ = offline_run
    rows = history(wandb_records(run_dir))
    images = [row for row in rows if row.get("samples/ema._type") == "image-file"]
    assert [row["iteration"] for row in images] == [2, 4]
    assert all("samples/generator.path" in row for row in images)
    media = next((run_dir / "wandb").glob("offline-run-*/files/" + images[-1]["samples/ema.path"]))
    assert np.asarray(Image.open(media)).max() > 0  # W&B saves float tensors as black PNGs; we pass uint8
    for name in ("iter-0000002.png", "iter-0000004.png", "raw/iter-0000004.png"):
        assert np.asarray(Image.open(run_dir / "samples" / name)).std() > 0


def test_the_last_step_is_read_from_a_wandb_file_cut_anywhere(offline_run, tmp_path):
    """A resumed run reads where the earlier segments' .wandb files end; a file cut short (a killed process, a
    full disk) gives the last complete row, never an error or a step it does not hold."""
    run_dir, _ = offline_run
    data = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    cut = tmp_path / "cut.wandb"
    found = []
    for end in sorted({*range(0, len(data), max(1, len(data) // 300)), len(data)}):
        cut.write_bytes(data[:end])
        found.append(last_logged_step(cut))
    assert found[-1] == 4
    assert set(found) == {None, 2, 4}
    assert [-1 if step is None else step for step in found] == sorted(-1 if step is None else step for step in found)


def test_resume_continues_the_same_wandb_run(offline_run, tmp_path):
    run_dir, _ = offline_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    first = run_ids(wandb_records(copy))
    done = run_trainer(copy, "log.wandb.mode=offline", "train.iterations=6", "log.every=2",
                       resume="auto", env=child_env(WANDB_MODE="offline"))  # fmt: skip
    assert done.returncode == 0, done.stdout
    records = wandb_records(copy)
    assert len(list((copy / "wandb").glob("offline-run-*"))) == 2
    assert run_ids(records) == first  # the same id: what `wandb sync` needs to append the second segment
    # W&B's step is the iteration in both segments (an offline segment would otherwise start again at step 0).
    assert [[(row["_step"], row["iteration"]) for row in rows] for rows in segments(copy)] == [
        [(2, 2), (4, 4)],
        [(6, 6)],
    ]


# Run the real CLI, but SIGKILL the process at the end of one iteration, as the OOM killer or `kill -9` would: no
# `finally`, no W&B finish. It first waits for W&B to write its buffer to the .wandb file (every
# WANDB_FLUSH_INTERVAL_S); what a kill loses inside that interval is described in the README.
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from trainer import tracking

    advance = tracking.Tracker.advance

    def advance_then_die(self, iteration):
        advance(self, iteration)
        if iteration == {kill_at}:
            time.sleep(3 * tracking.WANDB_FLUSH_INTERVAL_S)
            os.kill(os.getpid(), signal.SIGKILL)

    tracking.Tracker.advance = advance_then_die
    from trainer.run import main
    sys.exit(main())
""")


def test_a_killed_offline_run_resumes_without_losing_or_repeating_an_iteration(tmp_path):
    """Killed after iteration 7 (checkpoint at 4, rows at 2, 4, 6), resumed at 4: the new segment trains 5-10 again
    but logs only 8 and 10 to W&B, with _step = iteration, so `wandb sync` appends it to the first."""
    overrides = ["log.wandb.mode=offline", "train.iterations=10", "log.every=2", "log.samples_every=4",
                 "checkpoint.every=4", "eval.every=4", "eval.metrics=[swd]", "eval.num_images=16",
                 f"run.dir={tmp_path}"]  # fmt: skip
    env = child_env(WANDB_MODE="offline")
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN.format(repo=str(REPO), kill_at=7), "--config",
                             str(REPO / "configs" / "demo.yaml"), *TINY, *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("iter-*")) == ["iter-0000004"]
    assert not [r for r in wandb_records(tmp_path) if r["type"] == "exit"]  # a crash: W&B never finished it

    resumed = subprocess.run([sys.executable, RUN, "--config", str(REPO / "configs" / "demo.yaml"), "--resume",
                              "auto", *TINY, *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout
    assert "the previous segment logged up to iteration 6, which W&B keeps; iterations 5-6 go to" in resumed.stdout
    assert [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("it ")] == ["6/10", "8/10",
                                                                                                   "10/10"]  # fmt: skip

    first, second = segments(tmp_path)
    for row in first + second:
        assert row["_step"] == row["iteration"], row
    assert [row["iteration"] for row in first] == [2, 4, 6]
    assert [row["iteration"] for row in second] == [8, 10]  # after the checkpoint (4) and after the first segment
    assert len(run_ids(wandb_records(tmp_path))) == 1  # one W&B run, two segments
    # Scalars, sample grids and the evaluation of one iteration share its row; the grids written after the last
    # iteration (10 is not a multiple of log.samples_every) join the last row.
    for row in (first[1], second[0]):
        assert {"wasserstein", "samples/ema._type", "metrics/swd"} <= set(row), sorted(row)
    assert {"wasserstein", "samples/ema._type"} <= set(second[1]), sorted(second[1])


def test_two_processes_log_once_with_values_averaged_over_ranks(offline_run, tmp_path):
    run_dir, _ = offline_run
    done = run_trainer(tmp_path, "log.wandb.mode=offline", "train.iterations=4", "log.every=2",
                       "log.samples_every=2", "checkpoint.every=2", nproc=2,
                       env=child_env(WANDB_MODE="offline"))  # fmt: skip
    assert done.returncode == 0, done.stdout
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # only the main process touched W&B
    single = {row["iteration"]: row for row in history(wandb_records(run_dir)) if "wasserstein" in row}
    double = {row["iteration"]: row for row in history(wandb_records(tmp_path)) if "wasserstein" in row}
    assert sorted(double) == [2, 4]  # each logging step once, not once per rank
    for key in ("wasserstein", "loss/penalty", "loss/generator", "critic/real"):
        assert double[2][key] == pytest.approx(single[2][key], rel=1e-4, abs=1e-6), key


def test_console_prints_plain_lines_when_not_a_tty(offline_run):
    _, output = offline_run
    lines = [line for line in output.splitlines() if line.startswith("it ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert all("img/s" in line and "W " in line for line in lines)


def test_evaluations_print_their_own_line_and_append_to_metrics_jsonl_without_wandb(tmp_path):
    """With W&B disabled nothing is lost: every evaluation is a line of run.dir/metrics.jsonl and of the console,
    never a loss line of nans; a log window without a penalty step (loss.every=2, n_critic=1) shows "penalty -"."""
    overrides = ("train.iterations=4", "log.every=1", "eval.every=2", "eval.metrics=[swd]", "eval.num_images=16",
                 "train.n_critic=1", "loss.every=2", "checkpoint.every=100")  # fmt: skip
    done = run_trainer(tmp_path, *overrides)
    assert done.returncode == 0, done.stdout
    evaluations = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evaluations] == [2, 4]
    assert all(e["metrics/swd"] > 0 for e in evaluations)
    lines = done.stdout.splitlines()
    assert [line.split()[2] for line in lines if line.startswith("eval it ")] == ["2/4", "4/4"]
    assert all(line.split()[3] == "swd" for line in lines if line.startswith("eval it "))
    losses = [line for line in lines if line.startswith("it ")]
    assert len(losses) == 4 and not any("nan" in line for line in losses), losses
    # Critic steps 0, 2 take the penalty: iterations 1 and 3 show it, 2 and 4 have none to show.
    assert [line.split("penalty ")[1].split()[0] == "-" for line in losses] == [False, True, False, True], losses


def test_a_metrics_file_that_cannot_be_written_warns_once_and_training_goes_on(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir(parents=True)  # stands in for a full disk: appending fails with an OSError
    overrides = ("train.iterations=4", "eval.every=2", "eval.metrics=[swd]", "eval.num_images=16",
                 "checkpoint.every=100")  # fmt: skip
    done = run_trainer(tmp_path, *overrides)
    assert done.returncode == 0 and "Traceback" not in done.stdout, done.stdout[-3000:]
    assert done.stdout.count("cannot append to") == 1
    assert len([line for line in done.stdout.splitlines() if line.startswith("eval it ")]) == 2
    assert (tmp_path / "checkpoints" / "iter-0000004").is_dir()
