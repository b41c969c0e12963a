"""Write synthetic tumor patches from a trained tumor GAN as NIfTI with provenance.

`sample_tumors(checkpoint, class_name, n, seed, out)` draws `n` patches of one class from the
generator of models/train_tumor_gan.py (EMA weights) and writes out/patches/*.nii.gz (image,
float32 in the normalised [-1, 1] units of the training patches), out/masks/*.nii.gz (lesion
mask, uint8, generator mask > 0.5), a manifest.csv (synthetic=1, checkpoint sha256, seed,
index, the sha256 of each patch and of its mask) and provenance.json (each checkpoint's model card, including its train_subjects, and
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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pipeline.errors import CheckpointError, OutputOverlapError, PatchError
from pipeline.manifest import read_manifest, save_nifti, sha256_file, write_manifest

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
    "sha256",
    "label_sha256",
)
PROVENANCE_NAME = "provenance.json"
MASK_THRESHOLD = 0.5
STREAM_BLOCK = 1024
"""Patches generated and written per block: a 3-D 32^3 block is 256 MiB of float32 (image and mask)."""
NIFTI_HEADER_BYTES = 352


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
    _check_sample_folder(out)
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
    _check_room(out, n, card)
    ckpt_sha = sha256_file(checkpoint)
    import torch

    (out / "patches").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    existing = read_manifest(out) if (out / "manifest.csv").is_file() else []
    key = (ckpt_sha, class_name, str(seed))

    def same_call(r: dict[str, str]) -> bool:
        return (r.get("checkpoint_sha256"), r.get("class"), r.get("seed")) == key

    stale = [r for r in existing if same_call(r)]
    rows = [r for r in existing if not same_call(r)]
    files: list[str] = []
    base = {"class": class_name, "split": "train", "modality": card.get("modality", ""), "synthetic": "1",
            "checkpoint_sha256": ckpt_sha, "seed": str(seed), "patch_size": str(card.get("patch_size", "")),
            "spacing": "x".join(f"{float(s):g}" for s in card["spacing"])}
    # streamed in blocks of STREAM_BLOCK patches: memory stays bounded whatever --n is
    for start in range(0, n, STREAM_BLOCK):
        m = min(STREAM_BLOCK, n - start)
        x = generate(g, classes.index(class_name), m, block_seed(seed, class_name, start // STREAM_BLOCK), g.latent_dim,
                     torch.device(device), batch_size)
        for k, (name, sha, label_sha) in enumerate(_write_block(out, x, start, class_name, seed, ckpt_sha,
                                                                  patch_affine(card["spacing"]))):
            rows.append({"path": f"patches/{name}", "label_path": f"masks/{name}", "index": str(start + k), **base,
                         "sha256": sha, "label_sha256": label_sha})
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


def block_seed(seed: int, class_name: str, block: int) -> int:
    """Latent seed of streaming block `block` of a (seed, class) call; block 0 is `class_seed`, so
    a call of at most STREAM_BLOCK patches draws the latents it drew before streaming existed.

    >>> block_seed(0, "round", 0) == class_seed(0, "round") != block_seed(0, "round", 1)
    True
    """
    return class_seed(seed, class_name) if block == 0 else class_seed(seed, f"{class_name}#{block}")


def _write_block(out: Path, x: Any, start: int, class_name: str, seed: int, ckpt_sha: str,
                 affine: np.ndarray) -> list[tuple[str, str, str]]:
    """Write a block of generated patches x (m, 2, *S) as patches/ and masks/ NIfTI files
    (temp file + rename each); returns (file name, patch sha256, mask sha256) of each (indices
    start, start+1, ...): the manifest records both hashes, so the mask is bound to its patch."""
    images = x[:, 0].numpy().astype(np.float32)
    masks = (x[:, 1].numpy() > MASK_THRESHOLD).astype(np.uint8)
    names = []
    for k in range(images.shape[0]):
        i = start + k
        name = f"{class_name}_seed{seed}_{ckpt_sha[:8]}_{i:05d}.nii.gz"
        img, msk = images[k], masks[k]
        if img.ndim == 2:
            img, msk = img[..., None], msk[..., None]
        descrip = f"medaug synthetic {class_name} seed={seed} i={i} ckpt={ckpt_sha[:16]}".encode()[:79]
        shas = []
        for sub, arr in (("patches", img), ("masks", msk)):
            nii = nib.Nifti1Image(arr, affine)
            nii.header["descrip"] = descrip
            nii.header.set_xyzt_units("mm")
            tmp = out / sub / f".{name}.tmp.nii.gz"
            shas.append(save_nifti(nii, tmp))  # hashed as written, not read back
            tmp.replace(out / sub / name)
        names.append((name, shas[0], shas[1]))
    return names


def _check_sample_folder(out: Path) -> None:
    """Refuse an --out that holds a manifest sample-tumors did not write (a real patch or ingest
    folder): merging into it would rewrite that manifest and drop its columns (subject ids)."""
    if not (out / "manifest.csv").is_file():
        return
    try:
        kind = json.loads((out / PROVENANCE_NAME).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "tumor_gan_samples":
        raise OutputOverlapError(
            f"--out {out} holds a manifest.csv that sample-tumors did not write (no {PROVENANCE_NAME} of its kind; a real "
            "patch or ingest folder?); sampling into it would rewrite that manifest. Choose an empty folder or an "
            "earlier sample-tumors --out"
        )


def _check_room(out: Path, n: int, card: dict[str, Any]) -> None:
    """Refuse a call whose patches cannot fit the free space at `out` (float32 images, before gzip,
    which hardly shrinks generated noise; masks compress to little and are not counted)."""
    side = int(card.get("patch_size") or 0)
    dims = int(card.get("spatial_dims") or 2)
    need = n * (side**dims * 4 + NIFTI_HEADER_BYTES)
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if need > free:
        raise PatchError(
            f"--n {n} patches of {side}^{dims} need about {_size(need)} and {probe} has {_size(free)} free; ask for fewer "
            "(calls with different --seed values add to one folder)"
        )


def _size(n_bytes: float) -> str:
    """Bytes as a short human size, e.g. '12.8 TB'."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n_bytes < 1000 or unit == "PB":
            return f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} PB"


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
