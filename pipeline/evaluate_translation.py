"""How good is a CycleGAN translation: paired metrics on held-out phantoms, structure scores anywhere.

Two kinds of evidence, written together to evaluation.json and evaluation.md by
`run_evaluate_translation` (CLI `medaug evaluate-translation`):

* Paired truth, available only for the phantom cohort's held-out subjects (ingest rows of
  split "test" with both an MR and a CT of the same subject_id, same anatomy and grid):
  MRI->CT MAE in HU inside the body, PSNR and SSIM (MONAI PSNRMetric, SSIMMetric on the
  [-1, 1] scale, per axial slice); CT->MRI the same in normalised MR units. The CycleGAN is
  compared with a classical baseline it must beat: per-volume histogram matching of the
  source's body voxels to the target modality's body voxels of the *training* split
  (`HistogramMatcher`; it never sees the paired truth).
* Structure preservation, which needs no truth and so also works on a user's own data:
  body-mask Dice and bone/air-mask Dice between input and translation, edge consistency
  (correlation of gradient magnitudes, Dice of the strongest-edge maps) and, for MRI->CT,
  HU plausibility per tissue class (classes segmented from the input MR). On paired data
  the same scores of the truth itself are reported as the reference a perfect translation
  gets (bone and CSF are both dark in T1, so the bone/air Dice of the truth is < 1; a
  monotone intensity map keeps every edge, so the baseline can beat the truth on edges).

`structure_scores(g_mri2ct, g_ct2mri, held_out_batches)` computes the structure scores on
slices during training; bound with functools.partial it is the `evaluate` callback of
models.train_cyclegan.train_cyclegan.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

from pipeline.errors import DatasetError, ProvenanceError
from pipeline.preprocess import (
    CT_BODY_THRESHOLD_HU,
    DEFAULT_HU_WINDOW,
    body_mask,
    ct_to_unit,
    to_unit,
    unit_to_ct,
)
from pipeline.slices import manifest_rows, split_matches, volume_as_3d
from pipeline.translate import (
    Direction,
    TranslationSettings,
    direction_modalities,
    resolve_device,
    translate_unit,
)
from pipeline.types import HUWindow, Modality

log = logging.getLogger(__name__)

FloatArray = NDArray[np.floating]
BoolArray = NDArray[np.bool_]

MR_UNIT_BODY_THRESHOLD = -0.9
"""Normalised MR above this is body: air sits at -1, the darkest 5 % of the MR range is left out."""

MR_UNIT_DARK_THRESHOLD = -0.6
"""Normalised MR below this, inside the body, is dark: bone or air (dark in T1 and T2), but in T1 also CSF.

