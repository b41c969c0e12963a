"""Structure scores of a translation: does it keep the input's anatomy? No truth needed.

Body-mask Dice and bone/air-mask Dice between an input and its translation, edge
consistency (correlation of gradient magnitudes, Dice of the strongest-edge maps) and, for
MRI->CT, HU plausibility per tissue class of the input MR; all on the networks' [-1, 1]
scale (pipeline.preprocess). Two users: training picks best.pt by `structure_scores` on
held-out slices (pipeline.slices.monitor_scores binds it as train_cyclegan's `evaluate`
callback), and pipeline.evaluate_translation reports the same measures on whole volumes.
This module imports neither of them, so slices -> structure and evaluate_translation ->
structure, translate, slices form no import circle.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

from pipeline.preprocess import (
    CT_BODY_THRESHOLD_HU,
    DEFAULT_HU_WINDOW,
    body_mask,
    ct_to_unit,
    direction_modalities,
    unit_to_ct,
)
from pipeline.types import Direction, HUWindow, Modality

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



# --- overlap and correlation -----------------------------------------------------------------


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


def mean_scores(dicts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Key-wise mean of score dicts, NaNs left out (NaN where a key has no number).

    >>> mean_scores([{"a": 1.0, "b": float("nan")}, {"a": 3.0}])
    {'a': 2.0, 'b': nan}
    """
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
        for k, v in mean_scores(items).items():
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
