"""The fault soak (benchmarks/fault_soak.py) in its quick form: 4 faults on 2 real processes, then bit-identical
weights. About 1.5 minutes on 2 cores; needs root (it mounts a tmpfs). Skipped unless WGAN_DIV_SOAK=1:

    WGAN_DIV_SOAK=1 python -m pytest -q -m soak tests/test_fault_soak.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import REPO

if os.environ.get("WGAN_DIV_SOAK") != "1":
    pytest.skip("the fault soak runs only with WGAN_DIV_SOAK=1 (it needs root and takes minutes)",
                allow_module_level=True)  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.soak]


@pytest.mark.slow
@pytest.mark.soak
def test_quick_fault_soak_loses_nothing_and_ends_bit_identical(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the fault soak mounts a tmpfs: it needs root")
    done = subprocess.run([sys.executable, "benchmarks/fault_soak.py", "--quick", "--out", str(tmp_path)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["lost_checkpoints"] == 0, summary
    assert summary["corrupt_checkpoints"] == 0, summary
    assert summary["final_weights_identical"] is True, summary
    assert summary["faults_injected"] >= 4, summary
    assert summary["failures"] == [], summary
