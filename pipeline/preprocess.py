"""Modality-aware intensity normalisation and body masks for the CycleGAN.

Sits between ingest (canonical RAS+ NIfTI, CT in HU, MR in arbitrary scanner units) and
the networks, which see values in [-1, 1]. CT is windowed: a fixed HU window maps
linearly onto [-1, 1] and back, so a translated CT comes out in HU. MR has no absolute
scale, so each volume is scaled by robust percentiles of its own foreground (Nyul-style
landmarks reduced to two; Nyul & Udupa 1999) and the inverse needs those two numbers.
The body mask (intensity threshold, largest connected component, per-slice hole
filling) feeds slice sampling, MAE-in-body and the structure scores.

All arrays are numpy, axes (x, y, z) of a RAS+ volume unless said otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipeline.types import HUWindow, Modality

log = logging.getLogger(__name__)

DEFAULT_HU_WINDOW: HUWindow = (-1000.0, 1000.0)
"""HU window of the CycleGAN: air (-1000) to dense bone (1000); bone above is clipped."""

DEFAULT_MR_PERCENTILES: tuple[float, float] = (0.5, 99.5)
"""Foreground percentiles of an MR volume mapped to -1 and +1."""

CT_BODY_THRESHOLD_HU = -500.0
"""CT voxels above this are body (midway between air -1000 HU and fat -100 HU)."""

MR_BODY_FRACTION = 0.1
"""MR voxels above this fraction of the volume's 99th percentile are body (air is near 0)."""

FloatArray = NDArray[np.floating]
BoolArray = NDArray[np.bool_]


# --- CT: HU window ------------------------------------------------------------------------


def ct_to_unit(hu: FloatArray, window: HUWindow = DEFAULT_HU_WINDOW) -> NDArray[np.float32]:
    """CT in HU -> [-1, 1]: clip to `window` (low, high) HU, then map linearly.

    >>> ct_to_unit(np.array([-2000.0, -1000.0, 0.0, 500.0, 3000.0]), (-1000, 1000)).tolist()
    [-1.0, -1.0, 0.0, 0.5, 1.0]
    """
    lo, hi = _check_window(window)
    x = (np.clip(np.asarray(hu, dtype=np.float64), lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
    return x.astype(np.float32)


def unit_to_ct(x: FloatArray, window: HUWindow = DEFAULT_HU_WINDOW) -> NDArray[np.float32]:
    """[-1, 1] -> HU, the inverse of `ct_to_unit` (inputs outside [-1, 1] are clipped first).

    >>> unit_to_ct(np.array([-1.0, 0.0, 0.5, 1.0]), (-1000, 1000)).tolist()
    [-1000.0, 0.0, 500.0, 1000.0]
    """
    lo, hi = _check_window(window)
    hu = (np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0) + 1.0) / 2.0 * (hi - lo) + lo
    return hu.astype(np.float32)


def _check_window(window: HUWindow) -> tuple[float, float]:
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"HU window must be (low, high) with high > low, got {window}")
    return lo, hi


# --- MR: robust percentile scaling ---------------------------------------------------------


def mr_landmarks(
    volume: FloatArray,
    mask: BoolArray | None = None,
    percentiles: tuple[float, float] = DEFAULT_MR_PERCENTILES,
) -> tuple[float, float]:
    """The MR intensities at `percentiles` (default 0.5 and 99.5) of the foreground.

    `mask` (same shape) selects the foreground; by default `body_mask(volume, "MR")`.
    These two numbers are all `unit_to_mr` needs to invert `mr_to_unit`.

    >>> v = np.zeros((4, 4, 2)); v[1:3, 1:3] = np.array([[100.0, 200.0], [300.0, 400.0]])[..., None]
    >>> mr_landmarks(v, v > 0, (0.0, 100.0))
    (100.0, 400.0)
    """
    arr = np.asarray(volume, dtype=np.float64)
    if mask is None:
        mask = body_mask(arr, "MR")
    values = arr[mask] if mask.any() else arr.ravel()
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:  # a constant volume: keep the map invertible
        hi = lo + 1.0
    return float(lo), float(hi)


def mr_to_unit(volume: FloatArray, landmarks: tuple[float, float]) -> NDArray[np.float32]:
    """MR -> [-1, 1]: the `landmarks` (low, high) from `mr_landmarks` go to -1 and +1, then clip.

    Air (below the low foreground landmark) ends at -1, as it does in CT.

    >>> mr_to_unit(np.array([0.0, 100.0, 250.0, 400.0, 900.0]), (100.0, 400.0)).tolist()
    [-1.0, -1.0, 0.0, 1.0, 1.0]
    """
    lo, hi = float(landmarks[0]), float(landmarks[1])
    if not hi > lo:
        raise ValueError(f"MR landmarks must be (low, high) with high > low, got {landmarks}")
    x = (np.asarray(volume, dtype=np.float64) - lo) / (hi - lo) * 2.0 - 1.0
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def unit_to_mr(x: FloatArray, landmarks: tuple[float, float]) -> NDArray[np.float32]:
    """[-1, 1] -> MR units between `landmarks` (low, high), the inverse of `mr_to_unit`.

    >>> unit_to_mr(np.array([-1.0, 0.0, 1.0]), (100.0, 400.0)).tolist()
    [100.0, 250.0, 400.0]
    """
    lo, hi = float(landmarks[0]), float(landmarks[1])
    v = (np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0) + 1.0) / 2.0 * (hi - lo) + lo
    return v.astype(np.float32)


