"""The quality gate's metrics on features (N, D) and images (N, 1, H, W) in [-1, 1].

FID (Heusel et al. 2017) in float64, exact also with fewer samples than dimensions, KID
(Binkowski et al. 2018, unbiased MMD^2 with the cubic polynomial kernel, because FID is
biased at small sample sizes), precision / recall / density / coverage (Naeem et al. 2020,
k-NN balls), mean pairwise MS-SSIM (diversity, MONAI's MultiScaleSSIMMetric),
nearest-neighbour distances (memorization), a pixel-value Wasserstein distance (intensity)
and a seeded percentile bootstrap. Each is a plain function tested against a known answer
(tests/test_gate_metrics.py). pipeline/gate/run.py combines them into checks.

Distances, neighbours, k-NN radii, PRDC, KID and FID are float64 torch matrix products on
a `device` argument ("cpu" by default, "cuda" on a GPU; run_gate passes gate.device).
Distances come in blocks of `chunk` query rows against the whole reference set (peak
memory chunk x N, not N x N), each set copied to the device once per call. Arguments are
numpy arrays or torch tensors; results are numpy arrays and floats. MS-SSIM runs where its
images are (MONAI, float32).

Samples may carry a group (the volume or patch they came from): neighbours and pairs
are then taken only across groups, because adjacent slices of one volume are
near-copies of each other and would shrink every k-NN ball to nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric
from numpy.typing import NDArray

from pipeline.errors import ConfigError

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
Rows = NDArray[np.floating] | torch.Tensor
"""Samples as rows (N, D): a numpy array or a torch tensor on any device, any float dtype."""
Groups = NDArray[np.integer] | None
"""The group (item) of each row (N,), or None: every row is its own group."""

CHUNK = 1024
"""Query rows per block of distances: peak memory CHUNK x N float64 (80 MB at N = 10,000)."""

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale weights of Wang et al. 2003; the gate uses the first scales that fit the image."""


# --- device and rows ------------------------------------------------------------------------


def metric_device(device: str | torch.device = "cpu") -> torch.device:
    """The torch device the metrics run on, checked: "cpu", "cuda" or "cuda:N" (a GPU torch can see).

    Everything runs in float64, the precision the known-answer tests pin: data-centre GPUs
    do float64 matrix products at ~20 (A100) to ~67 (H100, H200) TFLOP/s, far more than
    these metrics need at 10,000 x 10,000 samples; consumer GPUs at 1/64 of their float32
    rate (~1 TFLOP/s). Apple "mps" has no float64, so it is not offered. Raises ConfigError
    for anything else, naming the choices.

    >>> metric_device("cpu")
    device(type='cpu')
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f'metrics device {device!r} is not a torch device; use "cpu", "cuda" or "cuda:N" '
                          "(gate.device)") from None
    match dev.type:
        case "cpu":
            return dev
        case "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"metrics device {device!r}: torch {torch.__version__} sees no CUDA GPU here "
                                  f"(built with CUDA: {torch.version.cuda or 'no'}); use \"cpu\" (gate.device)")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ConfigError(f"metrics device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) here, "
                                  f"cuda:0 to cuda:{torch.cuda.device_count() - 1} (gate.device)")
            return dev
        case other:
            raise ConfigError(f'metrics device {device!r}: type {other!r} is not supported; the metrics run in float64 '
                              'on "cpu", "cuda" or "cuda:N" (gate.device)')


def as_rows(x: Rows, device: str | torch.device = "cpu") -> torch.Tensor:
    """Samples x (N, D) as a float64 tensor on `device`; no copy when x already is one.

    A float32 array is moved to the device as float32 first and widened there: a blocking
    `.to(device, dtype)` would convert on the host and send twice the bytes. On the CPU
    the widened copy is the whole set in float64 (N x D x 8 bytes).

    >>> as_rows(np.zeros((3, 2), np.float32)).dtype
    torch.float64
    """
    dev = metric_device(device)
    if isinstance(x, torch.Tensor):
        t = x
    else:
        a = np.ascontiguousarray(x)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
    if t.ndim != 2:
        raise ValueError(f"samples must be rows (N, D), got shape {tuple(t.shape)}")
    return t.detach().to(device=dev).to(dtype=torch.float64)


def _same_width(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two sets have rows of {a.shape[1]} and {b.shape[1]} values; they must match")


def _group_tensor(groups: Groups, n: int, device: torch.device) -> torch.Tensor | None:
    if groups is None:
        return None
    g = torch.as_tensor(np.asarray(groups, dtype=np.int64), device=device)
    if g.shape != (n,):
        raise ValueError(f"groups must give one group per row ({n}), got shape {tuple(g.shape)}")
    return g


def _check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 query row, got {chunk}")


def _sq_norms(t: torch.Tensor) -> torch.Tensor:
    return (t * t).sum(dim=1)


def _block(q: torch.Tensor, q_sq: torch.Tensor, r: torch.Tensor, r_sq: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (c, M) of rows q (c, D) to rows r (M, D): sqrt of ||q||^2 + ||r||^2 - 2 q.r,
    clamped at 0 (round-off can make it slightly negative), built in place in one (c, M) buffer."""
    d = q @ r.T
    d.mul_(-2.0).add_(q_sq[:, None]).add_(r_sq[None, :])
    return d.clamp_(min=0.0).sqrt_()


