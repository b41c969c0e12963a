"""The gate's specification: planted generators on phantom heads must be judged for the right reason.

A held-out split of real subjects passes; a collapsed generator (a handful of distinct
outputs), a memorizing one (training volumes plus slight noise), a noise generator and a
wrong-modality one (MR volumes labelled CT) are each rejected, and the failed checks name
why. The phantom heads are drawn here (skin, skull, grey and white matter, ventricles, a
round or necrotic tumor; CT in HU, T1-like MR), written as ingest-style folders of NIfTI
volumes with manifest.csv. One domain encoder is trained per module on the training split
and reused by every scenario, as a gate run with gate.encoder_path would.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.gate.config import GateConfig
from pipeline.gate.encoder import save_domain_encoder, train_domain_encoder
from pipeline.gate.images import load_gate_set
from pipeline.gate.report import ACCEPTED_CSV, FIG_ACCEPTED, FIG_COPIES, REPORT_JSON, REPORT_MD
from pipeline.gate.run import run_gate
from pipeline.manifest import read_manifest, write_manifest

SIZE, NZ = 64, 12
COLUMNS = ["path", "label_path", "subject_id", "modality", "class", "split", "synthetic"]

# tissue: (CT HU, MR T1-like units)
AIR, SKIN, BONE, GM, WM, CSF, TUMOR, NECROSIS = (-1000, 0), (-80, 800), (900, 80), (40, 520), (28, 700), (8, 180), (55, 430), (15, 120)


def phantom_head(seed: int, modality: str, size: int = SIZE, nz: int = NZ) -> tuple[np.ndarray, str]:
    """A (size, size, nz) head of subject `seed` in HU (CT) or T1-like units (MR), and its tumor class.

    The same seed gives the same anatomy in both modalities (paired truth).
    """
    rng = np.random.default_rng(seed)
    col = 0 if modality == "CT" else 1
    a, b = rng.uniform(0.34, 0.44) * size, rng.uniform(0.40, 0.47) * size
    cx, cy = size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3)
    rot = rng.uniform(-0.25, 0.25)
    klass = "necrotic" if rng.random() < 0.3 else "round"
    tz = rng.uniform(0.3, 0.7) * nz
    tr = rng.uniform(0.12, 0.22) * a if klass == "necrotic" else rng.uniform(0.06, 0.1) * a
    tang, tdist = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.5)
    vent = rng.uniform(0.12, 0.2)
    x, y = np.meshgrid(np.arange(size) - cx, np.arange(size) - cy, indexing="ij")
    xr, yr = x * np.cos(rot) + y * np.sin(rot), -x * np.sin(rot) + y * np.cos(rot)
    vol = np.zeros((size, size, nz), np.float32)
    for z in range(nz):
        s = np.sqrt(max(0.0, 1.0 - ((z - nz * 0.35) / (nz * 0.85)) ** 2))
        r = np.sqrt((xr / (a * s + 1e-6)) ** 2 + (yr / (b * s + 1e-6)) ** 2)
        sl = np.full((size, size), AIR[col], np.float32)
        sl[r < 1.0] = SKIN[col]
        sl[r < 0.93] = BONE[col]
        sl[r < 0.83] = GM[col]
        sl[r < 0.6] = WM[col]
        for side in (-1, 1):
            rv = np.sqrt(((xr - side * 0.12 * a * s) / (vent * a * s + 1e-6)) ** 2 + (yr / (2.2 * vent * b * s + 1e-6)) ** 2)
            sl[rv < 1.0] = CSF[col]
        dz = (z - tz) * 2.5
        tx, ty = tdist * a * np.cos(tang), tdist * b * np.sin(tang)
        rt = np.sqrt((xr - tx) ** 2 + (yr - ty) ** 2 + dz**2)
        sl[(rt < tr) & (r < 0.8)] = TUMOR[col]
        if klass == "necrotic":
            sl[(rt < 0.55 * tr) & (r < 0.8)] = NECROSIS[col]
        vol[..., z] = sl
    vol = ndimage.gaussian_filter(vol, (0.7, 0.7, 0))
    vol += rng.normal(0, 8.0 if modality == "CT" else 12.0, vol.shape).astype(np.float32)
    return vol, klass


def write_folder(out: Path, volumes: list[tuple[np.ndarray, str]], modality: str, synthetic: bool, split: str = "") -> Path:
    """Write volumes as ingest-style NIfTI files plus manifest.csv (modality column as given)."""
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    rows = []
    affine = np.diag([3.4, 3.4, 4.0, 1.0])
    for i, (vol, klass) in enumerate(volumes):
        rel = f"volumes/item_{i:03d}_{modality}.nii.gz"
        nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), out / rel)
        rows.append({"path": rel, "subject_id": f"s{i:03d}", "modality": modality, "class": klass, "split": split,
                     "synthetic": int(synthetic)})
    write_manifest(out, rows, COLUMNS)
    return out


# subjects 0..23 train, 100..109 held out, 200.. new anatomy for the collapsed generator
TRAIN = range(24)
HELD_OUT = range(100, 110)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate_cohort")
    real = write_folder(root / "real", [phantom_head(s, "CT") for s in TRAIN], "CT", False, "train")
    held = write_folder(root / "held_out", [phantom_head(s, "CT") for s in HELD_OUT], "CT", True)
    modes = [phantom_head(s, "CT") for s in (200, 201, 202)]
    collapsed = write_folder(root / "collapsed", [modes[i % 3] for i in range(12)], "CT", True)
    rng = np.random.default_rng(5)
    memo = [(v + rng.normal(0, 10.0, v.shape).astype(np.float32), c) for v, c in (phantom_head(s, "CT") for s in list(TRAIN)[:10])]
    memorizing = write_folder(root / "memorizing", memo, "CT", True)
    noise = [(ndimage.gaussian_filter(rng.uniform(-1000, 1000, (SIZE, SIZE, NZ)), 1.0).astype(np.float32) * 3, "round")
             for _ in range(10)]
    noisy = write_folder(root / "noise", noise, "CT", True)
    wrong = write_folder(root / "wrong_modality", [phantom_head(s, "MR") for s in HELD_OUT], "CT", True)
    # one encoder for every scenario, trained on the real training slices as a gate run would
    cfg = GateConfig()
    images = load_gate_set(real, cfg, "real").images
    encoder = root / "domain_encoder.pt"
    save_domain_encoder(train_domain_encoder(images, steps=cfg.encoder_steps, seed=0), encoder)
    return {"real": real, "held_out": held, "collapsed": collapsed, "memorizing": memorizing, "noise": noisy,
            "wrong_modality": wrong, "encoder": encoder}


def _cfg(cohort: dict[str, Path], **kw: object) -> GateConfig:
    return GateConfig(encoder_path=cohort["encoder"], n_bootstrap=20, **kw)  # type: ignore[arg-type]
