"""Per-subject MRI->CT scores of several CycleGAN checkpoints on the phantom benchmark, and one figure.

`medaug evaluate-translation` reports each checkpoint's mean over the paired held-out subjects;
this script scores the same subjects with the same code (pipeline.evaluate_translation's
`find_pairs`, `read_volume`, `paired_metrics` and pipeline.translate's `translate_unit`, each
checkpoint with the context and normalisation its model card records) and prints one markdown
row per subject and checkpoint, so runs can be compared subject by subject in bench/RESULTS.md.
With --png it draws the middle axial slice of the first --figures subjects: MR, CT truth,
then each checkpoint's translation (pipeline.evaluate_translation.save_grid).

    OMP_NUM_THREADS=1 python bench/cyclegan_quality.py --data ingest \
        --run old=runs/old_s0/checkpoints/last.pt --run new=runs/new_s0/checkpoints/last.pt \
        --png bench/figures/cyclegan_mri2ct.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from models.train_cyclegan import load_generator
from pipeline.evaluate_translation import find_pairs, paired_metrics, read_volume, save_grid
from pipeline.translate import TranslationSettings, translate_unit

METRICS = ("mae", "mae_bone", "mae_soft", "psnr", "ssim")


def score(checkpoint: Path, data: list[Path], use_ema: bool = True) -> tuple[list[dict[str, float | str]], dict[str, np.ndarray]]:
    """Per-subject MRI->CT metrics of one checkpoint (EMA weights when kept and use_ema) and its translations by subject."""
    gen, card = load_generator(checkpoint, "mri2ct", use_ema=use_ema, device="cpu")
    settings = TranslationSettings.from_card(card)
    pairs, _ = find_pairs(data)
    rows: list[dict[str, float | str]] = []
    preds: dict[str, np.ndarray] = {}
    for mr_path, ct_path, row in pairs:
        sid = row.get("subject_id", "")
        mr = read_volume(mr_path, "MR", settings, sid)
        ct = read_volume(ct_path, "CT", settings, sid)
        pred = translate_unit(gen, mr.unit, settings, 16, "cpu")
        m = paired_metrics(pred, ct.unit, ct.body, "mri2ct", settings.hu_window, ct.raw)
        rows.append({"subject": sid, **{k: float(m[k]) for k in METRICS}})
        preds[sid] = pred
    return rows, preds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, action="append", required=True, help="ingest folder(s) with the paired test split")
    ap.add_argument("--run", action="append", required=True, help="NAME=CHECKPOINT, repeat; the figure's columns in this order")
    ap.add_argument("--png", type=Path, default=None, help="figure: MR, truth, then each run's translation")
    ap.add_argument("--figures", type=int, default=4, help="subjects (rows) in the figure")
    ap.add_argument("--live", action="store_true", help="score the live weights, not the EMA (short screening runs,"
                    " where the EMA still holds much of the initial weights)")
    ap.add_argument("--json", type=Path, default=None, help="also write every row here")
    args = ap.parse_args()

    runs = [r.split("=", 1) for r in args.run]
    results: dict[str, list[dict[str, float | str]]] = {}
    preds: dict[str, dict[str, np.ndarray]] = {}
    for name, ckpt in runs:
        results[name], preds[name] = score(Path(ckpt), args.data, use_ema=not args.live)

    print("| subject | run | body MAE (HU) | bone MAE (HU) | soft-tissue MAE (HU) | PSNR (dB) | SSIM |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, _ in runs:
        for r in results[name]:
            print(f"| {r['subject']} | {name} | {r['mae']:.1f} | {r['mae_bone']:.1f} | {r['mae_soft']:.1f} "
                  f"| {r['psnr']:.2f} | {r['ssim']:.3f} |")
        mean = {k: float(np.mean([float(r[k]) for r in results[name]])) for k in METRICS}
        print(f"| mean | {name} | {mean['mae']:.1f} | {mean['mae_bone']:.1f} | {mean['mae_soft']:.1f} "
              f"| {mean['psnr']:.2f} | {mean['ssim']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.png:
        # the same subjects and slices in every column; truth and MR read with the first run's settings
        _, card = load_generator(Path(runs[0][1]), "mri2ct", device="cpu")
        settings = TranslationSettings.from_card(card)
        grid = []
        for mr_path, ct_path, row in find_pairs(args.data)[0][: args.figures]:
            sid = row.get("subject_id", "")
            mr, ct = read_volume(mr_path, "MR", settings, sid), read_volume(ct_path, "CT", settings, sid)
            grid.append([mr.unit, ct.unit, *(preds[name][sid] for name, _ in runs)])
        save_grid(grid, args.png, ["MR", "CT truth", *(name for name, _ in runs)])
        print(f"figure: {args.png}")


if __name__ == "__main__":
    main()