def _mask_same_group(d: torch.Tensor, g_rows: torch.Tensor | None, g_cols: torch.Tensor | None) -> torch.Tensor:
    """Set the distances between rows of one group to inf (in place): they are no one's neighbours."""
    if g_rows is not None and g_cols is not None:
        d.masked_fill_(g_rows[:, None] == g_cols[None, :], math.inf)
    return d


# --- Frechet distance -----------------------------------------------------------------------


def _tr_sqrt_product(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """tr sqrt(S1 S2) of two covariances (D, D): the sum of square roots of the eigenvalues of the
    symmetric sqrt(S1) S2 sqrt(S1) (same spectrum as S1 S2), negative round-off clipped."""
    w, v = torch.linalg.eigh((s1 + s1.T) / 2.0)
    root1 = (v * w.clamp(min=0.0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    return torch.linalg.eigvalsh((m + m.T) / 2.0).clamp(min=0.0).sqrt().sum()


def frechet_distance(mu1: F64, sigma1: F64, mu2: F64, sigma2: F64, device: str | torch.device = "cpu") -> float:
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2), float64.

    tr sqrt(S1 S2) is computed as the sum of square roots of the eigenvalues of the
    symmetric matrix sqrt(S1) S2 sqrt(S1) (same spectrum as S1 S2), negatives clipped:
    stable where scipy.linalg.sqrtm of the non-symmetric product is not (and where
    MONAI's FIDMetric fails, calling sqrtm(disp=False) which current SciPy rejects).

    Limits: from the moments alone the D x D route is the only one. Covariances of
    fewer than D + 1 samples are singular, and the sum then includes the square roots of
    the D - n + 1 round-off eigenvalues that should be 0 (with Inception's 2048-d features
    and 128 to 2000 samples, ~1e-5 too small). With the features at hand, use `fid`,
    which is exact there.

    >>> frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.ones(2), np.diag([4.0, 1.0]))
    4.0
    """
    dev = metric_device(device)
    m1, m2 = (torch.as_tensor(np.asarray(m, np.float64), device=dev).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.atleast_2d(np.asarray(s, np.float64)), device=dev) for s in (sigma1, sigma2))
    diff = m1 - m2
    value = float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2.0 * _tr_sqrt_product(s1, s2))
    return max(value, 0.0)


def gaussian_moments(features: NDArray[np.floating]) -> tuple[F64, F64]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _features(x: Rows, device: torch.device) -> torch.Tensor:
    t = as_rows(x, device)
    if t.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {tuple(t.shape)}")
    return t


def _r_factor(xc: torch.Tensor) -> torch.Tensor:
    """A matrix with the Gram matrix of xc (n, D): its QR factor R (D, D) when n > D (R^T R =
    xc^T xc, and R xc'^T has the singular values of xc xc'^T), else xc itself."""
    return torch.linalg.qr(xc, mode="r").R if xc.shape[0] > xc.shape[1] else xc


def fid(a: Rows, b: Rows, device: str | torch.device = "cpu") -> float:
    """FID between two feature sets (N, D) and (M, D), float64 on `device`; 0 for a set against itself.

    tr sqrt(S1 S2) takes one of two routes. With N or M <= D the covariances are singular
    (rank N - 1 or M - 1), and summing square roots of the D x D route's round-off
    eigenvalues would add up to ~1e-5 of error (Inception's 2048-d with 128 to 2000
    samples); there the nonzero eigenvalues of S1 S2 are exactly the squared singular
    values of X1 X2^T / sqrt((N - 1)(M - 1)) (X centred; S1 S2 = X1^T X1 X2^T X2 / c has the
    nonzero spectrum of (X1 X2^T)(X1 X2^T)^T), so the trace is that matrix's nuclear norm,
    computed at most min(N, D) x min(M, D) large (a set with more rows than D is replaced
    by its QR factor R, which has the same Gram matrix). Otherwise the covariances have
    full rank and the stable D x D route of `frechet_distance` is used.

    >>> x = np.random.default_rng(0).normal(size=(50, 3)); round(fid(x, x), 9)
    0.0
    >>> y = np.random.default_rng(1).normal(size=(10, 64)); round(fid(y, y + 0.5), 9)  # 10 < 64: 64 x 0.5^2
    16.0
    """
    dev = metric_device(device)
    x, y = _features(a, dev), _features(b, dev)
    _same_width(x, y)
    (n1, d), n2 = x.shape, y.shape[0]
    mu1, mu2 = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - mu1, y - mu2
    if min(n1, n2) <= d:
        tr_covmean = torch.linalg.svdvals(_r_factor(xc) @ _r_factor(yc).T).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    else:
        tr_covmean = _tr_sqrt_product(xc.T @ xc / (n1 - 1), yc.T @ yc / (n2 - 1))
    diff = mu1 - mu2
    value = float(diff @ diff + _sq_norms(xc).sum() / (n1 - 1) + _sq_norms(yc).sum() / (n2 - 1) - 2.0 * tr_covmean)
    return max(value, 0.0)


# --- KID ------------------------------------------------------------------------------------


def _mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 samples per set, got {m} and {n}")
    d = x.shape[1]
    kxx, kyy, kxy = ((p @ q.T / d + 1.0) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def mmd2_unbiased(x: Rows, y: Rows, device: str | torch.device = "cpu") -> float:
    """Unbiased MMD^2 between (m, D) and (n, D) with the cubic kernel k(a, b) = (a.b / D + 1)^3, float64 on `device`.

    >>> x = np.array([[0.0], [2.0]]); y = np.array([[1.0], [3.0]])
    >>> round(mmd2_unbiased(x, y), 6)  # Kxx(0,2)=1, Kyy(1,3)=64, mean Kxy=(1+1+27+343)/4=93
    -121.0
    """
    xt, yt = as_rows(x, device), as_rows(y, device)
    _same_width(xt, yt)
    return _mmd2(xt, yt)


@dataclass(frozen=True)
class KID:
    """KID over random subsets: mean and std of the subset MMD^2 values, and the values."""

    mean: float
    std: float
    values: F64


def kid(a: Rows, b: Rows, subsets: int, subset_size: int, rng: np.random.Generator,
        device: str | torch.device = "cpu") -> KID:
    """KID of feature sets a (N, D) and b (M, D): unbiased MMD^2 on `subsets` random subsets
    of min(subset_size, N, M) samples from each, drawn without replacement within a subset.
    Both sets go to `device` once; the subsets are drawn from `rng` (a's, then b's, per subset)."""
    dev = metric_device(device)
    at, bt = as_rows(a, dev), as_rows(b, dev)
    _same_width(at, bt)
    n = min(subset_size, at.shape[0], bt.shape[0])
    vals = []
    for _ in range(subsets):
        ia = torch.as_tensor(rng.choice(at.shape[0], n, replace=False), device=dev)
        ib = torch.as_tensor(rng.choice(bt.shape[0], n, replace=False), device=dev)
        vals.append(_mmd2(at[ia], bt[ib]))
    v = np.asarray(vals, dtype=np.float64)
    return KID(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, v)


# --- distances and neighbours -----------------------------------------------------------------


def pairwise_distances(x: Rows, y: Rows, device: str | torch.device = "cpu") -> F64:
    """Euclidean distances (N, M) between rows of x (N, D) and y (M, D), float64 on `device`.

    The whole N x M matrix at once: for large sets use `nearest`, `knn_radii` and `prdc`,
    which take it in blocks of rows.

    >>> pairwise_distances(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0], [0.0, 1.0]])).tolist()
    [[5.0, 1.0]]
    """
    xt, yt = as_rows(x, device), as_rows(y, device)
    _same_width(xt, yt)
    return np.asarray(_block(xt, _sq_norms(xt), yt, _sq_norms(yt)).cpu().numpy(), dtype=np.float64)


def _knn_radii(x: torch.Tensor, k: int, groups: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """k-th smallest distance (N,) of each row of x (N, D) to the rows of other groups (tensors on one device)."""
    n = x.shape[0]
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > n:
        return torch.full((n,), math.inf, dtype=torch.float64, device=x.device)
    g = groups if groups is not None else torch.arange(n, device=x.device)
    x_sq = _sq_norms(x)
    radii = torch.empty(n, dtype=torch.float64, device=x.device)
    for s in range(0, n, chunk):
        d = _mask_same_group(_block(x[s:s + chunk], x_sq[s:s + chunk], x, x_sq), g[s:s + chunk], g)
        radii[s:s + chunk] = torch.topk(d, k, dim=1, largest=False, sorted=True).values[:, k - 1]
    return radii


def knn_radii(x: Rows, k: int, groups: Groups = None, chunk: int = CHUNK, device: str | torch.device = "cpu") -> F64:
    """Distance of each row of x (N, D) to its k-th nearest other row (N,), float64 on `device`.

    With `groups`, rows of the same group (itself included) are not neighbours; without,
    only the row itself is excluded. inf where fewer than k neighbours exist. Distances are
    taken `chunk` rows at a time (chunk x N in memory), the k-th smallest by torch.topk.

    >>> knn_radii(np.array([[0.0], [1.0], [3.0]]), 1).tolist()
    [1.0, 1.0, 2.0]
    """
    _check_chunk(chunk)
    dev = metric_device(device)
    t = as_rows(x, dev)
    return np.asarray(_knn_radii(t, k, _group_tensor(groups, t.shape[0], dev), chunk).cpu().numpy(), dtype=np.float64)


def nearest(query: Rows, ref: Rows, q_groups: Groups = None, r_groups: Groups = None, chunk: int = CHUNK,
            device: str | torch.device = "cpu") -> tuple[F64, I64]:
    """Distance (N,) and index (N,) of each query row's nearest ref row (other groups only when both
    groups are given), float64 on `device`; distance inf (index 0) where every ref row is excluded.

    Queries go in blocks of `chunk` rows against the whole ref set (chunk x M distances in
    memory). The nearest row is found with the matrix-product distances; its distance is then
    taken directly, ||q - r||, so a copy is at exactly 0 (the expanded form loses the low
    digits of distances much smaller than the vectors' norms).

    >>> d, i = nearest(np.array([[0.0], [2.9]]), np.array([[1.0], [3.0]])); d.round(3).tolist(), i.tolist()
    ([1.0, 0.1], [0, 1])
    """
    _check_chunk(chunk)
    dev = metric_device(device)
    q, r = as_rows(query, dev), as_rows(ref, dev)
    _same_width(q, r)
    n, m = q.shape[0], r.shape[0]
    if m == 0:
        raise ValueError("nearest needs at least one reference row, got none")
    qg, rg = _group_tensor(q_groups, n, dev), _group_tensor(r_groups, m, dev)
    r_sq = _sq_norms(r)
    dist = torch.empty(n, dtype=torch.float64, device=dev)
    index = torch.empty(n, dtype=torch.int64, device=dev)
    for s in range(0, n, chunk):
        qc = q[s:s + chunk]
        d = _mask_same_group(_block(qc, _sq_norms(qc), r, r_sq), None if qg is None else qg[s:s + chunk], rg)
        best, idx = d.min(dim=1)
        exact = torch.linalg.vector_norm(qc - r[idx], dim=1)
        dist[s:s + chunk] = torch.where(torch.isinf(best), best, exact)
        index[s:s + chunk] = idx
    return (np.asarray(dist.cpu().numpy(), dtype=np.float64), np.asarray(index.cpu().numpy(), dtype=np.int64))


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


def prdc(real: Rows, fake: Rows, k: int, real_groups: Groups = None, fake_groups: Groups = None,
         chunk: int = CHUNK, device: str | torch.device = "cpu") -> PRDC:
    """Precision, recall, density and coverage of fake (M, D) against real (N, D) with k-NN balls.

    Strict inequalities as in Naeem et al.'s reference code. With groups, a ball's radius
    counts only neighbours from other groups (other volumes). Float64 on `device`; the
    real-to-fake distances come `chunk` real rows at a time (chunk x M in memory), and the
    indicators are accumulated block by block. Radii and the distances compared with them
    come from the same matrix-product formula in float64 (equal to ~1e-15, not bit for bit:
    the blocks have different shapes), so only a sample on a ball's very edge could flip.

    >>> real = np.array([[0.0], [1.0], [2.0], [3.0]])
    >>> r = prdc(real, np.array([[0.5], [10.0]]), k=1); r.precision, r.coverage
    (0.5, 0.5)
    """
    _check_chunk(chunk)
    dev = metric_device(device)
    r, f = as_rows(real, dev), as_rows(fake, dev)
    _same_width(r, f)
    n, m = r.shape[0], f.shape[0]
    r_radii = _knn_radii(r, k, _group_tensor(real_groups, n, dev), chunk)
    f_radii = _knn_radii(f, k, _group_tensor(fake_groups, m, dev), chunk)
    r_sq, f_sq = _sq_norms(r), _sq_norms(f)
    in_ball = torch.zeros(m, dtype=torch.bool, device=dev)
    hits = torch.zeros(m, dtype=torch.int64, device=dev)
    recalled = torch.zeros(n, dtype=torch.bool, device=dev)
    covered = torch.zeros(n, dtype=torch.bool, device=dev)
    for s in range(0, n, chunk):
        d = _block(r[s:s + chunk], r_sq[s:s + chunk], f, f_sq)  # (c, M)
        inside = d < r_radii[s:s + chunk, None]
        in_ball |= inside.any(dim=0)
        hits += inside.sum(dim=0)
        covered[s:s + chunk] = inside.any(dim=1)
        recalled[s:s + chunk] = (d < f_radii[None, :]).any(dim=1)

    def host(t: torch.Tensor) -> F64:
        return np.asarray(t.to(torch.float64).cpu().numpy(), dtype=np.float64)

    in_real_ball, real_balls_hit = host(in_ball), host(hits) / k
    real_recalled, real_covered = host(recalled), host(covered)
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


def ms_ssim_pairs(a: torch.Tensor, b: torch.Tensor, kernel_size: int = 7, device: str | torch.device = "cpu") -> F64:
    """MS-SSIM of image pairs a[i], b[i] (P, 1, H, W) in [-1, 1] -> (P,) values in [0, 1], computed on `device`.

    MONAI's MultiScaleSSIMMetric (data range 2, Gaussian kernel sigma 1.5) with the first
    `ms_ssim_scales(H)` weights of Wang et al. renormalised to sum to 1. It convolves in
    float32; on CUDA cuDNN's TF32 is switched off meanwhile (TF32 keeps 10 mantissa bits and
    would move the values by ~1e-3, where the gate's comparisons need ~1e-5).
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
    dev = metric_device(device)
    if dev.type != "cuda":
        out = metric(a.to(dev, torch.float32), b.to(dev, torch.float32))
    else:  # a process-wide switch: gates running in parallel threads on one GPU would race on it
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            out = metric(a.to(dev, torch.float32), b.to(dev, torch.float32))
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
    return np.asarray(torch.as_tensor(out).reshape(-1).double().cpu().numpy(), dtype=np.float64)


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
                          strata: I64 | None = None, batch: int = 256, device: str | torch.device = "cpu") -> F64:
    """MS-SSIM values (P,) of up to `max_pairs` random pairs of images (N, 1, H, W) from different groups
    (and the same stratum when given), on `device`."""
    ii, jj = random_pairs(groups, max_pairs, rng, strata)
    vals = [ms_ssim_pairs(images[ii[s:s + batch]], images[jj[s:s + batch]], device=device)
            for s in range(0, len(ii), batch)]
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
