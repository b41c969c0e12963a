"""Unpaired MRI and CT slices for the CycleGAN, read from ingest folders.

Reads the ingest manifest(s), tells MRI from CT by the manifest's `modality`, keeps the
rows of one split (rows with an empty split count as train), normalises each volume to
[-1, 1] (pipeline.preprocess: CT by an HU window, MR by its foreground percentiles),
keeps the axial slices with enough body in them, and fits each slice into a square
image_size x image_size (symmetric pad with -1, i.e. air, then MONAI Resize). With
`context` > 0 a sample is 2.5-D: the 2*context+1 neighbouring slices as channels, the
centre slice in the middle channel (edge slices repeat). The result is a
models.train_cyclegan.UnpairedData: side a = MRI, side b = CT, and `meta`, which the
trainer stores in the checkpoint and the generator's model card so translation can undo
the normalisation and the gate can check that no test subject was trained on.

`volume_to_slices` / `slices_to_volume` are the same geometry both ways and are what
pipeline.translate uses, so training and inference see identical inputs.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Resize, SpatialCrop, SpatialPad
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, model_validator
from torch.utils.data import Dataset

from pipeline.errors import DatasetError
from pipeline.manifest import MANIFEST_NAME, read_manifest
from pipeline.preprocess import (
    DEFAULT_HU_WINDOW,
    DEFAULT_MR_PERCENTILES,
    body_mask,
    foreground_fraction,
    to_unit,
)
from pipeline.structure import held_out_batches, structure_scores
from pipeline.types import HUWindow, Modality

if TYPE_CHECKING:
    from models.train_cyclegan import UnpairedData

log = logging.getLogger(__name__)

SIDE_MODALITY: dict[str, Modality] = {"a": "MR", "b": "CT"}
"""Which modality each CycleGAN side holds: a = MRI, b = CT (so G_ab is MRI->CT)."""


# --- slice geometry, shared with pipeline.translate ---------------------------------------


def volume_to_slices(unit_volume: NDArray[np.floating], image_size: int, context: int = 0) -> torch.Tensor:
    """A normalised (x, y, z) volume -> network inputs (z, 2*context+1, image_size, image_size).

    Each axial slice is padded to a square with -1 (air) symmetrically, then resized with
    MONAI Resize (bilinear, anti-aliased when shrinking). Channel `context` is the slice
    itself, the others its neighbours (clamped at the volume's ends).

    >>> volume_to_slices(np.zeros((6, 4, 3)), 8, context=1).shape
    torch.Size([3, 3, 8, 8])
    """
    vol = torch.as_tensor(np.asarray(volume_as_3d(unit_volume), dtype=np.float32))
    x, y, z = vol.shape
    side = max(x, y)
    # (z, x, y): slices as channels, so one Resize call does the whole volume
    stack = vol.permute(2, 0, 1)
    stack = SpatialPad((side, side), method="symmetric", mode="constant", value=-1.0)(stack)
    if side != image_size:
        stack = Resize((image_size, image_size), mode="bilinear", anti_aliasing=image_size < side)(stack)
    # a plain tensor: MONAI's MetaTensor would track metadata through every network op
    stack = torch.as_tensor(stack).as_subclass(torch.Tensor).float().clamp(-1.0, 1.0)
    idx = torch.arange(z)[:, None] + torch.arange(-context, context + 1)[None, :]
    return stack[idx.clamp(0, z - 1)].contiguous()


def slices_to_volume(slices: torch.Tensor | NDArray[np.floating], shape: Sequence[int]) -> NDArray[np.float32]:
    """Network outputs (z, image_size, image_size) -> a (x, y, z) volume of in-plane `shape`.

    The inverse geometry of `volume_to_slices`: resize to the padded square, crop the pad.

    >>> v = np.random.default_rng(0).uniform(-1, 1, (6, 4, 3)).astype(np.float32)
    >>> np.allclose(slices_to_volume(volume_to_slices(v, 6)[:, 0], v.shape), v)
    True
    """
    t = torch.as_tensor(np.asarray(slices, dtype=np.float32)) if not isinstance(slices, torch.Tensor) else slices
    t = t.detach().float().cpu()
    if t.ndim != 3:
        raise ValueError(f"slices must be (z, H, W), got shape {tuple(t.shape)}")
    x, y = int(shape[0]), int(shape[1])
    side = max(x, y)
    if t.shape[-1] != side or t.shape[-2] != side:
        t = torch.as_tensor(Resize((side, side), mode="bilinear")(t)).as_subclass(torch.Tensor).float()
    # SpatialPad "symmetric" puts the odd pixel after; crop the same way
    start = ((side - x) // 2, (side - y) // 2)
    t = torch.as_tensor(SpatialCrop(roi_start=start, roi_end=(start[0] + x, start[1] + y))(t)).as_subclass(torch.Tensor)
    return t.permute(1, 2, 0).numpy().astype(np.float32)


def volume_as_3d(volume: NDArray[Any]) -> NDArray[Any]:
    """A 3-D view of a volume; a 4-D one with a single frame is squeezed, anything else refused.

    >>> volume_as_3d(np.zeros((2, 3, 4, 1))).shape
    (2, 3, 4)
    """
    arr = np.asarray(volume)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D volume (x, y, z), got shape {arr.shape}")
    return arr


# --- config ------------------------------------------------------------------------------------


class SliceConfig(BaseModel):
    """How slices are cut from ingest volumes for the CycleGAN (YAML section `cyclegan_data:`).

    The network options (image_size, in_channels) live in CycleGANConfig; these are the
    data-side ones.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW
    """CT window (low, high) in HU mapped to [-1, 1]; translated CT comes out inside it. Widen the top for dense bone."""
    mr_percentiles: tuple[float, float] = DEFAULT_MR_PERCENTILES
    """Foreground percentiles of each MR volume mapped to -1 and +1 (robust to scanner gain and outliers)."""
    min_foreground: float = 0.1
    """Keep axial slices with at least this body fraction (0..1); drops empty slices above and below the head."""
    max_slices: int | None = None
    """At most this many slices per modality (seeded random subset); None = all. Bounds memory on large cohorts."""
    seed: int = 0
    """Seed of the `max_slices` subset and of the monitor subjects."""
    monitor_fraction: float = 0.1
    """With no val split in the ingest: share of each modality's train subjects (at least 1) held out of training to
    score structure preservation during training and pick best.pt; the test split is never used for that. 0: none."""

    @model_validator(mode="after")
    def _check(self) -> SliceConfig:
        if not self.hu_window[1] > self.hu_window[0]:
            raise ValueError(f"hu_window must be (low, high) with high > low, got {self.hu_window}")
        if not 0.0 <= self.mr_percentiles[0] < self.mr_percentiles[1] <= 100.0:
            raise ValueError(f"mr_percentiles must be (low, high) in 0..100 with low < high, got {self.mr_percentiles}")
        if not 0.0 <= self.min_foreground < 1.0:
            raise ValueError(f"min_foreground must be in [0, 1), got {self.min_foreground}")
        if not 0.0 <= self.monitor_fraction < 0.5:
            raise ValueError(f"monitor_fraction must be in [0, 0.5), got {self.monitor_fraction}")
        return self


# --- datasets ------------------------------------------------------------------------------


class SliceStack(Dataset[torch.Tensor]):
    """Slices of one modality held in memory: item i is a float tensor (C, H, W) in [-1, 1].

    `foreground` is each slice's body fraction (usable as sampling weights) and `subject`
    the pseudonym it came from.
    """

    def __init__(self, slices: torch.Tensor, foreground: Sequence[float], subject: Sequence[str]) -> None:
        if slices.ndim != 4:
            raise ValueError(f"slices must be (N, C, H, W), got shape {tuple(slices.shape)}")
        if not len(foreground) == len(subject) == slices.shape[0]:
            raise ValueError("foreground and subject need one entry per slice")
        self.slices = slices
        self.foreground = torch.as_tensor(list(foreground), dtype=torch.float64)
        self.subject = list(subject)

    def __len__(self) -> int:
        return int(self.slices.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.slices[i]


@dataclass
class _Side:
    slices: list[torch.Tensor] = field(default_factory=list)
    foreground: list[float] = field(default_factory=list)
    subject: list[str] = field(default_factory=list)
    spacing: list[tuple[float, float, float]] = field(default_factory=list)
    landmarks: list[tuple[float, float]] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    volumes: int = 0


def split_matches(row_split: str, split: str) -> bool:
    """Whether a manifest row's split is the requested one (an empty split counts as train).

    >>> split_matches("", "train"), split_matches("test", "train"), split_matches("test", "test")
    (True, False, True)
    """
    return (row_split.strip() or "train") == split


def manifest_rows(ingest_dir: Path) -> list[dict[str, str]]:
    """The rows of `ingest_dir/manifest.csv`; DatasetError when the folder has none."""
    if not (ingest_dir / MANIFEST_NAME).is_file():
        raise DatasetError(f"{ingest_dir} has no {MANIFEST_NAME}; give an ingest output folder (medaug ingest SRC --out DIR)")
    rows = read_manifest(ingest_dir)
    missing = {"path", "modality", "subject_id", "split"} - set(rows[0] if rows else {"path", "modality", "subject_id", "split"})
    if missing:
        raise DatasetError(f"{ingest_dir / MANIFEST_NAME} lacks the columns {sorted(missing)}; is it an ingest manifest?")
    return rows


def load_unit_volume(
    path: Path,
    modality: Modality,
    hu_window: HUWindow = DEFAULT_HU_WINDOW,
    mr_percentiles: tuple[float, float] = DEFAULT_MR_PERCENTILES,
) -> tuple[NDArray[np.float32], NDArray[np.bool_], dict[str, Any]]:
    """Read a NIfTI volume (reoriented to RAS+), normalise it to [-1, 1] and mask its body.

    Returns the (x, y, z) normalised volume, its body mask and
    `{"spacing": (x, y, z) mm, "mr_landmarks": (lo, hi) for MR}`.
    """
    img = nib.as_closest_canonical(nib.load(str(path)))
    raw = volume_as_3d(np.asarray(img.dataobj, dtype=np.float32))
    mask = body_mask(raw, modality)
    unit, params = to_unit(raw, modality, hu_window, mr_percentiles, mask)
    info: dict[str, Any] = {"spacing": tuple(float(s) for s in img.header.get_zooms()[:3])}
    if "mr_landmarks" in params:
        info["mr_landmarks"] = tuple(params["mr_landmarks"])
    return unit, mask, info


def load_unpaired_slices(
    ingest_dirs: Sequence[Path],
    image_size: int,
    context: int = 0,
    split: str = "train",
    hu_window: HUWindow = DEFAULT_HU_WINDOW,
    min_foreground: float = 0.1,
    seed: int = 0,
    mr_percentiles: tuple[float, float] = DEFAULT_MR_PERCENTILES,
    max_slices: int | None = None,
    only_subjects: Collection[str] | None = None,
    skip_subjects: Collection[str] = (),
) -> UnpairedData:
    """Unpaired MRI (side a) and CT (side b) slices of one split of ingest folder(s).

    Args:
        ingest_dirs: ingest output folders (each with manifest.csv and volumes/).
        image_size: side of the square slices given to the networks, pixels.
        context: 2.5-D context; each sample has 2*context+1 channels (0 = plain 2-D).
        split: manifest split to use ("train", "val", "test"); rows with an empty split are train.
        hu_window: (low, high) HU mapped to [-1, 1] for CT.
        min_foreground: keep slices whose body fraction is at least this (0..1).
        seed: seeds the random subset when `max_slices` caps a side.
        mr_percentiles: foreground percentiles mapped to -1 and +1 for MR.
        max_slices: at most this many slices per side (a seeded random subset), or all.
        only_subjects: keep only volumes of these subject pseudonyms (None: all).
        skip_subjects: leave out volumes of these subjects (the monitor subjects of `plan_monitor`).

    Returns:
        models.train_cyclegan.UnpairedData with `a` (MRI) and `b` (CT) SliceStacks of
        (2*context+1, image_size, image_size) tensors in [-1, 1] and `meta`:
        modality per side, hu_window, mr_percentiles, image_size, context, in-plane
        geometry, median spacing per side (mm), train_subjects (the pseudonyms of every
        volume used), counts and a sha256 over the volumes' sha256s.

    Raises:
        DatasetError: no manifest, or no usable MRI or CT volume in the split.
    """
    from models.train_cyclegan import UnpairedData

    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if not 0.0 <= min_foreground < 1.0:
        raise ValueError(f"min_foreground must be in [0, 1), got {min_foreground}")
    sides = {"a": _Side(), "b": _Side()}
    side_of = {m: s for s, m in SIDE_MODALITY.items()}
    for ingest_dir in ingest_dirs:
        ingest_dir = Path(ingest_dir)
        for row in manifest_rows(ingest_dir):
            modality = row["modality"].strip().upper()
            if modality not in side_of or not split_matches(row.get("split", ""), split):
                continue
            subject = row.get("subject_id", "")
            if subject in skip_subjects or (only_subjects is not None and subject not in only_subjects):
                continue
            side = sides[side_of[modality]]
            unit, mask, info = load_unit_volume(ingest_dir / row["path"], modality, hu_window, mr_percentiles)  # type: ignore[arg-type]
            frac = foreground_fraction(mask)
            keep = np.flatnonzero(frac >= min_foreground)
            if keep.size == 0:
                log.warning("%s: no slice has %.0f%% body; volume skipped", row["path"], 100 * min_foreground)
                continue
            stack = volume_to_slices(unit, image_size, context)[torch.as_tensor(keep)]
            side.slices.append(stack)
            side.foreground.extend(float(f) for f in frac[keep])
            side.subject.extend([row["subject_id"]] * int(keep.size))
            side.spacing.append(info["spacing"])
            if "mr_landmarks" in info:
                side.landmarks.append(info["mr_landmarks"])
            side.sha256.append(row.get("sha256", ""))
            side.volumes += 1
    for key, side in sides.items():
        if not side.slices:
            dirs = ", ".join(str(d) for d in ingest_dirs)
            raise DatasetError(
                f"no usable {SIDE_MODALITY[key]} volume in split {split!r} of {dirs} "
                f"(need manifest rows with modality {SIDE_MODALITY[key]} and at least one slice "
                f"with {min_foreground:.0%} body); the CycleGAN needs both MRI and CT"
            )

    rng = np.random.default_rng(seed)
    stacks: dict[str, SliceStack] = {}
    for key, side in sides.items():
        slices = torch.cat(side.slices)
        idx = np.arange(slices.shape[0])
        if max_slices is not None and slices.shape[0] > max_slices:
            idx = np.sort(rng.choice(slices.shape[0], size=max_slices, replace=False))
        stacks[key] = SliceStack(
            slices[torch.as_tensor(idx)], [side.foreground[i] for i in idx], [side.subject[i] for i in idx]
        )
        log.info("%s: %d slices from %d volumes", SIDE_MODALITY[key], len(stacks[key]), side.volumes)

    all_sha = sorted(s for side in sides.values() for s in side.sha256)
    meta: dict[str, Any] = {
        "modality": dict(SIDE_MODALITY),
        "split": split,
        "hu_window": [float(hu_window[0]), float(hu_window[1])],
        "mr_percentiles": [float(mr_percentiles[0]), float(mr_percentiles[1])],
        "mr_scaling": {
            "method": "per-volume foreground percentiles to [-1, 1] (pipeline.preprocess.mr_to_unit)",
            "percentiles": [float(mr_percentiles[0]), float(mr_percentiles[1])],
        },
        "image_size": int(image_size),
        "context": int(context),
        "in_channels": 2 * int(context) + 1,
        "min_foreground": float(min_foreground),
        "spacing": {SIDE_MODALITY[k]: _median_spacing(s.spacing) for k, s in sides.items()},
        "mr_landmarks_median": [float(v) for v in np.median(np.asarray(sides["a"].landmarks), axis=0)],
        "train_subjects": sorted({s for side in sides.values() for s in side.subject if s}),
        "n_volumes": {SIDE_MODALITY[k]: s.volumes for k, s in sides.items()},
        "n_slices": {SIDE_MODALITY[k]: len(stacks[k]) for k, s in sides.items()},
        "data_sha256": hashlib.sha256("\n".join(all_sha).encode()).hexdigest(),
        "seed": int(seed),
    }
    return UnpairedData(a=stacks["a"], b=stacks["b"], meta=meta)


@dataclass(frozen=True)
class Monitor:
    """The volumes whose structure scores are watched during training and pick best.pt.

    `split` "val": every val volume (`subjects` None). `split` "train": the train volumes of
    `subjects`, which training then leaves out (`load_train_slices`).
    """

    split: str
    subjects: frozenset[str] | None = None

    @property
    def skip(self) -> frozenset[str]:
        """Subjects the training data must leave out."""
        return self.subjects if self.split == "train" and self.subjects else frozenset()

    def describe(self) -> str:
        if self.split == "train":
            return f"{len(self.subjects or ())} train subjects held out of training"
        return f"{self.split} split"


def plan_monitor(ingest_dirs: Sequence[Path], fraction: float, seed: int = 0) -> Monitor | None:
    """Which volumes score structure preservation during training; None when there are too few.

    The val split when it has MRI and CT volumes. Otherwise `fraction` of each modality's
    train subjects (at least 1), drawn with `seed`, held out of training; only when each
    modality keeps at least 2 train subjects. A subject with volumes of both modalities is
    held out whole, and preferred only where it does not overfill a modality; rows without
    a subject_id are never held out. The test split is never used: picking a checkpoint on
    it would leak the test set into model selection.
    """
    by_split: dict[str, dict[str, set[str]]] = {}
    for d in ingest_dirs:
        for row in manifest_rows(Path(d)):
            modality = row["modality"].strip().upper()
            if modality in SIDE_MODALITY.values():
                split = row.get("split", "").strip() or "train"
                by_split.setdefault(split, {}).setdefault(modality, set()).add(row.get("subject_id", "").strip())
    if all(by_split.get("val", {}).get(m) for m in SIDE_MODALITY.values()):
        return Monitor("val")
    train: dict[str, set[str]] = {m: by_split.get("train", {}).get(m, set()) for m in SIDE_MODALITY.values()}
    if fraction <= 0:
        return None
    want = {m: max(1, round(fraction * len(subj))) for m, subj in train.items()}
    held: set[str] = set()

    def short(m: str) -> bool:
        return len(train[m] & held) < want[m]

    order = [str(x) for x in np.random.default_rng([seed, 0x5E]).permutation(sorted(set().union(*train.values()) - {""}))]
    for exact in (True, False):  # first only subjects whose every modality is still short, then any that helps
        for subject in order:
            mods = [m for m in train if subject in train[m]]
            if subject not in held and any(short(m) for m in mods) and (not exact or all(short(m) for m in mods)):
                held.add(subject)
    if any(len(train[m] - held) < 2 or not train[m] & held for m in train):
        log.warning("no val split and too few train subjects to hold some out (%s); no structure scores, no best.pt",
                    ", ".join(f"{len(v)} {m}" for m, v in train.items()))
        return None
    return Monitor("train", frozenset(held))


@dataclass
class TrainingInputs:
    """What `train_cyclegan` needs from ingest folders: the train data and an optional evaluate callback.

    `evaluate` scores structure preservation on fixed monitor slices (`monitor`, see
    `plan_monitor`) and is None without a monitor; pass
    `best_key=pipeline.structure.STRUCTURE_KEY` with it.
    """

    data: UnpairedData
    evaluate: Callable[[torch.nn.Module, torch.nn.Module], dict[str, float]] | None
    monitor: Monitor | None


def load_train_slices(
    ingest_dirs: Sequence[Path], image_size: int, context: int, cfg: SliceConfig
) -> tuple[UnpairedData, Monitor | None]:
    """The CycleGAN's training slices: the train split with the monitor subjects (`plan_monitor`) left
    out and listed in meta["monitor_subjects"], so the model card (and the dataset writer, which keeps
    them in its train split) knows which subjects picked best.pt; and the monitor."""
    monitor = plan_monitor(ingest_dirs, cfg.monitor_fraction, cfg.seed)
    data = load_unpaired_slices(
        ingest_dirs, image_size=image_size, context=context, hu_window=cfg.hu_window, min_foreground=cfg.min_foreground,
        mr_percentiles=cfg.mr_percentiles, split="train", seed=cfg.seed, max_slices=cfg.max_slices,
        skip_subjects=monitor.skip if monitor else frozenset(),
    )
    data.meta["monitor_subjects"] = sorted(monitor.skip) if monitor else []
    return data, monitor


def monitor_scores(
    ingest_dirs: Sequence[Path], monitor: Monitor | None, image_size: int, context: int, cfg: SliceConfig
) -> Callable[[torch.nn.Module, torch.nn.Module], dict[str, float]] | None:
    """The structure-score callback on the monitor's volumes (fixed batches: comparable between calls);
    None without a monitor, or (with a warning) when its volumes have no usable slice."""
    if monitor is None:
        return None
    try:
        held = load_unpaired_slices(
            ingest_dirs, image_size=image_size, context=context, split=monitor.split, hu_window=cfg.hu_window,
            min_foreground=cfg.min_foreground, mr_percentiles=cfg.mr_percentiles, only_subjects=monitor.subjects,
        )
    except DatasetError as exc:
        log.warning("structure scores off (no best.pt): the %s gave no usable slices (%s)", monitor.describe(), exc)
        return None
    batches = held_out_batches(held, batch_size=16, max_batches=4)
    return partial(structure_scores, held_out_batches=batches, hu_window=cfg.hu_window)


def load_training_inputs(
    ingest_dirs: Sequence[Path], image_size: int, in_channels: int = 1, data_cfg: SliceConfig | None = None
) -> TrainingInputs:
    """Train-split slices (monitor subjects left out) plus the structure-score callback, as the CLI trains.

    `in_channels` (odd) is the generator's: 2*context+1 slices per sample. The monitor
    slices only feed structure scores (input vs translation), never paired truth.
    """
    cfg = data_cfg or SliceConfig()
    if in_channels < 1 or in_channels % 2 == 0:
        raise ValueError(f"in_channels must be odd (a centre slice and its neighbours), got {in_channels}")
    context = (in_channels - 1) // 2
    data, monitor = load_train_slices(ingest_dirs, image_size, context, cfg)
    evaluate = monitor_scores(ingest_dirs, monitor, image_size, context, cfg)
    return TrainingInputs(data, evaluate, monitor if evaluate is not None else None)


def _median_spacing(spacings: list[tuple[float, float, float]]) -> list[float]:
    return [float(v) for v in np.median(np.asarray(spacings, dtype=np.float64), axis=0)] if spacings else []
