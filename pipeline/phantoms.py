"""Seeded head phantoms with tumors: the test and demo data of every medaug stage.

`make_subject` builds one subject's tissue label map (0 air, 1 skin/fat, 2 bone, 3 CSF,
4 gray matter, 5 white matter, 6 tumor, 7 necrotic core) from smooth shapes (ellipsoids
under a low-frequency deformation) with a "round" or "necrotic" tumor; `render_ct` and
`render_mr` turn it into a CT in HU and a T1-like post-contrast MR (arbitrary units,
0..~1000). `write_cohort` writes a whole cohort the way a hospital export and a
Decathlon-style research dataset would look: DICOM series (CT/MR Image Storage, one file
per slice), NIfTI Decathlon datasets per modality, the tissue truth maps and cohort.csv.
Train subjects are unpaired (one modality each); held-out test subjects are rendered in
both modalities from the same anatomy (paired truth). Same seed, byte-identical files.

Geometry: a volume is a (x, y, z) array of size x size x size//2 voxels in RAS+ order
(NIfTI convention), in-plane field of view 220 mm and a 128 mm slab (4 mm slices at size
64). DICOM stores the same voxels in LPS with ImageOrientationPatient [1,0,0,0,1,0]
(`write_dicom_series` flips the array axes as needed).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipeline.errors import ConfigError
from pipeline.manifest import HashingWriter, write_manifest
from pipeline.types import Modality, Spacing

log = logging.getLogger(__name__)

TumorClass = Literal["round", "necrotic"]
TUMOR_CLASSES: tuple[TumorClass, TumorClass] = ("round", "necrotic")

AIR, SKIN_FAT, BONE, CSF, GM, WM, TUMOR, NECROSIS = range(8)
TISSUE_NAMES = ("air", "skin/fat", "bone", "CSF", "gray matter", "white matter", "tumor", "necrotic core")

FOV_MM = 220.0
"""In-plane field of view in mm (spacing = FOV_MM / size)."""
SLAB_MM = 128.0
"""Cranio-caudal extent in mm of the size//2 slices (4 mm slices at size 64)."""

COHORT_COLUMNS = (
    "subject",
    "case",
    "modality",
    "split",
    "class",
    "partner",
    "dicom_series_dir",
    "nifti_image",
    "nifti_label",
    "tissue_map",
    "patient_id",
)
"""Columns of out/cohort.csv; paths are relative to the cohort folder. `partner` is the
nifti_image of the same case in the other modality (paired test subjects only)."""

CT_INTERCEPT = -1024.0
"""CT DICOM: signed 16-bit stored values, HU = stored * 1 + CT_INTERCEPT."""
MR_SLOPE = 0.25
"""MR DICOM: unsigned 16-bit stored values, intensity = stored * MR_SLOPE + 0."""


# --- geometry ------------------------------------------------------------------------------


def phantom_shape(size: int) -> tuple[int, int, int]:
    """Array shape (x, y, z) of a phantom volume: (size, size, size // 2)."""
    if size < 16:
        raise ConfigError(f"phantom size must be >= 16 voxels, got {size}")
    return (size, size, size // 2)


def phantom_affine(size: int) -> NDArray[np.float64]:
    """4x4 RAS+ voxel-to-world affine (mm) of a phantom volume, centred on the world origin."""
    shape = phantom_shape(size)
    spacing = np.array([FOV_MM / size, FOV_MM / size, SLAB_MM / shape[2]])
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2.0 * spacing
    return affine


def _world_grid(size: int) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """Open (broadcastable) RAS world coordinate axes in mm of the phantom grid."""
    shape = phantom_shape(size)
    aff = phantom_affine(size)
    axes = [(aff[a, a] * np.arange(shape[a]) + aff[a, 3]).astype(np.float32) for a in range(3)]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, int, int], coarse: tuple[int, int, int], sigma: float = 1.0
) -> NDArray[np.float32]:
    """A smooth random field of unit standard deviation, resampled to `shape`.

    The noise is drawn on a fixed coarse grid, so the same seed gives the same anatomy at
    every phantom size.
    """
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse), sigma, mode="reflect")
    noise = (noise - noise.mean()) / (noise.std() + 1e-8)
    # Cubic-spline upsampling is separable and linear: apply it as one (out, coarse) matrix
    # per axis, much faster than a 3-D ndimage.zoom at size 256.
    out = noise
    for axis, (n_out, n_in) in enumerate(zip(shape, coarse, strict=True)):
        weights = ndimage.zoom(np.eye(n_in), (n_out / n_in, 1.0), order=3, mode="nearest", grid_mode=True)
        out = np.moveaxis(np.tensordot(weights[:n_out], out, axes=(1, axis)), 0, axis)
    return out.astype(np.float32)


# --- anatomy -------------------------------------------------------------------------------


