"""Write synthetic tumor patches from a trained tumor GAN as NIfTI with provenance.

`sample_tumors(checkpoint, class_name, n, seed, out)` draws `n` patches of one class from the
generator of models/train_tumor_gan.py (EMA weights) and writes out/patches/*.nii.gz (image,
float32 in the normalised [-1, 1] units of the training patches), out/masks/*.nii.gz (lesion
mask, uint8, generator mask > 0.5), a manifest.csv (synthetic=1, checkpoint sha256, seed,
index) and provenance.json (each checkpoint's model card, including its train_subjects, and
each sampling call). Each file's NIfTI `descrip` names class, seed, index and checkpoint. The
affine is patch-sized with the training spacing (origin 0). Latents come from a CPU generator
seeded by (seed, class name), so the same call gives byte-identical files, and calls for
several classes into one folder merge the manifest in a fixed order whatever the call order.
The gate and the dataset writer read the folder like any other synthetic folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pipeline.errors import CheckpointError, PatchError
from pipeline.manifest import read_manifest, sha256_file, write_manifest

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = (
    "path",
    "label_path",
    "class",
    "split",
    "modality",
    "synthetic",
    "checkpoint_sha256",
    "seed",
    "index",
    "patch_size",
    "spacing",
)
PROVENANCE_NAME = "provenance.json"
MASK_THRESHOLD = 0.5


@dataclass
class SampleReport:
    """What one call wrote: the folder, files (relative), class, seed and checkpoint sha256."""

    out: Path
    files: list[str]
    class_name: str
    seed: int
    checkpoint_sha256: str


def class_seed(seed: int, class_name: str) -> int:
    """The latent seed of a (seed, class) pair, so classes sampled with one seed do not share z.

    >>> class_seed(0, "round") == class_seed(0, "round") != class_seed(0, "necrotic")
    True
    """
    return int(hashlib.sha256(f"{seed}:{class_name}".encode()).hexdigest()[:15], 16)


def patch_affine(spacing: list[float] | tuple[float, ...]) -> np.ndarray:
    """Diagonal voxel-to-mm affine with the training spacing (x, y, z) and origin 0."""
    return np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])


def sample_tumors(
    checkpoint: Path,
    class_name: str,
    n: int,
    seed: int,
    out: Path,
    device: str = "cpu",
    batch_size: int = 64,
) -> SampleReport:
    """Write `n` synthetic patches of `class_name` into `out`; see the module docstring for the layout.

    Raises PatchError for an unknown class (listing the checkpoint's classes) or n < 1.
    Re-running a (checkpoint, class, seed) replaces that call's files and manifest rows.
    """
    from models.checkpoint import CheckpointError as _CheckpointError
    from models.train_tumor_gan import generate, load_tumor_generator

    if n < 1:
        raise PatchError(f"--n must be at least 1, got {n}")
    checkpoint = Path(checkpoint)
    try:
        g, card = load_tumor_generator(checkpoint, device=device)
    except _CheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    except (FileNotFoundError, ValueError) as exc:
        raise PatchError(f"cannot sample from {checkpoint}: {exc}") from None
    classes = list(card["classes"])
    if class_name not in classes:
        raise PatchError(f"class {class_name!r} is not one the generator knows; choose one of {', '.join(classes)}")
    ckpt_sha = sha256_file(checkpoint)
    import torch

    x = generate(g, classes.index(class_name), n, class_seed(seed, class_name), g.latent_dim, torch.device(device), batch_size)
    images = x[:, 0].numpy().astype(np.float32)
    masks = (x[:, 1].numpy() > MASK_THRESHOLD).astype(np.uint8)
    affine = patch_affine(card["spacing"])
    spacing_text = "x".join(f"{float(s):g}" for s in card["spacing"])

    (out / "patches").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    existing = read_manifest(out) if (out / "manifest.csv").is_file() else []
    key = (ckpt_sha, class_name, str(seed))

    def same_call(r: dict[str, str]) -> bool:
        return (r.get("checkpoint_sha256"), r.get("class"), r.get("seed")) == key

    stale = [r for r in existing if same_call(r)]
    rows = [r for r in existing if not same_call(r)]
    files: list[str] = []
    for i in range(n):
        name = f"{class_name}_seed{seed}_{ckpt_sha[:8]}_{i:05d}.nii.gz"
        img, msk = images[i], masks[i]
        if img.ndim == 2:
            img, msk = img[..., None], msk[..., None]
        descrip = f"medaug synthetic {class_name} seed={seed} i={i} ckpt={ckpt_sha[:16]}".encode()[:79]
        for sub, arr in (("patches", img), ("masks", msk)):
            nii = nib.Nifti1Image(arr, affine)
            nii.header["descrip"] = descrip
            nii.header.set_xyzt_units("mm")
            nib.save(nii, out / sub / name)
        rows.append(
            {
                "path": f"patches/{name}",
                "label_path": f"masks/{name}",
                "class": class_name,
                "split": "train",
                "modality": card.get("modality", ""),
                "synthetic": "1",
                "checkpoint_sha256": ckpt_sha,
                "seed": str(seed),
                "index": str(i),
                "patch_size": str(card.get("patch_size", "")),
                "spacing": spacing_text,
            }
        )
        files.append(f"patches/{name}")
    written = {r["path"] for r in rows}
    for r in stale:  # a re-run with a smaller n leaves no orphan files behind
        if r["path"] not in written:
            for rel in (r["path"], r.get("label_path", "")):
                if rel and (out / rel).is_file():
                    (out / rel).unlink()
    rows.sort(key=lambda r: (r.get("checkpoint_sha256", ""), r.get("class", ""), int(r.get("seed") or 0), int(r.get("index") or 0)))
    write_manifest(out, rows, SAMPLE_COLUMNS)
    _write_provenance(out, ckpt_sha, card, class_name, seed, n)
    log.info("wrote %d %s patches (seed %d) to %s", n, class_name, seed, out)
    return SampleReport(out, files, class_name, seed, ckpt_sha)


def _write_provenance(out: Path, ckpt_sha: str, card: dict[str, Any], class_name: str, seed: int, n: int) -> None:
    """Merge this call into out/provenance.json (sorted, no timestamps: same calls, same bytes)."""
    path = out / PROVENANCE_NAME
    prov: dict[str, Any] = {"kind": "tumor_gan_samples", "checkpoints": {}, "calls": []}
    if path.is_file():
        prov = json.loads(path.read_text(encoding="utf-8"))
    prov["checkpoints"][ckpt_sha] = card
    calls = [c for c in prov["calls"] if (c["checkpoint_sha256"], c["class"], c["seed"]) != (ckpt_sha, class_name, seed)]
    calls.append({"checkpoint_sha256": ckpt_sha, "class": class_name, "seed": seed, "n": n,
                  "latent_seed": class_seed(seed, class_name), "mask_threshold": MASK_THRESHOLD})
    prov["calls"] = sorted(calls, key=lambda c: (c["checkpoint_sha256"], c["class"], c["seed"]))
    prov["intensity"] = "normalised [-1, 1] as in training; see each checkpoint's normalisation to invert (CT: hu_window)"
    tmp = out / f".{PROVENANCE_NAME}.tmp"
    tmp.write_text(json.dumps(prov, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
