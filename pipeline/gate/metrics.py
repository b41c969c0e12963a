"""The quality gate's metrics on features (N, D) and images (N, 1, H, W) in [-1, 1].

FID (Heusel et al. 2017) in float64 with a stable matrix square root, KID (Binkowski et al.
2018, unbiased MMD^2 with the cubic polynomial kernel, because FID is biased at small
sample sizes), precision / recall / density / coverage (Naeem et al. 2020, k-NN balls),
mean pairwise MS-SSIM (diversity, MONAI's MultiScaleSSIMMetric), nearest-neighbour
distances (memorization), a pixel-value Wasserstein distance (intensity) and a seeded
percentile bootstrap. Each is a plain function tested against a known answer
(tests/test_gate_metrics.py). pipeline/gate/run.py combines them into checks.

Samples may carry a group (the volume or patch they came from): neighbours and pairs
are then taken only across groups, because adjacent slices of one volume are
near-copies of each other and would shrink every k-NN ball to nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric
from numpy.typing import NDArray

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale weights of Wang et al. 2003; the gate uses the first scales that fit the image."""


# --- Frechet distance -----------------------------------------------------------------------


def _psd_sqrt(s: F64) -> F64:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return np.asarray((v * np.sqrt(np.clip(w, 0.0, None))) @ v.T, dtype=np.float64)


def frechet_distance(mu1: F64, sigma1: F64, mu2: F64, sigma2: F64) -> float:
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2), float64.

    tr sqrt(S1 S2) is computed as the sum of square roots of the eigenvalues of the
    symmetric matrix sqrt(S1) S2 sqrt(S1) (same spectrum as S1 S2), negatives clipped:
    stable where scipy.linalg.sqrtm of the non-symmetric product is not (and where
    MONAI's FIDMetric fails, calling sqrtm(disp=False) which current SciPy rejects).

    >>> frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.ones(2), np.diag([4.0, 1.0]))
    4.0
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    root1 = _psd_sqrt(s1)
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def gaussian_moments(features: NDArray[np.floating]) -> tuple[F64, F64]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def fid(a: NDArray[np.floating], b: NDArray[np.floating]) -> float:
    """FID between two feature sets (N, D) and (M, D); 0 for a set against itself.

    >>> x = np.random.default_rng(0).normal(size=(50, 3)); round(fid(x, x), 9)
    0.0
    """
    return frechet_distance(*gaussian_moments(a), *gaussian_moments(b))


# --- KID ------------------------------------------------------------------------------------


def _poly_kernel(x: F64, y: F64) -> F64:
    d = x.shape[1]
    return np.asarray((x @ y.T / d + 1.0) ** 3, dtype=np.float64)


def mmd2_unbiased(x: NDArray[np.floating], y: NDArray[np.floating]) -> float:
    """Unbiased MMD^2 between (m, D) and (n, D) with the cubic kernel k(a, b) = (a.b / D + 1)^3.

    >>> x = np.array([[0.0], [2.0]]); y = np.array([[1.0], [3.0]])
    >>> round(mmd2_unbiased(x, y), 6)  # Kxx(0,2)=1, Kyy(1,3)=64, mean Kxy=(1+1+27+343)/4=93
    -121.0
    """
    xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = xa.shape[0], ya.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 samples per set, got {m} and {n}")
    kxx, kyy, kxy = _poly_kernel(xa, xa), _poly_kernel(ya, ya), _poly_kernel(xa, ya)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


@dataclass(frozen=True)
class KID:
    """KID over random subsets: mean and std of the subset MMD^2 values, and the values."""

    mean: float
    std: float
    values: F64


def kid(a: NDArray[np.floating], b: NDArray[np.floating], subsets: int, subset_size: int, rng: np.random.Generator) -> KID:
    """KID of feature sets a (N, D) and b (M, D): unbiased MMD^2 on `subsets` random subsets
    of min(subset_size, N, M) samples from each, drawn without replacement within a subset."""
    n = min(subset_size, len(a), len(b))
    vals = np.array(
        [mmd2_unbiased(a[rng.choice(len(a), n, replace=False)], b[rng.choice(len(b), n, replace=False)]) for _ in range(subsets)]
    )
    return KID(float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, vals)


# --- distances and neighbours -----------------------------------------------------------------


