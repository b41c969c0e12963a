"""Known answers for the gate's metrics (pipeline/gate/metrics.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.gate import metrics as M
from pipeline.gate import run as gate_run
from pipeline.gate.config import GateConfig
from pipeline.gate.images import GateSet
from pipeline.gate.run import run_gate


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


# --- chunked float64 matrix products on a device -------------------------------------------------


def _direct_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances by differences (no matrix product): the reference the chunked code must match."""
    return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(axis=-1))


@pytest.fixture(scope="module")
def clouds() -> dict[str, np.ndarray]:
    """Two point sets in 8-d with 3-slice "items" (groups), sized so that chunk=3 leaves a partial last block."""
    rng = np.random.default_rng(11)
    return {"real": rng.normal(size=(41, 8)), "fake": rng.normal(0.3, 1.2, size=(37, 8)),
            "rg": np.repeat(np.arange(14), 3)[:41], "fg": np.repeat(np.arange(13), 3)[:37]}


def test_nearest_knn_and_prdc_in_tiny_chunks_equal_one_block(clouds: dict[str, np.ndarray]) -> None:
    r, f, rg, fg = clouds["real"], clouds["fake"], clouds["rg"], clouds["fg"]
    for q_groups, r_groups in ((None, None), (fg, rg)):
        d3, i3 = M.nearest(f, r, q_groups, r_groups, chunk=3)
        d_all, i_all = M.nearest(f, r, q_groups, r_groups, chunk=10**6)
        assert i3.tolist() == i_all.tolist()
        np.testing.assert_allclose(d3, d_all, rtol=1e-12)
    for groups in (None, rg):
        np.testing.assert_allclose(M.knn_radii(r, 5, groups, chunk=3), M.knn_radii(r, 5, groups, chunk=10**6), rtol=1e-12)
    p3 = M.prdc(r, f, 5, rg, fg, chunk=3)
    p_all = M.prdc(r, f, 5, rg, fg, chunk=10**6)
    for name in ("in_real_ball", "real_balls_hit", "real_recalled", "real_covered"):
        np.testing.assert_array_equal(getattr(p3, name), getattr(p_all, name))
    assert (p3.precision, p3.recall, p3.density, p3.coverage) == (p_all.precision, p_all.recall, p_all.density, p_all.coverage)