@dataclass
class Subject:
    """One phantom subject: its anatomy, before rendering to a modality.

    `tissue` is (x, y, z) uint8 with the TISSUE_NAMES labels, `depth_mm` the depth below
    the scalp (mm, negative outside), `bone_mm` the (start, end) depth of the skull, used
    by the renderers for skin/fat and diploe texture.
    """

    index: int
    tumor_class: TumorClass
    tissue: NDArray[np.uint8]
    depth_mm: NDArray[np.float32]
    affine: NDArray[np.float64]
    bone_mm: tuple[float, float]
    params: dict[str, float] = field(default_factory=dict)

    @property
    def spacing(self) -> Spacing:
        """Voxel spacing (x, y, z) in mm."""
        sp = np.abs(np.diag(self.affine)[:3])
        return (float(sp[0]), float(sp[1]), float(sp[2]))

    @property
    def tumor_mask(self) -> NDArray[np.uint8]:
        """Binary (x, y, z) uint8 tumor mask: tumor and necrotic core."""
        return (self.tissue >= TUMOR).astype(np.uint8)


def make_subject(seed: int, index: int, size: int = 64, tumor_class: TumorClass = "round") -> Subject:
    """Build subject `index` of cohort `seed`: head anatomy and one tumor of `tumor_class`.

    The anatomy depends only on (seed, index), not on the size or the cohort's other
    subjects. Shape (size, size, size // 2), affine from `phantom_affine(size)`.
    """
    if tumor_class not in TUMOR_CLASSES:
        raise ConfigError(f"tumor_class must be one of {TUMOR_CLASSES}, got {tumor_class!r}")
    rng = np.random.default_rng([seed, index, 1])
    shape = phantom_shape(size)
    px, py, pz = _world_grid(size)

    # Per-subject anatomy: scale, centre, in-plane rotation, head semi-axes (mm).
    scale = rng.uniform(0.9, 1.04)
    centre = np.array([rng.uniform(-4, 4), rng.uniform(-5, 5), rng.uniform(-16, -12)])
    theta = math.radians(rng.uniform(-12, 12))
    axes = scale * np.array([rng.uniform(70, 78), rng.uniform(88, 97), rng.uniform(64, 68)])
    skin_fat = rng.uniform(4.0, 6.0)
    bone_thick = rng.uniform(5.5, 8.0)
    csf_thick = rng.uniform(2.0, 3.5)
    gm_thick = rng.uniform(3.0, 4.5)

    # Head coordinates q: rotate about z, then a low-frequency deformation (~3 mm).
    c, s = math.cos(theta), math.sin(theta)
    dx, dy, dz = px - centre[0], py - centre[1], pz - centre[2]
    warp = [3.0 * _smooth_field(rng, shape, (5, 5, 4)) for _ in range(3)]
    qx = (c * dx + s * dy + warp[0]).astype(np.float32)
    qy = (-s * dx + c * dy + warp[1]).astype(np.float32)
    qz = (dz + warp[2]).astype(np.float32)
    del dx, dy, dz, warp

    # Depth below the scalp along the ray from the head centre (mm).
    rho = np.sqrt((qx / axes[0]) ** 2 + (qy / axes[1]) ** 2 + (qz / axes[2]) ** 2)
    radius = np.sqrt(qx**2 + qy**2 + qz**2)
    depth = (radius * (1.0 / np.maximum(rho, 1e-3) - 1.0)).astype(np.float32)
    del rho, radius

    # Layers: skin/fat, skull, subarachnoid CSF, cortex folded by a smooth field, white matter.
    fold = _smooth_field(rng, shape, (28, 28, 14), sigma=1.0)
    bone_start, bone_end = skin_fat, skin_fat + bone_thick
    gm_start = bone_end + csf_thick * (1.0 + 0.35 * fold)
    wm_start = gm_start + gm_thick * (1.0 + 0.5 * fold)
    tissue = np.zeros(shape, np.uint8)
    tissue[depth >= 0] = SKIN_FAT
    tissue[depth >= bone_start] = BONE
    tissue[depth >= bone_end] = CSF
    tissue[depth >= gm_start] = GM
    brain = depth >= wm_start
    tissue[brain] = WM
    # Sulci: CSF clefts where the folding field peaks inside the cortex.
    tissue[(tissue == GM) & (fold > 1.3)] = CSF
    del fold, gm_start, wm_start

    def blob(cx: float, cy: float, cz: float, ax: float, ay: float, az: float) -> NDArray[np.bool_]:
        return ((qx - cx) / ax) ** 2 + ((qy - cy) / ay) ** 2 + ((qz - cz) / az) ** 2 <= 1.0

    # Falx: a thin CSF sheet between the hemispheres, above the ventricles.
    tissue[brain & (np.abs(qx) < 1.0) & (qz > 10.0)] = CSF
    # Deep gray matter (thalami), then the lateral ventricles (they vary most between subjects).
    thal = scale * rng.uniform(7.0, 9.0)
    for side in (-1.0, 1.0):
        tissue[brain & blob(side * 10.0 * scale, -6.0, 4.0, thal, 1.3 * thal, thal)] = GM
    v_lat, v_ap, v_cc = rng.uniform(3.5, 6.5), rng.uniform(18, 26), rng.uniform(6, 10)
    v_off = rng.uniform(5.5, 8.0)
    for side in (-1.0, 1.0):
        tissue[brain & blob(side * v_off * scale, 4.0, 18.0, v_lat, v_ap * scale, v_cc)] = CSF

    radius_t, extent = _add_tumor(tissue, (qx, qy, qz), rng, tumor_class, axes - bone_end)

    params = {
        "scale": float(scale),
        "rotation_deg": math.degrees(theta),
        "tumor_radius_mm": float(radius_t),
        "tumor_extent_mm": float(extent),
    }
    return Subject(
        index=index,
        tumor_class=tumor_class,
        tissue=tissue,
        depth_mm=depth,
        affine=phantom_affine(size),
        bone_mm=(float(bone_start), float(bone_end)),
        params=params,
    )


