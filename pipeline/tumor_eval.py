"""Evaluate a tumor GAN against real patches: class fidelity, per-class diversity, mask statistics.

`evaluate_tumors(checkpoint, real_dir, out)` answers three questions and writes the answers to
out/tumor_eval.json (plus out/real_vs_generated.png):
  * class fidelity: a small classifier (MONAI's `Classifier`) trained on the real patches
    labels generated patches of each class; per-class accuracy, next to its accuracy on real
    held-out (test-split) patches, or on its training patches when there are none;
  * diversity: mean pairwise MS-SSIM within each class, generated vs. real (the gate's
    pipeline/gate/metrics.py:mean_pairwise_ms_ssim; real pairs are taken across source
    volumes). Generated patches should not be more self-similar than real ones; a collapsed
    generator scores near 1;
  * mask statistics: lesion area (voxels, mm^2 or mm^3) and compactness per class, real vs.
    generated.
Real patches come from a folder written by `medaug extract-patches` (pipeline/patches.py).
3D patches are compared on their centre axial slice for MS-SSIM.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from pipeline.errors import CheckpointError, PatchError
from pipeline.gate.metrics import mean_pairwise_ms_ssim
from pipeline.manifest import sha256_file
from pipeline.patches import read_patch_folder
from pipeline.sample_tumors import MASK_THRESHOLD, class_seed

log = logging.getLogger(__name__)

REPORT_NAME = "tumor_eval.json"
DIVERSITY_TOLERANCE = 0.05
"""Generated MS-SSIM may exceed real by this much before a class is flagged as less diverse."""


# --- mask statistics -------------------------------------------------------------------------


def boundary_faces(mask: NDArray[np.bool_]) -> int:
    """Number of voxel faces between the mask and the outside (edges in 2D, faces in 3D).

    >>> boundary_faces(np.ones((2, 2), bool)), boundary_faces(np.ones((1, 1, 1), bool))
    (8, 6)
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    return int(sum(np.count_nonzero(np.diff(m.astype(np.int8), axis=a)) for a in range(m.ndim)))


def compactness(mask: NDArray[np.bool_]) -> float:
    """Shape compactness of a 2D or 3D mask in (0, 1]; NaN for an empty mask.

    2D: 4 pi A / P^2 with P counted in pixel edges; 3D: sphericity pi^(1/3) (6V)^(2/3) / S with
    S in voxel faces. Counting edges measures a perimeter in city-block steps, so a digital disc
    and a square both score about pi/4 while elongated or ragged shapes score less; real and
    generated masks are measured the same way, which is what the comparison needs.

    >>> round(compactness(np.ones((4, 4), bool)), 4)  # pi / 4
    0.7854
    """
    m = np.asarray(mask, dtype=bool)
    area = int(m.sum())
    if area == 0:
        return float("nan")
    faces = boundary_faces(m)
    if m.ndim == 2:
        return 4.0 * math.pi * area / faces**2
    return math.pi ** (1 / 3) * (6.0 * area) ** (2 / 3) / faces


def mask_stats(masks: NDArray[Any], voxel_volume: float) -> dict[str, float | None]:
    """Mean/std lesion area (voxels and mm^2 or mm^3) and mean compactness of masks (N, *S).

    Compactness averages the non-empty masks only; `empty_fraction` is the share with no lesion.
    """
    m = np.asarray(masks) > 0
    areas = m.reshape(m.shape[0], -1).sum(axis=1).astype(np.float64)
    comp = [compactness(x) for x in m if x.any()]
    return {
        "area_vox_mean": float(areas.mean()),
        "area_vox_std": float(areas.std()),
        "area_mm_mean": float(areas.mean() * voxel_volume),
        "compactness_mean": float(np.mean(comp)) if comp else None,
        "empty_fraction": float((areas == 0).mean()),
    }


# --- diversity ---------------------------------------------------------------------------------


def class_ms_ssim(images: NDArray[np.float32], groups: NDArray[np.int64], seed: int, max_pairs: int = 500) -> float | None:
    """Mean pairwise MS-SSIM of images (N, *S) in [-1, 1] from different groups; None when < 1 pair.

    3D patches use their centre axial slice. 1 means every pair is identical (collapse).
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 4:
        x = x[..., x.shape[-1] // 2]
    vals = mean_pairwise_ms_ssim(torch.from_numpy(x).unsqueeze(1), groups, max_pairs, np.random.default_rng(seed))
    return float(vals.mean()) if len(vals) else None


# --- fidelity classifier --------------------------------------------------------------------------


def train_classifier(
    images: NDArray[np.float32], labels: NDArray[np.int64], num_classes: int, steps: int, seed: int
) -> torch.nn.Module:
    """A small CNN (MONAI Classifier, up to 3 strided conv layers) trained on images (N, *S) -> labels.

    Class-balanced batches of 32, Adam 1e-3, `steps` updates, CPU, seeded: same data, same net.
    """
    from monai.networks.nets import Classifier

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    shape = images.shape[1:]
    width = 8 if shape[0] <= 32 else 16
    layers = max(1, min(3, int(math.log2(min(shape))) - 1))  # stop at >= 2 voxels: instance norm needs them
    net = Classifier(in_shape=(1, *shape), classes=num_classes, channels=tuple(width * 2**i for i in range(layers)),
                     strides=(2,) * layers)
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).unsqueeze(1)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    counts = torch.bincount(y, minlength=num_classes).float().clamp(min=1)
    weights = (1.0 / counts)[y]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(steps):
        idx = torch.multinomial(weights, 32, replacement=True, generator=gen)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def predict(net: torch.nn.Module, images: NDArray[np.float32]) -> NDArray[np.int64]:
    """Class indices (N,) predicted for images (N, *S)."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).unsqueeze(1)
    return np.concatenate([net(x[i : i + 256]).argmax(1).numpy() for i in range(0, len(x), 256)]).astype(np.int64)


