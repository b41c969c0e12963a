"""Tumor GAN recipes on a CPU budget: train, sample, gate, and report what the default gate says.

Each variant trains models/train_tumor_gan.py on a downstream work folder's real patches
(bench/downstream.py builds them: phantom CT, 32x32 lesion-centred and healthy patches),
samples 160 necrotic and 80 of each other class, runs the default gate (pipeline/gate) against
the real patches, and reports the wall time, the gate's checks and the share of samples whose
lesion mask came out empty (a generator that gives up on the mask cannot feed insertion).

    OMP_NUM_THREADS=1 .venv/bin/python bench/tumor_gan_sweep.py --work bench/_work/ins280 \\
        --name r1-ada --set r1_gamma=1.0 --set ada_target=0.6 --set lr_d=1e-4 --steps 1500

The base recipe is bench/downstream.py's (width 16, batch 32, minibatch std, mode seeking,
DiffAugment translation + cutout, EMA 0.99); --set changes one TumorGANConfig field.

`--lesions` trains a lesion-scale GAN instead: on lesion-centred crops only (no healthy
patches; crop side --set patch_size=16 holds every phantom lesion, at most 12 px wide), gated
against those crops. `--insert N` then inserts N of its necrotic lesions into real CT training
volumes (pipeline/insertion.py) and runs the insertion gate on them (lesion-centred 32 px crops
of the inserted volumes against the real ones; the default gate with the seam check on, where
bench/downstream.py uses the deployment's, with class and lesion HU checks):

    OMP_NUM_THREADS=1 .venv/bin/python bench/tumor_gan_sweep.py --work bench/_work/ins280 \
        --name lesion16 --lesions --set patch_size=16 --steps 3000 --insert 91
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BASE = {"patch_size": 32, "latent_dim": 64, "g_channels": 16, "d_channels": 16, "batch_size": 32, "minibatch_std": True,
        "mode_seeking_weight": 0.25, "lr_g": 4e-4, "diffaug": ["translation", "cutout"], "log_every": 100, "sample_every": 500,
        "ema_decay": 0.99}


def main(argv: list[str] | None = None) -> int:
    from bench.downstream import real_lesion_patches
    from models.train_tumor_gan import TumorGANConfig, train_tumor_gan
    from pipeline.gate.config import GateConfig
    from pipeline.gate.run import run_gate
    from pipeline.insertion import gate_insertions, insert_lesions
    from pipeline.manifest import read_manifest
    from pipeline.patches import read_patch_folder, to_train_data
    from pipeline.sample_tumors import sample_tumors

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="A downstream work folder (its patches_real/).")
    parser.add_argument("--name", required=True, help="Variant name (its folder under WORK/sweep/).")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--set", action="append", default=[], help="field=value (JSON value) of TumorGANConfig.")
    parser.add_argument("--lesions", action="store_true", help="Train on lesion-centred crops only (a lesion-scale GAN).")
    parser.add_argument("--class-checks", action="store_true",
                        help="Gate each class alone too (gate.class_checks, as configs/tumor-patches.yaml).")
    parser.add_argument("--insert", type=int, default=0, help="Insert this many necrotic lesions and run the insertion gate.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    options = dict(BASE, steps=args.steps, checkpoint_every=args.steps, seed=0)
    for kv in args.set:
        key, value = kv.split("=", 1)
        options[key] = json.loads(value) if value[:1] in "[{0123456789-.tfn" else value
    out = args.work / "sweep" / args.name
    real = args.work / "patches_real"
    ingest = args.work / "ingest"
    if args.lesions:  # lesion-centred crops of the GAN's patch size, cut once per work folder
        real = real_lesion_patches(args.work, options["patch_size"], 0)
    t0 = time.perf_counter()
    train_tumor_gan(TumorGANConfig.model_validate(options), to_train_data(read_patch_folder(real, synthetic=False), modality="CT"),
                    out / "run", device="cpu")
    train_s = time.perf_counter() - t0
    ckpt = out / "run" / "checkpoints" / "last.pt"
    for klass in (("round", "necrotic") if args.lesions else ("healthy", "round", "necrotic")):
        sample_tumors(ckpt, klass, 160 if klass == "necrotic" else 80, 0, out / "synthetic")
    report = run_gate(real, out / "synthetic", out / "gate", GateConfig.model_validate({"seed": 0, "class_checks": args.class_checks}))
    import nibabel as nib

    rows = [r for r in read_manifest(out / "synthetic") if r["class"] == "necrotic"]
    empty = float(np.mean([(np.asarray(nib.load(out / "synthetic" / r["label_path"]).dataobj) > 0).sum() < 4 for r in rows]))  # type: ignore[attr-defined]
    result = {"name": args.name, "options": {k: v for k, v in options.items() if BASE.get(k) != v}, "train_s": round(train_s, 1),
              "verdict": report.verdict, "failed": report.failed_checks, "necrotic_empty_mask_share": round(empty, 3),
              "checks": {c.name: round(c.value, 3) if c.value is not None else None for c in report.checks}}
    if args.insert:
        # the insertion gate's reference: lesion-centred 32 px crops of the real training volumes (as bench/downstream.py)
        lesions = real_lesion_patches(args.work, 32, 0)
        t1 = time.perf_counter()
        patch_gate = out / "gate" if report.verdict == "accept" else None
        insert_lesions(ingest, out / "synthetic", out / "insertion", args.insert, "necrotic", seed=0, patch_gate=patch_gate)
        ins = gate_insertions(lesions, out / "insertion", out / "insertion_gate", GateConfig.model_validate({"seed": 0}), patch_size=32)
        result["insertion"] = {"n": args.insert, "from_accepted_patches_only": patch_gate is not None, "verdict": ins["verdict"],
                               "failed": ins["failed_checks"], "n_accepted": ins["n_accepted"], "n_rejected": ins["n_rejected"],
                               "wall_s": round(time.perf_counter() - t1, 1),
                               "checks": {c["name"]: round(c["value"], 3) if c.get("value") is not None else None for c in ins["checks"]}}
    (out / "sweep_result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