def _add_tumor(
    tissue: NDArray[np.uint8],
    q: tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]],
    rng: np.random.Generator,
    tumor_class: TumorClass,
    brain_axes: NDArray[np.float64],
) -> tuple[float, float]:
    """Paint one tumor (TUMOR, and NECROSIS for "necrotic") into `tissue` in place.

    `q` holds the head coordinates (mm) of every voxel and `brain_axes` the semi-axes (mm)
    of the skull's inner surface. A "round" tumor is a sphere of radius 7-10 mm; a
    "necrotic" one a union of a 11-15 mm sphere and 3-5 protruding lobes with a rough
    border and an irregular core at about half its radius. The centre lies inside the
    cerebrum, off the midline, far enough from the skull for the whole tumor; voxels
    outside the brain are never painted. Returns (main radius, extent) in mm.
    """
    qx, qy, qz = q
    lobes: list[tuple[NDArray[np.float64], float]]
    if tumor_class == "round":
        radius_t = rng.uniform(7.0, 10.0)
        extent = radius_t
        lobes = []
    else:
        radius_t = rng.uniform(11.0, 15.0)
        lobes = []
        for _ in range(int(rng.integers(3, 6))):
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            lobes.append((direction * radius_t * rng.uniform(0.85, 1.15), radius_t * rng.uniform(0.4, 0.6)))
        extent = max([radius_t] + [float(np.linalg.norm(o)) + r for o, r in lobes])
    inner = np.maximum(brain_axes - 12.0 - extent, 5.0) * np.array([0.55, 0.6, 0.5])
    u = rng.standard_normal(3)
    u = u / np.linalg.norm(u) * rng.uniform(0.3, 1.0) ** (1 / 3)
    tc = u * inner + np.array([0.0, 0.0, 12.0])
    tc[0] += np.sign(tc[0] if tc[0] != 0 else 1.0) * 8.0  # keep off the midline
    # Bounding box in voxels around the tumor centre: evaluate the shape there only.
    rough = _smooth_field(rng, (18, 18, 18), (9, 9, 9))
    sl = _bbox(qx, qy, qz, tc, extent * 1.8 + 4.0)
    bx, by, bz = qx[sl] - tc[0], qy[sl] - tc[1], qz[sl] - tc[2]
    dist = np.sqrt(bx**2 + by**2 + bz**2)
    if tumor_class == "round":
        shape_fn = dist / radius_t
        core = np.zeros_like(shape_fn, dtype=bool)
    else:
        # Irregular border: a union of spheres (lobes) with a rough, noisy surface.
        shape_fn = dist / radius_t
        for offset, r in lobes:
            d_l = np.sqrt((bx - offset[0]) ** 2 + (by - offset[1]) ** 2 + (bz - offset[2]) ** 2) / r
            shape_fn = np.minimum(shape_fn, d_l)
        rough_box = ndimage.zoom(
            rough, [n / 18 for n in shape_fn.shape], order=1, mode="nearest", grid_mode=True
        )
        rough_box = rough_box[: shape_fn.shape[0], : shape_fn.shape[1], : shape_fn.shape[2]]
        shape_fn = shape_fn + 0.25 * rough_box
        core = (dist / radius_t + 0.3 * rough_box) < rng.uniform(0.5, 0.62)
    inside = (shape_fn <= 1.0) & (tissue[sl] >= CSF)
    # At coarse sizes a tumor could fall between voxel centres: keep at least the centre voxel
    # (and, for necrotic tumors, a core voxel) so every subject has a labelled tumor.
    centre_voxel = np.unravel_index(int(np.argmin(dist)), dist.shape)
    inside[centre_voxel] = True
    if tumor_class == "necrotic":
        core[centre_voxel] = True
    box = tissue[sl]  # a view: painting it paints `tissue`
    box[inside] = TUMOR
    box[inside & core] = NECROSIS
    return float(radius_t), float(extent)


def _bbox(
    qx: NDArray[np.float32],
    qy: NDArray[np.float32],
    qz: NDArray[np.float32],
    centre: NDArray[np.float64],
    half: float,
) -> tuple[slice, slice, slice]:
    """Voxel slices of the box where the head coordinates q lie within `half` mm of `centre`."""
    near = (
        (np.abs(qx - centre[0]) <= half) & (np.abs(qy - centre[1]) <= half) & (np.abs(qz - centre[2]) <= half)
    )
    idx = np.nonzero(near)
    if idx[0].size == 0:  # pragma: no cover - the centre is always inside the head
        return (slice(0, 1), slice(0, 1), slice(0, 1))
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)  # type: ignore[return-value]


# --- rendering -----------------------------------------------------------------------------


def _piecewise(subject: Subject, values: Mapping[int, float]) -> NDArray[np.float32]:
    lut = np.zeros(256, np.float32)
    for label, value in values.items():
        lut[label] = value
    return lut[subject.tissue]


