"""benchmarks/scaling.py: the smoke run's JSON, and the model's pure functions.

No timing is asserted: the smoke run only checks that every figure is there and that the bytes are 4 x parameters.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from benchmarks import scaling
from tests.support import REPO, child_env

SMOKE = ["data.resolution=16", "model.width=8", "train.batch_size=16"]
TIMED = ("iteration_ms", "img_per_s", "critic_step_ms", "generator_step_ms", "critic_backward_ms")


@pytest.mark.slow
def test_scaling_smoke_run_prints_sizes_timings_and_predictions():
    command = [sys.executable, "benchmarks/scaling.py", "--configs", "configs/demo.yaml", "--model-config",
               "configs/demo.yaml", *SMOKE, "--steps", "1", "--warmup", "1", "--rounds", "1", "--json"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout holds the JSON object and nothing else

    from models import models_from_config
    from trainer.config import load_config

    generator, critic = models_from_config(load_config(REPO / "configs" / "demo.yaml", SMOKE))
    sizes = result["configs"]["demo"]["sizes"]
    for name, module in (("D", critic), ("G", generator)):
        count = sum(p.numel() for p in module.parameters())
        assert sizes[name]["parameters"] == count
        assert sizes[name]["gradient_bytes"] == 4 * count
        assert sum(sizes[name]["buckets_computed"]) == 4 * count
        assert sum(sizes[name]["buckets_reducer"]) == 4 * count  # the real reducer's buckets hold every gradient
        assert sizes[name]["bucket_count"] == len(sizes[name]["buckets_reducer"]) >= 1
    assert sizes["bytes_per_critic_step"] == 4 * sum(p.numel() for p in critic.parameters())
    assert sizes["bytes_per_generator_step"] == 4 * sum(p.numel() for p in generator.parameters())

    timing = result["configs"]["demo"]["timing"]
    for run, processes, batch in (("one_process", 1, 16), ("one_process_half_batch", 1, 8), ("two_processes", 2, 8)):
        assert timing[run]["processes"] == processes and timing[run]["per_process_batch"] == batch
        for key in TIMED:
            assert timing[run][key] > 0, (run, key)
    two = timing["two_processes"]
    assert set(two["allreduce_ms"]) == {"D", "G"} and min(two["allreduce_ms"].values()) > 0
    assert two["parameters"] == {"D": sizes["D"]["parameters"], "G": sizes["G"]["parameters"]}
    assert {"speedup", "efficiency", "critic_step_comm_ms", "iteration_comm_ms"} <= set(timing["derived"])

    model = result["model"]
    expected = len(scaling.ANCHORS) * len(scaling.MODEL_BATCHES) * len(scaling.GPU_COUNTS) * len(scaling.INTER_NODE)
    assert len(model["predictions"]) == len(model["predictions_linear_compute"]) == expected
    assert all(0 < row["efficiency"] <= 1 + 1e-9 and row["img_per_s"] > 0 for row in model["predictions"])


def test_ring_all_reduce_moves_2_n_minus_1_over_n_of_the_bytes():
    assert scaling.ring_allreduce_seconds(1e9, 1, 1e9) == 0
    assert scaling.ring_allreduce_seconds(1e9, 2, 1e9) == pytest.approx(1.0)
    assert scaling.ring_allreduce_seconds(1e9, 8, 50e9) == pytest.approx(2 * 7 / 8 / 50)
    assert scaling.ring_allreduce_seconds(30e6, 64, 1.25e9) == pytest.approx(2 * 63 / 64 * 30e6 / 1.25e9)


def test_bandwidth_is_nvlink_within_a_node_and_the_slower_link_across_nodes():
    assert scaling.bus_bandwidth(8, "10gbe") == scaling.LINKS["nvlink"]
    assert scaling.bus_bandwidth(16, "10gbe") == scaling.LINKS["10gbe"]
    assert scaling.bus_bandwidth(64, "infiniband") == scaling.LINKS["infiniband"]


def test_ddp_buckets_follow_the_reducers_caps():
    mib = scaling.MIB
    # reverse order: the last parameter first; the first bucket closes at 1 MiB, the next at 25 MiB
    assert scaling.ddp_buckets([10 * mib, 20 * mib, mib // 2, mib // 2]) == [mib, 30 * mib]
    assert scaling.ddp_buckets([4, 4]) == [8]
    assert scaling.ddp_buckets([30 * mib, 30 * mib, 2 * mib]) == [2 * mib, 30 * mib, 30 * mib]


def test_ddp_buckets_match_a_real_reducer_on_a_chain():
    import torch

    layers = torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.Linear(600, 3000), torch.nn.Linear(3000, 1))
    computed = scaling.ddp_buckets(scaling.parameter_bytes(layers))
    real = scaling.reducer_buckets(layers, lambda y: y.sum(), lambda: torch.randn(2, 600))
    assert computed == real


def test_only_the_last_bucket_is_always_exposed():
    buckets = [int(1e9), int(1e9)]  # 1 s each on 2 ranks at 1 GB/s
    assert scaling.exposed_seconds(buckets, 2, 1e9, overlap_window_s=5.0) == pytest.approx(1.0)
    assert scaling.exposed_seconds(buckets, 2, 1e9, overlap_window_s=0.25) == pytest.approx(1.75)
    assert scaling.exposed_seconds(buckets, 1, 1e9, overlap_window_s=0.0) == 0


FFHQ_D = [9_469_956, 20_501_248]  # ffhq64's buckets as the reducer builds them (see the README's scaling section)
FFHQ_G = [1_074_700, 27_807_232, 5_283_840]


@pytest.mark.parametrize("link", scaling.INTER_NODE)
@pytest.mark.parametrize("floor", [1, 8])
def test_efficiency_is_1_on_one_gpu_falls_with_n_and_is_higher_at_batch_512(link, floor):
    anchor = scaling.ANCHORS[0]
    efficiency = {
        batch: [
            scaling.predict(anchor, FFHQ_D, FFHQ_G, batch, n, link, floor_batch=floor)["efficiency"]
            for n in scaling.GPU_COUNTS
        ]
        for batch in scaling.MODEL_BATCHES
    }
    for batch, values in efficiency.items():
        assert values[0] == pytest.approx(1.0)
        assert all(a >= b for a, b in itertools.pairwise(values)), (batch, values)
        assert values[-1] < 1
    assert all(big > small for big, small in zip(efficiency[512][1:], efficiency[64][1:]))


def test_one_gpu_prediction_reproduces_the_anchor():
    anchor = scaling.ANCHORS[0]
    one = scaling.predict(anchor, FFHQ_D, FFHQ_G, anchor.batch, 1)
    assert one["iteration_ms"] == pytest.approx(anchor.iteration_ms)
    assert one["img_per_s"] == pytest.approx(anchor.n_critic * anchor.batch / (anchor.iteration_ms / 1000))
