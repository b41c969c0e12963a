"""Tiny ingest-format folders with tumor masks for the tumor GAN tests (made here, never downloaded).

`make_ingest_folder` writes what `medaug ingest` writes (volumes/, labels/, manifest.csv with
path,label_path,subject_id,modality,shape,spacing,sha256,class,split,source_kind) for a few
small synthetic heads: an ellipse of brain (CT ~30 HU) inside a skull ring (~1000 HU) in air,
with a "round" lesion (bright disc) or a "necrotic" one (larger ring with a dark core).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.manifest import read_manifest, sha256_file, write_manifest

INGEST_COLUMNS = ("path", "label_path", "subject_id", "modality", "shape", "spacing", "sha256", "class", "split", "source_kind")


def make_volume(
    size: int, depth: int, cls: str, rng: np.random.Generator, modality: str = "CT"
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic head (size, size, depth) in HU (CT) or MR-like units, and its lesion mask."""
    x, y, z = np.meshgrid(np.arange(size), np.arange(size), np.arange(depth), indexing="ij")
    c = (size - 1) / 2
    r = ((x - c) / (0.46 * size)) ** 2 + ((y - c) / (0.42 * size)) ** 2
    vol = np.full((size, size, depth), -1000.0)
    vol[r < 1.0] = 1000.0
    vol[r < 0.8] = 30.0 + rng.normal(0, 3, size=vol[r < 0.8].shape)
    # Lesion inside the brain, its centre drawn at random, radius by class.
    radius = rng.uniform(2.0, 3.0) if cls == "round" else rng.uniform(3.5, 4.5)
    lx, ly = c + rng.uniform(-0.2, 0.2) * size, c + rng.uniform(-0.2, 0.2) * size
    lz = depth / 2 + rng.uniform(-1, 1)
    d = np.sqrt((x - lx) ** 2 + (y - ly) ** 2 + ((z - lz) * 2.0) ** 2)
    lesion = d < radius
    vol[lesion] = 70.0
    if cls == "necrotic":
        vol[d < radius * 0.5] = 10.0
    if modality == "MR":
        vol = np.clip((vol + 1000.0) / 2.0, 0, None)
    return vol.astype(np.float32), lesion.astype(np.uint8)


def make_ingest_folder(
    out: Path,
    n_subjects: int = 6,
    size: int = 48,
    depth: int = 8,
    seed: int = 0,
    modality: str = "CT",
    classes: tuple[str, ...] = ("round", "necrotic"),
    test_every: int = 0,
) -> Path:
    """Write an ingest-format folder of `n_subjects` synthetic heads; every `test_every`-th is test."""
    rng = np.random.default_rng(seed)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    rows = []
    for i in range(n_subjects):
        cls = classes[i % len(classes)]
        vol, mask = make_volume(size, depth, cls, rng, modality)
        name = f"subj{i:03d}_{modality}_0.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine), out / "volumes" / name)
        nib.save(nib.Nifti1Image(mask, affine), out / "labels" / name)
        split = "test" if test_every and i % test_every == test_every - 1 else "train"
        rows.append(
            {
                "path": f"volumes/{name}",
                "label_path": f"labels/{name}",
                "subject_id": f"subj{i:03d}",
                "modality": modality,
                "shape": f"{size}x{size}x{depth}",
                "spacing": "2x2x4",
                "sha256": sha256_file(out / "volumes" / name),
                "class": cls,
                "split": split,
                "source_kind": "nifti",
            }
        )
    write_manifest(out, rows, INGEST_COLUMNS)
    return out


def test_make_ingest_folder_writes_the_ingest_contract(tmp_path: Path) -> None:
    folder = make_ingest_folder(tmp_path / "ingest", n_subjects=3, size=32, depth=6)
    rows = read_manifest(folder)
    assert [r["class"] for r in rows] == ["round", "necrotic", "round"]
    for r in rows:
        vol = np.asarray(nib.load(folder / r["path"]).dataobj)
        lab = np.asarray(nib.load(folder / r["label_path"]).dataobj)
        assert vol.shape == lab.shape == (32, 32, 6)
        assert 0 < lab.sum() < lab.size // 10


def tiny_patch_data(n: int = 24, size: int = 32, seed: int = 0, classes: tuple[str, ...] = ("healthy", "necrotic", "round")):
    """In-memory TumorPatchData of n (1, size, size) patches: discs whose radius depends on the class
    (none for "healthy"), at random positions on a noisy background; masks are the discs."""
    import torch

    from models.train_tumor_gan import TumorPatchData

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images, masks, labels = [], [], []
    for i in range(n):
        k = i % len(classes)
        img = -0.5 + 0.1 * rng.normal(size=(size, size))
        mask = np.zeros((size, size), np.float32)
        if classes[k] != "healthy":
            r = size * (0.12 if classes[k] == "round" else 0.2)
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).astype(np.float32)
            img = np.where(mask > 0, 0.6, img)
            if classes[k] == "necrotic":
                img = np.where((xx - cx) ** 2 + (yy - cy) ** 2 < (r / 2) ** 2, -0.2, img)
        images.append(np.clip(img, -1, 1))
        masks.append(mask)
        labels.append(k)
    return TumorPatchData(
        torch.tensor(np.stack(images), dtype=torch.float32).unsqueeze(1),
        torch.tensor(np.stack(masks), dtype=torch.float32).unsqueeze(1),
        torch.tensor(labels, dtype=torch.long),
        list(classes),
        "CT",
        (2.0, 2.0, 4.0),
        [f"subj{i:03d}" for i in range(n)],
        {"modality": "CT", "hu_window": [-100.0, 200.0]},
    )
