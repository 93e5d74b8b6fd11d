"""Sweeps: the shipped files pass W&B's own schema, the grid is W&B's, and the local runner trains every run,
reports failures as rows, and after a Ctrl-C finishes only what was left (real processes, real signals)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support import REPO, child_env
from trainer import sweep as sweeps

SHIPPED = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
# W&B's sweep-config JSON schema, copied unchanged from the PyPI package `sweeps` 0.3.0 (W&B's sweep engine, MIT
# licence: sweeps/config/schema.json). The package itself pins numpy<2, which torch's numpy 2 excludes, and pulls
# scipy and scikit-learn, so the test validates with the schema file and jsonschema, as that package does.
SCHEMA = REPO / "tests" / "data" / "wandb_sweep_schema.json"


def wandb_schema_violations(config: dict) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    checker = jsonschema.FormatChecker()
    checker.checks("float")(lambda value: isinstance(value, float))  # the package's own format checks
    checker.checks("integer")(lambda value: isinstance(value, int))
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()), format_checker=checker)
    return [error.message for error in validator.iter_errors(config)]


def test_the_sweeps_the_issue_asks_for_are_shipped():
    assert {p.name for p in SHIPPED} >= {"r_ablation.yaml", "kp_ablation.yaml", "r_ablation_ffhq64.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_sweep_passes_wandb_schema_and_every_run_config_is_valid(path):
    assert wandb_schema_violations(yaml.safe_load(path.read_text())) == []
    sweep = sweeps.read_sweep(path)
    runs = sweeps.expand(sweep)
    sweeps.check_runs(sweep, runs, REPO / "runs" / "sweeps" / sweep.name)  # raises on a bad config
    assert len({r.name for r in runs}) == len(runs)


def test_the_schema_check_can_fail():
    broken = yaml.safe_load((REPO / "configs" / "sweeps" / "r_ablation.yaml").read_text())
    broken["method"] = "grdi"
    broken["parameters"]["loss.r"] = {"valuez": ["fake"]}
    violations = wandb_schema_violations(broken)
    assert any("grdi" in v for v in violations) and len(violations) >= 2


def test_r_ablation_grid_is_w_and_bs_order_and_size():
    """W&B's engine (sweeps/grid_search.py) takes the product of the parameters sorted by name, the last one
    varying fastest; constants join every run; ${args_no_hyphens} writes key=value with Python's str()."""
    sweep = sweeps.read_sweep(REPO / "configs" / "sweeps" / "r_ablation.yaml")
    runs = sweeps.expand(sweep)
    assert len(runs) == 2 * 6 * 2
    assert [r.name for r in runs[:3]] == [
        "name=wgan-div_r=real-fake-interp_seed=0",
        "name=wgan-div_r=real-fake-interp_seed=1",
        "name=wgan-div_r=within-interp_seed=0",
    ]
    assert runs[-1].name == "name=wgan-gp_r=real_seed=1"
    assert "eval.metrics=['swd']" in runs[0].overrides and "loss.gp_lambda=10.0" in runs[0].overrides
    assert runs[0].overrides == sorted(runs[0].overrides)


def test_wgan_gp_takes_lambda_and_wgan_div_takes_k():
    from trainer.config import load_config

    demo = REPO / "configs" / "demo.yaml"
    both = ["loss.k=2", "loss.gp_lambda=10"]
    assert load_config(demo, [*both, "loss.name=wgan-gp"]).loss.penalty_weight() == 10.0
    assert load_config(demo, [*both, "loss.name=wgan-div"]).loss.penalty_weight() == 2.0
    assert load_config(demo, ["loss.k=7", "loss.name=wgan-gp"]).loss.penalty_weight() == 7.0  # as before lambda


