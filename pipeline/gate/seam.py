"""The gate's seam check: a lesion pasted into real tissue must not leave a visible border.

Lesion insertion (pipeline/insertion.py) writes a synthetic lesion into a real volume; a
bad blend shows as extra edges just outside the lesion (a step where the mask was pasted
hard, a square where a lesion's box was pasted with its background). For every item with a
mask (the manifest's label_path) the score is the mean gradient energy of its image in
the ring 1..4 pixels outside the lesion (`seam_score`, on the 2-D patch in
[-1, 1], or each masked axial slice of a volume); the check compares the synthetic items'
median with the real items' median (`seam_max_ratio`), and the per-sample filter drops an
item whose own score is above `seam_item_ratio` times the real median (real lesions spread
0.6-1.9 x their median, so one item is judged with a wider margin than the batch). Items without a mask are not scored; with
no scored item on either side the check is skipped (reported as not computed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipeline.gate.images import GateSet
from pipeline.gate.report import CheckResult


def seam_score(image: NDArray[Any], mask: NDArray[Any], inner: int = 1, outer: int = 4) -> float:
    """Mean gradient energy |grad I|^2 in the ring `inner`..`outer` pixels outside a lesion mask (2-D).

    A seam left by pasting (a lesion's box pasted with a background that differs from the
    host's) is a contour of steps just outside the lesion; squaring weights those steps over
    the tissue's noise. The lesion's own edge (the first pixel, blurred by the scanner's PSF)
    is left out. Measured on phantom CT patches in [-1, 1] (bench/RESULTS.md, Lesion
    insertion): real lesions 0.6-1.9 x their median (5th-95th percentile), feathered
    insertions ~0.8 x, a pasted box with a 22 HU background offset 1.8-2.1 x and more.
    NaN for an empty mask.

    >>> im = np.zeros((16, 16)); m = np.zeros((16, 16)); m[7:9, 7:9] = 1
    >>> seam_score(im, m)
    0.0
    """
    m = np.asarray(mask) > 0
    if not m.any():
        return float("nan")
    ring = ndimage.binary_dilation(m, iterations=outer) & ~ndimage.binary_dilation(m, iterations=inner)
    g0, g1 = (np.asarray(g) for g in np.gradient(np.asarray(image, np.float64)))
    return float((g0**2 + g1**2)[ring].mean())


def item_seam_score(image: Path, mask: Path) -> float:
    """Seam score of one item: a 2-D patch (s, s[, 1]) in [-1, 1], or the mean over a volume's masked slices."""
    img = np.asarray(cast(nib.Nifti1Image, nib.load(image)).dataobj, np.float32)
    msk = np.asarray(cast(nib.Nifti1Image, nib.load(mask)).dataobj) > 0
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return seam_score(img.reshape(img.shape[:2]), msk.reshape(msk.shape[:2]))
    if float(np.abs(img).max()) > 1.001:  # a volume in HU: the tumor patches' window
        from pipeline.preprocess import ct_to_unit

        img = ct_to_unit(img, (-100.0, 200.0))
    scores = [seam_score(img[..., z], msk[..., z]) for z in np.flatnonzero(msk.any(axis=(0, 1)))]
    return float(np.mean(scores)) if scores else float("nan")


def seam_scores(s: GateSet) -> NDArray[np.float64]:
    """Seam score of every item of a set (NaN where the item has no mask or its mask is empty)."""
    out = np.full(len(s.items), np.nan)
    for i, item in enumerate(s.items):
        rel = (item.row.get("label_path") or "").strip()
        if rel and (s.folder / rel).is_file():
            out[i] = item_seam_score(item.abs_path, s.folder / rel)
    return out


def seam_ratio(real: NDArray[np.float64], syn: NDArray[np.float64]) -> tuple[float, float]:
    """(median synthetic score / median real score, median real score); NaN when either side has none."""
    r, s = real[np.isfinite(real)], syn[np.isfinite(syn)]
    if len(r) == 0 or len(s) == 0:
        return float("nan"), float("nan")
    base = float(np.median(r))
    return float(np.median(s)) / max(base, 1e-12), base


def seam_gate(ref: GateSet, syn: GateSet, max_ratio: float | None, item_ratio: float) -> tuple[CheckResult | None, dict[str, float], dict[int, str]]:
    """The seam batch check, its metric and the per-item reasons (item index -> reason) of dropped items.

    Nothing (None, {}, {}) when `max_ratio` is None (the check is off).
    """
    if max_ratio is None:
        return None, {}, {}
    real, synth = seam_scores(ref), seam_scores(syn)
    ratio, base = seam_ratio(real, synth)
    detail = (f"median gradient energy 1-4 px outside the lesion mask, synthetic over real ({int(np.isfinite(synth).sum())} "
              f"and {int(np.isfinite(real).sum())} masked items)")
    ok = bool(np.isfinite(ratio) and ratio <= max_ratio)
    check = CheckResult("seam", ratio if np.isfinite(ratio) else None, max_ratio, "<=", ok,
                        detail if np.isfinite(ratio) else f"{detail} (could not be computed: no masked item)")
    reasons = {}
    if np.isfinite(base):
        for i, v in enumerate(synth):
            if np.isfinite(v) and v > item_ratio * base:
                reasons[i] = f"visible seam: gradient outside the lesion {v / base:.2f} x the real lesions' median, over {item_ratio}"
    metric = {"value": ratio, "real_median": base, "synthetic_median": float(np.nanmedian(synth)) if np.isfinite(synth).any() else float("nan")}
    return check, metric, reasons