T1 cannot tell bone from CSF by intensity (phantom medians -0.65 and -0.69), so even the
paired truth reaches a bone/air Dice of only ~0.6 on the phantoms: compare with that ceiling."""

CT_BONE_HU = 300.0
"""CT above this (HU) is bone (cancellous bone starts near 300 HU)."""

CT_AIR_HU = -400.0
"""CT below this (HU) is air, also inside the body (sinuses)."""

HU_PLAUSIBLE: dict[str, tuple[tuple[float, float], ...]] = {
    "air": ((-1100.0, -800.0),),
    "soft": ((-200.0, 200.0),),
    "dark": ((-1100.0, -800.0), (300.0, 3100.0)),
}
"""Plausible HU per tissue class of the input MR: outside the body air; body voxels with
MR signal fat, fluid or tissue (-200..200 HU); MR signal voids bone or air."""

EDGE_QUANTILE = 0.9
"""Edge maps keep the strongest 10 % of gradient magnitudes inside the body."""


# --- metrics ---------------------------------------------------------------------------------


def mae(pred: FloatArray, truth: FloatArray, mask: BoolArray | None = None) -> float:
    """Mean absolute error, inside `mask` when given (units of the inputs, e.g. HU).

    >>> mae(np.array([0.0, 10.0, 30.0]), np.array([0.0, 0.0, 0.0]), np.array([True, True, False]))
    5.0
    """
    diff = np.abs(np.asarray(pred, np.float64) - np.asarray(truth, np.float64))
    if mask is not None:
        diff = diff[np.asarray(mask, bool)]
    return float(diff.mean()) if diff.size else float("nan")


def _slices_tensor(volume: FloatArray) -> torch.Tensor:
    """(x, y, z) or (x, y) -> (z, 1, x, y) float tensor: axial slices as a batch."""
    arr = np.asarray(volume, np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.as_tensor(np.ascontiguousarray(np.moveaxis(arr, -1, 0)))[:, None]


def psnr(pred: FloatArray, truth: FloatArray, data_range: float = 2.0) -> float:
    """PSNR in dB of a whole volume (MONAI PSNRMetric); inf for identical inputs.

    >>> psnr(np.zeros((4, 4, 2)), np.zeros((4, 4, 2)))
    inf
    >>> round(psnr(np.full((4, 4, 1), 0.2), np.zeros((4, 4, 1))), 2)
    20.0
    """
    from monai.metrics import PSNRMetric

    p = _slices_tensor(pred).reshape(1, 1, -1)
    t = _slices_tensor(truth).reshape(1, 1, -1)
    return float(torch.as_tensor(PSNRMetric(max_val=data_range)(p, t)).mean())


def ssim(pred: FloatArray, truth: FloatArray, data_range: float = 2.0) -> float:
    """Mean SSIM over axial slices (MONAI SSIMMetric, 2-D, Gaussian window of up to 11 px); 1 when identical.

    >>> ssim(np.ones((16, 16, 2)), np.ones((16, 16, 2)))
    1.0
    """
    from monai.metrics import SSIMMetric

    p, t = _slices_tensor(pred), _slices_tensor(truth)
    win = min(11, p.shape[-1], p.shape[-2])
    win -= 1 - win % 2  # odd window
    metric = SSIMMetric(spatial_dims=2, data_range=data_range, win_size=max(win, 3))
    return float(torch.as_tensor(metric(p, t)).mean())


def dice(a: BoolArray, b: BoolArray) -> float:
    """Dice overlap of two boolean masks (MONAI compute_dice); 1 when both are empty.

    >>> round(dice(np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool)), 4)
    0.6667
    """
    from monai.metrics import compute_dice

    pa = torch.as_tensor(np.asarray(a, bool).reshape(1, 1, -1).astype(np.float32))
    pb = torch.as_tensor(np.asarray(b, bool).reshape(1, 1, -1).astype(np.float32))
    return float(compute_dice(pa, pb, include_background=True, ignore_empty=False).item())


def correlation(a: FloatArray, b: FloatArray) -> float:
    """Pearson correlation; 1 when both are constant and equal, 0 when only one is constant.

    >>> correlation(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]))
    1.0
    """
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if x.size == 0:
        return float("nan")
    sx, sy = x.std(), y.std()
    if sx == 0 or sy == 0:
        return 1.0 if sx == sy and np.allclose(x, y) else 0.0
    return float(np.clip(np.mean((x - x.mean()) * (y - y.mean())) / (sx * sy), -1.0, 1.0))


# --- masks on the [-1, 1] scale ---------------------------------------------------------------


def unit_body_mask(x: FloatArray, modality: Modality, hu_window: HUWindow = DEFAULT_HU_WINDOW) -> BoolArray:
    """Body mask of a normalised (x, y[, z]) slice or volume (pipeline.preprocess.body_mask).

    >>> x = np.full((5, 5), -1.0); x[1:4, 1:4] = 0.2
    >>> int(unit_body_mask(x, "MR").sum())
    9
    """
    match modality:
        case "CT":
            threshold = float(ct_to_unit(np.array([CT_BODY_THRESHOLD_HU]), hu_window)[0])
        case "MR":
            threshold = MR_UNIT_BODY_THRESHOLD
        case _:
            raise ValueError(f"modality must be one of CT, MR; got {modality!r}")
    return body_mask(x, modality, threshold=threshold)


def dark_mask(x: FloatArray, modality: Modality, body: BoolArray, hu_window: HUWindow = DEFAULT_HU_WINDOW) -> BoolArray:
    """Bone-or-air voxels inside `body`: CT above CT_BONE_HU or below CT_AIR_HU; MR signal void.

    >>> ct = ct_to_unit(np.array([[-1000.0, 0.0, 1000.0]])); b = np.ones((1, 3), bool)
    >>> dark_mask(ct, "CT", b).tolist()
    [[True, False, True]]
    """
    arr = np.asarray(x, np.float64)
    match modality:
        case "CT":
            hu = unit_to_ct(arr, hu_window)
            dark = (hu > CT_BONE_HU) | (hu < CT_AIR_HU)
        case "MR":
            dark = arr < MR_UNIT_DARK_THRESHOLD
        case _:
            raise ValueError(f"modality must be one of CT, MR; got {modality!r}")
    return np.asarray(dark & body)


def gradient_magnitude(x: FloatArray) -> NDArray[np.float64]:
    """In-plane Sobel gradient magnitude of each axial slice of a (x, y[, z]) array.

    >>> g = gradient_magnitude(np.tile([0.0, 0.0, 1.0, 1.0], (4, 1)))
    >>> bool(g[:, 1:3].min() > 0), float(g[:, 0].max())
    (True, 0.0)
    """
    arr = np.asarray(x, np.float64)
    gx = ndimage.sobel(arr, axis=0, mode="nearest")
    gy = ndimage.sobel(arr, axis=1, mode="nearest")
    return np.asarray(np.hypot(gx, gy))


def edge_map(g: NDArray[np.float64], region: BoolArray, quantile: float = EDGE_QUANTILE) -> BoolArray:
    """The strongest (1 - quantile) fraction of gradient magnitudes inside `region`."""
    if not region.any():
        return np.zeros_like(region)
    level = np.quantile(g[region], quantile)
    return np.asarray(region & (g > level) if level > 0 else region & (g > 0))


def hu_plausibility(ct_unit: FloatArray, mr_unit: FloatArray, hu_window: HUWindow = DEFAULT_HU_WINDOW) -> dict[str, float]:
    """Fraction of translated-CT voxels in their tissue's plausible HU range (HU_PLAUSIBLE).

    Tissue classes come from the input MR (`mr_unit`, same grid): "air" outside its body
    mask, "dark" (signal void: bone or air) and "soft" inside it. Returns
    `{"air": f, "soft": f, "dark": f, "all": f}`, NaN for a class with no voxel.

    >>> mr = np.full((6, 6), -1.0); mr[1:5, 1:5] = 0.3
    >>> ct = ct_to_unit(np.where(mr > -1, 40.0, -1000.0))
    >>> hu_plausibility(ct, mr)["all"]
    1.0
    """
    hu = unit_to_ct(np.asarray(ct_unit, np.float64), hu_window).astype(np.float64)
    body = unit_body_mask(mr_unit, "MR")
    dark = dark_mask(mr_unit, "MR", body)
    classes = {"air": ~body, "soft": body & ~dark, "dark": dark}
    out: dict[str, float] = {}
    ok_all = np.zeros(hu.shape, bool)
    for name, where in classes.items():
        ok = np.zeros(hu.shape, bool)
        for lo, hi in HU_PLAUSIBLE[name]:
            ok |= (hu >= lo) & (hu <= hi)
        ok &= where
        ok_all |= ok
        out[name] = float(ok.sum() / where.sum()) if where.any() else float("nan")
    out["all"] = float(ok_all.mean())
    return out


def structure_measures(
    src_unit: FloatArray, out_unit: FloatArray, direction: Direction, hu_window: HUWindow = DEFAULT_HU_WINDOW
) -> dict[str, float]:
    """Structure preservation between an input and its translation, both on the [-1, 1] scale.

    Works on one (x, y) slice or a (x, y, z) volume; no truth needed. Returns body_dice,
    bone_air_dice, edge_corr (gradient-magnitude correlation inside the body), edge_dice
    and, for mri2ct, hu_plausible_{air,soft,dark,all}.

    >>> x = np.full((8, 8), -1.0); x[2:6, 2:6] = 0.5
    >>> structure_measures(x, x, "mri2ct")["body_dice"]
    1.0
    """
    src_mod, tgt_mod = direction_modalities(direction)
    src, out = np.asarray(src_unit, np.float64), np.asarray(out_unit, np.float64)
    if src.shape != out.shape:
        raise ValueError(f"input {src.shape} and translation {out.shape} must have the same shape")
    body_src = unit_body_mask(src, src_mod, hu_window)
    body_out = unit_body_mask(out, tgt_mod, hu_window)
    g_src, g_out = gradient_magnitude(src), gradient_magnitude(out)
    region = body_src | body_out
    if region.any():
        region = np.asarray(ndimage.binary_dilation(region, iterations=1))
    scores = {
        "body_dice": dice(body_src, body_out),
        "bone_air_dice": dice(dark_mask(src, src_mod, body_src, hu_window), dark_mask(out, tgt_mod, body_out, hu_window)),
        "edge_corr": correlation(g_src[region], g_out[region]) if region.any() else float("nan"),
        "edge_dice": dice(edge_map(g_src, region), edge_map(g_out, region)),
    }
    if tgt_mod == "CT":
        for k, v in hu_plausibility(out, src, hu_window).items():
            scores[f"hu_plausible_{k}"] = v
    return scores


def _mean_dicts(dicts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    out = {}
    for k in keys:
        vals = [d[k] for d in dicts if k in d and not math.isnan(d[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


# --- training callback ---------------------------------------------------------------------


STRUCTURE_KEY = "structure"
"""Key of the overall structure score (higher is better): pass it as train_cyclegan's best_key."""