def pairwise_distances(x: NDArray[np.floating], y: NDArray[np.floating]) -> F64:
    """Euclidean distances (N, M) between rows of x (N, D) and y (M, D), float64 (torch.cdist)."""
    tx = torch.as_tensor(np.asarray(x, np.float64))
    ty = torch.as_tensor(np.asarray(y, np.float64))
    return np.asarray(torch.cdist(tx, ty).numpy(), dtype=np.float64)


def _mask_same_group(d: F64, g_rows: I64 | None, g_cols: I64 | None) -> F64:
    if g_rows is None or g_cols is None:
        return d
    d = d.copy()
    d[np.asarray(g_rows)[:, None] == np.asarray(g_cols)[None, :]] = np.inf
    return d


def knn_radii(x: NDArray[np.floating], k: int, groups: I64 | None = None) -> F64:
    """Distance of each row of x (N, D) to its k-th nearest other row (N,).

    With `groups`, rows of the same group (itself included) are not neighbours; without,
    only the row itself is excluded. inf where fewer than k neighbours exist.

    >>> knn_radii(np.array([[0.0], [1.0], [3.0]]), 1).tolist()
    [1.0, 1.0, 2.0]
    """
    d = pairwise_distances(x, x)
    g = np.asarray(groups) if groups is not None else np.arange(len(d))
    d = _mask_same_group(d, g, g)
    if k > d.shape[1]:
        return np.full(len(d), np.inf)
    return np.sort(d, axis=1)[:, k - 1]


def nearest(query: NDArray[np.floating], ref: NDArray[np.floating], q_groups: I64 | None = None,
            r_groups: I64 | None = None, chunk: int = 1024) -> tuple[F64, I64]:
    """Distance (N,) and index (N,) of each query row's nearest ref row (other groups only when given).

    Queries go in chunks of `chunk` rows, so memory stays at chunk x M distances.

    >>> d, i = nearest(np.array([[0.0], [2.9]]), np.array([[1.0], [3.0]])); d.round(3).tolist(), i.tolist()
    ([1.0, 0.1], [0, 1])
    """
    n = len(query)
    dist, index = np.empty(n, np.float64), np.empty(n, np.int64)
    for s in range(0, n, chunk):
        qg = None if q_groups is None else np.asarray(q_groups)[s:s + chunk]
        d = _mask_same_group(pairwise_distances(query[s:s + chunk], ref), qg, r_groups)
        idx = np.argmin(d, axis=1)
        dist[s:s + chunk], index[s:s + chunk] = d[np.arange(len(d)), idx], idx
    return dist, index


# --- precision, recall, density, coverage -------------------------------------------------------


@dataclass(frozen=True)
class PRDC:
    """Naeem et al. 2020 metrics and the per-sample indicators they average (for bootstraps).

    `in_real_ball` (M,): synthetic sample j lies in some real k-NN ball (precision);
    `real_balls_hit` (M,): how many real balls hold it / k (density); `real_recalled` (N,):
    real sample i lies in some synthetic k-NN ball (recall); `real_covered` (N,): real ball i
    holds a synthetic sample (coverage).
    """

    precision: float
    recall: float
    density: float
    coverage: float
    in_real_ball: F64
    real_balls_hit: F64
    real_recalled: F64
    real_covered: F64


def prdc(real: NDArray[np.floating], fake: NDArray[np.floating], k: int,
         real_groups: I64 | None = None, fake_groups: I64 | None = None) -> PRDC:
    """Precision, recall, density and coverage of fake (M, D) against real (N, D) with k-NN balls.

    Strict inequalities as in Naeem et al.'s reference code. With groups, a ball's radius
    counts only neighbours from other groups (other volumes).

    >>> real = np.array([[0.0], [1.0], [2.0], [3.0]])
    >>> r = prdc(real, np.array([[0.5], [10.0]]), k=1); r.precision, r.coverage
    (0.5, 0.5)
    """
    r_radii = knn_radii(real, k, real_groups)
    f_radii = knn_radii(fake, k, fake_groups)
    d = pairwise_distances(real, fake)  # (N, M)
    inside = d < r_radii[:, None]
    in_real_ball = np.asarray(inside.any(axis=0), dtype=np.float64)
    real_balls_hit = inside.sum(axis=0).astype(np.float64) / k
    real_recalled = np.asarray((d < f_radii[None, :]).any(axis=1), dtype=np.float64)
    real_covered = (d.min(axis=1) < r_radii).astype(np.float64)
    return PRDC(
        precision=float(in_real_ball.mean()),
        recall=float(real_recalled.mean()),
        density=float(real_balls_hit.mean()),
        coverage=float(real_covered.mean()),
        in_real_ball=in_real_ball,
        real_balls_hit=real_balls_hit,
        real_recalled=real_recalled,
        real_covered=real_covered,
    )