def _partial_volume(vol: NDArray[np.float32], subject: Subject) -> NDArray[np.float32]:
    """Blur with a PSF of ~1.2 mm in-plane FWHM and half the slice thickness across slices."""
    sp = subject.spacing
    sigma = (0.5, 0.5, max(0.35, 0.45 * sp[2] / sp[0] / 2.0))
    return ndimage.gaussian_filter(vol, sigma, mode="nearest")


def render_ct(subject: Subject, seed: int) -> NDArray[np.int16]:
    """Render a contrast-enhanced head CT in HU: (x, y, z) int16, values in [-1024, 3071].

    Tissue HU (Gaussian-distributed per subject): air -1000, skin ~30, fat ~-90, cortical
    bone tables ~1150 and diploe ~700, CSF ~8, GM ~40, WM ~30, round (enhancing) tumor
    ~62, necrotic tumor rim ~48 and core ~20; partial-volume blur and ~4 HU noise.
    """
    rng = np.random.default_rng([seed, subject.index, 2, 0])
    jit = rng.normal(0.0, 1.0, 8)
    tumor_hu = 62.0 + 2.0 * jit[6] if subject.tumor_class == "round" else 47.0 + 1.5 * jit[6]
    vol = _piecewise(
        subject,
        {
            AIR: -1000.0,
            SKIN_FAT: -90.0 + 5.0 * jit[1],
            BONE: 0.0,
            CSF: 8.0 + 1.5 * jit[3],
            GM: 40.0 + 1.5 * jit[4],
            WM: 30.0 + 1.5 * jit[5],
            TUMOR: tumor_hu,
            NECROSIS: 20.0 + 2.0 * jit[7],
        },
    )
    depth = subject.depth_mm
    skin = (subject.tissue == SKIN_FAT) & (depth < 1.8)
    vol[skin] = 30.0 + 3.0 * jit[2]
    # Skull: dense inner and outer tables, cancellous diploe between them.
    bone = subject.tissue == BONE
    b0, b1 = subject.bone_mm
    frac = np.clip((depth[bone] - b0) / (b1 - b0), 0.0, 1.0)
    vol[bone] = 1150.0 - 450.0 * np.sin(np.pi * frac) ** 2
    vol = _partial_volume(vol, subject)
    vol += rng.normal(0.0, 4.0, vol.shape).astype(np.float32)
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)


def render_mr(subject: Subject, seed: int) -> NDArray[np.float32]:
    """Render a T1-weighted post-gadolinium head MR: (x, y, z) float32, ~0..1000 a.u.

    Intensities: fat ~900 (bright), skin ~400, bone ~40 with marrow-filled diploe ~350,
    CSF ~150, GM ~430, WM ~620 (WM > GM > CSF), round tumor ~900 (homogeneous
    enhancement), necrotic tumor rim ~780 with a dark core ~170. A smooth multiplicative
    bias field (+-15 %) and Rician noise (sigma ~12) are applied; values are quantised to
    the DICOM step MR_SLOPE so DICOM and NIfTI hold identical numbers.
    """
    rng = np.random.default_rng([seed, subject.index, 2, 1])
    jit = rng.normal(0.0, 1.0, 8)
    tumor = 900.0 + 20.0 * jit[6] if subject.tumor_class == "round" else 780.0 + 20.0 * jit[6]
    vol = _piecewise(
        subject,
        {
            AIR: 0.0,
            SKIN_FAT: 900.0 + 20.0 * jit[1],
            BONE: 40.0,
            CSF: 150.0 + 10.0 * jit[3],
            GM: 430.0 + 10.0 * jit[4],
            WM: 620.0 + 10.0 * jit[5],
            TUMOR: tumor,
            NECROSIS: 170.0 + 15.0 * jit[7],
        },
    )
    depth = subject.depth_mm
    vol[(subject.tissue == SKIN_FAT) & (depth < 1.8)] = 400.0 + 15.0 * jit[2]
    bone = subject.tissue == BONE
    b0, b1 = subject.bone_mm
    frac = np.clip((depth[bone] - b0) / (b1 - b0), 0.0, 1.0)
    vol[bone] = 40.0 + 310.0 * np.sin(np.pi * frac) ** 4
    vol = _partial_volume(vol, subject)
    bias = np.exp(0.12 * _smooth_field(rng, vol.shape, (4, 4, 3), sigma=0.8)).astype(np.float32)  # type: ignore[arg-type]
    vol *= bias
    sigma = 12.0
    re = vol + rng.normal(0.0, sigma, vol.shape).astype(np.float32)
    im = rng.normal(0.0, sigma, vol.shape).astype(np.float32)
    mag = np.sqrt(re * re + im * im)
    return (np.rint(mag / MR_SLOPE) * MR_SLOPE).astype(np.float32)


def render(subject: Subject, modality: Modality, seed: int) -> NDArray[Any]:
    """Render `subject` as CT (int16 HU) or MR (float32 a.u.)."""
    match modality:
        case "CT":
            return render_ct(subject, seed)
        case "MR":
            return render_mr(subject, seed)
        case _:
            raise ValueError(f"modality must be one of ('CT', 'MR'), got {modality!r}")


