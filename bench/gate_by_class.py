"""The default gate run once per class: each class of a synthetic patch folder against the real
items of that class only (its own domain encoder, fitted to them), as a probe of what a
class-conditional gate would decide. The pooled gate (`medaug gate`) compares all classes at
once; bench/RESULTS.md ("The accepted CPU tumor GAN downstream") shows a batch it accepted whose
lesions were wrong.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gate_by_class.py --real bench/_work/ins280/patches_real \\
        --synthetic bench/_work/ins280/from-tumor_gan-HASH/synthetic --out bench/_work/ins280/gate_by_class
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.gate.config import GateConfig  # noqa: E402
from pipeline.gate.run import run_gate  # noqa: E402
from pipeline.manifest import read_manifest, write_manifest  # noqa: E402


def class_subset(src: Path, dst: Path, klass: str) -> None:
    """A folder whose manifest keeps src's rows of one class; the files are links to src's."""
    rows = [r for r in read_manifest(src) if r["class"] == klass]
    dst.mkdir(parents=True)
    for name in os.listdir(src):
        if name != "manifest.csv":
            os.symlink((src / name).resolve(), dst / name)
    if rows:
        write_manifest(dst, rows, list(rows[0].keys()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, required=True, help="Real patch folder (manifest with a class column).")
    parser.add_argument("--synthetic", type=Path, required=True, help="Synthetic patch folder (sample-tumors output).")
    parser.add_argument("--out", type=Path, required=True, help="Work folder (replaced).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    print("| class | real slices scored | synthetic slices | verdict | failed | intensity | excess FID | precision | recall | coverage |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for klass in sorted({r["class"] for r in read_manifest(args.synthetic)}):
        class_subset(args.real, args.out / f"real_{klass}", klass)
        class_subset(args.synthetic, args.out / f"synthetic_{klass}", klass)
        run_gate(args.out / f"real_{klass}", args.out / f"synthetic_{klass}", args.out / f"gate_{klass}",
                 GateConfig.model_validate({"seed": args.seed}))
        report = json.loads((args.out / f"gate_{klass}" / "gate_report.json").read_text())
        v = {c["name"]: c["value"] for c in report["checks"]}
        n_real, n_syn = report["per_class"][klass]["n_real"], report["per_class"][klass]["n_synthetic"]  # the slices scored
        print(f"| {klass} | {n_real} | {n_syn} | {report['verdict']} | {', '.join(report['failed_checks']) or '-'} | "
              f"{v['intensity']:.3f} | {v['fid']:.3f} | {v['precision']:.3f} | {v['recall']:.3f} | {v['coverage']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
