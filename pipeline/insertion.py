"""Lesion insertion: place synthetic tumor patches into healthy brain of real training CT volumes.

The tumor-patches deployment's second mode (`dataset.synthesis: insertion`). A 2-D lesion
patch drawn by the tumor GAN (pipeline/sample_tumors.py: image in [-1, 1] through the GAN's HU
window, and its mask) is grown into a 3-D lesion (the same lesion on 2*half_z+1 axial slices,
shrunk towards the ends like an ellipsoid; in-plane size and slice count drawn from the real
lesions of the training volumes), placed in brain tissue of a real training CT (inside the
skull, `skull_margin_mm` from bone, `lesion_margin_mm` from the host's own lesion), and blended with a feathered mask: the lesion's pixels replace
the host's inside the mask, and outside it the lesion's edge value (never the generator's
background) fades into the host over ~`feather_px` pixels. Only the lesion
is synthetic; its surroundings stay the host's voxels.

Why mask feathering, and its width: the phantom lesions have a partial-volume edge (the
scanner PSF, Gaussian sigma 0.5 pixel in-plane), so the alpha falls off with that sigma and
the lesion's edge value (extended outwards, never the generator's background) fades into the
host. Measured with `seam_score` on the CPU GAN's necrotic patches in real hosts (bench/RESULTS.md,
Lesion insertion): sigma 0.5 gives 1.13 x the real lesions' median seam score, sigma 0.8 1.90
(the lesion's contrast smeared outwards), a hard mask paste 0.82 (its step sits on the mask
border, which the score leaves out), a pasted box with the GAN's background 57 x (the gate's
seam check rejects it). Poisson blending would match the host's gradients at the border, but
it rewrites the lesion's own intensity (HU is the class feature here), so it was not chosen.

Output (`insert_lesions`): out/volumes/*.nii.gz (int16 HU, the host's affine), out/labels/
*.nii.gz (uint8: 1 = the host's own lesion, 2 = the inserted lesion, so `label > 0` is every
tumor voxel), manifest.csv (synthetic=1; the host's pseudonymised subject_id and sha256, the
split "train", the patch generator's checkpoint sha256, the patch file's sha256, seed, index
and the placement) and provenance.json. No DICOM or NIfTI header field of the host is copied
except its affine. Same inputs and seed, byte-identical files.

The inserted volumes are gated as lesion-centred patches (`gate_insertions`): the patches of
the inserted lesions against the real lesion patches of the training volumes, through
pipeline.gate.run.run_gate with the seam check on; a volume is accepted when the batch is
and all its patches are.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipeline.errors import PatchError
from pipeline.gate.lesion import (
    INSERTED_LABEL as INSERTED_LABEL,  # the label value of the inserted lesion; the gate reads it
)
from pipeline.gate.seam import seam_score as seam_score  # re-exported: the metric lives with the gate
from pipeline.manifest import manifest_sha256, read_manifest, sha256_file, write_manifest
from pipeline.preprocess import fill_holes_per_slice, unit_to_ct

log = logging.getLogger(__name__)

HOST_LABEL = 1
"""Label value of the host volume's own lesion in an inserted volume's label map."""

BONE_HU = 300.0
"""CT voxels above this are bone (diploe ~700 HU, tables ~1150 HU; brain and tumor < 100 HU)."""
SOFT_TISSUE_HU = (15.0, 90.0)
"""Brain parenchyma (GM ~40, WM ~30, tumor ~20-65 HU); CSF (~8 HU) and fat are below."""

INSERTION_COLUMNS = (
    "path",
    "label_path",
    "class",
    "split",
    "modality",
    "synthetic",
    "subject_id",
    "source_sha256",
    "checkpoint_sha256",
    "patch_sha256",
    "seed",
    "index",
    "placement",
    "half_z",
    "zoom",
    "blend",
    "sha256",
)
PROVENANCE_NAME = "provenance.json"
MIN_PLACE_LESIONS = 5
"""A class with fewer real lesions than this is placed where any class's lesions sit (sizes
stay its own): a place drawn from one or two lesions would put every insertion in the same spot."""
MIN_LESION_PX = 4
"""A lesion patch with fewer mask pixels than this is not inserted (a phantom lesion has 14-70 on its largest slice)."""


@dataclass(frozen=True)
class InsertionOptions:
    """Where and how lesions go in (mm, pixels); the defaults are the recipe.

    skull_margin_mm: least distance of every lesion voxel from bone (the brain's edge).
    position_tolerance_mm: the inserted lesion's centre lies this close (mm) to where the real
        lesion whose size was drawn sits, carried into the host by the brain's bounding box
        (normalised coordinates, see lesion_position; the nearest places the host offers when
        none is that close; 0 places anywhere in the brain). Real lesions of a class are not
        spread evenly through the brain, and what surrounds a lesion (skull, ventricles, the
        side the skull is on) is what a lesion-centred patch shows most of.
    mirror: the real lesion's place may also be taken in the other hemisphere (left-right, axis 0
        of the canonical volume): both sides are tried in random order and the first with room
        is used (the brain is near symmetric).
    lesion_margin_mm: least distance from the host's own lesion (30 mm: it stays out of the
        central 55 mm of the inserted lesion's axial patches, what the downstream classifier sees).
    feather_px: Gaussian sigma (pixels) of the blending alpha's fall-off outside the mask;
        0 pastes the mask hard (a visible step: the planted failure of the tests).
    blend: "feather" (the recipe) or "box" (paste the lesion's bounding box plus 3 pixels with
        its GAN background: the naive crop-and-paste, a visible square seam; for tests and
        the seam measurement only).
    hu_window: the patch generator's HU window ([-1, 1] -> HU).
    """

    skull_margin_mm: float = 10.0
    lesion_margin_mm: float = 30.0
    position_tolerance_mm: float = 6.0
    mirror: bool = True
    feather_px: float = 0.5
    blend: str = "feather"
    hu_window: tuple[float, float] = (-100.0, 200.0)


@dataclass(frozen=True)
class LesionStats:
    """Real lesions, one entry each: largest axial area (voxels), slices holding lesion and, when
    known, where the lesion's centre sits in its brain (`positions`, lesion_position: drawn with
    its size). `place_pool` is used instead when `positions` is empty: places drawn on their own
    (a class with too few lesions to place from takes every class's). Neither: no place."""

    areas: tuple[float, ...]
    slices: tuple[int, ...]
    positions: tuple[tuple[float, float, float], ...] = ()
    place_pool: tuple[tuple[float, float, float], ...] = ()

    def draw(self, rng: np.random.Generator) -> tuple[float, int, tuple[float, float, float] | None]:
        """(area in voxels, half extent in slices, position or None) of one real lesion drawn at random."""
        if not self.areas:
            raise PatchError("no real lesion to size inserted lesions from (the real volumes have empty masks)")
        k = int(rng.integers(len(self.areas)))
        half_z = max(0, (self.slices[k] - 1) // 2)
        if self.positions:
            return self.areas[k], half_z, self.positions[k]
        if self.place_pool:
            return self.areas[k], half_z, self.place_pool[int(rng.integers(len(self.place_pool)))]
        return self.areas[k], half_z, None


def brain_box(hu: NDArray[Any]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(lowest, highest) voxel index per axis of the inside of the skull of an (x, y, z) CT
    (the holes of the bone mask, per axial slice); the whole volume when no skull is found."""
    bone = np.asarray(hu) > BONE_HU
    inside = np.argwhere(fill_holes_per_slice(bone) & ~bone)
    if len(inside) == 0:
        return np.zeros(3), np.asarray(np.shape(hu), np.float64) - 1
    return inside.min(0).astype(np.float64), inside.max(0).astype(np.float64)


def lesion_position(hu: NDArray[Any], mask: NDArray[Any]) -> tuple[float, float, float]:
    """A lesion's centre of mass in its brain's bounding box (brain_box), each axis in [0, 1]:
    a place that carries over to another head of another size.

    >>> hu = np.full((13, 13, 3), 30.0); hu[1, 1:12, :] = hu[11, 1:12, :] = hu[1:12, 1, :] = hu[1:12, 11, :] = 1000.0
    >>> m = np.zeros_like(hu); m[4, 8, 1] = 1
    >>> lesion_position(hu, m)
    (0.25, 0.75, 0.5)
    """
    lo, hi = brain_box(hu)
    centre = np.asarray(ndimage.center_of_mass(np.asarray(mask) > 0))
    u = np.clip((centre - lo) / np.maximum(hi - lo, 1.0), 0.0, 1.0)
    return (float(u[0]), float(u[1]), float(u[2]))


def lesion_stats(masks: Sequence[NDArray[Any]], positions: Sequence[tuple[float, float, float]] | None = None) -> LesionStats:
    """LesionStats of (x, y, z) lesion masks (nonzero = lesion); empty masks are left out.
    `positions` (lesion_position, one per mask) are kept beside their lesions.

    >>> m = np.zeros((8, 8, 5), bool); m[2:5, 2:4, 1:4] = True
    >>> lesion_stats([m])
    LesionStats(areas=(6.0,), slices=(3,), positions=(), place_pool=())
    """
    areas, slices, kept = [], [], []
    for i, m in enumerate(masks):
        per_slice = (np.asarray(m) > 0).sum(axis=(0, 1))
        if per_slice.any():
            areas.append(float(per_slice.max()))
            slices.append(int((per_slice > 0).sum()))
            if positions is not None:
                kept.append(tuple(float(v) for v in positions[i]))
    return LesionStats(tuple(areas), tuple(slices), tuple(kept))  # type: ignore[arg-type]


def brain_mask_ct(hu: NDArray[Any], spacing: Sequence[float], skull_margin_mm: float) -> NDArray[np.bool_]:
    """Brain parenchyma at least `skull_margin_mm` from bone, of an (x, y, z) CT in HU.

    Inside the skull = the holes of the bone mask, filled per axial slice; parenchyma = its
    voxels in SOFT_TISSUE_HU (so not CSF); the distance to bone is measured in 3-D, in mm.
    """
    bone = np.asarray(hu) > BONE_HU
    inside = fill_holes_per_slice(bone) & ~bone
    soft = (hu >= SOFT_TISSUE_HU[0]) & (hu <= SOFT_TISSUE_HU[1])
    dist_bone = ndimage.distance_transform_edt(~bone, sampling=tuple(float(s) for s in spacing[:3]))
    out: NDArray[np.bool_] = inside & soft & (dist_bone >= skull_margin_mm)
    return out


def _lesion_window(patch: NDArray[Any], mask: NDArray[Any], margin: int) -> tuple[NDArray[np.float32], NDArray[np.float32], tuple[float, float]]:
    """The patch and mask around the mask's centroid (a square of half side radius+margin) and that centroid."""
    m = np.asarray(mask) > 0
    if not m.any():
        raise PatchError("the lesion patch has an empty mask: nothing to insert")
    cy, cx = ndimage.center_of_mass(m)
    return np.asarray(patch, np.float32), m.astype(np.float32), (float(cy), float(cx))


def _scaled_slice(img: NDArray[np.float32], msk: NDArray[np.float32], centre: tuple[float, float], scale: float,
                  half: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Patch and mask resampled by `scale` about `centre` onto a (2*half+1)^2 grid centred on it."""
    n = 2 * half + 1
    grid = (np.mgrid[0:n, 0:n].astype(np.float64) - half) / max(scale, 1e-6)
    coords = np.stack([grid[0] + centre[0], grid[1] + centre[1]])
    out_img = ndimage.map_coordinates(img, coords, order=1, mode="nearest").astype(np.float32)
    out_msk = ndimage.map_coordinates(msk, coords, order=1, mode="constant", cval=0.0).astype(np.float32)
    return out_img, out_msk


def blend_alpha(mask: NDArray[Any], feather_px: float) -> NDArray[np.float32]:
    """Blending weight of the lesion: 1 inside the mask, a Gaussian fall-off of sigma `feather_px` outside.

    >>> m = np.zeros((5, 5)); m[2, 2] = 1
    >>> a = blend_alpha(m, 0.0); float(a[2, 2]), float(a[0, 0])
    (1.0, 0.0)
    """
    m = np.asarray(mask) > 0
    if feather_px <= 0:
        return m.astype(np.float32)
    soft = ndimage.gaussian_filter(m.astype(np.float32), feather_px, mode="constant")
    # the lesion itself at full weight; the fall-off only reaches outwards
    return np.where(m, 1.0, np.clip(soft, 0.0, 1.0)).astype(np.float32)


def extend_outwards(values: NDArray[Any], mask: NDArray[Any]) -> NDArray[np.float32]:
    """`values` inside the mask, and outside it the value of the nearest mask pixel (2-D).

    What the feathered blend fades into the host: the lesion's own edge, never the
    generator's background around it.

    >>> v = np.array([[5.0, 9.0, 9.0]]); m = np.array([[1, 0, 0]])
    >>> extend_outwards(v, m).tolist()
    [[5.0, 5.0, 5.0]]
    """
    m = np.asarray(mask) > 0
    idx = ndimage.distance_transform_edt(~m, return_distances=False, return_indices=True)
    return np.asarray(values, np.float32)[tuple(idx)]


@dataclass
class Inserted:
    """One inserted volume: HU (x, y, z) int16, label map (1 host lesion, 2 inserted), placement."""

    volume: NDArray[np.int16]
    label: NDArray[np.uint8]
    placement: dict[str, Any] = field(default_factory=dict)


def _candidates(hu: NDArray[Any], host_lesion: NDArray[np.bool_], spacing: Sequence[float], radius_mm: float,
                half_z: int, opts: InsertionOptions) -> NDArray[np.int64]:
    """Voxel centres (k, 3) where a lesion of in-plane radius `radius_mm` and +-half_z slices fits (see insert_lesion)."""
    sp = tuple(float(s) for s in spacing[:3])
    brain = brain_mask_ct(hu, sp, opts.skull_margin_mm + radius_mm)
    if host_lesion.any():
        brain &= ndimage.distance_transform_edt(~host_lesion, sampling=sp) >= opts.lesion_margin_mm + radius_mm
    # every slice of the lesion must be brain at the centre column
    ok = ndimage.minimum_filter(brain.astype(np.uint8), size=(1, 1, 2 * half_z + 1), mode="constant", cval=0).astype(bool)
    return np.argwhere(ok)


def _near_place(cands: NDArray[np.int64], hu: NDArray[Any], position: tuple[float, float, float], spacing: Sequence[float],
                opts: InsertionOptions, rng: np.random.Generator) -> NDArray[np.int64]:
    """The candidates within opts.position_tolerance_mm of a real lesion's place (lesion_position)
    carried into this host, on either side when opts.mirror (the sides tried in random order);
    when neither side has one that close, those near the closest fit within twice the
    tolerance. Raises PatchError when nothing fits that close (the caller tries another host)."""
    lo, hi = brain_box(hu)
    tol = opts.position_tolerance_mm
    sides = [np.asarray(position, np.float64)]
    if opts.mirror:
        sides.append(sides[0] * [-1.0, 1.0, 1.0] + [1.0, 0.0, 0.0])
        sides = [sides[int(k)] for k in rng.permutation(2)]
    offsets = [np.linalg.norm((cands - (lo + u * (hi - lo))) * np.asarray(spacing[:3], np.float64), axis=1) for u in sides]
    for off in offsets:
        if off.min() <= tol:
            return cands[off <= tol]
    best = min(offsets, key=lambda o: float(o.min()))
    if best.min() > 2 * tol:
        raise PatchError(f"no place that fits the lesion lies within {2 * tol:.0f} mm of the real lesion's place "
                         f"(nearest {best.min():.0f} mm)")
    return cands[best <= best.min() + tol / 2]


def insert_lesion(
    host_hu: NDArray[Any],
    host_lesion: NDArray[Any],
    spacing: Sequence[float],
    patch: NDArray[Any],
    patch_mask: NDArray[Any],
    stats: LesionStats,
    rng: np.random.Generator,
    opts: InsertionOptions | None = None,
) -> Inserted:
    """Insert one lesion patch into a host CT.

    Args:
        host_hu: (x, y, z) CT in HU.
        host_lesion: (x, y, z) mask of the host's own lesion (nonzero = lesion).
        spacing: voxel spacing (x, y, z) in mm.
        patch, patch_mask: (s, s) lesion patch in [-1, 1] (opts.hu_window) and its mask, as
            sample-tumors writes them (a trailing axis of 1 is dropped).
        stats: real lesions; one is drawn, its largest area and slice count size the lesion and
            its place in its brain (when stats has positions) places this one (opts.position_tolerance_mm).
        rng: the only randomness (size draw and placement).
    Returns Inserted (volume int16, labels uint8, placement: centre (x, y, z) voxels, half_z,
    zoom, area drawn, blend). Raises PatchError when no place in the brain fits the lesion.
    """
    opts = opts or InsertionOptions()
    hu = np.asarray(host_hu, np.float32)
    lesion = np.asarray(host_lesion) > 0
    img, msk, centre = _lesion_window(np.squeeze(patch), np.squeeze(patch_mask), 3)
    area, half_z, position = stats.draw(rng)
    zoom = float(np.clip(math.sqrt(area / float(msk.sum())), 0.25, 4.0))
    radius_px = zoom * math.sqrt(float(msk.sum()) / math.pi)
    radius_mm = radius_px * float(spacing[0])
    cands = _candidates(hu, lesion, spacing, radius_mm, half_z, opts)
    if len(cands) == 0:
        raise PatchError(f"no brain voxel {opts.skull_margin_mm + radius_mm:.0f} mm from bone and "
                         f"{opts.lesion_margin_mm + radius_mm:.0f} mm from the host lesion fits a lesion of "
                         f"{2 * half_z + 1} slices")
    if position is not None and opts.position_tolerance_mm > 0:
        cands = _near_place(cands, hu, position, spacing, opts, rng)
    cx, cy, cz = (int(v) for v in cands[int(rng.integers(len(cands)))])
    half = int(math.ceil(radius_px + 4 * max(opts.feather_px, 1.0) + 4))
    out = hu.copy()
    label = np.where(lesion, HOST_LABEL, 0).astype(np.uint8)
    for dz in range(-half_z, half_z + 1):
        # an ellipsoid: the cross-section shrinks towards the lesion's ends
        s = zoom * math.sqrt(max(0.0, 1.0 - (dz / (half_z + 0.5)) ** 2)) if half_z else zoom
        li, lm = _scaled_slice(img, msk, centre, s, half)
        lm_b = lm > 0.5
        if not lm_b.any():
            continue
        x0, y0, z = cx - half, cy - half, cz + dz
        xs, ys = slice(max(0, x0), min(hu.shape[0], x0 + 2 * half + 1)), slice(max(0, y0), min(hu.shape[1], y0 + 2 * half + 1))
        win = (slice(xs.start - x0, xs.stop - x0), slice(ys.start - y0, ys.stop - y0))
        lesion_hu = unit_to_ct(li, opts.hu_window)[win]
        if opts.blend == "box":
            box = ndimage.binary_dilation(lm_b, iterations=3)
            rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
            alpha = np.zeros_like(lm)
            alpha[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = 1.0
            alpha = alpha[win]
        else:
            alpha = blend_alpha(lm_b, opts.feather_px)[win]
            lesion_hu = unit_to_ct(extend_outwards(li, lm_b), opts.hu_window)[win]
        out[xs, ys, z] = alpha * lesion_hu + (1.0 - alpha) * out[xs, ys, z]
        label[xs, ys, z][lm_b[win]] = INSERTED_LABEL
    placement = {"centre": [cx, cy, cz], "half_z": half_z, "zoom": round(zoom, 4), "area_drawn": area, "blend": opts.blend,
                 "feather_px": opts.feather_px,
                 "real_place": None if position is None else [round(v, 3) for v in position]}
    return Inserted(np.clip(np.rint(out), -1024, 3071).astype(np.int16), label, placement)


# --- folders: insert into an ingest folder's training volumes, cut patches, gate ----------------


def _hosts(real: Path, modality: str = "CT") -> list[dict[str, str]]:
    """Training-split rows of an ingest manifest with a label file, of `modality`, sorted by sha256."""
    rows = [r for r in read_manifest(real) if (r.get("split") or "") == "train" and r.get("label_path")
            and (r.get("modality") or "") == modality and (r.get("synthetic") or "0") in ("0", "")]
    if not rows:
        raise PatchError(f"{real}: no {modality} training volume with a tumor mask to insert lesions into")
    return sorted(rows, key=lambda r: r.get("sha256") or r["path"])


def _patches(folder: Path, klass: str, gate: Path | None) -> list[dict[str, str]]:
    """The lesion patches of `klass` in a sample-tumors folder (only those `gate` accepted, when given)."""
    rows = [r for r in read_manifest(folder) if r.get("class") == klass and r.get("label_path")]
    if gate is not None:
        report = json.loads((gate / "gate_report.json").read_text(encoding="utf-8"))
        if report.get("verdict") != "accept":
            raise PatchError(f"the gate {gate.name} rejected the lesion patches ({', '.join(report.get('failed_checks', []))}); "
                             "nothing to insert")
        accepted = {r["path"] for r in read_manifest(gate / "accepted.csv")}
        rows = [r for r in rows if r["path"] in accepted]
    if not rows:
        raise PatchError(f"{folder}: no {klass} lesion patch" + (" accepted by the gate" if gate is not None else ""))
    return sorted(rows, key=lambda r: r["path"])


def insert_lesions(
    real: Path,
    patches: Path,
    out: Path,
    n: int,
    klass: str,
    seed: int = 0,
    opts: InsertionOptions | None = None,
    patch_gate: Path | None = None,
) -> list[dict[str, str]]:
    """Write `n` inserted volumes of class `klass` (see the module doc for the layout).

    Args:
        real: an ingest folder; its training-split CT volumes with masks are the hosts (in
            seeded order, each used in turn), and the lesions of its `klass` volumes give the
            sizes and places the inserted lesions are drawn from (every host's lesion when no
            training volume is of `klass`).
        patches: a sample-tumors folder holding lesion patches of `klass`.
        patch_gate: a gate folder of `patches`; when given, only the patches it accepted.
    Returns the manifest rows written. Raises PatchError when hosts or patches are missing.
    """
    opts = opts or InsertionOptions()
    if n < 1:
        raise PatchError(f"n must be at least 1, got {n}")
    hosts = _hosts(real)
    lesion_rows = _patches(patches, klass, patch_gate)
    # a generated patch whose mask came out empty (or a speck) has no lesion to insert
    lesion_rows = [r for r in lesion_rows if int((np.asarray(_load(patches / r["label_path"]).dataobj) > 0).sum()) >= MIN_LESION_PX]
    if not lesion_rows:
        raise PatchError(f"{patches}: every {klass} lesion patch has an empty mask (under {MIN_LESION_PX} pixels); nothing to insert")
    ckpt = {r.get("checkpoint_sha256", "") for r in lesion_rows}
    masks = [np.asarray(_load(real / h["label_path"]).dataobj) for h in hosts]
    # a necrotic lesion is sized and placed like the real necrotic lesions, not like the pool of
    # all lesions (mostly the majority class's, smaller and elsewhere)
    lesioned = [k for k in range(len(hosts)) if np.any(masks[k])]
    if not lesioned:
        raise PatchError(f"{real}: no training volume has a lesion in its mask to size and place inserted lesions from")
    own = [k for k in lesioned if hosts[k].get("class") == klass]
    sized_from_class = bool(own)
    if not own:
        own = lesioned
        log.warning("no %s training lesion: inserted lesions are sized and placed like every class's lesions", klass)
    # places: those of the class's own lesions; of every lesion when the class has too few
    placed_from_class = sized_from_class and len(own) >= MIN_PLACE_LESIONS
    place_from = own if placed_from_class else lesioned
    if sized_from_class and not placed_from_class:
        log.warning("%d real %s lesions (under %d): inserted lesions are placed where any class's lesions sit",
                    len(own), klass, MIN_PLACE_LESIONS)
    places = [lesion_position(np.asarray(_load(real / hosts[k]["path"]).dataobj, np.float32), masks[k]) for k in place_from]
    stats = lesion_stats([masks[k] for k in own], places if placed_from_class else None)
    if not placed_from_class:
        stats = replace(stats, place_pool=tuple(places))
    order = np.random.default_rng([seed, 0x1E5]).permutation(len(hosts))
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    unplaced = 0
    for i in range(n):
        p = lesion_rows[int(np.random.default_rng([seed, 0x9A7, i]).integers(len(lesion_rows)))]
        patch = np.asarray(_load(patches / p["path"]).dataobj, np.float32)
        pmask = np.asarray(_load(patches / p["label_path"]).dataobj)
        # the i-th host in seeded order; one without room for this lesion passes it to the next;
        # when no host has room near a real lesion's place, the lesion goes anywhere in the brain
        # (counted in the provenance: few real lesions of the class give few places)
        ins = None
        for attempt in (opts, replace(opts, position_tolerance_mm=0.0)) if opts.position_tolerance_mm > 0 else (opts,):
            for step in range(len(hosts)):
                h = hosts[int(order[(i + step) % len(hosts)])]
                host_img = _load(real / h["path"])
                rng = np.random.default_rng([seed, int((h.get("sha256") or "0")[:15] or "0", 16), i])
                spacing = [float(z) for z in host_img.header.get_zooms()[:3]]
                try:
                    ins = insert_lesion(np.asarray(host_img.dataobj, np.float32), masks[hosts.index(h)], spacing, patch, pmask, stats,
                                        rng, attempt)
                    break
                except PatchError as exc:
                    log.info("insertion %d: host %s has no room (%s); next host", i, (h.get("sha256") or "")[:12], exc)
            if ins is not None:
                if attempt is not opts:
                    unplaced += 1
                    log.warning("insertion %d: no training volume has room near a real %s lesion's place; placed anywhere in the brain",
                                i, klass)
                break
        if ins is None:
            raise PatchError(f"insertion {i}: no training volume has room for lesion patch {p['path']}")
        name = f"ins_{klass}_s{seed}_{i:05d}.nii.gz"
        affine = np.asarray(host_img.affine, np.float64)
        vol_sha = _write_nifti(ins.volume, affine, out / "volumes" / name)
        _write_nifti(ins.label, affine, out / "labels" / name)
        rows.append({
            "path": f"volumes/{name}", "label_path": f"labels/{name}", "class": klass, "split": "train", "modality": "CT",
            "synthetic": "1", "subject_id": h.get("subject_id", ""), "source_sha256": h.get("sha256", ""),
            "checkpoint_sha256": p.get("checkpoint_sha256", ""), "patch_sha256": manifest_sha256(p) or sha256_file(patches / p["path"]),
            "seed": str(seed), "index": str(i), "placement": "x".join(str(c) for c in ins.placement["centre"]),
            "half_z": str(ins.placement["half_z"]), "zoom": f"{ins.placement['zoom']:g}", "blend": opts.blend,
            "sha256": vol_sha,
        })
    # calls for several classes into one folder merge, as sample-tumors does
    kept = [r for r in read_manifest(out) if r["class"] != klass] if (out / "manifest.csv").is_file() else []
    write_manifest(out, sorted(kept + rows, key=lambda r: str(r["path"])), INSERTION_COLUMNS)
    path = out / PROVENANCE_NAME
    prov: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {
        "kind": "lesion_insertion", "calls": {},
        "labels": {"0": "background", str(HOST_LABEL): "host lesion (real)", str(INSERTED_LABEL): "inserted lesion (synthetic)"}}
    prov["calls"][klass] = {
        "seed": seed, "n": n, "options": opts.__dict__, "patch_checkpoints": sorted(ckpt),
        "patch_gate": json.loads((patch_gate / "gate_report.json").read_text()).get("report_id") if patch_gate is not None else None,
        "lesion_sizes": {"n_real_lesions": len(stats.areas), "of_class": klass if sized_from_class else "all",
                         "area_voxels": [min(stats.areas), max(stats.areas)], "slices": [min(stats.slices), max(stats.slices)],
                         "places_of_class": klass if placed_from_class else "all",
                         "positions": [[round(v, 3) for v in u] for u in stats.positions or stats.place_pool]},
        "placed_away_from_real_places": unplaced}
    path.write_text(json.dumps(prov, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    log.info("inserted %d %s lesions into %d host volumes -> %s", n, klass, min(n, len(hosts)), out)
    return rows


def insertion_counts(real: Path, oversample: float = 1.25, modality: str = "CT") -> dict[str, int]:
    """Lesions to insert per class so every class of the training volumes reaches the largest:
    the gap to the largest class times `oversample` (the gate drops some), rounded up; classes
    without a gap are left out.

    The counts are of the real `modality` training volumes with a mask in an ingest manifest.
    """
    counts: dict[str, int] = {}
    for r in _hosts(real, modality):
        counts[r["class"]] = counts.get(r["class"], 0) + 1
    top = max(counts.values())
    return {c: math.ceil((top - k) * oversample) for c, k in sorted(counts.items()) if k < top}


def _load(path: Path) -> nib.Nifti1Image:
    """A NIfTI image (nibabel types nib.load loosely)."""
    return cast(nib.Nifti1Image, nib.load(path))


def _write_nifti(arr: NDArray[Any], affine: NDArray[np.float64], path: Path) -> str:
    """A .nii.gz with the host's affine and nothing else of its header (byte-identical for equal
    input); returns the sha256 of its bytes, hashed as they are written."""
    from pipeline.phantoms import write_nifti_sha256

    return write_nifti_sha256(arr, affine, path)


def inserted_patches(volume: NDArray[Any], label: NDArray[Any], patch_size: int, neighbours: int,
                     hu_window: tuple[float, float], value: int = INSERTED_LABEL) -> list[tuple[NDArray[np.float32], NDArray[np.uint8], int]]:
    """2-D lesion-centred patches (unit image, mask, slice) of the lesion labelled `value` in a label map.

    As pipeline.patches cuts real lesions: the largest-lesion axial slice and up to
    `neighbours` slices either side holding lesion, centred on the lesion's centroid there,
    CT through `hu_window` to [-1, 1] (outside the volume: -1).
    """
    from pipeline.patches import _crop, _lesion_centres
    from pipeline.preprocess import ct_to_unit

    lesion = np.asarray(label) == value
    unit = ct_to_unit(np.asarray(volume, np.float32), hu_window)
    out = []
    half = patch_size // 2
    for _, (cx, cy, z) in _lesion_centres(lesion, "x", 2, neighbours):
        lower = [cx - half, cy - half, z]
        size = [patch_size, patch_size, 1]
        out.append((_crop(unit, lower, size, -1.0)[..., 0], _crop(lesion.astype(np.uint8), lower, size, 0)[..., 0], z))
    return out


def write_inserted_patch_folder(folder: Path, out: Path, patch_size: int, neighbours: int = 2,
                                hu_window: tuple[float, float] = (-100.0, 200.0)) -> Path:
    """The inserted lesions of an insertion folder as a patch folder (patches/, masks/, manifest.csv).

    Each row keeps its volume's class and sha256 (source_sha256), so the gate's per-patch
    decisions map back to volumes. The patches are (s, s, 1) float32 in [-1, 1].
    """
    rows = []
    for r in read_manifest(folder):
        vol = np.asarray(_load(folder / r["path"]).dataobj, np.float32)
        lab = np.asarray(_load(folder / r["label_path"]).dataobj)
        stem = Path(r["path"]).name.removesuffix(".nii.gz")
        for k, (img, msk, z) in enumerate(inserted_patches(vol, lab, patch_size, neighbours, hu_window)):
            name = f"{stem}_{k:02d}.nii.gz"
            for sub, arr in (("patches", img[..., None].astype(np.float32)), ("masks", msk[..., None].astype(np.uint8))):
                _write_nifti(arr, np.eye(4), out / sub / name)
            rows.append({"path": f"patches/{name}", "label_path": f"masks/{name}", "class": r["class"], "split": "train",
                         "modality": "CT", "synthetic": "1", "source_sha256": r.get("sha256", ""), "slice": str(z),
                         "checkpoint_sha256": r.get("checkpoint_sha256", "")})
    write_manifest(out, rows, ["path", "label_path", "class", "split", "modality", "synthetic", "source_sha256", "slice",
                               "checkpoint_sha256"])
    return out


def gate_insertions(real_patches: Path, folder: Path, out: Path, cfg: Any, patch_size: int = 32,
                    key: bytes | None = None) -> dict[str, Any]:
    """Gate an insertion folder: its lesion patches against real lesion patches, then per volume.

    `real_patches` is a patch folder of the real training volumes (pipeline.patches, the
    same size, window and slices); its lesion patches of the classes inserted are the reference
    (all its lesion patches when those are fewer than gate.min_samples). Runs pipeline.gate.run.run_gate on out/patches_gate with
    `cfg` (its seam check is switched on at SEAM_MAX_RATIO when the config leaves it off);
    writes out/gate_report.json (report_id, verdict, failed checks, checks, per-volume
    decisions) and out/accepted.csv (the insertion manifest's rows of accepted volumes),
    which `build-dataset --gate` reads. Like `medaug gate`'s report, each volume is listed by
    the sha256 of its bytes and of its mask's bytes (a volume whose bytes no longer match its
    manifest row is rejected), the report_id is its content id and, with a gate key (`key`, or
    MEDAUG_GATE_KEY), it carries an HMAC signature (pipeline/gate/signing.py). Returns the report dict.
    """
    from pipeline.gate.config import SEAM_MAX_RATIO
    from pipeline.gate.run import run_gate
    from pipeline.gate.signing import content_id, gate_key_from_env, sign

    if getattr(cfg, "seam_max_ratio", None) is None:
        cfg = cfg.model_copy(update={"seam_max_ratio": SEAM_MAX_RATIO})
    syn = write_inserted_patch_folder(folder, out / "inserted_patches", patch_size)
    # the reference is the real lesions of the inserted classes: a fill of the minority is
    # compared with the real minority lesions (coverage of the other classes' lesions is not
    # its job), and healthy-tissue patches are left out
    classes = {r["class"] for r in read_manifest(folder)}
    real_rows = [r | {"path": str((real_patches / r["path"]).resolve()),
                      "label_path": str((real_patches / r["label_path"]).resolve()) if r.get("label_path") else ""}
                 for r in read_manifest(real_patches) if r.get("class") not in ("healthy", "")]
    same = [r for r in real_rows if r["class"] in classes and r.get("split", "train") in ("train", "")]
    if len(same) >= cfg.min_samples:
        real_rows = same
    else:  # too few real lesions of these classes to score: every real lesion is the reference
        log.warning("insertion gate: %d real %s lesion patches (under gate.min_samples %d); the reference is all %d real lesion patches",
                    len(same), "/".join(sorted(classes)), cfg.min_samples, len(real_rows))
    lesions = write_manifest(out / "real_lesions", real_rows, list(real_rows[0]) if real_rows else ["path"]).parent
    report = run_gate(lesions, syn, out / "patches_gate", cfg)
    by_volume: dict[str, list[Any]] = {}
    src = {r["path"]: r["source_sha256"] for r in read_manifest(syn)}
    for s in report.samples:
        by_volume.setdefault(src.get(s.path, ""), []).append(s)
    rows = read_manifest(folder)
    samples = []
    for r in rows:
        decided = by_volume.get(r["sha256"], [])
        reasons = sorted({why for s in decided if s.decision != "accept" for why in s.reasons})
        if not decided:
            reasons = ["no lesion patch was cut"]
        # bind the verdict to the bytes on disk, volume and mask (build-dataset ships exactly these)
        sha = sha256_file(folder / r["path"])
        if sha != r["sha256"]:
            reasons.append("volume changed since it was inserted (sha256 differs from the manifest)")
        label_sha = sha256_file(folder / r["label_path"]) if r.get("label_path") else ""
        ok = report.accepted and not reasons
        samples.append({"path": r["path"], "sha256": sha, "label_sha256": label_sha, "class": r["class"],
                        "decision": "accept" if ok else "reject", "reasons": reasons})
    content = {"verdict": report.verdict, "failed_checks": report.failed_checks,
               "checks": [c.__dict__ for c in report.checks], "patch_gate_report_id": report.report_id,
               "n_accepted": sum(s["decision"] == "accept" for s in samples),
               "n_rejected": sum(s["decision"] != "accept" for s in samples), "samples": samples,
               "metrics": {k: report.metrics[k] for k in ("seam_ratio",) if k in report.metrics}}
    content = json.loads(json.dumps(content, default=str))  # the JSON the file holds, so its id checks on reading
    key = key if key is not None else gate_key_from_env()
    content["report_id"] = content_id(content)
    content["signature"] = sign(content, key) if key else None
    (out / "gate_report.json").write_text(json.dumps(content, indent=2, default=str) + "\n", encoding="utf-8")
    keep = {s["path"] for s in samples if s["decision"] == "accept"}
    write_manifest(out, [r for r in rows if r["path"] in keep], list(INSERTION_COLUMNS), name="accepted.csv")
    _write_markdown(content, out)
    log.info("insertion gate %s: %d of %d volumes accepted", report.verdict, content["n_accepted"], len(samples))
    return content


def _write_markdown(content: dict[str, Any], out: Path) -> Path:
    """OUT/gate_report.md of an insertion gate: verdict, checks, per-volume decisions (the patch gate's own report is under patches_gate/)."""
    lines = [f"# Insertion gate: **{content['verdict'].upper()}**"
             + (f" (failed: {', '.join(content['failed_checks'])})" if content["failed_checks"] else ""), "",
             f"Report {content['report_id'][:12]}; inserted volumes accepted {content['n_accepted']}, rejected {content['n_rejected']}. "
             "The inserted lesions were scored as lesion-centred patches against the real lesion patches "
             f"(patches_gate/gate_report.md, report {content['patch_gate_report_id'][:12]}).", "",
             "| check | value | threshold | passed |", "|---|---|---|---|"]
    for c in content["checks"]:
        value = "n/a" if c.get("value") is None else f"{c['value']:.4g}"
        lines.append(f"| {c['name']} | {value} | {c['op']} {c['threshold']} | {'yes' if c['passed'] else 'NO'} |")
    lines += ["", "| volume | class | decision | reasons |", "|---|---|---|---|"]
    lines += [f"| {s['path']} | {s['class']} | {s['decision']} | {'; '.join(s['reasons'])} |" for s in content["samples"]]
    path = out / "gate_report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