def to_unit(volume: FloatArray, modality: Modality, hu_window: HUWindow = DEFAULT_HU_WINDOW,
            mr_percentiles: tuple[float, float] = DEFAULT_MR_PERCENTILES,
            mask: BoolArray | None = None) -> tuple[NDArray[np.float32], dict[str, Any]]:
    """Normalise a volume of either modality to [-1, 1]; returns it and the numbers to invert it.

    The one place that switches on the modality: slices (CycleGAN training), the gate,
    translation, its evaluation and the tumor patches all call it. CT goes through the HU
    `hu_window` (low, high); MR maps the `mr_percentiles` of its foreground to -1 and +1.
    `mask` is that foreground (the volume's shape), when the caller already has the body
    mask; None computes `body_mask(volume, "MR")`. Returns (unit volume, float32, the
    input's shape; `{"modality": "CT", "hu_window": [lo, hi]}` or
    `{"modality": "MR", "mr_landmarks": [lo, hi]}`).

    >>> to_unit(np.array([[[-1000.0, 1000.0]]]), "CT")[1]
    {'modality': 'CT', 'hu_window': [-1000.0, 1000.0]}
    """
    match modality:
        case "CT":
            return ct_to_unit(volume, hu_window), {"modality": "CT", "hu_window": [float(hu_window[0]), float(hu_window[1])]}
        case "MR":
            marks = mr_landmarks(volume, mask, mr_percentiles)
            return mr_to_unit(volume, marks), {"modality": "MR", "mr_landmarks": list(marks)}
        case _:
            raise ValueError(f"modality must be one of CT, MR; got {modality!r}")


def direction_modalities(direction: str) -> tuple[Modality, Modality]:
    """(source, target) modality of a direction; a bad direction lists the allowed ones.

    >>> direction_modalities("mri2ct")
    ('MR', 'CT')
    """
    match direction:
        case "mri2ct":
            return "MR", "CT"
        case "ct2mri":
            return "CT", "MR"
        case _:
            raise ValueError(f"direction must be one of mri2ct, ct2mri; got {direction!r}")


# --- body mask ---------------------------------------------------------------------------


def body_mask(volume: FloatArray, modality: Modality, threshold: float | None = None) -> BoolArray:
    """Body (foreground) mask: threshold, keep the largest connected component, fill holes per slice.

    The threshold is `CT_BODY_THRESHOLD_HU` for CT, `MR_BODY_FRACTION` of the 99th
    percentile for MR, or `threshold` in the volume's units. Holes are filled in each
    axial (x, y) slice, so air in sinuses or bowel inside the body counts as body even
    when it opens to the outside a few slices away. Written with scipy.ndimage because
    MONAI's KeepLargestConnectedComponent needs scikit-image, which medaug does not install.
    Works on 2-D (x, y) slices too. Returns a bool array of the input's shape.

    >>> v = np.full((7, 7, 1), -1000.0); v[1:6, 1:6] = 40.0; v[3, 3] = -1000.0; v[0, 0] = 40.0
    >>> m = body_mask(v, "CT"); int(m.sum()), bool(m[3, 3, 0]), bool(m[0, 0, 0])
    (25, True, False)
    """
    arr = np.asarray(volume, dtype=np.float64)
    if arr.ndim not in (2, 3):
        raise ValueError(f"body_mask needs a 2-D slice or a 3-D volume, got shape {arr.shape}")
    if threshold is None:
        match modality:
            case "CT":
                threshold = CT_BODY_THRESHOLD_HU
            case "MR":
                threshold = MR_BODY_FRACTION * float(np.percentile(arr, 99.0))
            case _:
                raise ValueError(f"modality must be one of CT, MR; got {modality!r}")
    mask = largest_component(arr > threshold)
    return fill_holes_per_slice(mask)


def largest_component(mask: BoolArray) -> BoolArray:
    """The largest face-connected component of a boolean mask (all False when the mask is empty).

    >>> largest_component(np.array([1, 1, 0, 1, 1, 1], bool)).astype(int).tolist()
    [0, 0, 0, 1, 1, 1]
    """
    labels, n = ndimage.label(mask)
    if n <= 1:
        return np.asarray(mask, dtype=bool).copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.asarray(labels == int(np.argmax(sizes)))


def fill_holes_per_slice(mask: BoolArray) -> BoolArray:
    """Fill enclosed holes in each axial slice (last axis) of a 3-D mask, or in a 2-D mask.

    >>> m = np.ones((3, 3), bool); m[1, 1] = False
    >>> bool(fill_holes_per_slice(m)[1, 1])
    True
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim == 2:
        return np.asarray(ndimage.binary_fill_holes(m))
    out = np.empty_like(m)
    for z in range(m.shape[-1]):
        out[..., z] = ndimage.binary_fill_holes(m[..., z])
    return out


def foreground_fraction(mask: BoolArray) -> NDArray[np.float64]:
    """Fraction of body voxels in each axial slice of a (x, y, z) mask, shape (z,).

    >>> foreground_fraction(np.stack([np.ones((2, 2)), np.zeros((2, 2))], -1).astype(bool)).tolist()
    [1.0, 0.0]
    """
    m = np.asarray(mask, dtype=bool)
    return np.asarray(m.reshape(-1, m.shape[-1]).mean(axis=0), dtype=np.float64)