def equal_size_indices(n_real: int, n_fake: int, rng: np.random.Generator) -> tuple[I64, I64]:
    """Indices that subsample the larger of two sets to the smaller one's size (seeded, sorted).

    Naeem et al.'s expected values (coverage 1 - 2^-k for identical distributions) assume
    equal sizes; with more real than synthetic samples coverage drops for a perfect generator.

    >>> [len(x) for x in equal_size_indices(10, 4, np.random.default_rng(0))]
    [4, 4]
    """
    n = min(n_real, n_fake)
    ri = np.sort(rng.choice(n_real, n, replace=False)) if n_real > n else np.arange(n_real)
    fi = np.sort(rng.choice(n_fake, n, replace=False)) if n_fake > n else np.arange(n_fake)
    return ri.astype(np.int64), fi.astype(np.int64)


# --- diversity: pairwise MS-SSIM ----------------------------------------------------------------


def ms_ssim_scales(size: int, kernel_size: int = 7) -> int:
    """How many MS-SSIM scales fit an image of side `size` with a `kernel_size` kernel.

    MONAI needs size // (scales - 1)^2 > kernel_size - 1; 64x64 with kernel 7 fits 3 scales
    (64 -> 32 -> 16 px), not the 5 of Wang et al. 2003 (those need 161 px at kernel 11).

    >>> ms_ssim_scales(64), ms_ssim_scales(256)
    (3, 5)
    """
    scales = 1
    for n in range(2, len(MS_SSIM_WEIGHTS) + 1):
        # MONAI's own size rule, and a coarsest scale at least twice the kernel
        if size // (n - 1) ** 2 > kernel_size - 1 and size // 2 ** (n - 1) >= 2 * kernel_size:
            scales = n
    return scales


