"""Load a real or synthetic folder into the gate's 2-D images: (N, 1, S, S) float32 in [-1, 1].

A folder is the output of `medaug ingest`, `translate`, `sample-tumors` or
`extract-patches` (read through its manifest.csv: path, class, modality, split, ...), or a
plain folder of NIfTI (.nii, .nii.gz) or .npy files. 3-D volumes are scored as axial
slices: each volume is normalised per modality exactly as the generators see it
(pipeline.preprocess: CT through an HU window, MR through its foreground percentiles),
only slices with enough body are kept, and they are fitted into gate_size x gate_size with
the CycleGAN's own geometry (pipeline.slices.volume_to_slices). Files whose values already
lie in [-1, 1] (patch folders and sample-tumors output, 2-D (s, s) / (s, s, 1) or 3-D
cubes) are taken as they are: every slice scored, no resizing when all share one square
size. A 2-D patch in scanner units is normalised like a volume.

Each slice remembers its item (file), which is also its group: neighbours and pairs in the
metrics are taken across items only.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from isal import igzip
from numpy.typing import NDArray

from pipeline.errors import DatasetError
from pipeline.gate.config import GateConfig
from pipeline.manifest import MANIFEST_NAME, manifest_sha256, read_manifest, sha256_file
from pipeline.preprocess import body_mask, foreground_fraction, to_unit
from pipeline.slices import volume_to_slices
from pipeline.types import Modality

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".npy")
"""Files a plain folder may hold."""

UNIT_TOL = 1.001
"""A file whose values all lie within +-UNIT_TOL is already normalised to [-1, 1] (a patch)."""

CT_GUESS_HU = -500.0
"""A volume whose 1st percentile is below this is CT (air at -1000 HU); MR air is near 0."""

Role = Literal["real", "synthetic"]


@dataclass
class GateItem:
    """One file of a folder: its manifest path (relative to the folder), sha256, class and modality.

    `label_sha256` is the sha256 of its mask's bytes (a synthetic item with a label_path; "" else):
    the gate report binds the mask to the image so that a mask swapped after gating is refused.

    `kind` is "volume" (scored as axial slices) or "patch" (one 2-D image). `skipped` says
    why no slice of it is scored ("" when some are).
    """

    path: str
    abs_path: Path
    sha256: str
    klass: str
    modality: str
    kind: str
    row: dict[str, str]
    skipped: str = ""
    label_sha256: str = ""


@dataclass
class GateSet:
    """The scored images of one folder and where each came from.

    images (N, 1, S, S) float32 in [-1, 1]; item_of (N,) index into `items` (the group);
    slice_of (N,) axial slice index in its volume (0 for patches); classes (N,).
    """

    folder: Path
    items: list[GateItem]
    images: torch.Tensor
    item_of: NDArray[np.int64]
    slice_of: NDArray[np.int64]
    columns: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        """Class name of each slice (its item's class; "" when unlabelled)."""
        return [self.items[i].klass for i in self.item_of]

    @property
    def modalities(self) -> list[str]:
        """Sorted modalities of the items with scored slices."""
        return sorted({self.items[i].modality for i in set(self.item_of.tolist())})

    def content_sha256(self) -> str:
        """sha256 over the sorted sha256s of the items: names the input by content, not by path."""
        h = hashlib.sha256()
        for s in sorted(it.sha256 for it in self.items):
            h.update(s.encode())
        return h.hexdigest()

    def subset(self, keep: NDArray[np.int64]) -> GateSet:
        """The same set restricted to slices `keep` (indices into the N slices)."""
        k = torch.as_tensor(np.asarray(keep, np.int64))
        return GateSet(self.folder, self.items, self.images[k], self.item_of[keep], self.slice_of[keep], self.columns)


def capped_indices(n: int, cap: int, seed: list[int]) -> NDArray[np.int64]:
    """Sorted indices of a seeded random subset of at most `cap` of n slices (all when n <= cap).

    >>> capped_indices(5, 10, [0]).tolist()
    [0, 1, 2, 3, 4]
    """
    if n <= cap:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False)).astype(np.int64)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images (N, 1, H, W) -> (N, 1, size, size), bilinear with anti-aliasing when shrinking."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                        antialias=size < max(images.shape[-2:]))
    return out.clamp(-1.0, 1.0)


def _rows(folder: Path) -> tuple[list[dict[str, str]], list[str]]:
    if not folder.is_dir():
        raise DatasetError(f"gate input {folder} is not a folder; pass an ingest, translate or sample-tumors output folder")
    if (folder / MANIFEST_NAME).is_file():
        rows = read_manifest(folder)
        if rows and "path" not in rows[0]:
            raise DatasetError(f"{folder / MANIFEST_NAME} has no 'path' column; is it a medaug manifest?")
        return rows, list(rows[0].keys()) if rows else ["path"]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(IMAGE_SUFFIXES))
    if not files:
        raise DatasetError(f"{folder} has neither a {MANIFEST_NAME} nor NIfTI/.npy files")
    return [{"path": p.relative_to(folder).as_posix()} for p in files], ["path"]