def test_neighbours_and_prdc_match_direct_differences(clouds: dict[str, np.ndarray]) -> None:
    # the previous implementation's answers: full distance matrices by differences, masked, sorted
    r, f, rg, fg = clouds["real"], clouds["fake"], clouds["rg"], clouds["fg"]
    d_rf = _direct_distances(r, f)
    d, i = M.nearest(f, r, chunk=4)
    assert i.tolist() == d_rf.argmin(axis=0).tolist()
    np.testing.assert_allclose(d, d_rf.min(axis=0), rtol=1e-12)

    def radii(x: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
        dd = _direct_distances(x, x)
        dd[g[:, None] == g[None, :]] = np.inf
        return np.sort(dd, axis=1)[:, k - 1]

    np.testing.assert_allclose(M.knn_radii(r, 5, rg, chunk=4), radii(r, rg, 5), rtol=1e-12)
    np.testing.assert_allclose(M.knn_radii(r, 5, chunk=4), radii(r, np.arange(len(r)), 5), rtol=1e-12)
    rr, fr = radii(r, rg, 5), radii(f, fg, 5)
    p = M.prdc(r, f, 5, rg, fg, chunk=4)
    inside = d_rf < rr[:, None]
    np.testing.assert_array_equal(p.in_real_ball, inside.any(axis=0))
    np.testing.assert_array_equal(p.real_balls_hit, inside.sum(axis=0) / 5)
    np.testing.assert_array_equal(p.real_recalled, (d_rf < fr[None, :]).any(axis=1))
    np.testing.assert_array_equal(p.real_covered, d_rf.min(axis=1) < rr)


def test_nearest_puts_a_copy_at_exactly_zero_and_excluded_rows_at_inf() -> None:
    x = np.random.default_rng(12).normal(100.0, 1.0, size=(20, 64))  # large norms: the expanded form loses digits
    d, i = M.nearest(x[[3, 7]], x)
    assert d.tolist() == [0.0, 0.0] and i.tolist() == [3, 7]
    d, _ = M.nearest(x[:2], x[:2], np.array([0, 0]), np.array([0, 0]))
    assert np.isinf(d).all()
    assert np.isinf(M.knn_radii(x[:3], 5)).all()


def test_explicit_cpu_device_and_tensor_inputs_give_the_same_answers(clouds: dict[str, np.ndarray]) -> None:
    r, f, rg, fg = clouds["real"], clouds["fake"], clouds["rg"], clouds["fg"]
    cpu = torch.device("cpu")
    for device in ("cpu", cpu):
        assert M.nearest(f, r, device=device)[1].tolist() == M.nearest(f, r)[1].tolist()
        np.testing.assert_array_equal(M.knn_radii(r, 3, rg, device=device), M.knn_radii(r, 3, rg))
        assert M.prdc(r, f, 5, rg, fg, device=device).coverage == M.prdc(r, f, 5, rg, fg).coverage
        assert M.fid(r, f, device=device) == pytest.approx(M.fid(r, f), rel=1e-12)
        kid = M.kid(r, f, 5, 20, np.random.default_rng(0), device=device)
        np.testing.assert_allclose(kid.values, M.kid(r, f, 5, 20, np.random.default_rng(0)).values, rtol=1e-12)
    # float32 tensors are widened to float64 on the device, like float32 numpy arrays
    r32 = r.astype(np.float32)
    np.testing.assert_allclose(M.nearest(torch.from_numpy(r32), torch.from_numpy(r32), rg, rg, device="cpu")[0],
                               M.nearest(r32, r32, rg, rg)[0], rtol=1e-15)
    assert M.as_rows(torch.zeros(2, 3)).dtype == torch.float64
    with pytest.raises(ValueError, match=r"rows \(N, D\)"):
        M.as_rows(np.zeros(3))
    with pytest.raises(ValueError, match="8 and 5 values"):
        M.nearest(r, r[:, :5])


def test_ms_ssim_runs_on_the_given_device_and_leaves_tf32_alone_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand((6, 1, 32, 32), generator=g) * 2 - 1, torch.rand((6, 1, 32, 32), generator=g) * 2 - 1
    seen: list[tuple[str, bool]] = []
    metric_call = M.MultiScaleSSIMMetric.__call__

    def spy(self: object, y_pred: torch.Tensor, y: torch.Tensor) -> object:
        seen.append((y_pred.device.type, torch.backends.cudnn.allow_tf32))
        return metric_call(self, y_pred, y)  # type: ignore[arg-type]

    monkeypatch.setattr(M.MultiScaleSSIMMetric, "__call__", spy)
    before = torch.backends.cudnn.allow_tf32
    np.testing.assert_array_equal(M.ms_ssim_pairs(a, b, device=torch.device("cpu")), M.ms_ssim_pairs(a, b))
    assert seen == [("cpu", before), ("cpu", before)] and torch.backends.cudnn.allow_tf32 == before
    # the gate passes gate.device through its diversity check
    calls: list[object] = []
    monkeypatch.setattr(M, "ms_ssim_pairs", lambda x, y, kernel_size=7, device="cpu": calls.append(device) or np.zeros(len(x)))
    s = _gate_set(a, np.arange(6))
    gate_run._diversity(s, np.arange(6), GateConfig(max_pairs=10), 4)
    assert calls == ["cpu"]


def test_kid_reproduces_the_unbiased_mmd_of_its_subsets() -> None:
    rng = np.random.default_rng(13)
    a, b = rng.normal(size=(30, 4)), rng.normal(0.5, 1.0, size=(25, 4))
    k = M.kid(a, b, subsets=3, subset_size=10, rng=np.random.default_rng(1), device="cpu")
    draw = np.random.default_rng(1)
    for value in k.values:
        x, y = a[draw.choice(30, 10, replace=False)], b[draw.choice(25, 10, replace=False)]
        kxx, kyy, kxy = ((p @ q.T / 4 + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        expected = (kxx.sum() - np.trace(kxx)) / 90 + (kyy.sum() - np.trace(kyy)) / 90 - 2 * kxy.mean()
        assert value == pytest.approx(expected, rel=1e-12)


def test_bad_device_is_a_config_error_that_names_the_choices(tmp_path: Path) -> None:
    x = np.zeros((4, 2))
    with pytest.raises(ConfigError, match=r"'gpu' is not a torch device; use \"cpu\", \"cuda\" or \"cuda:N\""):
        M.nearest(x, x, device="gpu")
    with pytest.raises(ConfigError, match="'meta'.*float64 on \"cpu\", \"cuda\" or \"cuda:N\""):
        M.fid(x, x, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            M.prdc(x, x, 1, device="cuda")
    else:
        with pytest.raises(ConfigError, match="CUDA GPU"):
            M.knn_radii(x, 1, device=f"cuda:{torch.cuda.device_count()}")
    # the gate checks gate.device before it reads a file or builds an encoder
    with pytest.raises(ConfigError, match="gate.device"):
        run_gate(tmp_path / "real", tmp_path / "synthetic", tmp_path / "out", GateConfig(device="gpu"))
    assert not (tmp_path / "out").exists()


def _gate_set(images: torch.Tensor, items: np.ndarray) -> GateSet:
    return GateSet(Path("set"), [], images, items.astype(np.int64), np.zeros(len(items), np.int64))


def test_memorization_and_duplicates_in_tiny_chunks_equal_one_block() -> None:
    g = torch.Generator().manual_seed(14)
    real = _gate_set(torch.rand((24, 1, 8, 8), generator=g) * 2 - 1, np.repeat(np.arange(8), 3))
    syn_images = torch.rand((18, 1, 8, 8), generator=g) * 2 - 1
    syn_images[:3] = real.images[:3] + 0.01  # near-copies of training slices
    syn_images[9:12] = syn_images[3:6]  # a synthetic item repeated
    syn = _gate_set(syn_images, np.repeat(np.arange(6), 3))
    fr, fs = real.images.reshape(24, -1)[:, :16].double().numpy(), syn.images.reshape(18, -1)[:, :16].double().numpy()
    cpu = M.metric_device("cpu")
    queries = np.arange(0, 24, 2)
    small = gate_run._memorization(real, queries, syn, fr, fs, cpu, chunk=3)
    whole = gate_run._memorization(real, queries, syn, fr, fs, cpu, chunk=10**6)
    for key in small:
        np.testing.assert_allclose(small[key], whole[key], rtol=1e-12)
    assert small["pixel_idx"][:3].tolist() == [0, 1, 2] and (small["pixel_ratio"][:3] < 0.2).all()
    cfg = GateConfig()
    dup_small = gate_run._duplicates(real, syn, fr, fs, cfg, cpu, chunk=3)
    np.testing.assert_array_equal(dup_small, gate_run._duplicates(real, syn, fr, fs, cfg, cpu, chunk=10**6))
    assert dup_small[3:6].tolist() == [1.0] * 3 and dup_small[9:12].tolist() == [1.0] * 3


# --- FID with fewer samples than dimensions --------------------------------------------------------


def test_fid_of_identical_and_shifted_sets_with_fewer_samples_than_dimensions() -> None:
    # 128 samples of 2048-d (Inception's width): the covariances have rank 127
    x = np.random.default_rng(15).normal(size=(128, 2048))
    shift = np.random.default_rng(16).normal(0.0, 0.1, size=2048)
    assert M.fid(x, x) == pytest.approx(0.0, abs=1e-9)
    assert M.fid(x, x + shift) == pytest.approx(float(shift @ shift), abs=1e-9)


def test_fid_closed_form_for_rotated_diagonal_covariances_with_n_below_d() -> None:
    # +-c_i e_i for i < 4: 8 samples in 64-d, mean 0, covariance diag(2 c_i^2 / 7) exactly; a second
    # set the same with other c_i and a shifted mean; a common random rotation hides the diagonal
    d, r = 64, 4
    c1, c2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 0.5, 1.5, 1.0])
    mu = np.random.default_rng(17).normal(size=d)
    q, _ = np.linalg.qr(np.random.default_rng(18).normal(size=(d, d)))

    def pm(c: np.ndarray) -> np.ndarray:
        e = np.zeros((2 * r, d))
        e[np.arange(r), np.arange(r)], e[r + np.arange(r), np.arange(r)] = c, -c
        return e

    x, y = pm(c1) @ q.T, (pm(c2) + mu) @ q.T
    a, b = 2 * c1**2 / 7, 2 * c2**2 / 7
    expected = float(mu @ mu + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert M.fid(x, y) == pytest.approx(expected, rel=1e-12)


def test_fid_with_one_set_larger_than_the_dimension_matches_an_independent_route() -> None:
    # 600 x 256 (reduced to its QR factor) against 100 x 256; reference: tr sqrt(S1 S2) from the
    # eigenvalues of the symmetric 100 x 100 matrix Y S1 Y^T / (m - 1), the same nonzero spectrum
    rng = np.random.default_rng(19)
    x = rng.normal(size=(600, 256)) @ rng.normal(0.0, 0.2, size=(256, 256))
    y = rng.normal(0.2, 1.0, size=(100, 256))
    mu1, s1 = M.gaussian_moments(x)
    mu2, s2 = M.gaussian_moments(y)
    yc = y - mu2
    ev = np.linalg.eigvalsh(yc @ s1 @ yc.T / 99)
    expected = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())
    assert M.fid(x, y) == pytest.approx(expected, rel=1e-9)
    assert M.fid(y, x) == pytest.approx(expected, rel=1e-9)


# --- the fid check: matched FID over real-vs-real, averaged over half splits ------------------------


def _subjects(rng: np.random.Generator, items: int, slices: int, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features (items * slices, 16) of `items` subjects (a random offset each, slices scattered around it)
    and their item ids first.. : the structure of volumes' slices that the half splits must respect."""
    offsets = rng.normal(size=(items, 16))
    x = np.repeat(offsets, slices, axis=0) + 0.5 * rng.normal(size=(items * slices, 16))
    return x, np.repeat(np.arange(first, first + items), slices)


@pytest.fixture(scope="module")
def held_out() -> dict[str, np.ndarray]:
    """24 training subjects and 12 held-out ones from the same distribution, 20 slices each."""
    rng = np.random.default_rng(0)
    fr, gr = _subjects(rng, 24, 20)
    fs, gs = _subjects(rng, 12, 20)
    return {"fr": fr, "gr": gr, "fs": fs, "gs": gs}


def test_matched_fid_ratio_of_held_out_real_subjects_is_near_one(held_out: dict[str, np.ndarray]) -> None:
    # equal sizes on both sides, so the same small-sample bias: real vs real gives ~1 whatever the seed
    # (0.77-1.31 over 20 data seeds); the rule before (all 240 vs all 480 slices over one split of
    # 240 vs 240) gave 0.57-1.18, biased low by the larger numerator samples
    for seed in range(3):
        r = gate_run.matched_fid(held_out["fr"], held_out["fs"], held_out["gr"], held_out["gs"], 10, seed)
        assert r is not None and 0.5 < r.ratio < 2.0, (seed, r)
        assert len(r.baseline) == 10 and (r.baseline > 0).all()


def test_averaging_over_splits_steadies_the_ratio_across_seeds(held_out: dict[str, np.ndarray]) -> None:
    # one fixed real set, one fixed "synthetic" set: only the gate seed (which halves, which subsets) moves;
    # std over seeds 0-4 with 10 splits is 0.38 x that with 1 here, at most 0.70 x over 20 data seeds
    def spread(splits: int) -> float:
        ratios = [gate_run.matched_fid(held_out["fr"], held_out["fs"], held_out["gr"], held_out["gs"], splits,
                                             seed).ratio for seed in range(5)]  # type: ignore[union-attr]
        return float(np.std(ratios))

    one, ten = spread(1), spread(10)
    assert ten < 0.75 * one, (one, ten)


def test_fid_excess_estimates_a_fixed_generators_distance_at_any_cohort_size() -> None:
    # a "generator" of new subjects shifted by delta: its true FID is |delta|^2 = 1.96, the real features'
    # total variance is 16 x (1 + 0.5^2) = 20, so the excess should be ~0.098 at every cohort size; the
    # ratio instead grows with the cohort (its baseline is FID's small-sample bias, which shrinks)
    delta = np.full(16, 0.35)
    excess, ratio = {}, {}
    for items in (16, 128):
        runs = []
        for seed in range(5):
            rng = np.random.default_rng(seed)
            fr, gr = _subjects(rng, items, 10)
            fs, gs = _subjects(rng, items // 2, 10, first=1000)
            runs.append(gate_run.matched_fid(fr, fs + delta, gr, gs, 10, seed))
        excess[items] = float(np.mean([r.excess for r in runs]))  # type: ignore[union-attr]
        ratio[items] = float(np.mean([r.ratio for r in runs]))  # type: ignore[union-attr]
        assert runs[0] is not None and runs[0].real_variance == pytest.approx(20.0, rel=0.25)
    # measured: excess 0.107 (16 items) and 0.103 (128); ratio 1.15 and 1.94
    for items in (16, 128):
        assert excess[items] == pytest.approx(0.098, abs=0.03), excess
    assert ratio[128] > 1.4 * ratio[16], ratio


def test_fid_excess_is_scale_free_and_near_zero_for_held_out_real(held_out: dict[str, np.ndarray]) -> None:
    r = gate_run.matched_fid(held_out["fr"], held_out["fs"], held_out["gr"], held_out["gs"], 10, 0)
    big = gate_run.matched_fid(7 * held_out["fr"], 7 * held_out["fs"], held_out["gr"], held_out["gs"], 10, 0)
    assert r is not None and big is not None
    assert abs(r.excess) < 0.1, r.excess  # measured -0.050 (24 vs 12 subjects are few)
    assert big.excess == pytest.approx(r.excess, rel=1e-9)  # FID and the variance both scale by 49
    assert r.split_excess.mean() == pytest.approx(r.excess)


@pytest.mark.parametrize("n_syn_items", [30, 5])
def test_matched_fid_compares_equal_sizes_drawn_by_item(monkeypatch: pytest.MonkeyPatch, n_syn_items: int) -> None:
    # column 0 of each row is its index, so a spy on M.fid can tell which slices each FID got;
    # items have 3 to 9 slices, so an equal size needs the last drawn item trimmed
    rng = np.random.default_rng(3)
    gr = np.repeat(np.arange(20), rng.integers(3, 10, 20))
    gs = np.repeat(np.arange(n_syn_items), rng.integers(3, 10, n_syn_items))
    fr = np.column_stack([np.arange(len(gr)), rng.normal(size=(len(gr), 4))])
    fs = np.column_stack([np.arange(len(gs)), rng.normal(size=(len(gs), 4))])
    calls: list[tuple[np.ndarray, np.ndarray]] = []
    real_fid = M.fid

    def spy(a: M.Rows, b: M.Rows, device: str | torch.device = "cpu") -> float:
        calls.append((np.asarray(torch.as_tensor(a)[:, 0].cpu(), np.int64), np.asarray(torch.as_tensor(b)[:, 0].cpu(), np.int64)))
        return real_fid(a, b, device)

    monkeypatch.setattr(M, "fid", spy)
    r = gate_run.matched_fid(fr, fs, gr, gs, 4, seed=0)
    assert r is not None and len(calls) == 8
    for i in range(4):
        (syn_a, real_b), (real_a, real_b2) = calls[2 * i], calls[2 * i + 1]
        # numerator and denominator: same real half B, A sides of one size (a half's, or all synthetic slices)
        np.testing.assert_array_equal(real_b, real_b2)
        assert len(syn_a) == len(real_a) == r.sizes[i] == min(len(fs), len(np.flatnonzero(~np.isin(gr, gr[real_b]))))
        assert not set(gr[real_a].tolist()) & set(gr[real_b].tolist())  # item-disjoint halves
        assert len(set(syn_a.tolist())) == len(syn_a) and len(set(real_a.tolist())) == len(real_a)
        # drawn by item: every item taken whole but at most one
        for rows, groups in ((syn_a, gs), (real_a, gr)):
            partial = [g for g in np.unique(groups[rows]) if (groups[rows] == g).sum() < (groups == g).sum()]
            assert len(partial) <= 1
    # the report's ratio is mean over mean
    assert r.ratio == pytest.approx(r.matched.mean() / r.baseline.mean())


def test_matched_fid_needs_four_real_items() -> None:
    x = np.random.default_rng(0).normal(size=(12, 4))
    assert gate_run.matched_fid(x, x, np.repeat(np.arange(3), 4), np.repeat(np.arange(3), 4), 10, 0) is None