# --- NIfTI ---------------------------------------------------------------------------------


def write_nifti(data: NDArray[Any], affine: NDArray[np.float64], path: Path) -> Path:
    """Write a .nii.gz with qform = sform = `affine` (RAS, mm), byte-identical for equal input.

    nibabel's own gzip writer stamps the current time into the gzip header; this writes
    the NIfTI bytes through gzip with mtime 0 and no file name instead.
    """
    write_nifti_sha256(data, affine, path)
    return path


def write_nifti_sha256(data: NDArray[Any], affine: NDArray[np.float64], path: Path) -> str:
    """`write_nifti`, returning the sha256 of the file's bytes, hashed on their way to disk."""
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    payload = img.to_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw:
        sink = HashingWriter(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=6) as gz:
            gz.write(payload)
    return sink.hexdigest()


# --- DICOM ---------------------------------------------------------------------------------

TagKey = str | int | tuple[int, int]
"""A DICOM tag given by keyword ("PatientName"), int (0x00100010) or (group, element)."""


_UID_NAMESPACE = uuid.UUID("6d656461-7567-5068-616e-746f6d000001")


def _uid(*parts: object) -> str:
    """A deterministic DICOM UID "2.25.<uuid as integer>" (PS3.5 B.2) from a name-based UUID.

    pydicom's generate_uid(prefix=None) ignores its entropy sources and is random, so the
    UUID is derived here (uuid5) to keep same-seed cohorts byte-identical.
    """
    name = "/".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def write_dicom_series(
    volume: NDArray[Any],
    affine: NDArray[np.float64],
    out_dir: Path,
    tags: Mapping[TagKey, Any],
    modality: Modality,
) -> list[Path]:
    """Write `volume` as one DICOM file per axial slice (IM0001.dcm, ...) in `out_dir`.

    Args:
        volume: (x, y, z) array in the NIfTI voxel order of `affine`; CT in HU, MR in a.u.
        affine: 4x4 voxel-to-world RAS affine (mm) with axes along x, y, z (any signs).
        out_dir: series folder, created if missing.
        tags: header values written over the defaults, applied last (so they may also
            break the geometry on purpose). Keys are keywords, ints or (group, element);
            a value is either plain (VR from the DICOM dictionary), a `(VR, value)` tuple
            (needed for private tags), None to delete the tag, or a callable
            `f(slice_index) -> value` evaluated per slice. Defaults for UIDs are random-free
            (derived from the PatientID, SeriesDescription and geometry), so pass
            StudyInstanceUID / SeriesInstanceUID / FrameOfReferenceUID to control them.
        modality: "CT" (CT Image Storage, signed int16, HU = stored - 1024) or "MR" (MR
            Image Storage, unsigned int16, value = stored * MR_SLOPE).

    Returns the written paths in slice order (inferior to superior).

    The array is flipped so that DICOM rows run anterior->posterior and columns
    right->left (ImageOrientationPatient [1,0,0,0,1,0] in LPS) whenever the affine allows.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.tag import Tag
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        UID,
        CTImageStorage,
        ExplicitVRLittleEndian,
        MRImageStorage,
    )

    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be one of ('CT', 'MR'), got {modality!r}")
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3-D (x, y, z), got shape {vol.shape}")
    # World LPS affine, then flip array axes so each axis runs along +L, +P, +S.
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, np.float64)
    for axis in range(3):
        col = lps[:3, axis]
        if col[int(np.argmax(np.abs(col)))] < 0:
            vol = np.flip(vol, axis)
            flip = np.eye(4)
            flip[axis, axis] = -1.0
            flip[axis, 3] = vol.shape[axis] - 1
            lps = lps @ flip
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir = lps[:3, 0] / spacing[0]  # direction of increasing column index (array axis x)
    col_dir = lps[:3, 1] / spacing[1]  # direction of increasing row index (array axis y)
    normal = np.cross(row_dir, col_dir)

    if modality == "CT":
        stored = np.clip(np.rint(vol.astype(np.float64) - CT_INTERCEPT), -32768, 32767).astype("<i2")
        sop_class = CTImageStorage
    else:
        stored = np.clip(np.rint(vol.astype(np.float64) / MR_SLOPE), 0, 65535).astype("<u2")
        sop_class = MRImageStorage

    pid = str(tags.get("PatientID", "PH000000"))
    desc = str(tags.get("SeriesDescription", modality))
    geo = f"{vol.shape}{np.round(lps, 4).tolist()}"
    study_uid = str(tags.get("StudyInstanceUID", _uid("study", pid, modality)))
    series_uid = str(tags.get("SeriesInstanceUID", _uid("series", pid, modality, desc, geo)))
    frame_uid = str(tags.get("FrameOfReferenceUID", _uid("frame", pid, modality, geo)))

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for k in range(vol.shape[2]):
        pixels = np.ascontiguousarray(stored[:, :, k].T)  # [row = y, column = x]
        ipp = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
        sop_uid = _uid("sop", series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.Modality = modality
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = pid
        ds.SeriesDescription = desc
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.PatientPosition = "HFS"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds_num(v) for v in ipp]
        ds.ImageOrientationPatient = [_ds_num(v) for v in (*row_dir, *col_dir)]
        ds.SliceLocation = _ds_num(float(np.dot(normal, ipp)))
        ds.PixelSpacing = [_ds_num(spacing[1]), _ds_num(spacing[0])]  # row spacing, column spacing
        ds.SliceThickness = _ds_num(spacing[2])
        ds.SpacingBetweenSlices = _ds_num(spacing[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        if modality == "CT":
            ds.PixelRepresentation = 1
            ds.RescaleSlope = "1"
            ds.RescaleIntercept = _ds_num(CT_INTERCEPT)
            ds.RescaleType = "HU"
            ds.WindowCenter = "40"
            ds.WindowWidth = "80"
        else:
            ds.PixelRepresentation = 0
            ds.RescaleSlope = _ds_num(MR_SLOPE)
            ds.RescaleIntercept = "0"
            ds.WindowCenter = "500"
            ds.WindowWidth = "1000"
        ds.PixelData = pixels.tobytes()
        for key, value in tags.items():
            _set_tag(ds, Tag(key), value(k) if callable(value) else value)  # type: ignore[arg-type]
        path = out_dir / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ds_num(value: float) -> str:
    """A DICOM decimal string (DS, at most 16 characters) for `value`."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def _set_tag(ds: Any, tag: Any, value: Any) -> None:
    from pydicom.datadict import dictionary_VR

    if value is None:
        if tag in ds:
            del ds[tag]
        return
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and len(value[0]) == 2:
        vr, val = value
    else:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise ValueError(
                f"tag {tag} is not in the DICOM dictionary: give its value as (VR, value)"
            ) from None
        val = value
    ds.add_new(tag, vr, val)