def write_sweep(tmp_path: Path, parameters: dict, **top) -> Path:
    data = {
        "name": "tiny",
        "program": "trainer/run.py",
        "method": "grid",
        "metric": {"name": "metrics/swd", "goal": "minimize"},
        "parameters": parameters,
        "command": ["${env}", "python", "${program}", "--config", str(REPO / "configs/demo.yaml"), sweeps.ARGS_MACRO],
        **top,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# A run of a few seconds: 16 px, a tiny model, W&B off.
TINY_PARAMETERS = {
    "data.resolution": {"value": 16},
    "model.width": {"value": 8},
    "model.z_dim": {"value": 16},
    "train.batch_size": {"value": 16},
    "train.n_critic": {"value": 2},
    "train.channels_last": {"value": False},
    "log.every": {"value": 1},
    "log.samples_every": {"value": 1000},
    "log.grid_size": {"value": 16},
    "log.wandb.mode": {"value": "disabled"},
    "eval.num_images": {"value": 64},
    "eval.batch_size": {"value": 32},
}


def run_sweep(path: Path, out: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "trainer.sweep", str(path), "--out", str(out), *extra]
    return subprocess.run(command, cwd=REPO, env=child_env(), timeout=timeout, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)  # fmt: skip


def read_rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv") as handle:
        return {row["run"]: row for row in csv.DictReader(handle)}


@pytest.mark.slow
def test_tiny_sweep_two_runs_in_parallel_a_failed_run_is_a_row_and_a_rerun_trains_nothing(tmp_path):
    """Two runs of 2 iterations on two slots at once (--gpus 0,1 pins each run's CUDA_VISIBLE_DEVICES; on this CPU
    machine they train on the CPU side by side), one of them on a data source that does not exist."""
    parameters = {**TINY_PARAMETERS, "train.iterations": {"value": 2},
                  "data.source": {"values": ["bundled:mnist", str(tmp_path / "no-such-folder")]}}  # fmt: skip
    path, out = write_sweep(tmp_path, parameters), tmp_path / "out"
    first = run_sweep(path, out, "--gpus", "0,1")
    assert first.returncode == 1, first.stdout  # a failed run: exit 1, after the others finished
    rows = read_rows(out)
    good, bad = rows["source=bundled-mnist"], rows[next(name for name in rows if "no-such-folder" in name)]
    assert good["status"] == "finished" and float(good["metrics/swd"]) > 0
    assert bad["status"] == "failed" and "no-such-folder" in bad["error"] and bad["metrics/swd"] == ""
    assert "failed" in (out / "results.md").read_text() and (out / "results.png").stat().st_size > 1000
    logs = {name: (out / "runs" / name / "sweep.log").read_text() for name in rows}
    assert {log.count("CUDA_VISIBLE_DEVICES=") for log in logs.values()} == {1}
    assert sorted(log.split("CUDA_VISIBLE_DEVICES=")[1][0] for log in logs.values()) == ["0", "1"]
    metrics = [json.loads(line) for line in (out / "runs" / "source=bundled-mnist" / "metrics.jsonl").open()]
    assert metrics[-1]["iteration"] == 2  # eval.at_end: the final evaluation the table is made of

    second = run_sweep(path, out)  # finished runs are skipped, the failed one is kept as it is
    assert second.returncode == 1, second.stdout
    assert "1 finished, 1 failed (kept; --retry-failed runs them again), 0 to run" in second.stdout
    assert {name: (out / "runs" / name / "sweep.log").read_text() for name in rows} == logs  # nothing started
    assert read_rows(out) == rows


@pytest.mark.slow
def test_a_ctrl_c_stops_the_sweep_with_checkpoints_and_a_second_invocation_finishes_only_what_was_left(tmp_path):
    """What a user does: start a sweep, press Ctrl-C in the middle of its first run (SIGINT to the runner's
    process group, as a terminal sends it), then run the same command again."""
    parameters = {**TINY_PARAMETERS, "train.iterations": {"value": 150}, "checkpoint.every": {"value": 5},
                  "run.seed": {"values": [0, 1]}}  # fmt: skip
    path, out = write_sweep(tmp_path, parameters), tmp_path / "out"
    command = [sys.executable, "-m", "trainer.sweep", str(path), "--out", str(out)]
    runner = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)  # fmt: skip
    first_run = out / "runs" / "seed=0"
    deadline = time.monotonic() + 120
    while not list((first_run / "checkpoints").glob("iter-*/manifest.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(runner.pid, signal.SIGINT)  # the whole foreground group: the runner (and nothing else: see below)
    stdout, _ = runner.communicate(timeout=120)
    assert runner.returncode == 130, stdout
    assert "seed=0: stopped; it resumes from its checkpoint next time" in stdout
    assert "seed=1" not in stdout.split("SIGINT")[1]  # the second run never started
    newest = sorted((first_run / "checkpoints").glob("iter-*"))[-1]
    stopped_at = json.loads((newest / "manifest.json").read_text())
    assert 0 < stopped_at["iteration"] < 150
    assert read_rows(out)["seed=0"]["status"] == "interrupted"

    # Shorten the runs for the second invocation? No: the sweep file must stay the same (a changed file is refused).
    # The stopped run resumes from its checkpoint.
    second = run_sweep(path, out, timeout=600)
    assert second.returncode == 0, second.stdout
    assert "0 finished, 0 failed (kept; --retry-failed runs them again), 2 to run" in second.stdout
    log = (first_run / "sweep.log").read_text()
    assert f"resumed from {first_run / 'checkpoints'}" in log and log.count("=== sweep:") == 2
    assert (out / "runs" / "seed=1" / "sweep.log").read_text().count("=== sweep:") == 1
    assert {row["status"] for row in read_rows(out).values()} == {"finished"}


def test_a_changed_sweep_file_is_refused_for_an_existing_sweep_directory(tmp_path, capsys):
    path, out = write_sweep(tmp_path, {**TINY_PARAMETERS, "train.iterations": {"value": 1}}), tmp_path / "out"
    sweep = sweeps.read_sweep(path)
    sweeps.prepare_directory(sweep, out)
    path.write_text(path.read_text().replace("value: 1\n", "value: 2\n"))
    assert sweeps.main([str(path), "--out", str(out)]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "holds another sweep" in error and str(out) in error and "Traceback" not in error


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"method": "bayes"}, "method: bayes needs W&B's sweep server"),
        ({"method": "random"}, "method: random needs run_cap"),
        ({"command": ["python", "${program}", "${args}"]}, "${args} is not supported"),
        ({"parameters": {"loss.r": {"values": ["fakee"]}}}, "run 1 (run) has no valid config"),
        ({"parameters": {"loss.rr": {"values": ["fake"]}}}, "unknown key 'loss.rr'. Did you mean 'loss.r'?"),
        ({"parameters": {"loss.k": {"distribution": "uniform", "min": 1, "max": 2}}}, "continuous (uniform)"),
        ({"program": None}, "program is missing"),
    ],
)
def test_a_bad_sweep_file_gets_one_paragraph_naming_the_file(tmp_path, capsys, change, expected):
    path = write_sweep(tmp_path, {"loss.r": {"values": ["fake"]}})
    data = yaml.safe_load(path.read_text())
    data.update(change)
    path.write_text(yaml.safe_dump(data))
    assert sweeps.main([str(path), "--dry-run"]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert expected in error and str(path) in error and "Traceback" not in error


def test_random_draws_are_the_same_on_every_invocation(tmp_path):
    path = write_sweep(tmp_path, {"loss.k": {"distribution": "log_uniform_values", "min": 0.5, "max": 20},
                                  "loss.r": {"values": ["fake", "real"]}}, method="random", run_cap=5)  # fmt: skip
    first, second = (sweeps.expand(sweeps.read_sweep(path)) for _ in range(2))
    assert [r.values for r in first] == [r.values for r in second] and len(first) == 5
    assert all(0.5 <= r.values["loss.k"] <= 20 for r in first)


@pytest.mark.slow
def test_under_a_wandb_agent_each_run_writes_to_its_own_directory(tmp_path):
    """`wandb agent` sets WANDB_SWEEP_ID and WANDB_RUN_ID for each run: the run goes to run.dir/<run id>."""
    command = [sys.executable, str(REPO / "trainer" / "run.py"), "--config", str(REPO / "configs/demo.yaml"),
               *(f"{k}={v['value']}" for k, v in TINY_PARAMETERS.items()), "train.iterations=1",
               f"run.dir={tmp_path}"]  # fmt: skip
    env = child_env(WANDB_SWEEP_ID="abc123", WANDB_RUN_ID="run7")
    result = subprocess.run(command, cwd=REPO, env=env, timeout=300, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert (tmp_path / "run7" / "checkpoints").is_dir() and not (tmp_path / "checkpoints").exists()


def test_results_of_list_valued_parameters_group_by_value(tmp_path):
    """train.betas is a list: the table and chart group runs by it (a list is not hashable as is)."""
    betas = {"values": [[0.5, 0.999], [0.0, 0.9]]}
    path = write_sweep(tmp_path, {"train.betas": betas, "run.seed": {"values": [0, 1]}})
    sweep = sweeps.read_sweep(path)
    runs = sweeps.expand(sweep)
    assert [r.name for r in runs] == ["seed=0_betas=0.5,0.999", "seed=0_betas=0.0,0.9", "seed=1_betas=0.5,0.999",
                                      "seed=1_betas=0.0,0.9"]  # fmt: skip
    for i, run in enumerate(runs):
        run.status, run.metrics = ("finished", {"metrics/swd": 10.0 + i}) if i != 3 else ("failed", {})
    written = sweeps.write_results(sweep, runs, tmp_path)
    assert len(written) == 3
    table = (tmp_path / "results.md").read_text()
    assert "| 0.5,0.999 | 11 | 2 | seed 0: 10, seed 1: 12 | 2/2 |" in table
    assert "| 0.0,0.9 | 11 | - | seed 0: 11, seed 1: failed | 1/2 |" in table


def test_runs_never_share_a_directory_and_names_the_yaml_parser_would_misread_stay_strings(tmp_path):
    """From the review: 0.12345 and 0.12346 were both named k=0.1235 (the second run resumed the first's weights);
    a sweep named "tiny #2" lost everything after the # (a YAML comment) in every run's run.dir."""
    from trainer.config import load_config

    close = write_sweep(tmp_path, {"loss.k": {"values": [0.12345, 0.12346]}, "run.name": {"values": ["a b", "a-b"]}})
    runs = sweeps.expand(sweeps.read_sweep(close))
    assert len({r.name for r in runs}) == 4 and runs[0].name.startswith("k=0.12345")
    for name in ("tiny #2", "2024", "r ablation: v2", "[a]"):
        sweep = sweeps.read_sweep(write_sweep(tmp_path, {"loss.r": {"value": "fake"}}, name=name))
        run = sweeps.expand(sweep)[0]
        out = tmp_path / "out dir" / "#1"
        cfg = load_config(REPO / "configs/demo.yaml", [*run.overrides, *sweeps.runner_overrides(sweep, run, out)])
        assert (cfg.run.dir, cfg.log.wandb.group, cfg.run.name) == (str(out), name, f"{name}/run")


def test_a_second_runner_on_the_same_directory_is_refused(tmp_path):
    first = sweeps.hold_the_directory(tmp_path)
    with pytest.raises(sweeps.SweepError, match=f"another runner \\(pid {os.getpid()} on .*\\) is running"):
        sweeps.hold_the_directory(tmp_path)
    first.close()  # the first one ends: the directory is free again
    sweeps.hold_the_directory(tmp_path).close()


def test_odd_files_in_a_run_directory_are_read_as_not_finished(tmp_path):
    sweep = sweeps.read_sweep(write_sweep(tmp_path, {"loss.r": {"value": "fake"}}))
    (run,) = sweeps.expand(sweep)
    run.iterations = 30
    (tmp_path / sweeps.STATUS_FILE).write_text("null")  # valid JSON, not the runner's
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 30, "metrics/sw')  # cut short by a crash
    sweeps.load_status(run, tmp_path)
    assert run.status == "pending"  # to run again (--resume auto), not finished and not failed
    # The trainer's next evaluation starts on a line of its own, so the run can finish.
    from trainer.tracking import Tracker

    tracker = Tracker.__new__(Tracker)
    tracker.main, tracker.run, tracker.run_dir, tracker.total, tracker.bar = True, None, tmp_path, 30, None
    tracker.metrics_write_failed = False
    tracker.metrics(30, {"metrics/swd": 12.5})
    sweeps.load_status(run, tmp_path)
    assert run.status == "finished" and run.metrics == {"metrics/swd": 12.5}
