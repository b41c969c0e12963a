"""Known answers for the gate's metrics (pipeline/gate/metrics.py)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from pipeline.gate import metrics as M


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Small tensors gain nothing from threads, and on a busy 2-core machine OpenMP spin-waits
    make 2 threads ~8x slower than 1; restored afterwards so other modules keep their setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_fid_of_a_set_against_itself_is_zero() -> None:
    x = np.random.default_rng(0).normal(size=(200, 16))
    assert M.fid(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_form_for_diagonal_covariances() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 4.0, 8), rng.uniform(0.1, 4.0, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_with_rotated_covariances_and_singular_matrices() -> None:
    # same spectrum in a rotated basis: tr sqrt(S1 S2) needs the full matrix root, not the diagonal
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    s = np.diag([1.0, 2.0, 3.0, 4.0, 5.0])
    s1, s2 = q @ s @ q.T, s
    # reference: tr sqrt(S1 S2) from the (real, non-negative) eigenvalues of the product itself
    ev = np.linalg.eigvals(s1 @ s2)
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev.real, 0, None)).sum()
    assert M.frechet_distance(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(expected, rel=1e-8)
    # rank-deficient covariances (fewer samples than dimensions) stay finite and non-negative
    x = rng.normal(size=(10, 64))
    y = rng.normal(size=(10, 64)) + 0.5
    value = M.fid(x, y)
    assert np.isfinite(value) and value > 0


def test_fid_of_samples_approaches_the_closed_form() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 1.0, size=(20000, 3))
    y = rng.normal(1.0, 2.0, size=(20000, 3))
    # ||mu1 - mu2||^2 = 3, sum (sqrt(1) - sqrt(4))^2 = 3
    assert M.fid(x, y) == pytest.approx(6.0, rel=0.03)


def test_fid_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        M.fid(np.zeros((1, 3)), np.zeros((5, 3)))


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two() -> None:
    rng = np.random.default_rng(4)
    x, y, z = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)), rng.normal(1.0, 1.0, size=(300, 8))
    same = M.kid(x, y, subsets=20, subset_size=100, rng=np.random.default_rng(0))
    diff = M.kid(x, z, subsets=20, subset_size=100, rng=np.random.default_rng(0))
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert diff.mean > 10 * abs(same.mean) and diff.mean > 0
    assert len(diff.values) == 20


def test_mmd_unbiased_known_answer() -> None:
    x, y = np.array([[0.0], [2.0]]), np.array([[1.0], [3.0]])
    # k(a, b) = (a b + 1)^3: Kxx off-diagonal 1, Kyy off-diagonal 64, Kxy mean (1 + 1 + 27 + 343) / 4
    assert M.mmd2_unbiased(x, y) == pytest.approx(1 + 64 - 2 * 93)


def test_prdc_on_constructed_points() -> None:
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    # k=1 radii: 1, 1, 1, 1. fake 0.5 sits in balls of 0 and 1; fake 10 in none
    r = M.prdc(real, np.array([[0.5], [10.0]]), k=1)
    assert r.precision == 0.5
    assert r.density == pytest.approx((2 + 0) / 2)
    # coverage: real balls (radius 1, strict) holding a fake: 0 (d .5) and 1 (d .5)
    assert r.coverage == 0.5
    # fake radii (k=1): both 9.5; every real point is within 9.5 of fake 0.5
    assert r.recall == 1.0


def test_prdc_identical_sets_and_disjoint_sets() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 4))
    same = M.prdc(x, x + 1e-9, k=5)
    assert same.precision == 1.0 and same.coverage == 1.0 and same.recall == 1.0
    far = M.prdc(x, x + 100.0, k=5)
    assert far.precision == 0.0 and far.coverage == 0.0 and far.recall == 0.0 and far.density == 0.0


def test_groups_exclude_same_volume_neighbours() -> None:
    # two "volumes" of near-identical slices: without groups the 1-NN radius is tiny
    x = np.array([[0.0], [0.01], [5.0], [5.01]])
    assert M.knn_radii(x, 1).tolist() == pytest.approx([0.01, 0.01, 0.01, 0.01])
    assert M.knn_radii(x, 1, np.array([0, 0, 1, 1])).tolist() == pytest.approx([5.0, 4.99, 4.99, 5.0])
    d, i = M.nearest(x, x, np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]))
    assert i.tolist() == [2, 2, 1, 1]


def test_ms_ssim_identical_images_is_one_and_noise_is_low() -> None:
    rng = torch.Generator().manual_seed(0)
    a = torch.rand((8, 1, 64, 64), generator=rng) * 2 - 1
    b = torch.rand((8, 1, 64, 64), generator=rng) * 2 - 1
    assert np.allclose(M.ms_ssim_pairs(a, a), 1.0, atol=1e-5)
    assert M.ms_ssim_pairs(a, b).mean() < 0.2
    assert M.ms_ssim_scales(64) == 3 and M.ms_ssim_scales(32) == 2
    # small patches still work (fewer scales, smaller kernel)
    assert np.allclose(M.ms_ssim_pairs(a[..., :16, :16], a[..., :16, :16]), 1.0, atol=1e-5)


def test_mean_pairwise_ms_ssim_higher_for_a_collapsed_set() -> None:
    rng = torch.Generator().manual_seed(1)
    varied = torch.rand((40, 1, 32, 32), generator=rng) * 2 - 1
    collapsed = varied[torch.arange(40) % 2]
    groups = np.arange(40)
    r = np.random.default_rng(0)
    assert M.mean_pairwise_ms_ssim(collapsed, groups, 200, r).mean() > M.mean_pairwise_ms_ssim(varied, groups, 200, r).mean() + 0.3


def test_random_pairs_are_capped_distinct_and_cross_group() -> None:
    groups = np.repeat(np.arange(50), 4)
    i, j = M.random_pairs(groups, 300, np.random.default_rng(0))
    assert len(i) == 300
    assert (groups[i] != groups[j]).all() and (i < j).all()
    assert len(set(zip(i.tolist(), j.tolist(), strict=True))) == 300


def test_intensity_w1_known_shift() -> None:
    x = np.random.default_rng(6).uniform(-1, 0.5, 5000)
    assert M.intensity_w1(x, x) == 0.0
    assert M.intensity_w1(x, x + 0.25) == pytest.approx(0.25, abs=1e-9)


def test_bootstrap_intervals_are_seeded_and_cover_the_mean() -> None:
    v = np.random.default_rng(7).normal(1.0, 1.0, 400)
    a = M.bootstrap_mean_ci(v, 200, 0.95, np.random.default_rng(0))
    b = M.bootstrap_mean_ci(v, 200, 0.95, np.random.default_rng(0))
    assert a == b
    assert a[0] < v.mean() < a[1]
    assert a[1] - a[0] == pytest.approx(2 * 1.96 / 20, rel=0.3)
    assert np.isnan(M.bootstrap_mean_ci(v, 0, 0.95, np.random.default_rng(0))[0])
    x = np.random.default_rng(8).normal(size=(100, 2))
    lo, hi = M.bootstrap_two_sample_ci(lambda i, j: M.fid(x[i], x[j]), 100, 100, 20, 0.9, np.random.default_rng(0))
    assert 0.0 <= lo <= hi


def test_equal_size_indices() -> None:
    ri, fi = M.equal_size_indices(10, 4, np.random.default_rng(0))
    assert len(ri) == len(fi) == 4 and fi.tolist() == [0, 1, 2, 3] and len(set(ri.tolist())) == 4
