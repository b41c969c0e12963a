"""Translate whole volumes MRI->CT or CT->MRI with a trained CycleGAN generator.

The inference side of the CycleGAN (the training side is models/train_cyclegan.py).
`translate_volume` cuts a volume into the same (optionally 2.5-D) axial slices the
generator was trained on (pipeline.slices), runs them in batches, undoes the
normalisation and returns a volume of the source's shape: CT output in HU, MR output on
the documented scale `MR_OUTPUT_LANDMARKS` (network -1 -> 0, +1 -> 1000, i.e. the source
MR's 0.5th foreground percentile at 0 and its 99.5th at 1000; an MRI has no absolute
scale to return to). `run_translate` does this for an ingest folder or NIfTI files and
writes a synthetic-data folder: out/volumes/<name>.nii.gz with exactly the source's
affine and shape and the NIfTI descrip "medaug synthetic", a sidecar JSON per volume with
provenance (checkpoint sha256, direction, config, seed, source sha256; never a source
file name), the source's tumour mask copied to out/labels/ (a translation keeps the
anatomy, so it inherits label and class), and out/manifest.csv with synthetic=1.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from numpy.typing import NDArray

from pipeline.errors import CheckpointError, DatasetError, InputRejected, OutputWriteError
from pipeline.manifest import (
    MANIFEST_NAME,
    manifest_sha256,
    read_manifest,
    save_nifti,
    sha256_file,
    write_manifest,
)
from pipeline.outputs import atomic_file
from pipeline.preprocess import (
    DEFAULT_HU_WINDOW,
    DEFAULT_MR_PERCENTILES,
    direction_modalities,
    to_unit,
    unit_to_ct,
    unit_to_mr,
)
from pipeline.slices import slices_to_volume, split_matches, volume_as_3d, volume_to_slices
from pipeline.types import Direction, HUWindow, Modality

log = logging.getLogger(__name__)


MR_OUTPUT_LANDMARKS: tuple[float, float] = (0.0, 1000.0)
"""Scale of translated MR: network output -1 -> 0 and +1 -> 1000 (T1-like arbitrary units)."""

SYNTHETIC_DESCRIP = "medaug synthetic"
"""NIfTI header `descrip` of every volume medaug generates."""

TRANSLATE_COLUMNS = (
    "path", "label_path", "subject_id", "modality", "shape", "spacing", "sha256", "class", "split",
    "synthetic", "source_sha256", "checkpoint_sha256", "direction", "seed", "label_sha256",
)
"""Columns of a translate output folder's manifest.csv."""


