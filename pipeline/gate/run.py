"""The quality gate: score a synthetic folder against the real training folder, decide, report.

`run_gate(real, synthetic, out, cfg) -> GateReport` is what `medaug gate` and the Prefect
flow call. It reads both folders into 2-D images (pipeline/gate/images.py), embeds them
(pipeline/gate/features.py), computes the metrics (pipeline/gate/metrics.py), runs the
batch checks (any failure rejects the batch, each failure named), filters samples (near-
copies of training images and outliers are dropped, each with its reason) and writes
gate_report.json, gate_report.md, PNG figures and accepted.csv (pipeline/gate/report.py).

The checks (thresholds in GateConfig):
  modality      the synthetic items' modalities appear in the real reference;
  intensity     pixel-value Wasserstein-1 distance (wrong modality, window or scaling);
  fid           FID minus a real-vs-real baseline at equal sample sizes (its small-sample bias),
                averaged over random subject-disjoint half splits, over the real features' total
                variance (`matched_fid`, `MatchedFid.excess`); optionally the ratio, and absolute;
  kid           KID (absolute; off by default);
  precision     realism: synthetic samples inside real k-NN balls (noise fails);
  recall, coverage  the real distribution is covered (mode collapse fails);
  diversity     mean pairwise MS-SSIM of synthetic minus real (mode collapse raises it);
  duplicates    share of synthetic slices with a near-copy in another synthetic item (collapse);
  memorization  share of synthetic slices that are near-copies of training slices;
  seam          (off unless gate.seam_max_ratio; on for inserted lesions) gradient energy just
                outside the lesion masks, synthetic over real (pipeline/gate/seam.py);
  lesion        (off unless gate.lesion_hu_max; on for the CT deployments) the HU inside the lesion
                masks of each class, synthetic vs real (pipeline/gate/lesion.py);
  class         (off unless gate.class_checks; on for tumor-patches) every class gated alone
                against the real items of its class, with its own features (`_class_gates`).

Distances are normalised by the median real-to-real nearest-neighbour distance between
different items (subjects), so "near" means "much nearer than two real subjects are".
The metrics run on gate.device, like the encoder: float64 matrix products in blocks of rows
(pipeline/gate/metrics.py), each set copied to the device once per search; MS-SSIM runs there
too (float32 without TF32); the intensity distance (quantiles of pooled pixels) stays on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from pipeline.errors import ConfigError, DatasetError
from pipeline.gate import metrics as M
from pipeline.gate.config import CHECKS, GateConfig
from pipeline.gate.features import FeatureExtractor, build_extractor, needs_real_images
from pipeline.gate.images import GateSet, capped_indices, load_gate_set, resize_images
from pipeline.gate.lesion import lesion_gate
from pipeline.gate.report import (
    FIG_ACCEPTED,
    FIG_COPIES,
    FIG_REJECTED,
    CheckResult,
    GateReport,
    SampleDecision,
    image_grid,
    report_id,
    sign_report,
    write_accepted,
    write_json,
    write_markdown,
)
from pipeline.gate.seam import seam_gate
from pipeline.gate.signing import NOT_VERIFIED_NOTE, gate_key_from_env

log = logging.getLogger(__name__)

F64 = NDArray[np.float64]


def _rng(cfg: GateConfig, stream: int) -> np.random.Generator:
    """An independent seeded generator per use, so adding a metric does not shift the others."""
    return np.random.default_rng([cfg.seed, stream])


def _metric(value: float, ci: tuple[float, float] | None = None, **extra: float) -> dict[str, Any]:
    out: dict[str, Any] = {"value": value}
    if ci is not None:
        out["ci_low"], out["ci_high"] = ci
    out.update(extra)
    return out


def _real_halves(groups: NDArray[np.int64], rng: np.random.Generator) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Slice indices of two item-disjoint halves of the real set: floor(items / 2) items in A, the rest in B."""
    perm = rng.permutation(np.unique(groups))
    in_a = np.isin(groups, perm[: len(perm) // 2])
    return np.flatnonzero(in_a), np.flatnonzero(~in_a)


def _draw_by_item(groups: NDArray[np.int64], pool: NDArray[np.int64], m: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """m slice indices out of `pool` (indices into `groups`), sorted: whole items in random order until
    m slices are reached, the last item's slices subsampled to make exactly m. Drawing by item keeps
    the mix of subjects of a real half; all of `pool` when m is its size."""
    chosen: list[NDArray[np.int64]] = []
    left = m
    for item in rng.permutation(np.unique(groups[pool])):
        sl = pool[groups[pool] == item]
        chosen.append(sl if len(sl) <= left else rng.choice(sl, left, replace=False))
        left -= len(chosen[-1])
        if left == 0:
            break
    return np.sort(np.concatenate(chosen)).astype(np.int64)


@dataclass(frozen=True)
class MatchedFid:
    """The fid check's numbers, one entry per item-disjoint half split (A_i, B_i) of the real set.

    `matched[i]` = FID(synthetic subset, B_i) and `baseline[i]` = FID(A_i subset, B_i), the two
    subsets of `sizes[i]` slices each, so numerator and denominator carry the same small-sample bias.
    `real_variance` is the total variance (trace of the covariance) of all real features: the
    squared scale of the feature space, which `excess` divides by.
    """

    matched: F64
    baseline: F64
    sizes: NDArray[np.int64]
    real_variance: float

    @property
    def ratio(self) -> float:
        """mean(matched) / mean(baseline); nan when the baseline mean is not positive."""
        den = float(self.baseline.mean())
        return float(self.matched.mean()) / den if den > 0 else float("nan")

    @property
    def split_ratios(self) -> F64:
        """matched[i] / baseline[i] per split (nan where a baseline is 0): what one split alone would say."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.baseline > 0, self.matched / self.baseline, np.nan)

    @property
    def excess(self) -> float:
        """(mean(matched) - mean(baseline)) / real_variance: the generator's FID with the small-sample
        bias taken off, as a share of the real features' total variance (what the fid check decides on).

        The ratio above grows with the sample for a fixed generator (its baseline is mostly FID's
        bias, which shrinks as samples grow, while the numerator tends to the true distance), so a
        fixed ratio threshold gets stricter as the data grows; the difference estimates the true
        distance at any size, and dividing by the total variance makes it unitless (FID and the
        trace both scale with the square of the features). nan when the variance is not positive.
        """
        if not self.real_variance > 0:
            return float("nan")
        return float(self.matched.mean() - self.baseline.mean()) / self.real_variance

    @property
    def split_excess(self) -> F64:
        """(matched[i] - baseline[i]) / real_variance per split, for the spread in the report."""
        return (self.matched - self.baseline) / self.real_variance if self.real_variance > 0 else self.matched * np.nan


def matched_fid(fr: F64, fs: F64, real_groups: NDArray[np.int64], syn_groups: NDArray[np.int64], splits: int,
                      seed: int, device: torch.device | str = "cpu") -> MatchedFid | None:
    """FID of synthetic vs real and of real vs real, at equal sample sizes, over `splits` random half splits.

    fr (N, D) and fs (M, D) are real and synthetic features, real_groups (N,) and syn_groups (M,)
    their items (subjects). Split i puts a random half of the real items in A_i, the rest in B_i
    (item-disjoint: slices of one volume are near-copies and would make real-vs-real look closer
    than it is). With m_i = min(|A_i|, M) slices, matched_i = FID(m_i synthetic slices, B_i) and
    baseline_i = FID(m_i slices of A_i, B_i), each subset drawn by item (`_draw_by_item`): FID's
    small-sample bias grows as the sample shrinks, so comparing all M synthetic slices with all N
    real ones against two halves of N / 2 would divide a less biased FID by a more biased one.
    One split is a noisy baseline (bench/RESULTS.md, "Gate stability": it moved 3x between cohorts
    with one generator); `MatchedFid.ratio` is mean(matched) / mean(baseline) over the splits, not
    the median of per-split ratios, because a split whose baseline is near 0 would make its own
    ratio huge while it shifts a mean of baselines by little. Splits come from
    default_rng([seed, 7]) (the first is the split the gate used before it averaged), the subsets
    from default_rng([seed, 11]). None with fewer than 4 real items (no two halves of 2).

    Cost: 2 x `splits` FIDs of at most max_slices / 2 samples a side, on top of the bootstrap's
    n_bootstrap full-size ones. Measured on one CPU core (EPYC) at 1000 a side: ~2 ms each with the
    64-d domain features; ~0.3 s each with Inception's 2048-d (the nuclear-norm route, n <= D), so
    ~6 s for the default 10 splits.

    >>> rng = np.random.default_rng(0); g = np.repeat(np.arange(20), 5)
    >>> r = matched_fid(rng.normal(size=(100, 4)), rng.normal(size=(100, 4)), g, g, 3, seed=0)
    >>> r.sizes.tolist(), 0.5 < r.ratio < 2
    ([50, 50, 50], True)
    """
    items = np.unique(real_groups)
    if len(items) < 4:
        return None
    split_rng, draw_rng = np.random.default_rng([seed, 7]), np.random.default_rng([seed, 11])
    tr, ts = M.as_rows(fr, device), M.as_rows(fs, device)
    all_s = np.arange(len(fs), dtype=np.int64)
    matched, baseline, sizes = [], [], []
    for _ in range(splits):
        a, b = _real_halves(real_groups, split_rng)
        m = min(len(a), len(fs))
        a_m = a if m == len(a) else _draw_by_item(real_groups, a, m, draw_rng)
        s_m = _draw_by_item(syn_groups, all_s, m, draw_rng)
        rb = tr[torch.as_tensor(b, device=tr.device)]
        matched.append(M.fid(ts[torch.as_tensor(s_m, device=ts.device)], rb, device))
        baseline.append(M.fid(tr[torch.as_tensor(a_m, device=tr.device)], rb, device))
        sizes.append(m)
    variance = float(np.asarray(fr, np.float64).var(axis=0, ddof=1).sum())
    return MatchedFid(np.asarray(matched, np.float64), np.asarray(baseline, np.float64), np.asarray(sizes, np.int64),
                      variance)


def _spread(x: F64) -> dict[str, float]:
    """std (ddof 1; 0 for one value), min and max of per-split values, for the report."""
    return {"std": float(x.std(ddof=1)) if len(x) > 1 else 0.0, "min": float(x.min()), "max": float(x.max())}


def _fid_metrics(mf: MatchedFid | None) -> dict[str, dict[str, Any]]:
    """Report entries fid_matched, fid_real_baseline, fid_excess and fid_ratio: means with their spread
    over the splits, so a reader sees how noisy the baseline is; nan without one."""
    names = ("fid_matched", "fid_real_baseline", "fid_excess", "fid_ratio")
    if mf is None:
        return {k: _metric(float("nan")) for k in names}
    sr = mf.split_ratios[np.isfinite(mf.split_ratios)]
    return dict(zip(names, (
        _metric(float(mf.matched.mean()), None, **_spread(mf.matched)),
        _metric(float(mf.baseline.mean()), None, **_spread(mf.baseline), splits=float(len(mf.baseline)),
                slices_per_side=float(mf.sizes.mean())),
        _metric(mf.excess, None, **_spread(mf.split_excess), real_variance=mf.real_variance),
        _metric(mf.ratio, None, **({"split_min": float(sr.min()), "split_max": float(sr.max())} if len(sr) else {})),
    ), strict=True))


def _median_finite(x: F64) -> float:
    ok = x[np.isfinite(x)]
    return float(np.median(ok)) if len(ok) else float("nan")


def _flat(s: GateSet, idx: NDArray[np.int64] | None = None) -> NDArray[np.float32]:
    """Slices as rows of pixels (N, H*W), float32 (the metrics widen them to float64 once, on their device)."""
    images = s.images if idx is None else s.images[torch.as_tensor(idx)]
    return np.asarray(images.reshape(images.shape[0], -1).numpy(), dtype=np.float32)


def _memorization(real: GateSet, real_queries: NDArray[np.int64], syn: GateSet, fr: F64, fs: F64, device: torch.device,
                  chunk: int = M.CHUNK) -> dict[str, F64]:
    """Nearest training slice (of all of `real`) of each synthetic slice in pixel and feature
    space, and the ratios of those distances to the median real-to-real (other item)
    nearest-neighbour distance, estimated from the `real_queries` slices against all of `real`.
    Each set goes to `device` once (float64) for the four searches."""
    pr, ps = M.as_rows(_flat(real), device), M.as_rows(_flat(syn), device)
    tr, ts = M.as_rows(fr, device), M.as_rows(fs, device)
    d_pix, i_pix = M.nearest(ps, pr, chunk=chunk, device=device)
    d_feat, i_feat = M.nearest(ts, tr, chunk=chunk, device=device)
    q = real_queries
    qt = torch.as_tensor(q, device=device)
    rr_pix, _ = M.nearest(pr[qt], pr, real.item_of[q], real.item_of, chunk=chunk, device=device)
    rr_feat, _ = M.nearest(tr[qt], tr, real.item_of[q], real.item_of, chunk=chunk, device=device)
    med_pix, med_feat = _median_finite(rr_pix), _median_finite(rr_feat)
    return {
        "pixel_dist": d_pix, "pixel_idx": i_pix.astype(np.float64), "feature_dist": d_feat,
        "feature_idx": i_feat.astype(np.float64),
        "pixel_ratio": d_pix / max(med_pix, 1e-12), "feature_ratio": d_feat / max(med_feat, 1e-12),
        "median_rr_pixel": np.array([med_pix]), "median_rr_feature": np.array([med_feat]),
    }


def _duplicates(ref: GateSet, syn: GateSet, fr: F64, fs: F64, cfg: GateConfig, device: torch.device,
                chunk: int = M.CHUNK) -> F64:
    """Per synthetic slice of an equal-size pair of subsets: 1.0 when its nearest synthetic slice
    from another item is a near-copy by the memorization rule, with the real-to-real baseline
    taken inside the real subset (same size, so nearest-neighbour distances are comparable)."""
    ri, si = M.equal_size_indices(len(ref.item_of), len(syn.item_of), _rng(cfg, 10))
    pr, ps = M.as_rows(_flat(ref, ri), device), M.as_rows(_flat(syn, si), device)
    tr, ts = M.as_rows(fr[ri], device), M.as_rows(fs[si], device)
    rg, sg = ref.item_of[ri], syn.item_of[si]

    def nn(x: torch.Tensor, g: NDArray[np.int64]) -> F64:
        return M.nearest(x, x, g, g, chunk=chunk, device=device)[0]

    base_pix, base_feat = _median_finite(nn(pr, rg)), _median_finite(nn(tr, rg))
    pix = nn(ps, sg) / max(base_pix, 1e-12)
    feat = nn(ts, sg) / max(base_feat, 1e-12)
    return ((pix < cfg.copy_ratio_pixel) | (feat < cfg.copy_ratio_feature)).astype(np.float64)


def _diversity(s: GateSet, idx: NDArray[np.int64], cfg: GateConfig, stream: int) -> F64:
    """MS-SSIM of random pairs of slices from different items at the same slice index (volumes) or
    any two patches: slices of one anatomical level are compared, so the measure is between-subject
    diversity rather than the (much larger) difference between levels of the head."""
    return M.mean_pairwise_ms_ssim(s.images[idx], s.item_of[idx], cfg.max_pairs, _rng(cfg, stream), strata=s.slice_of[idx],
                                   device=cfg.device)


def _prdc(fr: F64, fs: F64, rg: NDArray[np.int64], sg: NDArray[np.int64], k: int, rng: np.random.Generator,
          device: torch.device) -> M.PRDC:
    """PRDC on equal-size sets (the larger subsampled); per-sample indicators of the subsample."""
    ri, si = M.equal_size_indices(len(fr), len(fs), rng)
    return M.prdc(fr[ri], fs[si], min(k, len(ri) - 1), rg[ri], sg[si], device=device)


def _class_metrics(real: GateSet, syn: GateSet, fr: F64, fs: F64, copies: NDArray[np.bool_], cfg: GateConfig,
                   device: torch.device, class_gates: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Metrics restricted to each class with at least cfg.min_class_samples slices in both sets (pooled
    features), with each class's own gate under "gate" when gate.class_checks ran it."""
    out: dict[str, dict[str, Any]] = {cls: {"gate": g} for cls, g in class_gates.items()}
    rc, sc = np.array(real.classes), np.array(syn.classes)
    for k, cls in enumerate(sorted(set(sc.tolist()))):
        ri, si = np.flatnonzero(rc == cls), np.flatnonzero(sc == cls)
        entry: dict[str, Any] = {"n_real": len(ri), "n_synthetic": len(si)} | out.get(cls, {})
        if len(ri) < cfg.min_class_samples or len(si) < cfg.min_class_samples:
            entry["note"] = f"fewer than {cfg.min_class_samples} slices in a set: not scored"
            out[cls] = entry
            continue
        p = _prdc(fr[ri], fs[si], real.item_of[ri], syn.item_of[si], cfg.nearest_k, _rng(cfg, 400 + k), device)
        fc, rc_feats = M.as_rows(fs[si], device), M.as_rows(fr[ri], device)  # on the device once for the resamples
        fid = M.fid(rc_feats, fc, device)
        nb, lvl, rng_b = cfg.n_bootstrap, cfg.ci_level, _rng(cfg, 500 + k)

        def class_fid(a: NDArray[np.int64], b: NDArray[np.int64], fc: torch.Tensor = fc, rf: torch.Tensor = rc_feats) -> float:
            return M.fid(fc[torch.as_tensor(a, device=fc.device)], rf[torch.as_tensor(b, device=rf.device)], device)

        entry.update(
            fid=fid,
            fid_ci=list(M.bootstrap_two_sample_ci(class_fid, len(si), len(ri), nb, lvl, rng_b, estimate=fid)),
            kid=M.kid(fs[si], fr[ri], max(1, cfg.kid_subsets // 5), cfg.kid_subset_size, _rng(cfg, 100 + k), device).mean,
            precision=p.precision, precision_ci=list(M.bootstrap_mean_ci(p.in_real_ball, nb, lvl, rng_b)),
            recall=p.recall, recall_ci=list(M.bootstrap_mean_ci(p.real_recalled, nb, lvl, rng_b)),
            density=p.density,
            coverage=p.coverage, coverage_ci=list(M.bootstrap_mean_ci(p.real_covered, nb, lvl, rng_b)),
            ms_ssim_synthetic=float(np.mean(v)) if len(v := _diversity(syn, si, cfg, 200 + k)) else float("nan"),
            ms_ssim_real=float(np.mean(v)) if len(v := _diversity(real, ri, cfg, 300 + k)) else float("nan"),
            copy_fraction=float(copies[si].mean()),
        )
        out[cls] = entry
    return out


def _features(extractor: FeatureExtractor, images: torch.Tensor) -> F64:
    """The extractor's features (N, D) float64, checked: a plug-in returning anything else is a ConfigError."""
    f = np.asarray(extractor(images), dtype=np.float64)
    if f.ndim != 2 or f.shape[0] != images.shape[0] or not np.isfinite(f).all():
        raise ConfigError(f"feature extractor {extractor.name!r} returned shape {f.shape} (or non-finite values) for "
                          f"{images.shape[0]} images; it must return finite (N, D) features")
    return f


def _check(name: str, value: float | None, threshold: float | None, op: str, detail: str) -> CheckResult | None:
    if threshold is None:
        return None
    if value is None or not np.isfinite(value):
        return CheckResult(name, value, threshold, op, False, f"{detail} (could not be computed)")
    passed = value <= threshold if op == "<=" else value >= threshold
    return CheckResult(name, float(value), float(threshold), op, bool(passed), detail)


@dataclass
class _Scores:
    """What `_score` found: the batch checks (unsorted), the metrics, and what the per-sample
    filter and the report reuse (the capped subsets and their indices, features, nearest-real
    distances, copy and outlier flags, seam reasons, the extractor)."""

    checks: list[CheckResult]
    metrics: dict[str, Any]
    ref: GateSet
    syn: GateSet
    sub: NDArray[np.int64]
    rsub: NDArray[np.int64]
    fr: F64
    fs: F64
    mem: dict[str, F64]
    copies: NDArray[np.bool_]
    outliers: NDArray[np.bool_]
    seam_reasons: dict[int, str]
    extractor: FeatureExtractor


def _score(ref_all: GateSet, syn_all: GateSet, cfg: GateConfig, out: Path, extractor: FeatureExtractor | None,
           dev: torch.device) -> _Scores:
    """Features, metrics and batch checks of one synthetic set against one real set."""
    sub = capped_indices(len(syn_all.item_of), cfg.max_slices, [cfg.seed, 1])
    rsub = capped_indices(len(ref_all.item_of), cfg.max_slices, [cfg.seed, 0])
    syn, ref = syn_all.subset(sub), ref_all.subset(rsub)

    # features (the domain encoder trains on the capped real subset)
    extractor = extractor or build_extractor(cfg, ref.images, out)
    fr_all, fs_all = _features(extractor, ref_all.images), _features(extractor, syn_all.images)
    fr, fs = fr_all[rsub], fs_all[sub]
    log.info("gate features: %s, %d-d", extractor.name, fr.shape[1])

    # metrics
    k = min(cfg.nearest_k, len(ref.item_of) - 1, len(syn.item_of) - 1)
    all_r, all_s = np.arange(len(ref.item_of)), np.arange(len(syn.item_of))
    nb, lvl = cfg.n_bootstrap, cfg.ci_level
    pix_r = ref.images.flatten().numpy()
    pix_s = syn.images.flatten().numpy()
    rng_pix = _rng(cfg, 1)
    w1 = M.intensity_w1(rng_pix.choice(pix_s, min(len(pix_s), 400_000), replace=False),
                        rng_pix.choice(pix_r, min(len(pix_r), 400_000), replace=False))
    log.info("gate metrics on %s (float64)", dev)
    ts, tr = M.as_rows(fs, dev), M.as_rows(fr, dev)  # on the device once; the resamples index it there
    fid = M.fid(ts, tr, dev)
    fid_ci = M.bootstrap_two_sample_ci(
        lambda a, b: M.fid(ts[torch.as_tensor(a, device=ts.device)], tr[torch.as_tensor(b, device=tr.device)], dev),
        len(fs), len(fr), nb, lvl, _rng(cfg, 2), estimate=fid)
    mf = matched_fid(fr, fs, ref.item_of, syn.item_of, cfg.fid_baseline_splits, cfg.seed, dev)
    fid_m = _fid_metrics(mf)
    matched_m, baseline_m = fid_m["fid_matched"], fid_m["fid_real_baseline"]
    fid_excess, fid_ratio = (mf.excess, mf.ratio) if mf is not None else (float("nan"), float("nan"))
    halves = ("" if mf is None else
              f"FID synthetic vs real half {matched_m['value']:.4g}, real half vs half {baseline_m['value']:.4g} "
              f"(std {baseline_m['std']:.2g}, {baseline_m['min']:.4g} to {baseline_m['max']:.4g}), mean over "
              f"{len(mf.baseline)} item-disjoint half splits at {mf.sizes.mean():.0f} slices a side; ")
    no_base = f"FID {fid:.4g}; fewer than 4 real items: no real-vs-real baseline"
    excess_detail = no_base if mf is None else (
        f"excess FID = (synthetic vs real half - real half vs half) / real feature variance {mf.real_variance:.4g}; "
        f"{halves}FID on all samples {fid:.4g}")
    ratio_detail = no_base if mf is None else f"synthetic over real-vs-real: {halves}FID on all samples {fid:.4g}"
    kid = M.kid(fs, fr, cfg.kid_subsets, cfg.kid_subset_size, _rng(cfg, 3), dev)
    p = _prdc(fr, fs, ref.item_of, syn.item_of, k, _rng(cfg, 8), dev)
    ms_syn = _diversity(syn, all_s, cfg, 4)
    ms_real = _diversity(ref, all_r, cfg, 5)
    ms_s, ms_r = (float(v.mean()) if len(v) else float("nan") for v in (ms_syn, ms_real))
    mem = _memorization(ref_all, rsub, syn_all, fr_all, fs_all, dev)
    copies = (mem["pixel_ratio"] < cfg.copy_ratio_pixel) | (mem["feature_ratio"] < cfg.copy_ratio_feature)
    outliers = mem["feature_ratio"] > cfg.outlier_ratio
    dups = _duplicates(ref, syn, fr, fs, cfg, dev)
    rng_b = _rng(cfg, 6)
    metrics: dict[str, Any] = {
        "intensity_w1": _metric(w1),
        "fid": _metric(fid, fid_ci),
        **fid_m,
        "kid": _metric(kid.mean, M.percentile_ci(kid.values, lvl), std=kid.std),
        "precision": _metric(p.precision, M.bootstrap_mean_ci(p.in_real_ball, nb, lvl, rng_b)),
        "recall": _metric(p.recall, M.bootstrap_mean_ci(p.real_recalled, nb, lvl, rng_b)),
        "density": _metric(p.density, M.bootstrap_mean_ci(p.real_balls_hit, nb, lvl, rng_b)),
        "coverage": _metric(p.coverage, M.bootstrap_mean_ci(p.real_covered, nb, lvl, rng_b)),
        "ms_ssim_synthetic": _metric(ms_s, M.bootstrap_mean_ci(ms_syn, nb, lvl, rng_b)),
        "ms_ssim_real": _metric(ms_r, M.bootstrap_mean_ci(ms_real, nb, lvl, rng_b)),
        "duplicate_fraction": _metric(float(dups.mean()), M.bootstrap_mean_ci(dups, nb, lvl, rng_b)),
        "copy_fraction": _metric(float(copies.mean()), M.bootstrap_mean_ci(copies.astype(np.float64), nb, lvl, rng_b)),
        "outlier_fraction": _metric(float(outliers.mean()), M.bootstrap_mean_ci(outliers.astype(np.float64), nb, lvl, rng_b)),
        "median_real_nn_pixel": _metric(float(mem["median_rr_pixel"][0])),
        "median_real_nn_feature": _metric(float(mem["median_rr_feature"][0])),
        "nearest_k": k,
    }

    # seam (inserted lesions; off unless cfg.seam_max_ratio): pipeline/gate/seam.py
    seam_check, seam_metric, seam_reasons = seam_gate(ref_all, syn_all, cfg.seam_max_ratio, cfg.seam_item_ratio)
    if seam_metric:
        metrics["seam_ratio"] = seam_metric
    # lesion HU per class (off unless cfg.lesion_hu_max): pipeline/gate/lesion.py
    lesion_check, lesion_metric = lesion_gate(ref_all, syn_all, cfg.lesion_hu_max)
    if lesion_metric:
        metrics["lesion_hu"] = lesion_metric

    # batch checks
    missing = sorted(set(syn_all.modalities) - set(ref_all.modalities))
    checks = [
        CheckResult("modality", float(len(missing)), 0.0, "<=", len(missing) == 0,
                    f"synthetic {'/'.join(syn_all.modalities)} vs real {'/'.join(ref_all.modalities)}"
                    + (f": no real {', '.join(missing)} to compare with" if missing else "")),
        _check("intensity", w1, cfg.intensity_max, "<=", "Wasserstein-1 of pixel values in [-1, 1]"),
        _check("fid", fid_excess, cfg.fid_max_excess, "<=", excess_detail),
        _check("fid", fid_ratio, cfg.fid_max_ratio, "<=", ratio_detail),
        _check("fid", fid, cfg.fid_max, "<=", "absolute FID"),
        _check("kid", kid.mean, cfg.kid_max, "<=", f"KID +- {kid.std:.3g} over {cfg.kid_subsets} subsets"),
        _check("precision", p.precision, cfg.precision_min, ">=", f"synthetic samples inside real {k}-NN balls"),
        _check("recall", p.recall, cfg.recall_min, ">=", f"real samples inside synthetic {k}-NN balls"),
        _check("coverage", p.coverage, cfg.coverage_min, ">=", f"real {k}-NN balls holding a synthetic sample"),
        _check("diversity", ms_s - ms_r, cfg.diversity_max_excess, "<=",
               f"pairwise MS-SSIM synthetic {ms_s:.3f} minus real {ms_r:.3f}"),
        _check("duplicates", float(dups.mean()), cfg.max_duplicate_fraction, "<=",
               "share of synthetic slices that are near-copies of another synthetic item (mode collapse)"),
        _check("memorization", float(copies.mean()), cfg.max_copy_fraction, "<=",
               f"share of slices nearer a training image than {cfg.copy_ratio_pixel} x (pixels) or "
               f"{cfg.copy_ratio_feature} x (features) the typical real-to-real distance"),
        seam_check,
        lesion_check,
    ]
    return _Scores([c for c in checks if c is not None], metrics, ref, syn, sub, rsub, fr, fs, mem, copies, outliers,
                   seam_reasons, extractor)


def _class_gates(ref_all: GateSet, syn_all: GateSet, cfg: GateConfig, out: Path, pooled: FeatureExtractor,
                 dev: torch.device) -> tuple[CheckResult, dict[str, Any]]:
    """The "class" check (gate.class_checks): every synthetic class gated alone against the real
    items of its class, with its own domain encoder fitted to them (a fixed extractor, Inception
    or a given encoder, is shared). Pooled features are fitted to what the classes share (for
    tumor patches: skull, brain, air), so a batch whose lesions are wrong can pass pooled; the
    check fails when a class fails any of its checks. A class with fewer than
    gate.class_min_items real or synthetic items is not judged (its FID baseline would be noise)
    and the detail says so. Returns the check and each class's verdict and check values.
    """
    rc, sc = np.array(ref_all.classes), np.array(syn_all.classes)
    by_class: dict[str, Any] = {}
    problems: list[str] = []
    unjudged: list[str] = []
    for cls in sorted(set(sc.tolist())):
        ri, si = np.flatnonzero(rc == cls), np.flatnonzero(sc == cls)
        n_items = (len(set(ref_all.item_of[ri].tolist())), len(set(syn_all.item_of[si].tolist())))
        if min(n_items) < cfg.class_min_items or min(len(ri), len(si)) < cfg.min_samples:
            by_class[cls] = {"n_real": len(ri), "n_synthetic": len(si), "verdict": "not judged"}
            unjudged.append(f"{cls or 'unlabelled'} ({n_items[0]} real, {n_items[1]} synthetic items)")
            continue
        ref_c, syn_c = ref_all.subset(ri), syn_all.subset(si)
        extractor = None if needs_real_images(cfg) else pooled
        (folder := out / "classes" / (cls or "unlabelled")).mkdir(parents=True, exist_ok=True)  # its domain encoder
        scores = _score(ref_c, syn_c, cfg, folder, extractor, dev)
        failed = [c for c in scores.checks if not c.passed]
        by_class[cls] = {"n_real": len(ri), "n_synthetic": len(si), "verdict": "reject" if failed else "accept",
                         "failed_checks": [c.name for c in failed],
                         "checks": {c.name: c.value for c in scores.checks}}
        if failed:
            problems.append(f"{cls or 'unlabelled'}: " + ", ".join(
                f"{c.name} {c.value:.4g} {'>' if c.op == '<=' else '<'} {c.threshold:.4g}"
                if c.value is not None and c.threshold is not None else c.name for c in failed))
    judged = len(by_class) - len(unjudged)
    detail = "each class alone against its real items, own features: " + (
        "; ".join(problems) if problems else f"{judged} judged class(es) pass")
    if unjudged:
        detail += f"; not judged, under gate.class_min_items {cfg.class_min_items}: {', '.join(unjudged)}"
    check = CheckResult("class", float(len(problems)), 0.0, "<=", not problems, detail)
    return check, by_class


def run_gate(real: Path, synthetic: Path, out: Path, cfg: GateConfig | None = None, key: bytes | None = None) -> GateReport:
    """Score `synthetic` against `real` (folders; see pipeline/gate/images.py), write the report under `out`.

    `key` signs the report (HMAC-SHA256; None: MEDAUG_GATE_KEY, unsigned with a warning when
    that is unset; pipeline/gate/signing.py). Returns the GateReport (verdict "accept" or
    "reject", failed checks named). Raises
    DatasetError for unusable folders or too few samples, WeightsMissingError for missing
    weights, ConfigError for a bad extractor plug-in or a device torch cannot use.
    """
    cfg = cfg or GateConfig()
    # one device for the encoder, the features and the metrics (float64), checked before any work
    dev = M.metric_device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    # a missing weights file or a bad plug-in fails before any image is read
    extractor = None if needs_real_images(cfg) else build_extractor(cfg, None, out)

    # data: every synthetic slice (syn_all) gets a per-sample decision; batch metrics use
    # at most cfg.max_slices of them (syn), like the real set (ref); memorization compares with
    # every real slice (ref_all): a copy of an unsampled training slice is still a copy
    syn_all = load_gate_set(synthetic, cfg, "synthetic", cap=False)
    ref_all = load_gate_set(real, cfg, "real", modalities=set(syn_all.modalities), cap=False)
    if ref_all.images.shape[-1] != syn_all.images.shape[-1]:
        # a silent resize would compare images of different native resolution (16 px patches against 32 px slices)
        log.warning("synthetic images are %dx%d and real ones %dx%d: both resized to gate.gate_size %d; the gate then compares "
                    "different resolutions (blur, scale) - give it real and synthetic items of one size",
                    *syn_all.images.shape[-2:], *ref_all.images.shape[-2:], cfg.gate_size)
        ref_all.images = resize_images(ref_all.images, cfg.gate_size)
        syn_all.images = resize_images(syn_all.images, cfg.gate_size)
    for name, s in (("real", ref_all), ("synthetic", syn_all)):
        if len(s.item_of) < cfg.min_samples:
            raise DatasetError(f"{name} folder {s.folder.name} has {len(s.item_of)} scored slices; the gate needs at least "
                               f"{cfg.min_samples} (gate.min_samples)")
    sc = _score(ref_all, syn_all, cfg, out, extractor, dev)
    done = sc.checks
    class_gates: dict[str, Any] = {}
    if cfg.class_checks:
        class_check, class_gates = _class_gates(ref_all, syn_all, cfg, out, sc.extractor, dev)
        done.append(class_check)
    done.sort(key=lambda c: CHECKS.index(c.name))
    failed = list(dict.fromkeys(c.name for c in done if not c.passed))
    verdict = "reject" if failed else "accept"
    extractor = sc.extractor

    # per-sample filtering
    samples = _decide_samples(ref_all, syn_all, sc.mem, sc.copies, sc.outliers, cfg)
    for i, why in sc.seam_reasons.items():
        samples[i].decision, samples[i].reasons = "reject", [*samples[i].reasons, why]
    n_acc = sum(s.decision == "accept" for s in samples)
    report = GateReport(
        verdict=verdict,
        failed_checks=failed,
        checks=done,
        metrics=sc.metrics,
        per_class=_class_metrics(sc.ref, sc.syn, sc.fr, sc.fs, sc.copies[sc.sub], cfg, dev, class_gates),
        samples=samples,
        feature_extractor={"name": extractor.name, "sha256": extractor.sha256, "dim": int(sc.fr.shape[1])}
        | ({"weights": weights} if (weights := str(getattr(extractor, "weights", ""))) else {}),
        inputs={
            "real": {"content_sha256": ref_all.content_sha256(), "n_items": len(ref_all.items),
                     "n_slices": len(ref_all.item_of), "n_slices_batch_metrics": len(sc.rsub), "modalities": ref_all.modalities},
            "synthetic": {"content_sha256": syn_all.content_sha256(), "n_items": len(syn_all.items),
                          "n_slices": len(syn_all.item_of), "n_slices_batch_metrics": len(sc.sub), "modalities": syn_all.modalities},
            "image_size": int(sc.syn.images.shape[-1]),
        },
        config=cfg.model_dump(mode="json"),
        n_accepted=n_acc,
        n_rejected=len(samples) - n_acc,
        out=out,
    )
    report.report_id = report_id(report)
    key = key if key is not None else gate_key_from_env()
    sign_report(report, key)
    if key is None:
        log.warning("%s (the report is bound to its content only)", NOT_VERIFIED_NOTE)

    # files
    figures = _write_figures(report, ref_all, syn_all, sc.mem, sc.copies, cfg, out)
    write_json(report, out)
    write_markdown(report, out, figures)
    write_accepted(report, [it.row for it in syn_all.items], syn_all.columns, out)
    log.info("gate %s%s: %d of %d synthetic items pass the per-sample filter (report %s)", verdict.upper(),
             f" (failed: {', '.join(failed)})" if failed else "", n_acc, len(samples), report.report_id[:12])
    return report


def _slice_name(s: GateSet, i: int) -> str:
    """`<item path>#z<slice>` of slice i of a set (a patch's slice is z0)."""
    return f"{s.items[s.item_of[i]].path}#z{int(s.slice_of[i])}"


def _decide_samples(ref: GateSet, syn: GateSet, mem: dict[str, F64], copies: NDArray[np.bool_],
                    outliers: NDArray[np.bool_], cfg: GateConfig) -> list[SampleDecision]:
    """One decision per synthetic item: drop near-copies and outliers (share of its slices over cfg.item_share)."""
    decisions = []
    for idx, item in enumerate(syn.items):
        sl = np.flatnonzero(syn.item_of == idx)
        if item.skipped or len(sl) == 0:
            decisions.append(SampleDecision(item.path, item.sha256, item.klass, "reject", [item.skipped or "no scored slice"], 0,
                                            label_sha256=item.label_sha256))
            continue
        reasons = []
        copy_share, out_share = float(copies[sl].mean()), float(outliers[sl].mean())
        j = sl[int(np.argmin(mem["pixel_ratio"][sl]))]
        jf = sl[int(np.argmin(mem["feature_ratio"][sl]))]
        nearest = _slice_name(ref, int(mem["pixel_idx"][j]))
        nearest_feature = _slice_name(ref, int(mem["feature_idx"][jf]))
        if copy_share > cfg.item_share or (len(sl) == 1 and copy_share > 0):
            reasons.append(f"near-copy of training image {nearest}: pixel distance {mem['pixel_ratio'][j]:.2f} x, "
                           f"feature distance {float(mem['feature_ratio'][sl].min()):.2f} x the typical real-to-real distance "
                           f"({copy_share:.0%} of its slices)")
        if out_share > cfg.item_share or (len(sl) == 1 and out_share > 0):
            reasons.append(f"outlier: feature distance to the nearest real image {float(np.median(mem['feature_ratio'][sl])):.2f} x "
                           f"the typical real-to-real distance, over {cfg.outlier_ratio} ({out_share:.0%} of its slices)")
        decisions.append(SampleDecision(
            item.path, item.sha256, item.klass, "reject" if reasons else "accept", reasons, len(sl),
            pixel_ratio=float(mem["pixel_ratio"][sl].min()), feature_ratio=float(mem["feature_ratio"][sl].min()),
            outlier_share=out_share, nearest_real=nearest, nearest_real_feature=nearest_feature, label_sha256=item.label_sha256,
        ))
    return decisions


def _write_figures(report: GateReport, ref: GateSet, syn: GateSet, mem: dict[str, F64], copies: NDArray[np.bool_],
                   cfg: GateConfig, out: Path) -> list[str]:
    """Accepted samples, rejected samples, near-copy pairs (synthetic | nearest training slice) as PNGs."""
    n = cfg.figure_samples
    if n == 0:
        return []
    rng = _rng(cfg, 9)
    by_path = {s.path: s for s in report.samples}
    acc_slices = [i for i in range(len(syn.item_of)) if by_path[syn.items[syn.item_of[i]].path].decision == "accept"]
    rej_slices = [i for i in range(len(syn.item_of)) if by_path[syn.items[syn.item_of[i]].path].decision != "accept"]
    written = []
    for name, pool in ((FIG_ACCEPTED, acc_slices), (FIG_REJECTED, rej_slices)):
        if not pool:
            continue
        pick = sorted(rng.choice(len(pool), min(n, len(pool)), replace=False).tolist())
        idx = [pool[i] for i in pick]
        caps = [f"{syn.items[syn.item_of[i]].klass or '-'} z{int(syn.slice_of[i])}" for i in idx]
        image_grid([[syn.images[i]] for i in idx], caps, out / name)
        written.append(name)
    copy_idx = np.flatnonzero(copies)
    if len(copy_idx):
        order = copy_idx[np.argsort(mem["pixel_ratio"][copy_idx])][:n]
        tiles = [[syn.images[i], ref.images[int(mem["pixel_idx"][i])]] for i in order]
        caps = [f"ratio {mem['pixel_ratio'][i]:.2f}" for i in order]
        image_grid(tiles, caps, out / FIG_COPIES)
        written.append(FIG_COPIES)
    return written
