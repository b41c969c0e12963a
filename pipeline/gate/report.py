"""The gate's report: dataclasses, gate_report.json, gate_report.md, PNG figures, accepted.csv.

gate_report.json holds the verdict, the failed checks by name, every check with its value
and threshold, the metrics with bootstrap confidence intervals, per-class metrics, one
decision per synthetic item (with the reasons for a reject), the feature extractor's name
and sha256, the inputs by content hash, the config, a report id: the sha256 of the
canonical JSON of everything else, so the same inputs, config and weights give the same
id, and a signature: the HMAC of that JSON under the gate key (pipeline/gate/signing.py). Floats are rounded to 6 significant digits before hashing; NaN is written as null.
Figures are drawn with Pillow (no matplotlib): random accepted samples, rejected samples,
and each near-copy beside its nearest training image.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.gate.signing import NOT_VERIFIED_NOTE, content_id, sign
from pipeline.manifest import write_manifest
from pipeline.outputs import atomic_file

REPORT_JSON = "gate_report.json"
REPORT_MD = "gate_report.md"
ACCEPTED_CSV = "accepted.csv"
FIG_ACCEPTED = "accepted_samples.png"
FIG_REJECTED = "rejected_samples.png"
FIG_COPIES = "near_copies.png"


@dataclass
class CheckResult:
    """One batch check: `value` compared with `threshold` by `op` ("<=" or ">=")."""

    name: str
    value: float | None
    threshold: float | None
    op: str
    passed: bool
    detail: str


@dataclass
class SampleDecision:
    """The per-sample filter's decision on one synthetic item (a volume or a patch).

    `pixel_ratio` / `feature_ratio`: smallest over its slices of the distance to the nearest
    training image divided by the median real-to-real nearest-neighbour distance;
    `outlier_share`: share of its slices farther than the outlier threshold;
    `nearest_real` / `nearest_real_feature`: the training slice (`<path>#z<slice>`) nearest in
    pixel / feature space to its closest slice. `label_sha256`: sha256 of its mask's bytes ("" when
    it has none): the decision covers image and mask together, and build-dataset ships only this mask.
    """

    path: str
    sha256: str
    klass: str
    decision: str
    reasons: list[str]
    n_slices: int
    pixel_ratio: float | None = None
    feature_ratio: float | None = None
    outlier_share: float | None = None
    nearest_real: str = ""
    nearest_real_feature: str = ""
    label_sha256: str = ""


@dataclass
class GateReport:
    """Everything the gate decided; `report_id` is the sha256 of the canonical content, `signature`
    its HMAC under the gate key (None when no key was set; pipeline/gate/signing.py)."""

    verdict: str
    failed_checks: list[str]
    checks: list[CheckResult]
    metrics: dict[str, Any]
    per_class: dict[str, dict[str, Any]]
    samples: list[SampleDecision]
    feature_extractor: dict[str, Any]
    inputs: dict[str, Any]
    config: dict[str, Any]
    n_accepted: int
    n_rejected: int
    report_id: str = ""
    signature: dict[str, str] | None = None
    out: Path | None = field(default=None, compare=False)

    @property
    def accepted(self) -> bool:
        """True when the verdict is accept."""
        return self.verdict == "accept"

    def content(self) -> dict[str, Any]:
        """The canonical content (JSON-ready, floats rounded, NaN as None), without report_id, signature and out."""
        d = asdict(self)
        for k in ("report_id", "signature", "out"):
            d.pop(k)
        clean: dict[str, Any] = _clean(d)
        return clean

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: report_id and signature, then the content."""
        return {"report_id": self.report_id, "signature": self.signature, **self.content()}


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        f = float(x)
        return None if not math.isfinite(f) else float(f"{f:.6g}")
    return x


def report_id(report: GateReport) -> str:
    """sha256 of the canonical JSON of the report's content (sorted keys, no whitespace;
    pipeline/gate/signing.py `content_id`, the rule build-dataset checks)."""
    return content_id(report.content())


def sign_report(report: GateReport, key: bytes | None) -> None:
    """Set `report.signature` to the HMAC of its content under `key`; None when there is no key."""
    report.signature = sign(report.content(), key) if key else None


# --- files ---------------------------------------------------------------------------------


