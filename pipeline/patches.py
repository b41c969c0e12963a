"""Tumor and healthy-tissue patches cut from ingested volumes: the tumor GAN's training data.

Reads ingest folders (manifest.csv with path,label_path,subject_id,modality,spacing,sha256,
class,split), normalises each volume to [-1, 1] (CT through an HU window, MR through robust
foreground percentiles; pipeline/preprocess.py), and cuts lesion-centred patches per tumor
class plus healthy-tissue patches (class "healthy") from the body away from the lesion,
each with its mask. 2D patches (default) come from the axial slice of largest lesion area
and its neighbours that still hold lesion; 3D patches are cubes around the lesion centroid.
Extraction is deterministic: the only randomness (where healthy patches go) comes from a
generator seeded with (seed, source sha256), so the same inputs and seed give the same
patches in any order. `write_patch_folder` writes patches/*.nii.gz, masks/*.nii.gz and a
manifest.csv (synthetic=0) that the gate and dataset writer read like any other folder;
models/train_tumor_gan.py trains on the arrays (`to_train_data`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipeline.errors import PatchError
from pipeline.manifest import read_manifest, write_manifest
from pipeline.outputs import atomic_file
from pipeline.preprocess import body_mask, to_unit
from pipeline.types import HUWindow, Modality

log = logging.getLogger(__name__)

HEALTHY = "healthy"
"""Class name of patches of brain tissue away from any lesion."""

DEFAULT_TUMOR_HU_WINDOW: HUWindow = (-100.0, 200.0)
"""HU window of tumor patches: fat to enhancing tissue; brain contrast survives, bone clips to +1."""

PATCH_COLUMNS = (
    "path",
    "label_path",
    "class",
    "subject_id",
    "split",
    "modality",
    "synthetic",
    "source_sha256",
    "centre",
    "spacing",
    "patch_size",
)
PARAMS_NAME = "patches.json"
PADDING_WARN = 0.25
"""extract_patches warns when every patch is at least this share padding (patches larger than the volumes)."""


@dataclass
class PatchSet:
    """Patches in memory: images (N, *S) float32 in [-1, 1], masks (N, *S) uint8 {0, 1}.

    `rows[i]` holds patch i's manifest fields (class, subject_id, split, modality,
    source_sha256, centre, spacing, patch_size; `path`/`label_path` once written or read),
    `affines[i]` its 4x4 voxel-to-RAS+ matrix in mm. S is (s, s) for 2D, (s, s, s) for 3D.
    """

    images: NDArray[np.float32]
    masks: NDArray[np.uint8]
    rows: list[dict[str, str]]
    affines: list[NDArray[np.float64]]
    params: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self) -> dict[str, int]:
        """Patches per class, sorted by class name."""
        return dict(sorted(Counter(r["class"] for r in self.rows).items()))


# --- extraction ----------------------------------------------------------------------------


def _load(path: Path) -> nib.Nifti1Image:
    """A NIfTI image (typed for mypy; nibabel's load returns the generic image class)."""
    return cast(nib.Nifti1Image, nib.load(path))


def _crop(arr: NDArray[Any], lower: Sequence[int], size: Sequence[int], fill: float) -> NDArray[Any]:
    """`arr[lower : lower + size]` on every axis, padded with `fill` where it leaves the array."""
    out = np.full(tuple(size), fill, dtype=arr.dtype)
    src, dst = [], []
    for lo, n, dim in zip(lower, size, arr.shape, strict=True):
        a, b = max(lo, 0), min(lo + n, dim)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _translate(affine: NDArray[np.float64], lower: Sequence[int]) -> NDArray[np.float64]:
    """Affine of a crop whose first voxel is voxel `lower` (x, y, z) of the source."""
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(lower, dtype=np.float64)
    return np.asarray(affine @ shift, dtype=np.float64)


def _centroid(mask: NDArray[np.bool_]) -> tuple[int, ...]:
    return tuple(int(round(c)) for c in ndimage.center_of_mass(mask))


def _healthy_centres(
    lesion: NDArray[np.bool_],
    body: NDArray[np.bool_],
    patch_size: int,
    n: int,
    rng: np.random.Generator,
    dims: int,
    min_body_fraction: float,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    margin_mm: float = 0.0,
) -> list[tuple[int, int, int]]:
    """Up to `n` distinct patch centres (x, y, z) whose patch holds no lesion and mostly body.

    Centres lie at least `margin_mm` inside the body surface (in-plane for 2D), i.e. in brain
    rather than scalp or skull. 2D: the patch is an axial (x, y) square, so only lesion in the
    same slice is avoided.
    """
    s = patch_size
    if dims == 2:
        forbidden = ndimage.maximum_filter(lesion, size=(s + 2, s + 2, 1), mode="constant")
        fraction = ndimage.uniform_filter(body.astype(np.float32), size=(s, s, 1), mode="constant")
    else:
        forbidden = ndimage.maximum_filter(lesion, size=s + 2, mode="constant")
        fraction = ndimage.uniform_filter(body.astype(np.float32), size=s, mode="constant")
    # Centres need the whole patch inside the volume in-plane (and in z for 3D).
    inside = np.zeros_like(body)
    h = s // 2
    lo = [h, h, h if dims == 3 else 0]
    hi = [dim - (s - h) for dim in body.shape[:2]] + [body.shape[2] - (s - h) if dims == 3 else body.shape[2] - 1]
    if any(b < a for a, b in zip(lo, hi, strict=True)):
        return []
    inside[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    ok = body & inside & ~forbidden & (fraction >= min_body_fraction)
    if margin_mm > 0:
        if dims == 2:
            depth = np.stack([ndimage.distance_transform_edt(body[..., z], sampling=spacing[:2]) for z in range(body.shape[2])], -1)
        else:
            depth = ndimage.distance_transform_edt(body, sampling=spacing)
        ok &= depth >= margin_mm
    candidates = np.argwhere(ok)
    if len(candidates) == 0:
        return []
    picks = rng.choice(len(candidates), size=min(n, len(candidates)), replace=False)
    return [(int(a), int(b), int(c)) for a, b, c in candidates[np.sort(picks)]]


Centre = tuple[int, int, int]
"""A patch centre in voxels (x, y, z); for 2-D patches z is the slice."""


@dataclass(frozen=True)
class _CutOptions:
    """extract_patches' options that decide where and how each volume is cut (see its Args)."""

    patch_size: int
    dims: int
    neighbours: int
    healthy_per_volume: int
    hu_window: HUWindow
    min_body_fraction: float
    brain_margin_mm: float
    seed: int


def _check_arguments(patch_size: int, dims: int, hu_window: HUWindow) -> None:
    """PatchError for patch dims other than 2/3, patches under 4 voxels, or a CT window that is not low < high (HU)."""
    if dims not in (2, 3):
        raise PatchError(f"patch dims must be 2 or 3, got {dims}")
    if patch_size < 4:
        raise PatchError(f"patch size must be at least 4 voxels, got {patch_size}")
    lo, hi = float(hu_window[0]), float(hu_window[1])
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise PatchError(f"the CT window must have --hu-low below --hu-high; got {lo:g} to {hi:g} HU (swap them?)")


def _read_pair(folder: Path, row: dict[str, str]) -> tuple[nib.Nifti1Image, NDArray[np.float32], NDArray[np.bool_]]:
    """The volume (image and float32 voxels) and lesion mask of an ingest manifest row.

    Raises PatchError naming the manifest row's file when a file is missing or the volume
    holds NaN or infinite voxels (they would spread through the normalisation silently).
    """
    for rel in (row["path"], row["label_path"]):
        if not (folder / rel).is_file():
            raise PatchError(f"{folder.name}/manifest.csv lists {rel} but the file is missing; run `medaug ingest` again")
    img = _load(folder / row["path"])
    volume = np.asarray(img.dataobj, dtype=np.float32)
    bad = int((~np.isfinite(volume)).sum())
    if bad:
        raise PatchError(f"{folder.name}/{row['path']} holds {bad} NaN or infinite voxels; fix or leave out this volume")
    return img, volume, np.asarray(_load(folder / row["label_path"]).dataobj) > 0


def _padding_share(shape: Sequence[int], size: Sequence[int]) -> float:
    """Least share of a patch of `size` that lies outside a volume of `shape` (padding), in [0, 1).

    >>> _padding_share((32, 32, 16), (64, 64, 1))
    0.75
    """
    inside = float(np.prod([min(int(a), int(b)) for a, b in zip(shape, size, strict=True)]))
    return 1.0 - inside / float(np.prod(size))


def _skip_reason(row: dict[str, str], name: str) -> str | None:
    """Why a manifest row gives no patches before its files are read (None: it may give some)."""
    if not row.get("label_path"):
        return f"{name}: no tumor mask, so lesion and healthy tissue cannot be told apart"
    modality = row.get("modality", "")
    if modality not in ("CT", "MR"):
        return f"{name}: modality {modality!r} is not CT or MR"
    return None


def _lesion_centres(lesion: NDArray[np.bool_], cls: str, dims: int, neighbours: int) -> list[tuple[str, Centre]]:
    """Lesion patch centres of one (x, y, z) mask: 3-D the lesion's centroid; 2-D the centroid
    in the largest-lesion slice and in up to `neighbours` slices either side that hold lesion."""
    if not lesion.any():
        return []
    if dims == 3:
        cx, cy, cz = _centroid(lesion)
        return [(cls, (cx, cy, cz))]
    areas = lesion.sum(axis=(0, 1))
    z0 = int(np.argmax(areas))
    centres: list[tuple[str, Centre]] = []
    for z in range(z0 - neighbours, z0 + neighbours + 1):
        if 0 <= z < lesion.shape[2] and areas[z] > 0:
            cx, cy = _centroid(lesion[:, :, z])
            centres.append((cls, (cx, cy, z)))
    return centres


def _cut_volume(
    folder: Path, row: dict[str, str], opts: _CutOptions
) -> tuple[list[tuple[NDArray[np.float32], NDArray[np.uint8], NDArray[np.float64], dict[str, str]]], float] | str:
    """The patches of one manifest row as (image, mask, affine, manifest row) tuples with the
    least share of a patch that is padding (patches larger than the volume), or why it gives none.

    The volume is read once, normalised (pipeline.preprocess.to_unit with its body mask)
    and cut at its lesion centres and at healthy centres seeded by (seed, its sha256).
    """
    name = Path(row["path"]).name
    modality = _modality(row.get("modality", ""))
    sha = row.get("sha256") or ""
    img, volume, lesion = _read_pair(folder, row)
    if volume.ndim != 3 or lesion.shape != volume.shape:
        return f"{name}: volume {volume.shape} and mask {lesion.shape} must be the same 3-D shape"
    body = body_mask(volume, modality)
    unit, _ = to_unit(volume, modality, opts.hu_window, mask=body)
    zooms = tuple(float(v) for v in img.header.get_zooms()[:3])
    rng = np.random.default_rng([opts.seed, int(sha[:15], 16) if sha else 0])
    centres = _lesion_centres(lesion, row.get("class") or "tumor", opts.dims, opts.neighbours)
    healthy = _healthy_centres(lesion, body, opts.patch_size, opts.healthy_per_volume, rng, opts.dims,
                               opts.min_body_fraction, (zooms[0], zooms[1], zooms[2]), opts.brain_margin_mm)
    centres += [(HEALTHY, c) for c in healthy]
    if not centres:
        return f"{name}: no lesion and no room for a {opts.patch_size}-voxel healthy patch"
    base = {
        "subject_id": row.get("subject_id", ""),
        "split": row.get("split", ""),
        "modality": modality,
        "synthetic": "0",
        "source_sha256": sha,
        "spacing": "x".join(f"{z:g}" for z in zooms),
        "patch_size": str(opts.patch_size),
    }
    affine = np.asarray(img.affine, dtype=np.float64)
    size = [opts.patch_size] * 2 + [1 if opts.dims == 2 else opts.patch_size]
    stem = name.removesuffix(".nii.gz").removesuffix(".nii")
    out = []
    for k, (cls, centre) in enumerate(centres):
        half = opts.patch_size // 2
        lower = [centre[0] - half, centre[1] - half, centre[2] if opts.dims == 2 else centre[2] - half]
        out.append((_crop(unit, lower, size, -1.0), _crop(lesion.astype(np.uint8), lower, size, 0), _translate(affine, lower),
                    base | {"class": cls, "centre": "x".join(str(c) for c in centre), "name": f"{stem}_{cls}_{k:02d}"}))
    return out, _padding_share(volume.shape, size)


def extract_patches(
    ingest_dirs: Sequence[Path],
    patch_size: int = 64,
    seed: int = 0,
    dims: int = 2,
    neighbours: int = 1,
    healthy_per_volume: int = 2,
    hu_window: HUWindow = DEFAULT_TUMOR_HU_WINDOW,
    min_body_fraction: float = 0.9,
    brain_margin_mm: float = 10.0,
) -> PatchSet:
    """Cut lesion and healthy patches from every labelled volume in `ingest_dirs`.

    Args:
        ingest_dirs: ingest output folders (each with manifest.csv, volumes/, labels/).
        patch_size: patch side in voxels (2D: s x s axial; 3D: s^3).
        seed: seeds where healthy patches go (with each volume's sha256).
        dims: 2 for axial patches, 3 for cubes.
        neighbours: 2D only: slices either side of the largest-lesion slice to cut too.
        healthy_per_volume: healthy-tissue patches per volume (fewer when they do not fit).
        hu_window: CT window (low, high) in HU mapped to [-1, 1].
        min_body_fraction: least fraction of body voxels inside a healthy patch.
        brain_margin_mm: least depth (mm) of a healthy patch's centre below the body surface,
            so it sits in brain, not scalp or skull (about their thickness in adults).

    Volumes without a label file are skipped (where the lesion is is unknown); a volume with
    an empty mask gives healthy patches only; a lesion with an empty class is "tumor"; a
    volume listed twice (same sha256) is cut once.
    Returns a PatchSet; `skipped` says which volumes gave nothing and why (by file name).
    """
    _check_arguments(patch_size, dims, hu_window)
    opts = _CutOptions(patch_size, dims, neighbours, healthy_per_volume, hu_window, min_body_fraction, brain_margin_mm, seed)
    cut: list[tuple[NDArray[np.float32], NDArray[np.uint8], NDArray[np.float64], dict[str, str]]] = []
    skipped: list[str] = []
    seen: set[str] = set()
    padding = 0.0
    for folder in ingest_dirs:
        manifest = folder / "manifest.csv"
        if not manifest.is_file():
            raise PatchError(f"{folder} is not an ingest folder: it has no manifest.csv (run `medaug ingest` first)")
        for row in sorted(read_manifest(manifest), key=lambda r: (r.get("sha256", ""), r["path"])):
            sha = row.get("sha256") or ""
            if sha and sha in seen:
                continue
            seen.add(sha)
            result = _skip_reason(row, Path(row["path"]).name) or _cut_volume(folder, row, opts)
            if isinstance(result, str):
                skipped.append(result)
            else:
                cut += result[0]
                padding = max(padding, result[1])
    if padding > PADDING_WARN:
        log.warning("%d-voxel patches are larger than the volumes: at least %.0f%% of a patch is padding; pass a --patch-size "
                    "no larger than the volumes' smallest side", patch_size, 100 * padding)
    if not cut:
        raise PatchError(
            f"no patches from {len(ingest_dirs)} ingest folder(s): "
            + ("; ".join(skipped[:3]) if skipped else "the manifests list no volumes")
        )
    stack = np.stack([c[0] for c in cut])
    stack_m = np.stack([c[1] for c in cut])
    if dims == 2:
        stack, stack_m = stack[..., 0], stack_m[..., 0]
    params = {
        "patch_size": patch_size,
        "dims": dims,
        "seed": seed,
        "neighbours": neighbours,
        "healthy_per_volume": healthy_per_volume,
        "min_body_fraction": min_body_fraction,
        "brain_margin_mm": brain_margin_mm,
        "normalisation": {"CT": {"hu_window": [float(hu_window[0]), float(hu_window[1])]}, "MR": "foreground percentiles (0.5, 99.5) -> [-1, 1]"},
        "intensity": "normalised [-1, 1]",
    }
    patch_set = PatchSet(stack, stack_m, [c[3] for c in cut], [c[2] for c in cut], params, skipped)
    log.info("extracted %d patches %s; %d volume(s) skipped", len(patch_set), patch_set.counts(), len(skipped))
    return patch_set


def _modality(value: str) -> Modality:
    match value:
        case "CT":
            return "CT"
        case "MR":
            return "MR"
        case _:
            raise PatchError(f"modality must be one of CT, MR; got {value!r}")


# --- folders -------------------------------------------------------------------------------


def write_patch_folder(patch_set: PatchSet, out: Path) -> Path:
    """Write patches/<name>.nii.gz, masks/<name>.nii.gz, manifest.csv and patches.json under `out`.

    2D patches are stored as (s, s, 1) NIfTI with the source affine shifted to the patch, so
    they overlay their source volume. Returns the manifest path.
    """
    (out / "patches").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    out_rows = []
    for i, row in enumerate(patch_set.rows):
        name = row.get("name") or f"patch_{i:05d}"
        img, msk = patch_set.images[i], patch_set.masks[i]
        if img.ndim == 2:
            img, msk = img[..., None], msk[..., None]
        rel_img, rel_msk = f"patches/{name}.nii.gz", f"masks/{name}.nii.gz"
        for rel, arr in ((rel_img, img.astype(np.float32)), (rel_msk, msk.astype(np.uint8))):
            with atomic_file(out / rel) as tmp:  # a full disk leaves no truncated patch
                nib.save(nib.Nifti1Image(arr, patch_set.affines[i]), tmp)
        row["path"], row["label_path"] = rel_img, rel_msk
        out_rows.append({c: row.get(c, "") for c in PATCH_COLUMNS})
    out_rows.sort(key=lambda r: r["path"])
    with atomic_file(out / PARAMS_NAME) as tmp:
        tmp.write_text(
            json.dumps(patch_set.params | {"counts": patch_set.counts(), "skipped": patch_set.skipped}, indent=2, sort_keys=True)
            + "\n",
            encoding="utf-8",
        )
    return write_manifest(out, out_rows, PATCH_COLUMNS)


def read_patch_folder(folder: Path, synthetic: bool | None = None) -> PatchSet:
    """Load a patch folder (real from `write_patch_folder`, or synthetic from sample-tumors).

    2D patches stored as (s, s, 1) come back as (s, s). `synthetic` keeps only rows with that
    flag. Raises PatchError when the folder has no manifest or a listed file is missing.
    """
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise PatchError(f"{folder} has no manifest.csv: pass a folder written by `medaug extract-patches` or `sample-tumors`")
    rows = read_manifest(manifest)
    if synthetic is not None:
        rows = [r for r in rows if (r.get("synthetic", "0") == "1") == synthetic]
    images, masks, affines = [], [], []
    for r in rows:
        p = folder / r["path"]
        if not p.is_file():
            raise PatchError(f"{folder}: manifest lists {r['path']} but the file is missing")
        img = _load(p)
        arr = np.asarray(img.dataobj, dtype=np.float32)
        m = np.asarray(_load(folder / r["label_path"]).dataobj) > 0 if r.get("label_path") else np.zeros_like(arr, bool)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr, m = arr[..., 0], m[..., 0]
        images.append(arr)
        masks.append(m.astype(np.uint8))
        affines.append(np.asarray(img.affine, dtype=np.float64))
    if not rows:
        raise PatchError(f"{folder}: manifest.csv lists no patches")
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise PatchError(f"{folder}: patches have different shapes {sorted(shapes)}; one patch size per folder")
    params_path = folder / PARAMS_NAME
    params = json.loads(params_path.read_text(encoding="utf-8")) if params_path.is_file() else {}
    return PatchSet(np.stack(images), np.stack(masks), rows, affines, params)


def load_patches(dirs: Sequence[Path], **extract_kwargs: Any) -> PatchSet:
    """Patches from folders that are either patch folders (patches.json) or ingest folders.

    Patch folders are read as written; ingest folders are extracted with `extract_kwargs`.
    """
    sets = []
    ingest = [d for d in dirs if not (d / PARAMS_NAME).is_file()]
    sets += [read_patch_folder(d, synthetic=False) for d in dirs if (d / PARAMS_NAME).is_file()]
    if ingest:
        sets.append(extract_patches(ingest, **extract_kwargs))
    if len({s.images.shape[1:] for s in sets}) > 1:
        raise PatchError(f"patch folders and ingest folders give different patch shapes: {[s.images.shape[1:] for s in sets]}")
    return PatchSet(
        np.concatenate([s.images for s in sets]),
        np.concatenate([s.masks for s in sets]),
        [r for s in sets for r in s.rows],
        [a for s in sets for a in s.affines],
        sets[0].params,
        [k for s in sets for k in s.skipped],
    )


def to_train_data(patch_set: PatchSet, modality: str | None = None, splits: Sequence[str] = ("train",)) -> Any:
    """The tumor GAN's training data (models.train_tumor_gan.TumorPatchData) from a PatchSet.

    Keeps patches of `splits` (subjects with no split are used only when no patch has one of
    `splits`, with a warning) and of one `modality` (default: the one with most patches).
    Classes are sorted by name; `train_subjects` lists the subject pseudonyms used.
    """
    import torch

    from models.train_tumor_gan import TumorPatchData

    keep = [i for i, r in enumerate(patch_set.rows) if r.get("split", "") in splits]
    if not keep:
        keep = [i for i, r in enumerate(patch_set.rows) if not r.get("split")]
        if keep:
            log.warning("no patch is from a %s subject; training on %d patches of subjects without a split", "/".join(splits), len(keep))
    if not keep:
        raise PatchError(f"no patches from {'/'.join(splits)} subjects to train on (found splits {sorted({r.get('split', '') for r in patch_set.rows})})")
    by_modality = Counter(patch_set.rows[i]["modality"] for i in keep)
    if modality is None:
        modality = sorted(by_modality.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        if len(by_modality) > 1:
            log.warning("patches of %s found; training on %s (pass a modality to choose)", dict(sorted(by_modality.items())), modality)
    elif modality not in by_modality:
        raise PatchError(f"no {modality} training patches; the data holds {dict(sorted(by_modality.items()))}")
    keep = [i for i in keep if patch_set.rows[i]["modality"] == modality]
    rows = [patch_set.rows[i] for i in keep]
    classes = sorted({r["class"] for r in rows})
    if len(classes) == 1:
        # a class-conditional GAN with one class learns no class differences; its class label is a constant
        log.warning("only one class (%s) among %d training patches: the tumor GAN cannot learn class differences; "
                    "add volumes of other classes (or healthy patches, --healthy-per-volume)", classes[0], len(rows))
    index = {c: k for k, c in enumerate(classes)}
    spacing_text = Counter(r.get("spacing", "") for r in rows).most_common(1)[0][0]
    try:
        spacing = tuple(float(v) for v in spacing_text.split("x"))
    except ValueError:
        spacing = (1.0, 1.0, 1.0)
    if len(spacing) != 3:
        spacing = (1.0, 1.0, 1.0)
    norm = patch_set.params.get("normalisation", {}).get(modality, {})
    normalisation: dict[str, Any] = {"modality": modality, "intensity": "[-1, 1]"}
    normalisation |= norm if isinstance(norm, dict) else {"method": norm}
    images = torch.from_numpy(np.ascontiguousarray(patch_set.images[keep], dtype=np.float32)).unsqueeze(1)
    masks = torch.from_numpy(np.ascontiguousarray(patch_set.masks[keep], dtype=np.float32)).unsqueeze(1)
    labels = torch.tensor([index[r["class"]] for r in rows], dtype=torch.long)
    return TumorPatchData(
        images, masks, labels, classes, modality, (spacing[0], spacing[1], spacing[2]),
        sorted({r.get("subject_id", "") for r in rows} - {""}), normalisation,
    )