@torch.no_grad()
def structure_scores(
    g_mri2ct: torch.nn.Module,
    g_ct2mri: torch.nn.Module,
    held_out_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    hu_window: HUWindow = DEFAULT_HU_WINDOW,
) -> dict[str, float]:
    """Structure scores of both generators on held-out slices; the evaluate callback of training.

    `held_out_batches` yields (mri, ct) pairs of (N, C, H, W) tensors in [-1, 1] (unpaired
    is fine; see `held_out_batches`). Scores are averaged over slices; keys
    "mri2ct_<measure>" and "ct2mri_<measure>" (see `structure_measures`) plus
    "structure", the mean of body Dice, bone/air Dice and edge correlation of both
    directions and the overall HU plausibility: higher is better.
    """
    gens = {"mri2ct": g_mri2ct, "ct2mri": g_ct2mri}
    was_training = {k: g.training for k, g in gens.items()}
    per: dict[str, list[dict[str, float]]] = {"mri2ct": [], "ct2mri": []}
    try:
        for g in gens.values():
            g.eval()
        for mri, ct in held_out_batches:
            for direction, src in (("mri2ct", mri), ("ct2mri", ct)):
                g = gens[direction]
                dev = next(g.parameters()).device
                fake = g(src.to(dev).float()).float().clamp(-1, 1).cpu()
                centre_in = src[:, src.shape[1] // 2].float().cpu().numpy()
                centre_out = fake[:, fake.shape[1] // 2].numpy()
                for s, o in zip(centre_in, centre_out, strict=True):
                    per[direction].append(structure_measures(s, o, direction, hu_window))  # type: ignore[arg-type]
    finally:
        for k, g in gens.items():
            g.train(was_training[k])
    scores: dict[str, float] = {}
    for direction, items in per.items():
        for k, v in _mean_dicts(items).items():
            scores[f"{direction}_{k}"] = v
    main = ["mri2ct_body_dice", "mri2ct_bone_air_dice", "mri2ct_edge_corr", "mri2ct_hu_plausible_all",
            "ct2mri_body_dice", "ct2mri_bone_air_dice", "ct2mri_edge_corr"]
    vals = [scores[k] for k in main if k in scores and not math.isnan(scores[k])]
    scores[STRUCTURE_KEY] = float(np.mean(vals)) if vals else float("nan")
    return scores


def held_out_batches(data: Any, batch_size: int = 16, max_batches: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed (mri, ct) batches from an UnpairedData (e.g. load_unpaired_slices(split="test")).

    Slices are taken evenly spaced through each side so the batches cover every volume;
    the same batches every call, so scores are comparable between evaluations.
    """
    n = batch_size * max_batches
    out_a = _evenly(data.a, n)
    out_b = _evenly(data.b, n)
    k = min(out_a.shape[0], out_b.shape[0])
    return [(out_a[i : min(i + batch_size, k)], out_b[i : min(i + batch_size, k)]) for i in range(0, k, batch_size)]


def _evenly(ds: Any, n: int) -> torch.Tensor:
    idx = np.unique(np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int))
    return torch.stack([ds[int(i)] for i in idx])


# --- classical baseline ----------------------------------------------------------------------


@dataclass
class HistogramMatcher:
    """Per-volume histogram matching of body voxels to a reference distribution.

    The classical MRI->CT (or CT->MRI) baseline: each source volume's body-voxel quantiles
    are mapped piecewise-linearly onto the reference quantiles, which come from the target
    modality's *training* volumes (`fit`), never from the paired truth. Voxels outside the
    body get `background`. Our own because MONAI's HistogramNormalize equalises a volume
    rather than matching it to a reference. Monotone by construction, so it cannot undo
    T1's contrast inversions (bone dark in MR, bright in CT): the bar the CycleGAN must clear.

    >>> m = HistogramMatcher.fit([np.arange(100.0)], [np.ones(100, bool)], background=-1.0, levels=11)
    >>> m.apply(np.arange(10.0) * 2, np.ones(10, bool))[[0, -1]].tolist()
    [0.0, 99.0]
    """

    reference: NDArray[np.float64]
    background: float
    levels: NDArray[np.float64] = field(default_factory=lambda: np.linspace(0.0, 100.0, 201))

    @classmethod
    def fit(
        cls, volumes: Sequence[FloatArray], masks: Sequence[BoolArray], background: float, levels: int = 201
    ) -> HistogramMatcher:
        """Reference quantiles of the pooled body voxels of `volumes` (each volume weighted equally)."""
        pct = np.linspace(0.0, 100.0, levels)
        per_volume = [np.percentile(np.asarray(v, np.float64)[np.asarray(m, bool)], pct) for v, m in zip(volumes, masks, strict=True) if np.any(m)]
        if not per_volume:
            raise DatasetError("histogram matching needs at least one reference volume with a body mask")
        return cls(reference=np.mean(per_volume, axis=0), background=float(background), levels=pct)

    def apply(self, volume: FloatArray, mask: BoolArray) -> NDArray[np.float32]:
        """`volume` with its body voxels matched to the reference; background outside `mask`."""
        arr = np.asarray(volume, np.float64)
        m = np.asarray(mask, bool)
        out = np.full(arr.shape, self.background, np.float64)
        if m.any():
            src_q = np.percentile(arr[m], self.levels)
            # equal source quantiles (flat histogram parts) would make interp ill-defined
            src_q = np.maximum.accumulate(src_q + np.arange(src_q.size) * 1e-9)
            out[m] = np.interp(arr[m], src_q, self.reference)
        return out.astype(np.float32)


# --- the paired benchmark ------------------------------------------------------------------


@dataclass
class Volume:
    """A volume read for evaluation: RAS+ (x, y, z) data in source units, its [-1, 1] form and body mask."""

    subject_id: str
    modality: Modality
    raw: NDArray[np.float32]
    unit: NDArray[np.float32]
    body: BoolArray
    tumor_class: str = ""


def read_volume(path: Path, modality: Modality, settings: TranslationSettings, subject_id: str = "", tumor_class: str = "") -> Volume:
    """Read and normalise one ingest volume (CT by the HU window, MR by its own landmarks)."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    raw = volume_as_3d(np.asarray(img.dataobj, dtype=np.float32))
    body = body_mask(raw, modality)
    unit = to_unit(raw, modality, settings.hu_window, settings.mr_percentiles, body)[0]
    return Volume(subject_id, modality, raw, unit, body, tumor_class)


def find_pairs(ingest_dirs: Sequence[Path]) -> tuple[list[tuple[Path, Path, dict[str, str]]], list[tuple[Path, dict[str, str]]]]:
    """Paired test subjects (MR path, CT path, MR row) and the training rows (path, row).

    A pair is a subject_id with both an MR and a CT row in split "test"; training rows are
    split "train" or empty.
    """
    pairs: list[tuple[Path, Path, dict[str, str]]] = []
    train: list[tuple[Path, dict[str, str]]] = []
    for d in ingest_dirs:
        d = Path(d)
        by_subject: dict[str, dict[str, tuple[Path, dict[str, str]]]] = {}
        for row in manifest_rows(d):
            mod = row.get("modality", "").strip().upper()
            if mod not in ("CT", "MR"):
                continue
            if split_matches(row.get("split", ""), "train"):
                train.append((d / row["path"], row))
            elif split_matches(row.get("split", ""), "test") and row.get("subject_id"):
                by_subject.setdefault(row["subject_id"], {}).setdefault(mod, (d / row["path"], row))
        for _sid, mods in sorted(by_subject.items()):
            if "MR" in mods and "CT" in mods:
                pairs.append((mods["MR"][0], mods["CT"][0], mods["MR"][1]))
    return pairs, train


def _fit_baselines(train: Sequence[tuple[Path, dict[str, str]]], settings: TranslationSettings) -> dict[str, HistogramMatcher]:
    """Histogram matchers to CT (HU) and to MR ([-1, 1]) from the training volumes."""
    vols: dict[str, list[Volume]] = {"CT": [], "MR": []}
    for path, row in train:
        mod = row["modality"].strip().upper()
        vols[mod].append(read_volume(path, mod, settings))  # type: ignore[arg-type]
    for mod, items in vols.items():
        if not items:
            raise DatasetError(f"the baseline needs training {mod} volumes (split train) in the data folder; found none")
    return {
        "mri2ct": HistogramMatcher.fit([v.raw for v in vols["CT"]], [v.body for v in vols["CT"]], background=-1000.0),
        "ct2mri": HistogramMatcher.fit([v.unit for v in vols["MR"]], [v.body for v in vols["MR"]], background=-1.0),
    }


def paired_metrics(pred_unit: FloatArray, truth_unit: FloatArray, body: BoolArray, direction: Direction,
                   hu_window: HUWindow = DEFAULT_HU_WINDOW, truth_raw: FloatArray | None = None) -> dict[str, float]:
    """MAE inside `body` (HU for mri2ct against `truth_raw` HU, else [-1, 1] units), PSNR, SSIM on [-1, 1].

    mri2ct adds mae_bone and mae_soft: the MAE in HU over the truth's bone (> CT_BONE_HU)
    and over the rest of the body; on coarse grids bone partial volume dominates the MAE.

    >>> x = np.zeros((8, 8, 2)); b = np.ones_like(x, bool)
    >>> paired_metrics(x, x, b, "ct2mri")["mae"], paired_metrics(x, x, b, "ct2mri")["ssim"]
    (0.0, 1.0)
    """
    extra: dict[str, float] = {}
    if direction == "mri2ct":
        truth_hu = np.asarray(truth_raw if truth_raw is not None else unit_to_ct(truth_unit, hu_window), np.float64)
        pred_hu = unit_to_ct(pred_unit, hu_window)
        err = mae(pred_hu, truth_hu, body)
        bone = body & (truth_hu > CT_BONE_HU)
        extra = {"mae_bone": mae(pred_hu, truth_hu, bone), "mae_soft": mae(pred_hu, truth_hu, body & ~bone)}
    else:
        err = mae(pred_unit, truth_unit, body)
    return {"mae": err, "psnr": psnr(pred_unit, truth_unit), "ssim": ssim(pred_unit, truth_unit)} | extra


def run_evaluate_translation(
    checkpoint: Path,
    data: Sequence[Path],
    out: Path,
    batch_size: int = 16,
    device: str = "auto",
    use_ema: bool = True,
    max_figures: int = 4,
) -> dict[str, Any]:
    """Evaluate a CycleGAN checkpoint on the paired held-out subjects of ingest folder(s).

    Writes out/evaluation.json, out/evaluation.md and out/mri2ct_grid.png,
    out/ct2mri_grid.png (rows: subjects; columns: input, CycleGAN, baseline, truth,
    |CycleGAN - truth|; the middle axial slice). Without paired subjects (a user's own
    data) only structure scores of the test volumes (or all volumes) are reported.

    Raises:
        ProvenanceError: a paired test subject is in the checkpoint's train_subjects.
        DatasetError: no volume to evaluate, or no training volumes for the baseline.
    """
    from models.train_cyclegan import load_generator

    dev = resolve_device(device)
    g_m2c, card = load_generator(Path(checkpoint), "mri2ct", use_ema=use_ema, device=str(dev))
    g_c2m, _ = load_generator(Path(checkpoint), "ct2mri", use_ema=use_ema, device=str(dev))
    gens: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"mri2ct": g_m2c, "ct2mri": g_c2m}
    settings = TranslationSettings.from_card(card)
    trained_on = set(_card_list(card, "train_subjects"))
    dirs = [Path(d) for d in data]
    pairs, train = find_pairs(dirs)
    leaked = sorted({row.get("subject_id", "") for _, _, row in pairs} & trained_on)
    if leaked:
        raise ProvenanceError(
            f"{len(leaked)} of {len(pairs)} paired test subjects were in the generator's training data; "
            "evaluate on subjects the checkpoint never saw (ingest split 'test')"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {
        "checkpoint_sha256": _sha(Path(checkpoint)),
        "settings": {"hu_window": list(settings.hu_window), "mr_percentiles": list(settings.mr_percentiles),
                     "image_size": settings.image_size, "context": settings.context, "use_ema": use_ema},
        "n_paired_subjects": len(pairs),
    }
    figures: dict[str, list[list[NDArray[np.float32]]]] = {"mri2ct": [], "ct2mri": []}
    if pairs:
        baselines = _fit_baselines(train, settings)
        per_case: dict[str, dict[str, list[dict[str, float]]]] = {
            d: {"cyclegan": [], "baseline": [], "structure_cyclegan": [], "structure_baseline": [], "structure_truth": []}
            for d in ("mri2ct", "ct2mri")
        }
        for k, (mr_path, ct_path, row) in enumerate(pairs):
            mr = read_volume(mr_path, "MR", settings, row.get("subject_id", ""), row.get("class", ""))
            ct = read_volume(ct_path, "CT", settings, row.get("subject_id", ""))
            if mr.raw.shape != ct.raw.shape:
                raise DatasetError(f"paired test subject {k + 1}: MR {mr.raw.shape} and CT {ct.raw.shape} grids differ")
            for direction, src, tgt in (("mri2ct", mr, ct), ("ct2mri", ct, mr)):
                pred = translate_unit(gens[direction], src.unit, settings, batch_size, dev)
                match direction:
                    case "mri2ct":
                        base = ct_to_unit(baselines["mri2ct"].apply(src.raw, src.body), settings.hu_window)
                    case _:
                        base = baselines["ct2mri"].apply(ct_to_unit(src.raw, settings.hu_window), src.body)
                cases = per_case[direction]
                truth_raw = tgt.raw if direction == "mri2ct" else None
                cases["cyclegan"].append(paired_metrics(pred, tgt.unit, tgt.body, direction, settings.hu_window, truth_raw))  # type: ignore[arg-type]
                cases["baseline"].append(paired_metrics(base, tgt.unit, tgt.body, direction, settings.hu_window, truth_raw))  # type: ignore[arg-type]
                cases["structure_cyclegan"].append(structure_measures(src.unit, pred, direction, settings.hu_window))  # type: ignore[arg-type]
                cases["structure_baseline"].append(structure_measures(src.unit, base, direction, settings.hu_window))  # type: ignore[arg-type]
                cases["structure_truth"].append(structure_measures(src.unit, tgt.unit, direction, settings.hu_window))  # type: ignore[arg-type]
                if len(figures[direction]) < max_figures:
                    figures[direction].append([src.unit, pred, base, tgt.unit, np.abs(pred - tgt.unit) - 1.0])
        paired: dict[str, Any] = {}
        for direction, cases in per_case.items():
            res: dict[str, Any] = {name: _mean_dicts(items) for name, items in cases.items()}
            cg, bl = res["cyclegan"], res["baseline"]
            res["beats_baseline"] = {
                "mae": bool(cg["mae"] < bl["mae"]),
                "psnr": bool(cg["psnr"] > bl["psnr"]),
                "ssim": bool(cg["ssim"] > bl["ssim"]),
            }
            res["units"] = {"mae": "HU inside the body" if direction == "mri2ct" else "[-1, 1] MR units inside the body",
                            "mae_bone": "HU in the truth's bone (> 300 HU)", "mae_soft": "HU in the rest of the body",
                            "psnr": "dB on [-1, 1]", "ssim": "2-D, mean over axial slices"}
            paired[direction] = res
        report["paired"] = paired
        report["beats_baseline"] = all(all(v["beats_baseline"].values()) for v in paired.values())
    else:
        report["paired"] = None
        report["structure_only"] = _structure_only(dirs, gens, settings, batch_size, dev)
        report["beats_baseline"] = None

    for direction, rows in figures.items():
        if rows:
            save_grid(rows, out / f"{direction}_grid.png", ["input", "CycleGAN", "baseline", "truth", "|error|"])
    (out / "evaluation.json").write_text(json.dumps(_jsonable(report), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "evaluation.md").write_text(evaluation_markdown(report), encoding="utf-8")
    log.info("evaluation written to %s", out)
    return report


def _structure_only(dirs: Sequence[Path], gens: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
                    settings: TranslationSettings, batch_size: int, dev: torch.device) -> dict[str, dict[str, float]]:
    """Structure scores of every test volume (every volume when there is no test split), both directions."""
    rows = [(d, r) for d in dirs for r in manifest_rows(d) if r.get("modality", "").strip().upper() in ("CT", "MR")]
    chosen = [(d, r) for d, r in rows if split_matches(r.get("split", ""), "test")] or rows
    if not chosen:
        raise DatasetError(f"no CT or MR volume to evaluate in {', '.join(str(d) for d in dirs)}")
    per: dict[str, list[dict[str, float]]] = {"mri2ct": [], "ct2mri": []}
    for d, row in chosen:
        mod = row["modality"].strip().upper()
        vol = read_volume(d / row["path"], mod, settings)  # type: ignore[arg-type]
        direction: Direction = "mri2ct" if mod == "MR" else "ct2mri"
        pred = translate_unit(gens[direction], vol.unit, settings, batch_size, dev)
        per[direction].append(structure_measures(vol.unit, pred, direction, settings.hu_window))
    return {d: _mean_dicts(items) | {"n_volumes": float(len(items))} for d, items in per.items() if items}


def _card_list(card: Mapping[str, Any], key: str) -> list[str]:
    for part in (card, card.get("meta"), card.get("data")):
        if isinstance(part, Mapping) and isinstance(part.get(key), list):
            return [str(x) for x in part[key]]
    return []


def _sha(path: Path) -> str:
    from pipeline.manifest import sha256_file

    return sha256_file(path)


def _jsonable(x: Any) -> Any:
    """Non-finite floats become null (strict JSON has no inf/NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


# --- report ----------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if v == math.inf else ("n/a" if math.isnan(v) else f"{v:.3f}")
    return str(v)


def evaluation_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable evaluation.md for a report of `run_evaluate_translation`."""
    lines = ["# CycleGAN translation evaluation", "", f"Checkpoint sha256 `{report['checkpoint_sha256']}`.", ""]
    paired = report.get("paired")
    if paired:
        verdict = "beats" if report.get("beats_baseline") else "does NOT beat"
        lines += [f"{report['n_paired_subjects']} paired held-out subjects. The CycleGAN **{verdict}** the "
                  "histogram-matching baseline on every paired metric.", ""]
        for direction, res in paired.items():
            lines += [f"## {direction}", "", "| metric | CycleGAN | baseline | units |", "|---|---|---|---|"]
            for m in ("mae", "psnr", "ssim", "mae_bone", "mae_soft"):
                if m in res["cyclegan"]:
                    unit = res["units"].get(m, res["units"]["mae"])
                    lines.append(f"| {m} | {_fmt(res['cyclegan'][m])} | {_fmt(res['baseline'][m])} | {unit} |")
            lines += ["", "Structure preservation, input vs output (the truth's own scores are what a perfect "
                      "translation gets; a monotone map such as the baseline can exceed them on edges):", "",
                      "| score | CycleGAN | baseline | truth |", "|---|---|---|---|"]
            for k in res["structure_cyclegan"]:
                lines.append(f"| {k} | {_fmt(res['structure_cyclegan'][k])} | {_fmt(res['structure_baseline'].get(k))} "
                             f"| {_fmt(res['structure_truth'].get(k))} |")
            lines += ["", f"![{direction}]({direction}_grid.png)", ""]
    else:
        lines += ["No paired held-out subjects: structure scores only (no truth needed).", ""]
        for direction, res in (report.get("structure_only") or {}).items():
            lines += [f"## {direction}", "", "| score | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in res.items()]
            lines.append("")
    return "\n".join(lines) + "\n"


def save_grid(rows: Sequence[Sequence[FloatArray]], path: Path, titles: Sequence[str], scale: int = 3) -> Path:
    """A PNG grid (pillow) of the middle axial slice of each [-1, 1] volume: one row per case.

    Slices are shown anterior up with the patient's right on the right (neurological
    convention), upscaled `scale` times; column titles on top.
    """
    from PIL import Image, ImageDraw

    tiles = [[_to_uint8(v, scale) for v in row] for row in rows]
    h, w = tiles[0][0].shape
    head = 14
    grid = Image.new("L", (w * len(titles), head + h * len(tiles)), color=0)
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(titles):
        draw.text((j * w + 2, 1), title, fill=255)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            grid.paste(Image.fromarray(tile), (j * w, head + i * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _to_uint8(volume: FloatArray, scale: int) -> NDArray[np.uint8]:
    arr = np.asarray(volume, np.float64)
    sl = arr[..., arr.shape[2] // 2] if arr.ndim == 3 else arr
    img = np.rot90(sl)  # (x, y) RAS -> rows anterior-up, columns patient left to right
    u8 = np.clip((img + 1.0) * 127.5, 0, 255).astype(np.uint8)
    return np.kron(u8, np.ones((scale, scale), np.uint8))
