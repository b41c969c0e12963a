"""Lesion insertion: the blend measured (seam scores) and real vs inserted lesions side by side.

Reads a downstream work folder that ran `bench/downstream.py --synthesis insertion` (its ingest,
real lesion patches, and under from-tumor_gan-HASH the tumor GAN's samples and the insertion
gate) and:

  1. inserts the GAN's necrotic lesion patches into real CT training volumes three ways
     (pipeline/insertion.py): feathered (the recipe), a hard paste of the mask (feather 0)
     and a paste of the lesion's box with the GAN's background (the naive crop-and-paste),
     and reports each one's seam score (pipeline.insertion.seam_score) over the real
     training lesions', with the gate's seam check (pipeline/gate/seam.py thresholds);
  2. writes bench/figures/insertion_real_vs_inserted.png: real necrotic training lesions
     beside inserted ones (the downstream run's insertion gate verdict under each), and with
     --samples-out a PNG of the GAN's patches beside real ones, per class.

    OMP_NUM_THREADS=1 .venv/bin/python bench/insertion.py --work bench/_work/ins280
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.downstream import real_lesion_patches  # noqa: E402
from pipeline import insertion as ins  # noqa: E402
from pipeline.gate.config import SEAM_MAX_RATIO, GateConfig  # noqa: E402
from pipeline.manifest import read_manifest  # noqa: E402

WINDOW = (-100.0, 200.0)


def _arr(path: Path) -> np.ndarray:
    return np.asarray(ins._load(path).dataobj)


def blend_scores(work: Path, derived: Path, n_hosts: int, seed: int) -> dict[str, Any]:
    """Seam scores (over the real lesions' median) of three blends of the GAN's necrotic patches
    (`derived/synthetic`, the samples of one tumor GAN run)."""
    ingest = work / "ingest"
    hosts = ins._hosts(ingest)[:n_hosts]
    masks = [_arr(ingest / h["label_path"]) for h in ins._hosts(ingest)]
    stats = ins.lesion_stats(masks)
    samples = derived / "synthetic"
    lesions = [r for r in read_manifest(samples) if r["class"] == "necrotic" and (_arr(samples / r["label_path"]) > 0).sum() >= ins.MIN_LESION_PX]
    lesions = real_lesion_patches(work, 32, seed)
    real_rows = [r for r in read_manifest(lesions) if r["split"] == "train"]
    real = np.array([ins.seam_score(_arr(lesions / r["path"])[..., 0], _arr(lesions / r["label_path"])[..., 0]) for r in real_rows])
    base = float(np.median(real))
    item_ratio = GateConfig().seam_item_ratio
    out: dict[str, Any] = {"real": {"n": len(real), "median": base, "q05_q95": np.quantile(real / base, [0.05, 0.95]).round(2).tolist()}}
    for name, opts in (("feathered (recipe, sigma 0.5 px)", ins.InsertionOptions()),
                       ("hard mask paste (feather 0)", ins.InsertionOptions(feather_px=0.0)),
                       ("lesion box pasted with GAN background", ins.InsertionOptions(blend="box"))):
        scores = []
        for i, h in enumerate(hosts):
            p = lesions[i % len(lesions)]
            img = ins._load(ingest / h["path"])
            try:
                done = ins.insert_lesion(np.asarray(img.dataobj, np.float32), _arr(ingest / h["label_path"]),
                                         [float(z) for z in img.header.get_zooms()[:3]], _arr(samples / p["path"]),
                                         _arr(samples / p["label_path"]), stats, np.random.default_rng([seed, i]), opts)
            except Exception:  # noqa: BLE001 - a host without room is skipped here, as insert_lesions passes it on
                continue
            scores += [ins.seam_score(a, m) for a, m, _ in ins.inserted_patches(done.volume, done.label, 32, 2, WINDOW)]
        r = np.array(scores) / base
        out[name] = {"n_patches": len(r), "median_ratio": float(np.median(r)), "over_item_ratio": float((r > item_ratio).mean()),
                     "seam_check": "pass" if np.median(r) <= SEAM_MAX_RATIO else "FAIL"}
    return out


def figure(work: Path, gate: Path, out: Path, n: int) -> Path:
    """PNG of n real necrotic training lesions beside n inserted ones, with the insertion gate's verdicts."""
    from pipeline.gate.report import image_grid

    real_dir = real_lesion_patches(work, 32, 0)
    real = [r for r in read_manifest(real_dir) if r["class"] == "necrotic" and r["split"] == "train"]
    report = json.loads((gate / "gate_report.json").read_text())
    verdict = {s["sha256"]: s["decision"] for s in report["samples"]}
    syn_dir = gate / "inserted_patches"
    by_volume: dict[str, dict[str, str]] = {}
    for r in read_manifest(syn_dir):
        by_volume.setdefault(r["source_sha256"], r)  # one patch per volume: its first (largest-slice side)
    rows = list(by_volume.values())
    step_r, step_s = max(1, len(real) // n), max(1, len(rows) // n)
    tiles, captions = [], []
    for k in range(min(n, len(real), len(rows))):
        a = torch.as_tensor(_arr(real_dir / real[k * step_r]["path"])[..., 0])
        s = rows[k * step_s]
        b = torch.as_tensor(_arr(syn_dir / s["path"])[..., 0])
        tiles.append([a, b])
        captions.append(f"real | ins: {verdict.get(s['source_sha256'], '?')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return image_grid(tiles, captions, out, scale=3)


def samples_figure(work: Path, derived: Path, out: Path, n: int) -> Path:
    """PNG of the tumor GAN's patches beside real training patches, one row per (source, class)."""
    from pipeline.gate.report import image_grid

    rows, captions = [], []
    for klass in ("necrotic", "round"):
        for name, folder, keep in (("real", work / "patches_real", lambda r: r.get("split", "train") == "train"),
                                   ("GAN", derived / "synthetic", lambda r: True)):
            picked = [r for r in read_manifest(folder) if r["class"] == klass and keep(r)][:n]
            tiles = []
            for r in picked:
                a = _arr(folder / r["path"]).squeeze()
                tiles.append(torch.as_tensor((a[..., a.shape[-1] // 2] if a.ndim == 3 else a).astype(np.float32)))
            rows.append(tiles)
            captions.append(f"{name} {klass}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return image_grid(rows, captions, out, scale=3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="A downstream work folder run with --synthesis insertion.")
    parser.add_argument("--derived", type=Path, default=None,
                        help="The folder of one tumor GAN run's samples and insertions (default: the newest from-tumor_gan-* in --work).")
    parser.add_argument("--gate", type=Path, default=None, help="Its insertion gate folder (default: the newest there).")
    parser.add_argument("--hosts", type=int, default=24, help="Host volumes for the blend measurement.")
    parser.add_argument("--n", type=int, default=8, help="Pairs in the figure.")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "figures" / "insertion_real_vs_inserted.png")
    parser.add_argument("--samples-out", type=Path, default=None,
                        help="Also write this PNG: the GAN's patches beside real ones, per class (default: none).")
    args = parser.parse_args(argv)
    runs = sorted(args.work.glob("from-tumor_gan-*"), key=lambda p: p.stat().st_mtime)
    derived = args.derived or (runs[-1] if runs else args.work)  # work folders before per-run folders hold it directly
    # the newest insertion gate there (insertion_n*_gate-HASH; insertion_gate_n* in older work folders)
    gates = list(derived.glob("insertion_n*_gate-*")) + list(derived.glob("insertion_gate_n*"))
    gate = args.gate or max(gates, key=lambda p: p.stat().st_mtime)
    print(f"tumor GAN samples and insertion gate: {derived}")
    scores = blend_scores(args.work, derived, args.hosts, 0)
    print(json.dumps(scores, indent=2))
    print("| blend | inserted patches | seam score / real median (median) | share over the per-item threshold | seam check |")
    print("|---|---|---|---|---|")
    for name, v in scores.items():
        if name != "real":
            print(f"| {name} | {v['n_patches']} | {v['median_ratio']:.2f} | {v['over_item_ratio']:.0%} | {v['seam_check']} |")
    print(f"figure: {figure(args.work, gate, args.out, args.n)}")
    if args.samples_out:
        print(f"figure: {samples_figure(args.work, derived, args.samples_out, args.n)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