# --- the evaluation --------------------------------------------------------------------------------


def evaluate_tumors(
    checkpoint: Path,
    real_dir: Path,
    out: Path,
    n_per_class: int = 64,
    seed: int = 0,
    classifier_steps: int = 300,
    max_pairs: int = 500,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate the generator at `checkpoint` against the real patch folder `real_dir`.

    Writes out/tumor_eval.json (returned as a dict: per-class fidelity accuracy, MS-SSIM of
    generated and real, mask statistics, and `less_diverse_classes`) and a PNG of real and
    generated patches per class. Raises PatchError when the folders do not fit together.
    """
    from models.checkpoint import CheckpointError as _CheckpointError
    from models.common import save_image_grid
    from models.train_tumor_gan import generate, load_tumor_generator

    try:
        g, card = load_tumor_generator(Path(checkpoint), device=device)
    except _CheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    except (FileNotFoundError, ValueError) as exc:
        raise PatchError(f"cannot evaluate {checkpoint}: {exc}") from None
    real = read_patch_folder(Path(real_dir), synthetic=False)
    classes = list(card["classes"])
    keep = [i for i, r in enumerate(real.rows) if r["class"] in classes and r.get("modality", card["modality"]) == card["modality"]]
    if not keep:
        raise PatchError(f"{real_dir} holds no {card['modality']} patches of the generator's classes {classes}")
    if tuple(real.images.shape[1:]) != (card["patch_size"],) * card["spatial_dims"]:
        raise PatchError(f"{real_dir} holds {real.images.shape[1:]} patches but the generator makes {card['patch_size']}-voxel {card['spatial_dims']}D ones")
    rows = [real.rows[i] for i in keep]
    images, masks = real.images[keep], real.masks[keep]
    labels = np.array([classes.index(r["class"]) for r in rows], dtype=np.int64)
    sources = {s: k for k, s in enumerate(sorted({r.get("source_sha256", "") or r["path"] for r in rows}))}
    groups = np.array([sources[r.get("source_sha256", "") or r["path"]] for r in rows], dtype=np.int64)
    split = np.array([r.get("split", "") for r in rows])

    # fidelity: a classifier of real patches labels the generated ones
    train_sel = split != "test"
    net = train_classifier(images[train_sel], labels[train_sel], len(classes), classifier_steps, seed)
    held = split == "test"
    ref_sel, ref_name = (held, "test") if held.any() else (train_sel, "train")
    real_acc = float((predict(net, images[ref_sel]) == labels[ref_sel]).mean())

    voxel = float(np.prod(card["spacing"][: card["spatial_dims"]]))
    report: dict[str, Any] = {
        "checkpoint_sha256": sha256_file(Path(checkpoint)),
        "classes": classes,
        "modality": card["modality"],
        "n_per_class": n_per_class,
        "seed": seed,
        "classifier": {"real_accuracy": real_acc, "real_accuracy_on": ref_name, "steps": classifier_steps},
        "per_class": {},
        "less_diverse_classes": [],
    }
    grid_rows = []
    for k, cls in enumerate(classes):
        x = generate(g, k, n_per_class, class_seed(seed, cls), g.latent_dim, torch.device(device)).numpy()
        gen_img, gen_mask = x[:, 0], (x[:, 1] > MASK_THRESHOLD).astype(np.uint8)
        sel = labels == k
        acc = float((predict(net, gen_img) == k).mean())
        ms_gen = class_ms_ssim(gen_img, np.arange(len(gen_img), dtype=np.int64), seed, max_pairs)
        ms_real = class_ms_ssim(images[sel], groups[sel], seed, max_pairs) if sel.sum() > 1 else None
        less_diverse = ms_gen is not None and ms_real is not None and ms_gen > ms_real + DIVERSITY_TOLERANCE
        report["per_class"][cls] = {
            "n_real": int(sel.sum()),
            "fidelity_accuracy": acc,
            "ms_ssim_generated": ms_gen,
            "ms_ssim_real": ms_real,
            "less_diverse_than_real": bool(less_diverse),
            "mask_generated": mask_stats(gen_mask, voxel),
            "mask_real": mask_stats(masks[sel], voxel) if sel.any() else None,
        }
        if less_diverse:
            report["less_diverse_classes"].append(cls)
        show = 8
        real_show = images[sel][:show] if sel.any() else np.full((0, *images.shape[1:]), -1.0, np.float32)
        for arr in (real_show, gen_img[:show]):
            t = torch.from_numpy(np.asarray(arr, dtype=np.float32)).unsqueeze(1)
            grid_rows.append(t[..., t.shape[-1] // 2] if t.dim() == 5 else t)
        log.info("%s: fidelity %.2f, MS-SSIM generated %s vs real %s", cls, acc, ms_gen, ms_real)
    out.mkdir(parents=True, exist_ok=True)
    save_image_grid([r for r in grid_rows if r.shape[0]], out / "real_vs_generated.png")
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return report
