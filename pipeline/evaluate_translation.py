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

The structure measures themselves live in pipeline/structure.py, which training's
checkpoint picking (pipeline.slices.monitor_scores) uses too.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from numpy.typing import NDArray

from pipeline.errors import CheckpointError, DatasetError, ProvenanceError
from pipeline.preprocess import (
    DEFAULT_HU_WINDOW,
    body_mask,
    ct_to_unit,
    to_unit,
    unit_to_ct,
)
from pipeline.slices import manifest_rows, split_matches, volume_as_3d
from pipeline.structure import CT_BONE_HU, mean_scores, structure_measures
from pipeline.translate import TranslationSettings, resolve_device, translate_unit
from pipeline.types import Direction, HUWindow, Modality

log = logging.getLogger(__name__)

FloatArray = NDArray[np.floating]
BoolArray = NDArray[np.bool_]

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
    from models.checkpoint import CheckpointError as _CheckpointError
    from models.train_cyclegan import load_generator

    dev = resolve_device(device)
    try:
        g_m2c, card = load_generator(Path(checkpoint), "mri2ct", use_ema=use_ema, device=str(dev))
        g_c2m, _ = load_generator(Path(checkpoint), "ct2mri", use_ema=use_ema, device=str(dev))
    except _CheckpointError as exc:
        raise CheckpointError(str(exc)) from None
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
            res: dict[str, Any] = {name: mean_scores(items) for name, items in cases.items()}
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
    return {d: mean_scores(items) | {"n_volumes": float(len(items))} for d, items in per.items() if items}


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