# --- patient identities --------------------------------------------------------------------

_FAMILY = [
    "Smith",
    "Jones",
    "Miller",
    "Garcia",
    "Brown",
    "Davis",
    "Wilson",
    "Moore",
    "Taylor",
    "Anderson",
    "Thomas",
    "Jackson",
    "White",
    "Harris",
    "Martin",
    "Thompson",
    "Lopez",
    "Clark",
    "Lewis",
    "Walker",
    "Hall",
    "Young",
    "King",
    "Wright",
    "Scott",
    "Green",
    "Baker",
    "Adams",
    "Nelson",
    "Hill",
    "Campbell",
    "Mitchell",
    "Roberts",
    "Carter",
    "Phillips",
    "Evans",
    "Turner",
    "Torres",
    "Parker",
    "Collins",
    "Edwards",
    "Stewart",
    "Morris",
    "Murphy",
    "Cook",
]
_GIVEN = {
    "F": [
        "Mary",
        "Linda",
        "Susan",
        "Karen",
        "Nancy",
        "Laura",
        "Emma",
        "Olivia",
        "Sophia",
        "Grace",
        "Helen",
        "Ruth",
        "Anna",
        "Julia",
        "Clara",
    ],
    "M": [
        "James",
        "John",
        "Robert",
        "Michael",
        "David",
        "Daniel",
        "Paul",
        "Mark",
        "George",
        "Peter",
        "Frank",
        "Henry",
        "Samuel",
        "Oliver",
        "Lucas",
    ],
}
_PHYSICIANS = ("Hartmann^Eva^^Dr", "Okafor^Chidi^^Dr", "Lindqvist^Per^^Dr", "Moreau^Claire^^Dr")


def _id_offset(seed: int) -> int:
    return int(np.random.default_rng([seed, 5]).integers(0, 10**6))


