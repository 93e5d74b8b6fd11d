"""launch/gpu_check.sh rehearsed on the CPU (--quick --dry-run): its 4 result files, one step per config x precision.

fp16 and bf16 runs are not asserted to pass here: fp16 on the CPU needs the trainer's WGAN_DIV_CPU_FP16 hook, and a
failing step must only show up as FAIL in the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

CONFIGS = sorted(path.stem for path in (REPO / "configs").glob("*.yaml"))
PRECISIONS = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
FILES = {"summary.txt", "full.log", "figures.json", "rest.tar.gz"}


@pytest.mark.slow
def test_gpu_check_dry_run_writes_four_files_with_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ)
    env.pop("WGAN_DIV_INJECT_FAULT", None)
    env.update(
        OUT=str(out),
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",
        PYTHON=sys.executable,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        TMPDIR=str(tmp_path),
    )
    done = subprocess.run(
        ["bash", "launch/gpu_check.sh", "--quick", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    assert {path.name for path in out.iterdir()} == FILES, sorted(out.iterdir())
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith("gpu_check.")] == []  # scratch removed

    figures = json.loads((out / "figures.json").read_text())
    steps = figures["steps"]
    assert figures["card"] and figures["torch"] and figures["accelerate"]
    assert figures["mode"] == {"quick": True, "dry_run": True}
    assert {"setup", "cuda-tests", "eval-mnist32-bf16"} <= set(steps)
    for name in ("sweep-r_ablation", "sweep-kp_ablation"):  # the dry run checks every run's config
        assert steps[name]["status"] == "PASS" and "every config is valid" in steps[name]["summary"], steps[name]
    for config in CONFIGS:
        for label in PRECISIONS.values():
            assert f"run-{config}-{label}" in steps, (config, label, sorted(steps))
        fp32 = steps[f"run-{config}-fp32"]
        assert fp32["status"] == "PASS", fp32
        assert fp32["figures"]["s_per_iteration"] > 0 and fp32["figures"]["skipped_steps"] == 0
    assert steps["cuda-tests"]["status"] == "PASS" and steps["cuda-tests"]["figures"].get("skipped", 0) > 0
    for label in PRECISIONS.values():
        assert f"bench-{label}-b64" in steps
    assert steps["bench-fp32-b64"]["status"] == "PASS"
    assert steps["bench-fp32-b64"]["figures"]["img_per_s"] > 0
    for step in steps.values():
        assert step["status"] in ("PASS", "FAIL", "TIMEOUT"), step
        assert step["status"] == "PASS" or step["note"], step

    summary = (out / "summary.txt").read_text()
    lines = summary.splitlines()
    for name, step in steps.items():
        assert any(line.split()[:2] == [name, step["status"]] for line in lines), (name, summary)
        if step["status"] != "PASS":
            assert f"---- {name}: {step['status']}" in summary
    assert (done.returncode == 0) == all(step["status"] == "PASS" for step in steps.values())
    assert "==== [" in (out / "full.log").read_text()