@dataclass(frozen=True)
class TranslationSettings:
    """How a generator was trained, read from its model card: what translation must repeat.

    hu_window: (low, high) HU mapped to [-1, 1]; mr_percentiles: MR foreground
    percentiles mapped to -1 and +1; image_size: network input side in pixels;
    context: 2.5-D neighbours each side (channels = 2*context+1).
    """

    hu_window: HUWindow = DEFAULT_HU_WINDOW
    mr_percentiles: tuple[float, float] = DEFAULT_MR_PERCENTILES
    image_size: int = 64
    context: int = 0

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> TranslationSettings:
        """Read the settings from a model card (top level, or its `meta`/`data`/`config` parts)."""

        def get(key: str, default: Any) -> Any:
            for part in (card, card.get("meta"), card.get("data"), card.get("config")):
                if isinstance(part, dict) and part.get(key) is not None:
                    return part[key]
            return default

        hu = get("hu_window", DEFAULT_HU_WINDOW)
        pct = get("mr_percentiles", DEFAULT_MR_PERCENTILES)
        return cls(
            hu_window=(float(hu[0]), float(hu[1])),
            mr_percentiles=(float(pct[0]), float(pct[1])),
            image_size=int(get("image_size", cls.image_size)),
            context=int(get("context", (int(get("in_channels", 1)) - 1) // 2)),
        )


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available else cpu; otherwise torch.device(device).

    >>> resolve_device("cpu").type
    'cpu'
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be one of auto, cpu, cuda; got {device!r}")
    return torch.device(device)


@torch.inference_mode()
def translate_unit(
    generator: Callable[[torch.Tensor], torch.Tensor],
    unit_volume: NDArray[np.floating],
    settings: TranslationSettings,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> NDArray[np.float32]:
    """Translate a normalised (x, y, z) volume in [-1, 1]; returns (x, y, z) in [-1, 1].

    Slices go through the generator `batch_size` at a time; a 2.5-D generator's
    output keeps its centre channel.
    """
    dev = torch.device(device) if isinstance(device, str) else device
    if isinstance(generator, torch.nn.Module):
        generator.eval()
    inputs = volume_to_slices(unit_volume, settings.image_size, settings.context)
    outputs = []
    for start in range(0, inputs.shape[0], max(1, batch_size)):
        batch = inputs[start : start + batch_size].to(dev)
        out = generator(batch).float()
        if out.ndim != 4 or out.shape[0] != batch.shape[0]:
            raise ValueError(f"generator returned shape {tuple(out.shape)} for input {tuple(batch.shape)}")
        outputs.append(out[:, out.shape[1] // 2].clamp(-1.0, 1.0).cpu())
    return slices_to_volume(torch.cat(outputs), unit_volume.shape)


def translate_volume(
    generator: Callable[[torch.Tensor], torch.Tensor],
    volume: NDArray[np.floating],
    direction: Direction,
    settings: TranslationSettings | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> NDArray[np.float32]:
    """Translate a (x, y, z) RAS+ volume in source units; returns the target volume, same shape.

    mri2ct: MR in any units -> CT in HU (within the card's HU window). ct2mri: CT in HU ->
    MR on the `MR_OUTPUT_LANDMARKS` scale (0..1000). `settings` default to
    TranslationSettings() (64-pixel 2-D slices, HU window -1000..1000).
    """
    settings = settings or TranslationSettings()
    vol = volume_as_3d(np.asarray(volume, dtype=np.float32))
    source, _ = direction_modalities(direction)
    unit = to_unit(vol, source, settings.hu_window, settings.mr_percentiles)[0]
    out = translate_unit(generator, unit, settings, batch_size, device)
    match direction:
        case "mri2ct":
            return unit_to_ct(out, settings.hu_window)
        case "ct2mri":
            return unit_to_mr(out, MR_OUTPUT_LANDMARKS)
    raise AssertionError("unreachable")


# --- files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceVolume:
    """One volume to translate: its file, optional tumour mask, and manifest fields.

    `sha256` is the manifest's hash of the file (64 lower-case hex digits), empty for a file
    with no manifest or a manifest whose sha256 is not one ("n/a", "../x": it names output
    files, so it is checked): the hash travels with the item so the file is not read again.
    """

    path: Path
    label_path: Path | None = None
    subject_id: str = ""
    tumor_class: str = ""
    split: str = ""
    sha256: str = ""


def find_sources(src: Path, modality: Modality, split: str | None = None) -> list[SourceVolume]:
    """The volumes of `modality` in an ingest folder (by its manifest) or NIfTI file(s).

    An ingest folder gives its rows of that modality (of `split` when given; an empty
    split counts as train) with their label, subject and class. A NIfTI file, or a folder
    of them (searched recursively), is taken as `modality` as it is, with no label.
    """
    src = Path(src)
    if src.is_dir() and (src / MANIFEST_NAME).is_file():
        out = []
        for row in read_manifest(src):
            if row.get("modality", "").strip().upper() != modality:
                continue
            if split is not None and not split_matches(row.get("split", ""), split):
                continue
            label = row.get("label_path", "").strip()
            if not (src / row["path"]).is_file():
                raise DatasetError(f"{src / MANIFEST_NAME} lists {row['path']} but the file is missing; run `medaug ingest` again")
            out.append(SourceVolume(src / row["path"], src / label if label else None,
                                    row.get("subject_id", ""), row.get("class", ""), row.get("split", ""),
                                    manifest_sha256(row)))
        if not out:
            raise DatasetError(f"{src / MANIFEST_NAME} lists no {modality} volume" + (f" in split {split!r}" if split else ""))
        return out
    if src.is_file() and _is_nifti(src):
        return [SourceVolume(src)]
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and _is_nifti(p))
        if not files:
            raise DatasetError(f"{src} holds neither a {MANIFEST_NAME} nor any .nii/.nii.gz file")
        return [SourceVolume(p) for p in files]
    raise DatasetError(f"{src} is not an ingest folder, a NIfTI file or a folder of NIfTI files")


def _is_nifti(p: Path) -> bool:
    return p.name.endswith((".nii", ".nii.gz"))


def write_like(data: NDArray[np.floating], reference: nib.Nifti1Image, path: Path) -> str:
    """Write float32 `data` (in `reference`'s array axes) with exactly its shape, affine, qform and sform;
    return the sha256 of the file's bytes (hashed as they are written: the file is not read back).

    The header's descrip becomes "medaug synthetic" so any viewer shows it is generated;
    its free-text fields (aux_file, db_name) and header extensions are emptied.
    """
    arr = np.asarray(data, dtype=np.float32).reshape(reference.shape)
    header = reference.header.copy()
    header.set_data_dtype(np.float32)
    img = nib.Nifti1Image(arr, reference.affine, header=header)
    img.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]))
    img.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]))
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = SYNTHETIC_DESCRIP.encode()
    # free-text fields and extensions of a user's NIfTI may carry identifiers: never copy them
    img.header["aux_file"] = b""
    img.header["db_name"] = b""
    img.header.extensions.clear()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_nifti(img, path)