def _identity(seed: int, index: int) -> dict[str, str]:
    """Fake patient identity and study metadata of subject `index`, fixed by the seed."""
    rng = np.random.default_rng([seed, index, 3])
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(rng.integers(24, 82))
    study_day = np.datetime64("2024-01-08") + int(rng.integers(0, 600))
    birth = study_day - int(age * 365.25 + rng.integers(0, 365))
    hour, minute, second = int(rng.integers(7, 18)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    return {
        # A seed-dependent offset plus a stride coprime to 10**6: unique within a cohort.
        "PatientID": f"PH{(_id_offset(seed) + 7919 * index) % 10**6:06d}",
        "PatientName": f"{_FAMILY[int(rng.integers(len(_FAMILY)))]}^{_GIVEN[sex][int(rng.integers(15))]}",
        "PatientSex": sex,
        "PatientAge": f"{age:03d}Y",
        "PatientBirthDate": str(birth).replace("-", ""),
        "StudyDate": str(study_day).replace("-", ""),
        "StudyTime": f"{hour:02d}{minute:02d}{second:02d}",
        "AccessionNumber": f"A{rng.integers(0, 10**8):08d}",
        "ReferringPhysicianName": _PHYSICIANS[int(rng.integers(len(_PHYSICIANS)))],
    }


def _series_tags(seed: int, index: int, modality: Modality, n_slices: int) -> dict[TagKey, Any]:
    """All non-geometry tags of one subject's series: identity, study, series, scanner."""
    ident = _identity(seed, index)
    study_day = np.datetime64(f"{ident['StudyDate'][:4]}-{ident['StudyDate'][4:6]}-{ident['StudyDate'][6:]}")
    if modality == "MR":  # the MR study of a paired subject follows the CT by a few days
        study_day = study_day + int(np.random.default_rng([seed, index, 4]).integers(1, 15))
    date = str(study_day).replace("-", "")
    tags: dict[TagKey, Any] = dict(ident.items())
    tags |= {
        "StudyDate": date,
        "SeriesDate": date,
        "AcquisitionDate": date,
        "ContentDate": date,
        "SeriesTime": ident["StudyTime"],
        "AcquisitionTime": ident["StudyTime"],
        "ContentTime": ident["StudyTime"],
        "StudyID": f"{index + 1:04d}",
        "StudyInstanceUID": _uid("study", seed, index, modality),
        "SeriesInstanceUID": _uid("series", seed, index, modality),
        "FrameOfReferenceUID": _uid("frame", seed, index, modality),
        "InstitutionName": "Phantom General Hospital",
        "InstitutionAddress": "1 Imaging Way, Springfield",
        "StationName": f"{modality}SCAN01",
        "OperatorsName": "Tech^Alex",
        "BodyPartExamined": "HEAD",
        "Manufacturer": "MedAug Phantoms",
        "ManufacturerModelName": "HeadSim CT 64" if modality == "CT" else "HeadSim MR 1.5T",
        "SoftwareVersions": "medaug-phantom 1",
        "DeviceSerialNumber": f"{seed % 100000:05d}",
        "SeriesNumber": 2 if modality == "CT" else 5,
        "ImagesInAcquisition": n_slices,
    }
    if modality == "CT":
        tags |= {
            "StudyDescription": "CT HEAD WITH CONTRAST",
            "SeriesDescription": "AX HEAD C+ 4mm" if n_slices <= 40 else "AX HEAD C+",
            "ProtocolName": "HEAD ROUTINE C+",
            "KVP": "120",
            "XRayTubeCurrent": 220,
            "ExposureTime": 1000,
            "ConvolutionKernel": "H30s",
            "ContrastBolusAgent": "IOHEXOL 350",
        }
    else:
        tags |= {
            "StudyDescription": "MRI BRAIN W WO CONTRAST",
            "SeriesDescription": "AX T1 SE POST GD",
            "ProtocolName": "BRAIN T1 SE AX +C",
            "ScanningSequence": "SE",
            "SequenceVariant": "SK",
            "ScanOptions": "",
            "MRAcquisitionType": "2D",
            "RepetitionTime": "550",
            "EchoTime": "12",
            "EchoTrainLength": 1,
            "MagneticFieldStrength": "1.5",
            "ImagingFrequency": "63.87",
            "ImagedNucleus": "1H",
            "FlipAngle": "90",
            "ContrastBolusAgent": "GADOBUTROL",
        }
    return tags


# --- cohort --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One subject's place in the cohort: split, modalities rendered, tumor class."""

    split: Literal["train", "test"]
    modalities: tuple[Modality, ...]
    tumor_class: TumorClass


def plan_cohort(n_subjects: int, seed: int = 0, minority_fraction: float = 0.15) -> list[Slot]:
    """Split, modality and tumor class of each subject, by quota, shuffled by the seed.

    About a quarter of the subjects (at least 2) are held out as paired test subjects
    (both modalities); the rest are train subjects rendered in one modality, CT and MR
    alternating. "necrotic" is the minority class (`minority_fraction` of subjects, but
    with n_subjects >= 8 at least one in the test split and at least one in each
    modality's train split, so at least 3). Returns one Slot per subject index.
    """
    if n_subjects < 2:
        raise ConfigError(
            f"a phantom cohort needs at least 2 subjects (the paired test split), got {n_subjects}"
        )
    if not 0.0 < minority_fraction < 1.0:
        raise ConfigError(f"minority_fraction must be in (0, 1), got {minority_fraction}")
    n = n_subjects
    n_test = min(max(2, round(0.25 * n)), n)
    n_train = n - n_test
    n_min = max(round(minority_fraction * n), 3 if n >= 8 else 1)
    n_min = min(n_min, n - 2) if n >= 4 else 1
    test_min = min(max(1, round(n_min * n_test / n)), n_test - 1)
    train_min = min(n_min - test_min, n_train)
    train_mods: list[Modality] = ["CT" if i % 2 == 0 else "MR" for i in range(n_train)]
    n_ct = train_mods.count("CT")
    ct_min = min((train_min + 1) // 2, n_ct)
    mr_min = min(train_min - ct_min, n_train - n_ct)
    slots: list[Slot] = []
    for i in range(n_test):
        slots.append(Slot("test", ("CT", "MR"), "necrotic" if i < test_min else "round"))
    counts = {"CT": 0, "MR": 0}
    for mod in train_mods:
        quota = ct_min if mod == "CT" else mr_min
        cls: TumorClass = "necrotic" if counts[mod] < quota else "round"
        counts[mod] += 1
        slots.append(Slot("train", (mod,), cls))
    order = np.random.default_rng([seed, 0xC0]).permutation(n)
    return [slots[int(j)] for j in order]


def write_cohort(
    out: Path, n_subjects: int = 16, size: int = 64, seed: int = 0, minority_fraction: float = 0.15
) -> dict[str, Any]:
    """Write a phantom cohort to `out` (see the module docstring for the layout).

    out/dicom/<case>/<CT|MR>/IM0001.dcm..., out/nifti/<CT|MR>/{imagesTr,labelsTr,imagesTs,
    labelsTs}/<case>.nii.gz with dataset.json, out/truth/<case>_tissue.nii.gz and
    out/cohort.csv (COHORT_COLUMNS). Volumes are size x size x size//2 voxels.

    Returns a summary: {"out", "n_subjects", "size", "seed", "counts":
    {"<modality>/<split>/<class>": n}, "rows": the cohort.csv rows}.
    """
    out = Path(out)
    plan = plan_cohort(n_subjects, seed, minority_fraction)
    _clear_previous_cohort(out)
    rows: list[dict[str, str]] = []
    datasets: dict[Modality, dict[str, list[dict[str, str]]]] = {
        "CT": {"training": [], "test": []},
        "MR": {"training": [], "test": []},
    }
    for index, slot in enumerate(plan):
        case = f"phantom_{index:03d}"
        subject = make_subject(seed, index, size, slot.tumor_class)
        ident = _identity(seed, index)
        tissue_rel = f"truth/{case}_tissue.nii.gz"
        write_nifti(subject.tissue, subject.affine, out / tissue_rel)
        tr = "Tr" if slot.split == "train" else "Ts"
        for modality in slot.modalities:
            volume = render(subject, modality, seed)
            image_rel = f"nifti/{modality}/images{tr}/{case}.nii.gz"
            label_rel = f"nifti/{modality}/labels{tr}/{case}.nii.gz"
            write_nifti(volume, subject.affine, out / image_rel)
            write_nifti(subject.tumor_mask, subject.affine, out / label_rel)
            series_rel = f"dicom/{case}/{modality}"
            tags = _series_tags(seed, index, modality, volume.shape[2])
            write_dicom_series(volume, subject.affine, out / series_rel, tags, modality)
            partner = ""
            if len(slot.modalities) == 2:
                other = "MR" if modality == "CT" else "CT"
                partner = f"nifti/{other}/images{tr}/{case}.nii.gz"
            key = "training" if slot.split == "train" else "test"
            datasets[modality][key].append(
                {
                    "image": f"./images{tr}/{case}.nii.gz",
                    "label": f"./labels{tr}/{case}.nii.gz",
                    "class": slot.tumor_class,
                }
            )
            rows.append(
                {
                    "subject": f"sub-{index:03d}",
                    "case": case,
                    "modality": modality,
                    "split": slot.split,
                    "class": slot.tumor_class,
                    "partner": partner,
                    "dicom_series_dir": series_rel,
                    "nifti_image": image_rel,
                    "nifti_label": label_rel,
                    "tissue_map": tissue_rel,
                    "patient_id": ident["PatientID"],
                }
            )
    for mod in ("CT", "MR"):
        lists = datasets[mod]
        _write_dataset_json(out / "nifti" / mod, mod, lists["training"], lists["test"], size, seed)
    write_manifest(out, rows, COHORT_COLUMNS, name="cohort.csv")
    counts: dict[str, int] = {}
    for row in rows:
        key = f"{row['modality']}/{row['split']}/{row['class']}"
        counts[key] = counts.get(key, 0) + 1
    log.info("phantom cohort: %d subjects, %d volumes in %s", n_subjects, len(rows), out)
    return {
        "out": str(out),
        "n_subjects": n_subjects,
        "size": size,
        "seed": seed,
        "counts": counts,
        "rows": rows,
    }


def _clear_previous_cohort(out: Path) -> None:
    """Remove an earlier phantom cohort in `out`, so no stale case outlives a smaller new one.

    Only folders written by `write_cohort` are removed, and only when out/cohort.csv marks
    the folder as a phantom cohort; anything else named dicom/, nifti/ or truth/ is an error.
    """
    ours = [out / name for name in ("dicom", "nifti", "truth")]
    if not any(p.exists() for p in ours):
        return
    if not (out / "cohort.csv").is_file():
        raise ConfigError(
            f"{out} already holds dicom/, nifti/ or truth/ but no cohort.csv: not a phantom cohort; "
            "choose an empty output folder"
        )
    log.info("replacing the phantom cohort in %s", out)
    for path in ours:
        shutil.rmtree(path, ignore_errors=True)
    (out / "cohort.csv").unlink()


def _write_dataset_json(
    folder: Path,
    modality: Modality,
    training: Sequence[Mapping[str, str]],
    test: Sequence[Mapping[str, str]],
    size: int,
    seed: int,
) -> Path:
    """Write a Medical Segmentation Decathlon dataset.json (MONAI load_decathlon_datalist reads it)."""
    doc = {
        "name": f"MedaugPhantom{modality}",
        "description": f"Seeded head phantoms ({modality}) with round or necrotic tumors; seed {seed}.",
        "reference": "medaug pipeline/phantoms.py",
        "licence": "CC0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": {"0": "background", "1": "tumor"},
        "tumor_classes": list(TUMOR_CLASSES),
        "numTraining": len(training),
        "numTest": len(test),
        "training": list(training),
        "test": list(test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(exist_ok=True)
    path = folder / "dataset.json"
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path