def write_json(report: GateReport, out: Path) -> Path:
    """Write OUT/gate_report.json (indented, sorted keys) and return its path."""
    path = out / REPORT_JSON
    with atomic_file(path) as tmp:  # never a truncated report: build-dataset trusts what it lists
        tmp.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def write_accepted(report: GateReport, rows: list[dict[str, str]], columns: list[str], out: Path) -> Path:
    """Write OUT/accepted.csv: the synthetic manifest rows of items the per-sample filter kept.

    Paths stay as the synthetic manifest wrote them (relative to the synthetic folder); a
    sha256 column identifies each file. A rejected batch gets a header-only file: nothing
    of it is accepted.
    """
    cols = list(columns) + [c for c in ("sha256",) if c not in columns]
    keep = {s.path: s.sha256 for s in report.samples if s.decision == "accept"} if report.accepted else {}
    out_rows = [{**{c: r.get(c, "") for c in cols}, "sha256": keep[r["path"]]} for r in rows if r["path"] in keep]
    return write_manifest(out, out_rows, cols, name=ACCEPTED_CSV)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def write_markdown(report: GateReport, out: Path, figures: list[str]) -> Path:
    """Write OUT/gate_report.md: verdict, checks, metrics with CIs and their other numbers (a KID's std, the
    FID baseline's spread over half splits), per class, rejects, figures."""
    d = report.to_dict()
    lines = [
        "# Quality gate report",
        "",
        f"**Verdict: {report.verdict.upper()}**" + (f" (failed: {', '.join(report.failed_checks)})" if report.failed_checks else ""),
        "",
        f"- report id: `{report.report_id}`; "
        + (f"signed (HMAC-SHA256, key id `{report.signature['key_id']}`)" if report.signature else NOT_VERIFIED_NOTE),
        f"- feature extractor: {report.feature_extractor.get('name')} (sha256 `{report.feature_extractor.get('sha256')}`, "
        f"{report.feature_extractor.get('dim')}-d)"
        + (f"; weights: {report.feature_extractor['weights']}" if report.feature_extractor.get("weights") else ""),
        f"- real: {report.inputs['real']['n_items']} items, {report.inputs['real']['n_slices']} scored slices; "
        f"synthetic: {report.inputs['synthetic']['n_items']} items, {report.inputs['synthetic']['n_slices']} scored slices",
        f"- per-sample filter: {report.n_accepted} accepted, {report.n_rejected} rejected",
        "",
        "## Checks",
        "",
        "| check | value | threshold | result | detail |",
        "|---|---|---|---|---|",
    ]
    for c in d["checks"]:
        lines.append(f"| {c['name']} | {_fmt(c['value'])} | {c['op']} {_fmt(c['threshold'])} | "
                     f"{'pass' if c['passed'] else '**FAIL**'} | {c['detail']} |")
    lines += ["", "## Metrics", "", "| metric | value | CI low | CI high | spread and other |", "|---|---|---|---|---|"]
    for name, m in d["metrics"].items():
        if isinstance(m, dict):
            other = ", ".join(f"{k} {_fmt(v)}" for k, v in m.items() if k not in ("value", "ci_low", "ci_high"))
            lines.append(f"| {name} | {_fmt(m.get('value'))} | {_fmt(m.get('ci_low'))} | {_fmt(m.get('ci_high'))} | {other} |")
        else:
            lines.append(f"| {name} | {_fmt(m)} | | | |")
    if d["per_class"]:
        keys = ["n_real", "n_synthetic", "fid", "kid", "precision", "recall", "density", "coverage", "ms_ssim_synthetic",
                "ms_ssim_real", "copy_fraction"]
        lines += ["", "## Per class", "", "| class | " + " | ".join(keys) + " | own gate (gate.class_checks) |",
                  "|---" * (len(keys) + 2) + "|"]
        for cls, m in d["per_class"].items():
            g = m.get("gate") or {}
            own = f"{g.get('verdict', '')} {', '.join(g.get('failed_checks') or [])}".strip() or "-"
            lines.append(f"| {cls or '(none)'} | " + " | ".join(_fmt(m.get(k)) for k in keys) + f" | {own} |")
    rejected = [s for s in d["samples"] if s["decision"] != "accept"]
    if rejected:
        lines += ["", f"## Rejected samples ({len(rejected)})", "", "| item | reasons |", "|---|---|"]
        for s in rejected[:200]:
            lines.append(f"| {s['path']} | {'; '.join(s['reasons'])} |")
        if len(rejected) > 200:
            lines.append(f"| ... | {len(rejected) - 200} more in gate_report.json |")
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    path = out / REPORT_MD
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- figures -------------------------------------------------------------------------------


def _to_pil(img: torch.Tensor | np.ndarray, scale: int) -> Image.Image:
    a = np.asarray(img, dtype=np.float32).reshape(img.shape[-2], img.shape[-1])
    u8 = np.clip((a + 1.0) * 127.5, 0, 255).astype(np.uint8)
    # image rows are x, columns y of a RAS+ slice: transpose and flip so anterior is up
    pil = Image.fromarray(np.ascontiguousarray(u8.T[::-1]), mode="L")
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)


def image_grid(tiles: list[list[torch.Tensor]], captions: list[str], path: Path, scale: int = 2, pad: int = 4) -> Path:
    """Write a PNG grid: one cell per entry of `tiles` (its images side by side) with a caption.

    Images are (H, W) or (1, H, W) in [-1, 1]; cells are laid out in a near-square grid.
    """
    if not tiles:
        raise ValueError("image_grid needs at least one cell")
    h, w = tiles[0][0].shape[-2] * scale, tiles[0][0].shape[-1] * scale
    per = max(len(t) for t in tiles)
    cell_w, cell_h = per * w + (per - 1) * 2, h + 12
    cols = max(1, math.ceil(math.sqrt(len(tiles) * cell_h / cell_w)))
    rows = math.ceil(len(tiles) / cols)
    canvas = Image.new("L", (cols * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), 32)
    draw = ImageDraw.Draw(canvas)
    for k, (cell, caption) in enumerate(zip(tiles, captions, strict=True)):
        r, c = divmod(k, cols)
        x0, y0 = pad + c * (cell_w + pad), pad + r * (cell_h + pad)
        for j, img in enumerate(cell):
            canvas.paste(_to_pil(img, scale), (x0 + j * (w + 2), y0))
        draw.text((x0, y0 + h), caption[: max(4, cell_w // 6)], fill=230)
    canvas.save(path, format="PNG", optimize=False)
    return path