def translate_image(
    generator: Callable[[torch.Tensor], torch.Tensor],
    img: nib.Nifti1Image,
    direction: Direction,
    settings: TranslationSettings,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> NDArray[np.float32]:
    """Translate a NIfTI image in any orientation; returns data in the image's own array axes.

    The volume is turned to RAS+ (the orientation of training), translated, and turned back.
    """
    if len(img.shape) not in (3, 4) or (len(img.shape) == 4 and img.shape[3] != 1):
        raise InputRejected(f"a volume of shape {img.shape} is not 3-D; translate takes one 3-D volume per file")
    data = volume_as_3d(np.asarray(img.dataobj, dtype=np.float32))
    if not np.isfinite(data).all():
        raise InputRejected(f"holds {int((~np.isfinite(data)).sum())} NaN or infinite voxels; fix or leave out this volume")
    own = io_orientation(img.affine)
    ras = axcodes2ornt(("R", "A", "S"))
    data_ras = apply_orientation(data, ornt_transform(own, ras))
    out_ras = translate_volume(generator, data_ras, direction, settings, batch_size, device)
    return np.asarray(apply_orientation(out_ras, ornt_transform(ras, own)), dtype=np.float32)


def run_translate(
    checkpoint: Path,
    direction: Direction,
    src: Path,
    out: Path,
    batch_size: int = 16,
    device: str = "auto",
    split: str | None = None,
    use_ema: bool = True,
) -> list[dict[str, Any]]:
    """Translate every source-modality volume of `src` with a checkpoint; write a synthetic folder.

    Args:
        checkpoint: a CycleGAN checkpoint (models.train_cyclegan), with both generators.
        direction: "mri2ct" (MR sources -> CT in HU) or "ct2mri" (CT sources -> MR, 0..1000).
        src: an ingest folder, a NIfTI file or a folder of NIfTI files (taken as the source modality).
        out: output folder: volumes/, labels/, manifest.csv.
        batch_size: slices per forward pass.
        device: auto, cpu or cuda.
        split: only this split of an ingest folder (default: all rows).
        use_ema: use the generator's EMA weights when the checkpoint has them.

    Returns:
        The manifest rows written (columns TRANSLATE_COLUMNS).
    """
    from models.checkpoint import CheckpointError as _CheckpointError
    from models.train_cyclegan import load_generator

    source_mod, target_mod = direction_modalities(direction)
    sources = find_sources(src, source_mod, split)
    dev = resolve_device(device)
    try:
        generator, card = load_generator(Path(checkpoint), direction, use_ema=use_ema, device=str(dev))
    except _CheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    settings = TranslationSettings.from_card(card)
    ckpt_sha = sha256_file(Path(checkpoint))
    seed = (card.get("config") or {}).get("seed", _card_value(card, "seed", ""))
    train_subjects = set(_card_value(card, "train_subjects", []) or [])
    provenance = {
        "checkpoint_sha256": ckpt_sha,
        "direction": direction,
        "seed": seed,
        "config": _card_value(card, "config", {}),
        "config_hash": _card_value(card, "config_hash", ""),
        "use_ema": use_ema,
        "settings": {"hu_window": list(settings.hu_window), "mr_percentiles": list(settings.mr_percentiles),
                     "image_size": settings.image_size, "context": settings.context},
    }
    out = Path(out)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, source in enumerate(sources):
        src_sha = source.sha256 or sha256_file(source.path)
        try:
            img: Any = nib.load(str(source.path))
            data = translate_image(generator, img, direction, settings, batch_size, dev)
        except (InputRejected, nib.filebasedimages.ImageFileError) as exc:
            # the message names the volume by its hash, never by a file name
            raise InputRejected(f"source volume {i + 1} of {len(sources)} (sha256 {src_sha[:12]}): {exc}") from None
        name = f"syn_{src_sha[:16]}_{target_mod}"
        vol_path = out / "volumes" / f"{name}.nii.gz"
        label_rel = f"labels/{name}.nii.gz" if source.label_path is not None and source.label_path.is_file() else ""
        try:
            vol_sha, label_sha = _write_outputs(data, img, vol_path, source.label_path if label_rel else None, out / label_rel)
        except OSError as exc:
            raise _write_failed(out, exc, i, len(sources)) from None
        zooms = img.header.get_zooms()[:3]
        row = {
            "path": f"volumes/{name}.nii.gz",
            "label_path": label_rel,
            "subject_id": source.subject_id,
            "modality": target_mod,
            "shape": "x".join(str(int(s)) for s in img.shape[:3]),
            "spacing": "x".join(f"{float(s):g}" for s in zooms),
            "sha256": vol_sha,
            "class": source.tumor_class,
            "split": source.split,
            "synthetic": 1,
            "source_sha256": src_sha,
            "checkpoint_sha256": ckpt_sha,
            "direction": direction,
            "seed": seed,
            "label_sha256": label_sha,
        }
        sidecar = {
            "synthetic": True,
            "generator": "cyclegan",
            **provenance,
            "source_sha256": src_sha,
            "source_modality": source_mod,
            "modality": target_mod,
            "units": "HU" if target_mod == "CT" else f"MR, network [-1, 1] mapped to {list(MR_OUTPUT_LANDMARKS)}",
            "subject_id": source.subject_id,
            "source_in_generator_training": source.subject_id in train_subjects if source.subject_id else None,
            "label_inherited": bool(label_rel),
            "class": source.tumor_class,
            "split": source.split,
            "sha256": row["sha256"],
        }
        try:
            with atomic_file(out / "volumes" / f"{name}.json") as tmp:
                tmp.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        except OSError as exc:
            raise _write_failed(out, exc, i, len(sources)) from None
        rows.append(row)
        log.info("translated volume %d of %d (%s -> %s)", i + 1, len(sources), source_mod, target_mod)
    try:
        write_manifest(out, sorted(rows, key=lambda r: str(r["path"])), TRANSLATE_COLUMNS)
    except OSError as exc:
        (out / f".{MANIFEST_NAME}.tmp").unlink(missing_ok=True)
        raise _write_failed(out, exc, len(sources), len(sources)) from None
    return rows


def _write_outputs(data: NDArray[np.float32], img: Any, vol_path: Path, label_src: Path | None,
                   label_dst: Path) -> tuple[str, str]:
    """Write a translated volume and copy its label, each to a temp file renamed into place.

    Returns the sha256s of the volume's and the label's bytes ("" without a label), each from
    the one pass that wrote it: the volume's as its bytes go to disk, the label's from the
    buffer read once and written. Both go into the manifest (sha256, label_sha256); the gate
    judges the mask with the volume, and build-dataset ships only that mask.
    """
    with atomic_file(vol_path) as tmp:
        vol_sha = write_like(data, img, tmp)
    if label_src is None:
        return vol_sha, ""
    label = label_src.read_bytes()
    label_dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(label_dst) as tmp:
        tmp.write_bytes(label)
    return vol_sha, hashlib.sha256(label).hexdigest()


def _write_failed(out: Path, exc: OSError, i: int, n: int) -> OutputWriteError:
    """One line for a failed write: the folder, the system's reason, how far it got, what to do."""
    return OutputWriteError(
        f"writing to {out} failed after {i} of {n} volumes ({exc.strerror or type(exc).__name__}); no half-written "
        "file is left: check free space and permissions, then run translate again"
    )


def _card_value(card: dict[str, Any], key: str, default: Any) -> Any:
    for part in (card, card.get("meta"), card.get("data")):
        if isinstance(part, dict) and key in part:
            return part[key]
    return default