def ms_ssim_pairs(a: torch.Tensor, b: torch.Tensor, kernel_size: int = 7) -> F64:
    """MS-SSIM of image pairs a[i], b[i] (P, 1, H, W) in [-1, 1] -> (P,) values in [0, 1].

    MONAI's MultiScaleSSIMMetric (data range 2, Gaussian kernel sigma 1.5) with the first
    `ms_ssim_scales(H)` weights of Wang et al. renormalised to sum to 1.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"MS-SSIM needs two (P, 1, H, W) batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    size = int(min(a.shape[-2:]))
    kernel = kernel_size
    while kernel > 3 and ms_ssim_scales(size, kernel) < 2:
        kernel -= 2
    n = ms_ssim_scales(size, kernel)
    w = np.asarray(MS_SSIM_WEIGHTS[:n], dtype=np.float64)
    weights = tuple(float(x) for x in w / w.sum())
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=2.0, kernel_size=kernel, weights=weights, reduction="none")
    out = metric(a.float(), b.float())
    return np.asarray(torch.as_tensor(out).reshape(-1).double().numpy(), dtype=np.float64)


def random_pairs(groups: I64, max_pairs: int, rng: np.random.Generator, strata: I64 | None = None) -> tuple[I64, I64]:
    """Up to `max_pairs` distinct random index pairs (i, j), i < j, from different groups (seeded).

    With `strata` (e.g. the slice index of each sample), only pairs of the same stratum.

    >>> i, j = random_pairs(np.array([0, 0, 1]), 10, np.random.default_rng(0)); sorted(zip(i.tolist(), j.tolist()))
    [(0, 2), (1, 2)]
    >>> random_pairs(np.array([0, 0, 1]), 10, np.random.default_rng(0), strata=np.array([0, 1, 1]))[0].tolist()
    [1]
    """
    g = np.asarray(groups)
    n = len(g)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    total = n * (n - 1) // 2
    if total <= 4 * max_pairs:
        ii, jj = np.triu_indices(n, k=1)
    else:
        ii = rng.integers(0, n, 8 * max_pairs)
        jj = rng.integers(0, n, 8 * max_pairs)
        lo, hi = np.minimum(ii, jj), np.maximum(ii, jj)
        keep = lo != hi
        pairs = np.unique(np.stack([lo[keep], hi[keep]], axis=1), axis=0)
        ii, jj = pairs[:, 0], pairs[:, 1]
    keep = g[ii] != g[jj]
    if strata is not None:
        st = np.asarray(strata)
        keep &= st[ii] == st[jj]
    ii, jj = ii[keep], jj[keep]
    if len(ii) > max_pairs:
        pick = np.sort(rng.choice(len(ii), max_pairs, replace=False))
        ii, jj = ii[pick], jj[pick]
    return ii.astype(np.int64), jj.astype(np.int64)


def mean_pairwise_ms_ssim(images: torch.Tensor, groups: I64, max_pairs: int, rng: np.random.Generator,
                          strata: I64 | None = None, batch: int = 256) -> F64:
    """MS-SSIM values (P,) of up to `max_pairs` random pairs of images (N, 1, H, W) from different groups
    (and the same stratum when given)."""
    ii, jj = random_pairs(groups, max_pairs, rng, strata)
    vals = [ms_ssim_pairs(images[ii[s:s + batch]], images[jj[s:s + batch]]) for s in range(0, len(ii), batch)]
    return np.concatenate(vals) if vals else np.zeros(0)


# --- intensity ----------------------------------------------------------------------------------


def intensity_w1(a: NDArray[np.floating], b: NDArray[np.floating], n_quantiles: int = 1000) -> float:
    """Wasserstein-1 distance between the pooled values of two image sets (any shapes).

    W1 is the mean absolute difference of the quantile functions, taken on a grid of
    `n_quantiles` midpoints. A shift of every value by c gives |c|.

    >>> round(intensity_w1(np.zeros(100), np.full(50, 0.3)), 6)
    0.3
    """
    q = (np.arange(n_quantiles) + 0.5) / n_quantiles
    qa = np.quantile(np.asarray(a, np.float64).ravel(), q)
    qb = np.quantile(np.asarray(b, np.float64).ravel(), q)
    return float(np.abs(qa - qb).mean())


# --- bootstrap ----------------------------------------------------------------------------------


def percentile_ci(samples: NDArray[np.floating], level: float) -> tuple[float, float]:
    """(low, high) percentile interval of bootstrap `samples` at confidence `level`; NaNs when empty."""
    s = np.asarray(samples, np.float64)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(s, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_mean_ci(values: NDArray[np.floating], n: int, level: float, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-sample `values` (n resamples, seeded).

    >>> bootstrap_mean_ci(np.ones(10), 20, 0.95, np.random.default_rng(0))
    (1.0, 1.0)
    """
    v = np.asarray(values, np.float64)
    if n <= 0 or len(v) == 0:
        return float("nan"), float("nan")
    idx = rng.integers(0, len(v), (n, len(v)))
    return percentile_ci(v[idx].mean(axis=1), level)


def bootstrap_two_sample_ci(stat: Callable[[I64, I64], float], n_a: int, n_b: int, n: int, level: float,
                            rng: np.random.Generator, estimate: float | None = None) -> tuple[float, float]:
    """Bootstrap interval of stat(idx_a, idx_b) over n resamples (with replacement) of two sets of sizes n_a, n_b.

    With `estimate` (the statistic on the full sets), the percentile interval is shifted by
    the bootstrap bias (mean of the resampled values minus the estimate) and clipped at 0:
    resampling duplicates samples, which inflates FID, so plain percentiles of a resampled
    FID often lie entirely above the estimate.
    """
    if n <= 0:
        return float("nan"), float("nan")
    vals = np.asarray([stat(rng.integers(0, n_a, n_a), rng.integers(0, n_b, n_b)) for _ in range(n)])
    lo, hi = percentile_ci(vals, level)
    if estimate is None:
        return lo, hi
    bias = float(np.mean(vals[np.isfinite(vals)])) - estimate if np.isfinite(vals).any() else 0.0
    return max(0.0, lo - bias), max(0.0, hi - bias)