def _decode(data: bytes, name: str) -> NDArray[np.float32]:
    """The array in the bytes of a .npy, .nii or .nii.gz file (NIfTI turned to RAS+, nibabel's closest canonical)."""
    if name.endswith(".npy"):
        return np.asarray(np.load(io.BytesIO(data), allow_pickle=False), dtype=np.float32)
    raw = igzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    # NIfTI-1's header says 348 (either byte order) in its first 4 bytes; anything else is tried as NIfTI-2
    klass = nib.Nifti1Image if int.from_bytes(raw[:4], "little") in (348, 348 << 24) else nib.Nifti2Image
    return np.asarray(nib.as_closest_canonical(klass.from_bytes(raw)).dataobj, dtype=np.float32)


def squeeze_trailing(arr: NDArray[Any]) -> NDArray[Any]:
    """`arr` without trailing axes of length 1 beyond the second: a patch stored (s, s, 1) is (s, s).

    >>> squeeze_trailing(np.zeros((4, 4, 1, 1))).shape, squeeze_trailing(np.zeros((4, 4, 3))).shape
    ((4, 4), (4, 4, 3))
    """
    while arr.ndim > 2 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def _read_item(path: Path) -> tuple[NDArray[np.float32], str]:
    """A file's array and the sha256 of its bytes, both from one read.

    The bytes are read once, hashed, and decoded from the same buffer: a file replaced while
    the gate reads it cannot be judged on some bytes and bound (by its sha256) to others.
    Raises DatasetError for a file that cannot be decoded, is not 2-D/3-D, or holds NaN/inf.
    """
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    try:
        arr = _decode(data, path.name)
    except Exception as exc:  # numpy, nibabel and gzip raise several types for a bad file
        raise DatasetError(f"{path.name}: not a readable NIfTI or .npy file ({type(exc).__name__}); fix or leave it out") from None
    arr = squeeze_trailing(arr)
    if arr.ndim not in (2, 3):
        raise DatasetError(f"{path.name}: expected a 2-D patch or a 3-D volume, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DatasetError(f"{path.name}: holds NaN or infinite values")
    return arr, sha


def _label_sha256(folder: Path, row: dict[str, str]) -> str:
    """sha256 of the bytes of a synthetic row's mask (label_path), "" when it has none.

    Raises DatasetError when the mask is missing, or its bytes differ from the sha256 the
    manifest records for it (label_sha256): the mask changed after its generator wrote it.
    """
    rel = (row.get("label_path") or "").strip()
    if not rel:
        return ""
    path = folder / rel
    if not path.is_file():
        raise DatasetError(f"{folder.name}/{MANIFEST_NAME} lists the mask {rel} but the file is missing")
    sha = sha256_file(path)
    claimed = manifest_sha256(row, "label_sha256")
    if claimed and claimed != sha:
        raise DatasetError(f"{folder.name}: mask {rel} changed since its manifest was written (sha256 {sha[:12]}, the "
                           f"manifest says {claimed[:12]}); run the stage that wrote it again")
    return sha


def _modality(row: dict[str, str], raw: NDArray[np.float32], cfg: GateConfig) -> Modality:
    value = ((row.get("modality") or "").strip() or cfg.modality).upper()
    match value:
        case "CT":
            return "CT"
        case "MR" | "MRI":
            return "MR"
        case "AUTO":
            return "CT" if float(np.percentile(raw, 1.0)) < CT_GUESS_HU else "MR"
        case _:
            raise DatasetError(f"{row['path']}: modality {value!r} is not one of CT, MR (manifest column modality)")


def _normalise(raw: NDArray[np.float32], modality: Modality, cfg: GateConfig) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Volume (x, y, z) -> values in [-1, 1] and its body mask, as pipeline.slices does."""
    mask = body_mask(raw, modality)
    return to_unit(raw, modality, cfg.hu_window, cfg.mr_percentiles, mask)[0], mask


def _select_rows(rows: list[dict[str, str]], folder: Path, cfg: GateConfig, role: Role,
                 modalities: set[str] | None) -> list[dict[str, str]]:
    """The manifest rows a set is read from (see load_gate_set); DatasetError when none is left."""
    if role == "real" and cfg.real_split and rows and "split" in rows[0]:
        picked = [r for r in rows if (r.get("split") or "").strip() in ("", cfg.real_split)]
        if picked:
            rows = picked
        else:
            log.warning("real folder %s has no rows of split %r; all %d rows are the reference", folder.name, cfg.real_split, len(rows))
    if role == "real" and modalities and rows and "modality" in rows[0]:
        picked = [r for r in rows if (r.get("modality") or "").strip().upper() in modalities]
        if picked:
            rows = picked
    if role == "synthetic" and rows and "synthetic" in rows[0]:
        rows = [r for r in rows if (r.get("synthetic") or "1").strip() not in ("0", "false", "False")]
    if not rows:
        raise DatasetError(f"{folder} lists no usable {role} items")
    return rows


def _scored_slices(raw: NDArray[np.float32], item: GateItem, cfg: GateConfig) -> tuple[torch.Tensor, NDArray[np.int64]]:
    """The slices of one item that are scored, (S, 1, H, W) in [-1, 1], and their indices along z.

    An array already in [-1, 1] (patch folders, sample-tumors) is taken as it is, every slice
    (item.kind becomes "patch"); a 2-D patch in HU or MR units is normalised
    (pipeline.preprocess.to_unit); a volume is normalised and keeps its axial slices with at
    least cfg.min_foreground body, resized to gate_size (none: item.skipped says why).
    """
    if float(np.abs(raw).max()) <= UNIT_TOL:
        item.kind = "patch"
        unit = np.clip(raw, -1.0, 1.0)
        stack = torch.as_tensor(unit[..., None] if unit.ndim == 2 else unit, dtype=torch.float32).permute(2, 0, 1)[:, None]
        return stack, np.arange(stack.shape[0], dtype=np.int64)
    if raw.ndim == 2:
        unit = _normalise(raw[..., None], item.modality, cfg)[0][..., 0]  # type: ignore[arg-type]
        return torch.as_tensor(unit, dtype=torch.float32)[None, None], np.array([0], np.int64)
    unit, mask = _normalise(raw, item.modality, cfg)  # type: ignore[arg-type]
    keep = np.flatnonzero(foreground_fraction(mask) >= cfg.min_foreground)
    if len(keep) == 0:
        item.skipped = f"no axial slice has {cfg.min_foreground:.0%} body or more"
        return torch.empty(0, 1, cfg.gate_size, cfg.gate_size), keep.astype(np.int64)
    # a plain tensor, not MONAI's MetaTensor: the metrics need no metadata
    return volume_to_slices(unit[..., keep], cfg.gate_size)[:, :1].as_subclass(torch.Tensor), keep.astype(np.int64)


def load_gate_set(folder: Path, cfg: GateConfig, role: Role, modalities: set[str] | None = None, cap: bool = True) -> GateSet:
    """Read `folder` into a GateSet of scored slices (see the module doc).

    role "real" keeps rows of `cfg.real_split` (and rows with an empty split) and, when
    `modalities` is given and some rows match it, only rows of those modalities (the
    synthetic set's). With `cap`, at most `cfg.max_slices` slices are kept (seeded subset);
    run_gate loads the synthetic set uncapped so that every item gets a per-sample decision.
    Each file is read once: its sha256 is that of the bytes decoded (never the manifest's claim).
    Raises DatasetError for unreadable folders or files.
    """
    rows, columns = _rows(folder)
    rows = _select_rows(rows, folder, cfg, role, modalities)
    items: list[GateItem] = []
    stacks: list[torch.Tensor] = []
    item_of: list[NDArray[np.int64]] = []
    slice_of: list[NDArray[np.int64]] = []
    patch_sizes: set[tuple[int, int]] = set()
    for row in rows:
        rel = row["path"]
        path = folder / rel
        if not path.is_file():
            raise DatasetError(f"{folder.name}/{MANIFEST_NAME} lists {rel} but the file is missing")
        # the sha256 of the bytes decoded here (one read), never a manifest's claim: build-dataset ships exactly these bytes
        raw, sha = _read_item(path)
        item = GateItem(rel, path, sha,
                        (row.get("class") or "").strip(), _modality(row, raw, cfg), "patch" if raw.ndim == 2 else "volume", dict(row),
                        label_sha256=_label_sha256(folder, row) if role == "synthetic" else "")
        items.append(item)
        stack, slices = _scored_slices(raw, item, cfg)
        if item.skipped:
            continue
        if item.kind == "patch":
            patch_sizes.add((int(stack.shape[-2]), int(stack.shape[-1])))
        stacks.append(stack)
        item_of.append(np.full(len(slices), len(items) - 1, np.int64))
        slice_of.append(slices)

    if not stacks:
        raise DatasetError(f"{folder}: no {role} item has a scored slice (all near-empty)")
    # patches of one common square size keep it; anything else goes to gate_size
    native = next(iter(patch_sizes)) if len(patch_sizes) == 1 else None
    size = native[0] if native and native[0] == native[1] and all(s.shape[-1] == native[0] for s in stacks) else cfg.gate_size
    images = torch.cat([resize_images(s, size) for s in stacks])
    out = GateSet(folder, items, images, np.concatenate(item_of), np.concatenate(slice_of), columns)
    if cap and len(out.item_of) > cfg.max_slices:
        out = out.subset(capped_indices(len(out.item_of), cfg.max_slices, [cfg.seed, 0 if role == "real" else 1]))
    log.info("gate %s: %d items, %d scored slices of %dx%d", role, len(items), len(out.item_of), size, size)
    return out
