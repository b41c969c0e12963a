"""The datasheet of a written dataset: datasheet.md (counts per class and split, gate
results, generator provenance, config) and sample_grid.png (middle axial slices of real
and synthetic training items per class, pillow).

Called by the writer (pipeline/dataset/writer.py) on its temporary folder. Both files are
deterministic: no timestamps, fixed order, PNG without time chunks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image

from pipeline.gate.signing import status_note

GRID_NAME = "sample_grid.png"
DATASHEET_NAME = "datasheet.md"
TILE = 96  # pixels per grid tile


def _slice_u8(path: Path, size: int = TILE) -> np.ndarray:
    """Middle axial (last-axis) slice of a volume as uint8 (size, size), windowed to its
    1st-99th percentile; rotated so anterior is up (RAS+ arrays: x right, y anterior)."""
    img: Any = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    while data.ndim > 3:
        data = data[..., 0]
    sl = data[..., data.shape[-1] // 2] if data.ndim == 3 else data
    lo, hi = np.percentile(sl, [1, 99])
    scaled = np.clip((sl - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    tile = Image.fromarray(np.rot90(scaled * 255.0).astype(np.uint8))
    return np.asarray(tile.resize((size, size), Image.Resampling.NEAREST))


def write_sample_grid(folder: Path, rows: Sequence[Mapping[str, Any]], classes: Sequence[str], per_class: int) -> Path | None:
    """Write folder/sample_grid.png: one row per class, `per_class` real training items
    (first in manifest order) on the left, a gap, then `per_class` synthetic ones. Empty
    tiles are black. Returns the path, or None when `per_class` is 0 or there are no items."""
    if per_class <= 0 or not rows:
        return None
    gap = TILE // 4
    width = 2 * per_class * TILE + gap
    canvas = np.zeros((len(classes) * TILE, width), dtype=np.uint8)
    for ci, c in enumerate(classes):
        for synthetic in (0, 1):
            picks = [r for r in rows if r["split"] == "train" and r["class"] == c and int(r["synthetic"]) == synthetic]
            for k, r in enumerate(picks[:per_class]):
                x = synthetic * (per_class * TILE + gap) + k * TILE
                canvas[ci * TILE : (ci + 1) * TILE, x : x + TILE] = _slice_u8(folder / str(r["path"]))
    canvas[:, per_class * TILE : per_class * TILE + gap] = 64  # grey separator: real | synthetic
    path = folder / GRID_NAME
    Image.fromarray(canvas).save(path, format="PNG", optimize=False)
    return path


def _table(counts: Mapping[str, Mapping[str, Mapping[str, int]]], classes: Sequence[str]) -> list[str]:
    lines = ["| class | " + " | ".join(f"{sp} real | {sp} synthetic" for sp in counts) + " |"]
    lines.append("|---" * (1 + 2 * len(counts)) + "|")
    for c in classes:
        cells = [f"{counts[sp][c]['real']} | {counts[sp][c]['synthetic']}" for sp in counts]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    totals = [
        f"{sum(counts[sp][c]['real'] for c in classes)} | {sum(counts[sp][c]['synthetic'] for c in classes)}" for sp in counts
    ]
    lines.append("| **all** | " + " | ".join(totals) + " |")
    return lines


def write_datasheet(folder: Path, report: Mapping[str, Any], config: Mapping[str, Any], has_grid: bool) -> Path:
    """Write folder/datasheet.md from the build report (see writer._report) and the config."""
    classes = list(report["classes"])
    lines = [
        f"# Datasheet: medaug {report['deployment']} dataset ({report['target_modality']})",
        "",
        f"Content hash: `{report['content_hash']}`",
        "",
        "Real items of the target modality, split by subject (no subject in two splits); synthetic items only in the",
        f"training split, chosen seeded by the balancing strategy **{report['strategy']}**. Validation and test are real-only.",
        "",
        "## Items per class and split",
        "",
        *_table(report["counts"], classes),
        "",
        "Subjects per split: " + ", ".join(f"{sp} {n}" for sp, n in report["subjects"].items()) + ".",
        "",
        "## Balancing of the training split",
        "",
        "| class | target | real | synthetic | short of target |",
        "|---|---|---|---|---|",
        *[f"| {c} | {b['target']} | {b['real']} | {b['synthetic']} | {b['short']} |" for c, b in report["balance"].items()],
        "",
    ]
    if report.get("notes"):
        lines += ["Notes:", "", *[f"- {n}" for n in report["notes"]], ""]
    if report["excluded"]:
        lines += ["Left out:", "", *[f"- {k}: {v}" for k, v in report["excluded"].items()], ""]
    lines += ["## Quality gate", ""]
    if report.get("ungated_synthetic"):
        lines += [f"**UNGATED: {report['ungated_synthetic']} synthetic training items were not judged by the quality gate** "
                  "(built with --allow-ungated).", ""]
    if report["gates"]:
        for g in report["gates"]:
            counts = f" ({g['n_accepted']} accepted, {g['n_rejected']} rejected by the per-sample filter)" if "n_accepted" in g else ""
            lines.append(f"- report `{g.get('report_id')}`: verdict **{g.get('verdict')}**{counts}")
            if g.get("signature") == "verified":
                lines.append(f"  - signature: HMAC-SHA256 verified with the gate key (key id `{g.get('key_id')}`)")
            else:
                lines.append(f"  - **{status_note(g.get('signature') or 'unsigned')}**")
            for c in g.get("checks") or []:
                mark = "pass" if c.get("passed") else "FAIL"
                lines.append(f"  - {c.get('name')}: {c.get('value')} {c.get('op') or ''} {c.get('threshold')} ({mark})")
    else:
        lines.append("No gate report was given: synthetic items were not filtered by the quality gate.")
    lines += ["", "## Generators", ""]
    if report["generators"]:
        lines += ["| checkpoint sha256 | card | training subjects | gate reports |", "|---|---|---|---|"]
        for g in report["generators"]:
            lines.append(
                f"| `{g['checkpoint_sha256'][:16]}` | {g['card']} | {g['n_train_subjects']} | {', '.join(g['gate_report_ids']) or '-'} |"
            )
        lines.append("")
        lines.append("Every generator's training subjects are in the training split (checked by the writer).")
    else:
        lines.append("No synthetic items.")
    if has_grid:
        lines += [
            "",
            "## Sample grid",
            "",
            f"![samples]({GRID_NAME})",
            "",
            "One row per class in class-index order; real training items on the left, synthetic on the right of the",
            "grey bar; middle axial slice, windowed to its 1st-99th percentile.",
        ]
    lines += ["", "## Config", "", "```json", json.dumps(dict(config), indent=2, sort_keys=True), "```", ""]
    path = folder / DATASHEET_NAME
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
