"""Proof of usefulness: does the balanced augmented dataset train a better tumor classifier?

The same small 2D CNN is trained on the phantom tumor classes ("round" majority, "necrotic"
minority) three ways and tested on the real-only test split (held-out subjects):

  (a) real:        the imbalanced real training patches, shuffled, no augmentation;
  (b) real+aug:    the same real patches with class-balanced oversampling
                   (class_balanced_sampler) and classical MONAI augmentation
                   (random affine, intensity scale/shift, Gaussian noise);
  (c) medaug:      the balanced dataset written by `medaug build-dataset` (real + gated
                   synthetic items: tumor GAN patches, lesions inserted into real CTs, or
                   CycleGAN MRI->CT translations), shuffled, no augmentation;
  (d) medaug+aug:  the same dataset with the oversampling and MONAI augmentation of (b): the
                   comparison a researcher makes, since synthetic data is used together with
                   classical augmentation. The claim is (d) - (b).

When the gate rejects the synthetic batch, medaug refuses to add it and (c) is real-only; the
bench then also trains a diagnostic arm (c') on the same fill built without the gate, to show
what was refused (outside the product's rules, reported as such).

Every arm takes the same number of optimiser steps with the same batch size, for several
seeds; balanced accuracy and minority-class (necrotic) recall are reported per seed, as a
mean with a 95% t-interval over seeds, and as paired differences (c - a), (c - b), (d - b);
(d) - (b) and (c) - (b) also get a paired bootstrap interval over seeds AND test subjects
(`paired_bootstrap`), which holds the test-set sampling uncertainty. A cohort of 280 subjects
puts 10 necrotic subjects in the test split.

Two deployments (`--deployment`):

  tumor-patches (default): phantom cohort -> ingest (CT) -> real patches -> tumor GAN ->
      sample tumors -> gate -> build-dataset -> classifiers (all real stages, CPU, minutes);
      with `--synthesis insertion` the necrotic samples are inserted into real CT training
      volumes (pipeline/insertion.py, the class gap plus a quarter), gated as lesion patches
      against the real necrotic training lesions (seam check on), and the dataset is of
      volumes, cut into lesion-centred patches like mri-ct's (inserted volumes: the inserted lesion);
  mri-ct: phantom cohort -> ingest (CT and MR) -> CycleGAN (configs/cyclegan.yaml) -> translate
      the MR training split to CT with the EMA weights of best.pt (else last.pt), as the augment
      flow does -> gate (configs/mri-ct.yaml's: gate.yaml + the lesion HU check; reference: the
      real CT training volumes) ->
      build-dataset (configs/dataset.yaml + mri-ct.yaml's dataset section: translated volumes
      inherit their MR source's class and mask) -> lesion-centred CT patches
      (pipeline.patches.extract_patches on the dataset's volumes) -> classifiers. (a) and (b)
      train on patches of the real CT training volumes, (c) on the dataset's training split
      (real CT + gated translated CT), and every arm is tested on patches of the real CT
      volumes of the held-out (test split) subjects. A CycleGAN run is kept in the work folder
      under a hash of its config and data, so a rerun with the same inputs does not retrain.

    .venv/bin/python bench/downstream.py --subjects 40 --size 64 --seeds 5 --record
    OMP_NUM_THREADS=1 .venv/bin/python bench/downstream.py --synthesis insertion --subjects 280 --gan-steps 2000 \
        --seeds 10 --work bench/_work/ins280
    OMP_NUM_THREADS=1 .venv/bin/python bench/downstream.py --deployment mri-ct --subjects 80 --seeds 10 \
        --work bench/_work/downstream-mrict --record
    # the harder task: 4 real necrotic CT training subjects (the rest never enter ingest)
    OMP_NUM_THREADS=1 .venv/bin/python bench/downstream.py --deployment mri-ct --subjects 280 --minority-train 4 \
        --max-share 0.8 --seeds 10 --work bench/_work/mrict280_k4

Every gate is the deployment's own (configs/tumor-patches.yaml, tumor-insertion.yaml, mri-ct.yaml),
its folder named by a hash of its settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any folder
    sys.path.insert(0, str(REPO))

from bench.common import cpu_name  # noqa: E402

log = logging.getLogger("bench.downstream")

TUMOR_CLASSES = ["necrotic", "round"]
MINORITY = "necrotic"


# --- classifier ------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Three conv blocks (8, 16, 32 channels; conv-BN-ReLU-maxpool), global average pool, linear.

    Input (N, 1, S, S) patches in [-1, 1]; output (N, n_classes) logits.
    """

    def __init__(self, n_classes: int, width: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for k in range(3):
            c_out = width * 2**k
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _as_2d(image: torch.Tensor, crop: int) -> torch.Tensor:
    """(1, S, S, 1) or (1, S, S) patch -> its central (1, crop, crop) as a plain float tensor.

    Patches are lesion-centred, so the centre holds the tumor; on the whole 32x32 patch the
    classifier memorised skull position and recalled no minority case on held-out subjects
    (measured: necrotic recall 0 in every arm), so every arm sees the same central crop.
    """
    x = torch.as_tensor(image).float()
    if x.ndim == 4:
        x = x[..., 0]
    lo = (x.shape[-1] - crop) // 2
    return x[:, lo : lo + crop, lo : lo + crop].clone()


def load_items(root: Path, split: str, synthetic: bool | None, crop: int) -> list[dict[str, Any]]:
    """Items of a split of a medaug dataset as plain dicts {"image": (1, crop, crop), "class": int, "subject": str}."""
    from pipeline.dataset import BalancedDataset

    ds = BalancedDataset(root, split=split, synthetic=synthetic)
    return [{"image": _as_2d(ds[i]["image"], crop), "class": int(ds.rows[i]["class_index"]), "subject": ds.rows[i]["subject_id"]}
            for i in range(len(ds))]


def classical_augmentation() -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The classical augmentation of arm (b): MONAI random affine, intensity scale/shift and noise."""
    from monai.transforms import (
        Compose,
        RandAffined,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    return Compose([
        RandAffined(keys="image", prob=0.8, rotate_range=math.pi / 6, scale_range=0.1, translate_range=2, padding_mode="border"),
        RandScaleIntensityd(keys="image", prob=0.5, factors=0.1),
        RandShiftIntensityd(keys="image", prob=0.5, offsets=0.1),
        RandGaussianNoised(keys="image", prob=0.5, std=0.05),
    ])


@dataclass(frozen=True)
class Scores:
    """Test scores of one trained classifier."""

    balanced_accuracy: float
    minority_recall: float
    recalls: dict[str, float]
    correct: tuple[bool, ...] = ()


def train_and_test(
    train_items: Sequence[dict[str, Any]],
    test_items: Sequence[dict[str, Any]],
    classes: Sequence[str],
    seed: int,
    steps: int,
    batch_size: int,
    balanced_sampling: bool,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
) -> Scores:
    """Train SmallCNN for `steps` Adam steps on `train_items`, then score on `test_items`."""
    from monai.data import DataLoader, Dataset

    torch.manual_seed(seed)
    np.random.seed(seed)
    ds = Dataset(data=list(train_items), transform=transform)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed)  # type: ignore[union-attr]
    g = torch.Generator().manual_seed(seed)
    if balanced_sampling:
        targets = [it["class"] for it in train_items]
        counts = {c: targets.count(c) for c in set(targets)}
        sampler: torch.utils.data.Sampler[int] = torch.utils.data.WeightedRandomSampler([1.0 / counts[t] for t in targets], num_samples=steps * batch_size, generator=g)
    else:
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=steps * batch_size, generator=g)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=0)
    model = SmallCNN(len(classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for batch in loader:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(torch.as_tensor(batch["image"]).float()), torch.as_tensor(batch["class"]).long())
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x = torch.stack([it["image"] for it in test_items])
        pred = model(x).argmax(1).tolist()
    truth = [it["class"] for it in test_items]
    recalls = {}
    for ci, name in enumerate(classes):
        idx = [i for i, t in enumerate(truth) if t == ci]
        if idx:
            recalls[name] = sum(pred[i] == ci for i in idx) / len(idx)
    return Scores(statistics.fmean(recalls.values()), recalls.get(MINORITY, float("nan")), recalls,
                  tuple(p == t for p, t in zip(pred, truth, strict=True)))


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (low, high) over seeds."""
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def balanced_accuracy_weighted(correct: np.ndarray, classes: np.ndarray, weights: np.ndarray) -> float:
    """Balanced accuracy of per-item correctness (n,) with item weights (n,): the mean over classes
    of the weighted share of correct items (classes with zero weight are left out)."""
    recalls = [float((correct[classes == c] * weights[classes == c]).sum() / weights[classes == c].sum())
               for c in np.unique(classes) if weights[classes == c].sum() > 0]
    return float(np.mean(recalls))


def paired_bootstrap(
    correct_x: np.ndarray,
    correct_y: np.ndarray,
    classes: Sequence[int],
    subjects: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Balanced-accuracy difference x - y of two arms, with a bootstrap interval over seeds AND test subjects.

    correct_x, correct_y: (n_seeds, n_items) booleans, item i correct for classifier seed s,
    on the same test items in the same order (paired). Each resample draws the seeds with
    replacement (the same draw for both arms) and, within each class, the test subjects with
    replacement (all patches of a drawn subject come along: patches of one subject are not
    independent); an item's weight is the number of times its subject was drawn. Returns
    (difference on all seeds and items, low, high) of the `level` percentile interval.

    >>> x = np.ones((3, 4), bool); y = np.zeros((3, 4), bool)
    >>> paired_bootstrap(x, y, [0, 0, 1, 1], ["a", "b", "c", "d"], n_boot=50)
    (1.0, 1.0, 1.0)
    """
    cx, cy = np.asarray(correct_x, float), np.asarray(correct_y, float)
    if cx.shape != cy.shape or cx.ndim != 2:
        raise ValueError(f"paired correctness must be two (seeds, items) arrays of one shape, got {cx.shape} and {cy.shape}")
    cls = np.asarray(classes)
    subj = np.asarray(subjects)
    ones = np.ones(cls.shape[0])
    estimate = balanced_accuracy_weighted(cx.mean(0), cls, ones) - balanced_accuracy_weighted(cy.mean(0), cls, ones)
    rng = np.random.default_rng(seed)
    # subjects of each class (a subject's patches all have its class) and each item's subject index
    names, inverse = np.unique(subj, return_inverse=True)
    by_class = [np.unique(inverse[cls == c]) for c in np.unique(cls)]
    diffs = np.empty(n_boot)
    for b in range(n_boot):
        s = rng.integers(cx.shape[0], size=cx.shape[0])
        counts = np.zeros(len(names))
        for group in by_class:
            np.add.at(counts, rng.choice(group, size=len(group), replace=True), 1.0)
        w = counts[inverse]
        diffs[b] = balanced_accuracy_weighted(cx[s].mean(0), cls, w) - balanced_accuracy_weighted(cy[s].mean(0), cls, w)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(estimate), float(lo), float(hi)


# --- pipeline stages (each skipped when its output is already in the work folder) -----------


def stage_clock(work: Path) -> tuple[dict[str, float], Callable[[str, float], None]]:
    """Stage wall times of a work folder (work/stage_timings.json) and `timed(name, t0)`, which records one.

    A stage found done in the work folder (under 1 s) keeps the time it took when it ran.
    """
    timings_path = work / "stage_timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def timed(name: str, t0: float) -> None:
        took = round(time.perf_counter() - t0, 1)
        if took >= 1.0 or name not in timings:
            timings[name] = took
        timings_path.write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")
        log.info("stage %s: %.1f s", name, took)

    return timings, timed


def cohort_and_ingest(
    work: Path, subjects: int, size: int, seed: int, modalities: Sequence[str], timed: Callable[[str, float], None],
    minority_train: int | None = None,
) -> tuple[Path, Path]:
    """The phantom cohort (work/cohort) and its ingest of `modalities` (work/ingest), each made once.

    `minority_train` keeps only that many necrotic CT training subjects (the harder task: a
    minority that is rare in the target modality): the others are left out of a copy of the
    cohort's CT Decathlon dataset (work/cohort_ct) before ingest, so nothing downstream (GAN,
    CycleGAN, gate, dataset, classifiers) ever sees them. The test split and the MR dataset are
    untouched. Refuses a work folder whose cohort was made with other options (check_cohort).
    """
    from pipeline.ingest import run_ingest
    from pipeline.phantoms import write_cohort

    check_cohort(work, subjects, size, seed, minority_train)
    cohort = work / "cohort"
    t0 = time.perf_counter()
    if not (cohort / "cohort.csv").is_file():
        write_cohort(cohort, n_subjects=subjects, size=size, seed=seed)
    timed("cohort", t0)

    sources = [cohort / "nifti" / m for m in modalities]
    if minority_train is not None and "CT" in modalities:
        sources[list(modalities).index("CT")] = keep_minority(cohort / "nifti" / "CT", work / "cohort_ct", minority_train)
    ingest = work / "ingest"
    t0 = time.perf_counter()
    if not (ingest / "manifest.csv").is_file():
        run_ingest(sources, ingest, key=b"bench-downstream")
    timed("ingest", t0)
    return cohort, ingest


def keep_minority(dataset: Path, out: Path, keep: int) -> Path:
    """A copy of a Decathlon dataset (dataset.json + images and labels) at `out` whose training
    list holds only the first `keep` necrotic entries (in dataset.json order; every other entry
    and the test list kept); the left-out files are not copied. Made once; returns `out`."""
    if (out / "dataset.json").is_file():
        return out
    meta = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    minority = [e for e in meta["training"] if e.get("class") == MINORITY]
    if keep < 1 or keep > len(minority):
        raise SystemExit(f"--minority-train {keep}: the cohort has {len(minority)} necrotic CT training subjects; "
                         f"keep between 1 and {len(minority)}")
    dropped = minority[keep:]
    meta["training"] = [e for e in meta["training"] if e not in dropped]
    meta["numTraining"] = len(meta["training"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for entry in meta["training"] + meta["test"]:
        for key in ("image", "label"):
            (tmp / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(dataset / entry[key], tmp / entry[key])
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tmp.rename(out)
    log.info("harder task: %d of %d necrotic CT training subjects kept, %d left out", keep, len(minority), len(dropped))
    return out


def build_inputs(work: Path, subjects: int, size: int, seed: int, patch_size: int, gan_steps: int, n_synth: int,
                 minority_train: int | None = None) -> dict[str, Any]:
    """Phantom cohort -> ingest -> real patches -> tumor GAN -> samples -> gate. Returns paths and the gate verdict."""
    from models.train_tumor_gan import TumorGANConfig, train_tumor_gan
    from pipeline.gate.run import run_gate
    from pipeline.patches import extract_patches, to_train_data, write_patch_folder
    from pipeline.sample_tumors import sample_tumors

    timings, timed = stage_clock(work)
    cohort, ingest = cohort_and_ingest(work, subjects, size, seed, ["CT"], timed, minority_train)

    real = work / "patches_real"
    t0 = time.perf_counter()
    if not (real / "manifest.csv").is_file():
        write_patch_folder(extract_patches([ingest], patch_size=patch_size, dims=2, seed=seed, neighbours=2), real)
    timed("patches", t0)

    from pipeline.patches import read_patch_folder

    # The CPU recipe the default gate accepted at 2400 steps (bench/RESULTS.md, "The CPU tumor GAN,
    # second pass"): lr_g 4e-4 (TTUR's 1e-4 left the mask at sigmoid(0) = 0.5 too long) and mode
    # seeking 0.25 on the image channel.
    cfg = TumorGANConfig.model_validate({
        "patch_size": patch_size, "latent_dim": 64, "g_channels": 16, "d_channels": 16, "batch_size": 32,
        "steps": gan_steps, "seed": seed, "minibatch_std": True, "mode_seeking_weight": 0.25, "lr_g": 4e-4,
        "diffaug": ["translation", "cutout"], "log_every": 100, "sample_every": 500, "checkpoint_every": gan_steps,
        # a short CPU run: EMA over ~100 steps, not the recipe's ~1000, or it still averages the early noise
        "ema_decay": 0.99,
    })
    # one run folder per recipe, so a changed recipe never reuses another recipe's generator
    run = work / f"tumor_gan-{hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:10]}"
    t0 = time.perf_counter()
    if not (run / "checkpoints" / "last.pt").is_file():
        data = to_train_data(read_patch_folder(real, synthetic=False), modality="CT")
        train_tumor_gan(cfg, data, run, device="cpu")
    timed("tumor_gan", t0)
    ckpt = run / "checkpoints" / "last.pt"

    derived = work / f"from-{run.name}"  # everything made from this generator
    synthetic = derived / "synthetic"
    t0 = time.perf_counter()
    if not (synthetic / "manifest.csv").is_file():
        for klass in ("healthy", "round", "necrotic"):
            # the gate compares the whole batch with the real patches, so every class is sampled;
            # the minority is sampled most, since the dataset fills it
            sample_tumors(ckpt, klass, n_synth if klass == MINORITY else n_synth // 2, seed, synthetic)
    timed("sample", t0)

    gate_cfg, gate_hash = deployment_gate("tumor-patches.yaml", seed)
    gate = derived / f"gate-{gate_hash}"
    t0 = time.perf_counter()
    if not (gate / "gate_report.json").is_file():
        run_gate(real, synthetic, gate, gate_cfg)
    timed("gate", t0)
    verdict = json.loads((gate / "gate_report.json").read_text())
    return {"real": real, "synthetic": synthetic, "gate": gate, "card": run / "checkpoints" / "last.json", "derived": derived,
            "verdict": verdict.get("verdict"), "failed_checks": verdict.get("failed_checks", []), "timings": timings}


def build_balanced(work: Path, inputs: dict[str, Any], seed: int, max_share: float, gated: bool = True) -> Path:
    """The medaug dataset of the tumor classes: splits from ingest (held-out test subjects), all
    other subjects in training (the GAN saw them), necrotic filled with gated synthetic patches.

    `gated=False` builds the diagnostic dataset of arm (c'): the same fill without the gate
    (only used when the gate rejected the batch, to measure what medaug refused)."""
    from pipeline.dataset import DatasetConfig

    cfg = DatasetConfig(
        deployment="tumor-patches", target_modality="CT", classes=TUMOR_CLASSES, strategy="equalise",
        max_synthetic_share=max_share, seed=seed, fractions={"train": 1.0, "val": 0.0, "test": 0.0},  # type: ignore[arg-type]
        manifests_dir=work / "data_manifests",
    )
    return build_arm_dataset(inputs, cfg, inputs["derived"], gated)


def build_insertion_inputs(work: Path, inputs: dict[str, Any], seed: int, patch_size: int, n_insert: int | None) -> dict[str, Any]:
    """Lesion insertion (pipeline/insertion.py): the tumor GAN's necrotic patches inserted into
    real CT training volumes, gated as lesion patches against the real training lesions.

    The lesion patches are the GAN batch's accepted ones when the patch gate accepted it, else
    every necrotic patch of the batch (the insertion gate then judges the inserted lesions,
    and the report says so). `n_insert` defaults to the training volumes' class gap (round
    minus necrotic CT volumes) plus a quarter, for the items the insertion gate may drop.
    Returns `inputs` with real = the ingest folder, synthetic = the insertion folder, gate =
    the insertion gate, and the insertion gate's verdict and checks.
    """
    from pipeline.insertion import gate_insertions, insert_lesions
    from pipeline.manifest import read_manifest

    timings, timed = stage_clock(work)
    ingest = work / "ingest"
    rows = [r for r in read_manifest(ingest) if r["split"] == "train" and r["modality"] == "CT"]
    gap = sum(r["class"] == "round" for r in rows) - sum(r["class"] == MINORITY for r in rows)
    n = n_insert if n_insert is not None else max(1, gap + gap // 4)
    # named by what it was made from: the accepted patches of one patch gate, or all of them
    patch_gate = inputs["gate"] if inputs["verdict"] == "accept" else None
    out = inputs["derived"] / f"insertion_n{n}_{patch_gate.name if patch_gate is not None else 'all'}"
    t0 = time.perf_counter()
    if not (out / "manifest.csv").is_file():
        insert_lesions(ingest, inputs["synthetic"], out, n, MINORITY, seed=seed, patch_gate=patch_gate)
    timed("insertion", t0)

    gate_cfg, gate_hash = deployment_gate("tumor-insertion.yaml", seed)
    gate = out.with_name(f"{out.name}_gate-{gate_hash}")
    t0 = time.perf_counter()
    lesions = real_lesion_patches(work, patch_size, seed)
    if not (gate / "gate_report.json").is_file():
        gate_insertions(lesions, out, gate, gate_cfg, patch_size=patch_size)
    timed("insertion_gate", t0)
    report = json.loads((gate / "gate_report.json").read_text())
    return inputs | {"real": ingest, "synthetic": out, "gate": gate, "patch_gate_verdict": inputs["verdict"],
                     "patch_failed_checks": inputs["failed_checks"], "verdict": report["verdict"],
                     "failed_checks": report["failed_checks"], "checks": report["checks"], "n_accepted": report["n_accepted"],
                     "n_rejected": report["n_rejected"], "n_inserted": n, "timings": timings}


def real_lesion_patches(work: Path, patch_size: int, seed: int) -> Path:
    """Lesion-centred patches (no healthy ones) of every real volume of work/ingest, all splits,
    cut once per size and seed (the largest-lesion slice +-2): the insertion gate's reference."""
    from pipeline.patches import extract_patches, write_patch_folder

    out = work / f"patches_real_lesions{patch_size}_s{seed}"
    if not (out / "manifest.csv").is_file():
        write_patch_folder(extract_patches([work / "ingest"], patch_size=patch_size, dims=2, seed=seed, neighbours=2,
                                           healthy_per_volume=0), out)
    return out


def oracle_lesion_inputs(work: Path, inputs: dict[str, Any], patch_size: int, seed: int) -> dict[str, Any]:
    """Diagnostic, not a product mode: the real necrotic TRAINING lesion patches stand in for the
    GAN's, so insertion places real lesions (a perfect lesion generator's upper bound). Test-split
    patches are left out. Returns `inputs` with synthetic = that patch folder, no patch gate."""
    from pipeline.manifest import read_manifest, write_manifest

    lesions = real_lesion_patches(work, patch_size, seed)
    derived = work / "oracle-real-lesions"
    rows = [r for r in read_manifest(lesions) if r["class"] == MINORITY and r["split"] == "train"]
    if not rows:
        raise SystemExit(f"--oracle-lesions: {lesions} holds no {MINORITY} training lesion patch to insert")
    # the "generator" is the set of real lesions: named by their hashes, with a card listing their
    # subjects, so the dataset writer's provenance rules hold for the diagnostic too
    source = hashlib.sha256("".join(sorted(r["source_sha256"] for r in rows)).encode()).hexdigest()
    card = derived / "oracle_card.json"
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text(json.dumps({"checkpoint_sha256": source, "kind": "oracle: real necrotic training lesions (diagnostic)",
                                "train_subjects": sorted({r["subject_id"] for r in rows})}, indent=2) + "\n", encoding="utf-8")
    rows = [r | {"path": str((lesions / r["path"]).resolve()), "label_path": str((lesions / r["label_path"]).resolve()),
                 "checkpoint_sha256": source} for r in rows]
    write_manifest(derived / "lesions", rows, list(rows[0]))
    return inputs | {"synthetic": derived / "lesions", "derived": derived, "gate": None, "verdict": "oracle", "card": card,
                     "failed_checks": ["not a generator: real training lesions"]}


def build_insertion_balanced(work: Path, inputs: dict[str, Any], seed: int, max_share: float, gated: bool = True) -> Path:
    """The medaug dataset of the insertion mode: real CT volumes (ingest splits) plus gated inserted
    volumes in training (as the flow's dataset.synthesis: insertion builds it; each inserted row carries its class)."""
    from pipeline.dataset import DatasetConfig

    cfg = DatasetConfig(
        deployment="tumor-patches", synthesis="insertion", target_modality="CT", classes=TUMOR_CLASSES, strategy="equalise",
        max_synthetic_share=max_share, seed=seed, fractions={"train": 1.0, "val": 0.0, "test": 0.0},  # type: ignore[arg-type]
        manifests_dir=work / "data_manifests",
    )
    return build_arm_dataset(inputs, cfg, inputs["synthetic"].parent / f"{inputs['synthetic'].name}_ds", gated)


# --- mri-ct deployment: CycleGAN MRI->CT translations fill the CT minority class -----------------


CONFIGS = REPO / "configs"


def cyclegan_config(steps: int | None, seed: int) -> tuple[Any, Any]:
    """configs/cyclegan.yaml's `cyclegan:` and `cyclegan_data:` sections as (CycleGANConfig, SliceConfig).

    `steps` keeps the recipe's shape: half at the constant learning rate, half decaying to 0
    (the config's own 1000 + 1000 when None).
    """
    from medaug.config import load_config

    overrides = [f"cyclegan.seed={seed}"]
    if steps is not None:
        overrides += [f"cyclegan.n_steps_constant={steps // 2}", f"cyclegan.n_steps_decay={steps - steps // 2}"]
    cfg = load_config(CONFIGS / "cyclegan.yaml", overrides)
    return cfg.cyclegan, cfg.cyclegan_data


def deployment_gate(config: str, seed: int) -> tuple[Any, str]:
    """The gate section of configs/CONFIG (with what it includes) at this seed, as the deployment
    gates, and a short hash of it: gate folders are named by it, so a changed gate config never
    reuses an old verdict (a changed gate code does: start a fresh work folder)."""
    from medaug.config import load_section
    from pipeline.gate.config import GateConfig

    cfg = load_section(GateConfig, CONFIGS / config, "gate", [f"gate.seed={seed}"])
    return cfg, hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:8]


def mrict_dataset_config(work: Path, seed: int, max_share: float | None) -> Any:
    """configs/mri-ct.yaml's `dataset:` section (built on configs/dataset.yaml), for the tumor classes.

    Every non-test subject goes to training (its MR or CT trained the CycleGAN, so the writer
    would pin it there anyway); the held-out test subjects are the ingest manifest's test split.
    """
    from medaug.config import load_config
    from pipeline.dataset import DatasetConfig

    options: dict[str, Any] = load_config(CONFIGS / "mri-ct.yaml").dataset.model_dump()
    options.update({"classes": TUMOR_CLASSES, "seed": seed, "fractions": {"train": 1.0, "val": 0.0, "test": 0.0},
                    "manifests_dir": work / "data_manifests"})
    if max_share is not None:
        options["max_synthetic_share"] = max_share
    return DatasetConfig.model_validate(options)


def check_cohort(work: Path, subjects: int, size: int, seed: int, minority_train: int | None = None) -> None:
    """Refuse a work folder whose cohort was made with other options (its CycleGAN run would not match the report)."""
    stamp = work / "cohort_options.json"
    wanted: dict[str, Any] = {"subjects": subjects, "size": size, "seed": seed}
    if minority_train is not None:
        wanted["minority_train"] = minority_train
    if stamp.is_file():
        found = json.loads(stamp.read_text(encoding="utf-8"))
        if found != wanted:
            raise SystemExit(f"work folder {work} holds a cohort made with {found}, not {wanted}: "
                             "pass --fresh to rebuild it, or another --work folder")
    elif (work / "cohort" / "cohort.csv").is_file():
        raise SystemExit(f"work folder {work} holds a cohort of unknown options: pass --fresh, or another --work folder")
    else:
        work.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(wanted) + "\n", encoding="utf-8")


def build_mrict_inputs(work: Path, subjects: int, size: int, seed: int, cyclegan_steps: int | None,
                       minority_train: int | None = None) -> dict[str, Any]:
    """Phantom cohort -> ingest (CT, MR) -> CycleGAN -> MR training split translated to CT -> gate.

    Returns the paths (ingest = the real manifest, synthetic, gate, card), the checkpoint
    used, the gate verdict with its checks, and the stage timings.
    """
    from models.train_cyclegan import train_cyclegan
    from pipeline.gate.run import run_gate
    from pipeline.manifest import sha256_file
    from pipeline.slices import load_training_inputs
    from pipeline.structure import STRUCTURE_KEY
    from pipeline.translate import run_translate

    timings, timed = stage_clock(work)
    cohort, ingest = cohort_and_ingest(work, subjects, size, seed, ["CT", "MR"], timed, minority_train)

    # the run folder is named by a hash of the config and the ingest manifest (which holds every
    # volume's sha256), as the augment flow names its runs: same config and data, same run, no retraining
    cfg, slice_cfg = cyclegan_config(cyclegan_steps, seed)
    blob = json.dumps({"config": cfg.model_dump(mode="json"), "slices": slice_cfg.model_dump(mode="json"),
                       "data": sha256_file(ingest / "manifest.csv")}, sort_keys=True, default=str)
    run = work / "runs" / f"cyclegan-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
    last = run / "checkpoints" / "last.pt"
    done = last.is_file() and json.loads(last.with_suffix(".json").read_text()).get("step", 0) >= cfg.total_steps
    t0 = time.perf_counter()
    if not done:
        inputs = load_training_inputs([ingest], cfg.image_size, cfg.in_channels, slice_cfg)
        log.info("CycleGAN: %d MRI and %d CT training slices, %d steps, run %s", len(inputs.data.a), len(inputs.data.b),  # type: ignore[arg-type]
                 cfg.total_steps, run.name)
        result = train_cyclegan(cfg, inputs.data, run, resume=last.is_file(), device="cpu", evaluate=inputs.evaluate,
                                best_key=STRUCTURE_KEY if inputs.evaluate is not None else None)
        for warning in result.warnings:
            log.warning("CycleGAN health: %s", warning)
    timed("cyclegan", t0)
    # as flows/tasks.py train_cyclegan_task: best.pt (picked by structure scores) when there is one
    checkpoint = run / "checkpoints" / "best.pt"
    if not checkpoint.is_file():
        checkpoint = last

    # translations, gate and datasets belong to this run: a new run gets new folders
    derived = work / f"from-{run.name}"
    synthetic = derived / "synthetic"
    t0 = time.perf_counter()
    if not (synthetic / "manifest.csv").is_file():
        # the augment flow's generate defaults: the training split only, EMA weights
        run_translate(checkpoint, "mri2ct", ingest, synthetic, batch_size=16, device="cpu", split="train", use_ema=True)
    timed("translate", t0)

    gate_cfg, gate_hash = deployment_gate("mri-ct.yaml", seed)
    gate = derived / f"gate-{gate_hash}"
    t0 = time.perf_counter()
    if not (gate / "gate_report.json").is_file():
        # the real reference: the ingest folder's CT rows of the train split (the gate keeps the
        # synthetic set's modality and GateConfig.real_split, "train")
        run_gate(ingest, synthetic, gate, gate_cfg)
    timed("gate", t0)
    report = json.loads((gate / "gate_report.json").read_text())
    card = json.loads(checkpoint.with_suffix(".json").read_text())
    return {"real": ingest, "synthetic": synthetic, "gate": gate, "card": checkpoint.with_suffix(".json"), "derived": derived,
            "checkpoint": f"{run.name}/checkpoints/{checkpoint.name} (step {card.get('step')}, "
                          f"{card.get('weights_for_inference', 'live')} weights)",
            "cyclegan_steps": cfg.total_steps, "monitor_subjects": len(card.get("monitor_subjects") or []),
            "verdict": report.get("verdict"),
            "failed_checks": report.get("failed_checks", []), "checks": report.get("checks", []),
            "n_accepted": report.get("n_accepted"), "n_rejected": report.get("n_rejected"), "timings": timings}


def build_arm_dataset(inputs: dict[str, Any], cfg: Any, root: Path, gated: bool) -> Path:
    """Arm (c)'s dataset under root/dataset: the real items plus the gate-accepted synthetic ones (only
    the real items when the gate rejected the batch, so (c) equals (a) and the report says so); with
    `gated=False`, arm (c')'s diagnostic dataset under root/dataset_ungated: every synthetic item."""
    from pipeline.dataset import build_dataset

    if not gated:
        out = root / "dataset_ungated"
        build_dataset(inputs["real"], [inputs["synthetic"]], out, cfg, generator_cards=[inputs["card"]], overwrite=True,
                      allow_ungated=True)
    elif inputs["gate"] is None:
        out = root / "dataset"
        build_dataset(inputs["real"], [], out, cfg, overwrite=True)
    else:
        out = root / "dataset"
        build_dataset(inputs["real"], [inputs["synthetic"]], out, cfg, gates=[inputs["gate"]],
                      generator_cards=[inputs["card"]], overwrite=True)
    return out


def build_mrict_balanced(inputs: dict[str, Any], cfg: Any, gated: bool = True) -> Path:
    """The medaug mri-ct dataset: real CT volumes (ingest splits) plus translated CT volumes in training.

    `gated=False` builds the diagnostic dataset of arm (c'): every translation, without the gate
    (only used when the gate rejected the batch)."""
    return build_arm_dataset(inputs, cfg, inputs["derived"], gated)


def volume_patches(dataset: Path, crop: int, patch_size: int, seed: int) -> list[dict[str, Any]]:
    """Lesion-centred 2D CT patches of every volume of a medaug dataset, as classifier items.

    pipeline.patches.extract_patches reads the dataset's manifest.csv like an ingest manifest
    (path, label_path, class, split, modality, subject_id, sha256); it marks every patch real,
    so the adapter here takes each patch's split and synthetic flag from its source volume's row
    (the patch's source_sha256 is the dataset file's sha256). The largest-lesion axial slice and
    two neighbours either side that hold lesion, CT window -100..200 HU, as the tumor-patches
    mode cuts its real patches; no healthy patches (the classes are the tumor classes).
    Items: {"image": (1, crop, crop), "class": int, "split", "synthetic": bool, "subject_id"}.
    """
    from pipeline.manifest import read_manifest
    from pipeline.patches import extract_patches

    volumes = {r["sha256"]: r for r in read_manifest(dataset)}
    patches = extract_patches([dataset], patch_size=patch_size, seed=seed, dims=2, neighbours=2, healthy_per_volume=0)
    items = []
    for image, row in zip(patches.images, patches.rows, strict=True):
        volume = volumes[row["source_sha256"]]
        items.append({"image": _as_2d(torch.from_numpy(image[None]), crop), "class": TUMOR_CLASSES.index(row["class"]),
                      "split": volume["split"], "synthetic": volume["synthetic"] in ("1", "true", "True"),
                      "subject_id": volume["subject_id"]})
    return items


def inserted_volume_patches(dataset: Path, crop: int, patch_size: int) -> list[dict[str, Any]]:
    """Classifier items of the inserted volumes of a dataset: patches of the inserted lesion (label 2).

    An inserted volume also holds its host's own lesion (label 1, of the host's class);
    the volume's class is the inserted lesion's, so only that lesion is cut
    (pipeline.insertion.inserted_patches: the same slices, window and centring as the real patches).
    """
    import nibabel as nib

    from pipeline.insertion import inserted_patches
    from pipeline.manifest import read_manifest
    from pipeline.patches import DEFAULT_TUMOR_HU_WINDOW

    items = []
    for r in read_manifest(dataset):
        if r["synthetic"] != "1":
            continue
        vol = np.asarray(nib.load(dataset / r["path"]).dataobj, np.float32)  # type: ignore[attr-defined]
        lab = np.asarray(nib.load(dataset / r["label_path"]).dataobj)  # type: ignore[attr-defined]
        for img, _, _ in inserted_patches(vol, lab, patch_size, 2, DEFAULT_TUMOR_HU_WINDOW):
            items.append({"image": _as_2d(torch.from_numpy(img[None]), crop), "class": TUMOR_CLASSES.index(r["class"]),
                          "split": r["split"], "synthetic": True, "subject_id": r["subject_id"]})
    return items


def mrict_items(dataset: Path, crop: int, patch_size: int, seed: int, ungated: Path | None = None, insertion: bool = False) -> ArmItems:
    """Arm items of the volume datasets (mri-ct, and tumor-patches by insertion): (a)/(b) real CT
    training patches, (c)/(d) the dataset's training split (real + gated translated or inserted
    CT), test = real CT patches of the test-split subjects (each test item keeps its subject)."""
    from pipeline.manifest import read_manifest

    def plain(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"image": it["image"], "class": it["class"]} for it in items]

    cut = volume_patches(dataset, crop, patch_size, seed)
    if insertion:
        cut = [it for it in cut if not it["synthetic"]] + inserted_volume_patches(dataset, crop, patch_size)
    real_train = [it for it in cut if it["split"] == "train" and not it["synthetic"]]
    all_train = [it for it in cut if it["split"] == "train"]
    test = [it for it in cut if it["split"] == "test"]
    if any(it["synthetic"] for it in test):
        raise RuntimeError(f"{dataset}: the test split holds synthetic volumes; the dataset writer must keep them out")
    ungated_train = [it for it in volume_patches(ungated, crop, patch_size, seed) if it["split"] == "train"] if ungated else None
    if ungated_train is not None and insertion and ungated is not None:
        ungated_train = [it for it in ungated_train if not it["synthetic"]] + [
            it for it in inserted_volume_patches(ungated, crop, patch_size) if it["split"] == "train"]
    rows = read_manifest(dataset)

    def volumes(split: str, synthetic: bool) -> dict[str, int]:
        flag = "1" if synthetic else "0"
        return {c: sum(r["split"] == split and r["synthetic"] == flag and r["class"] == c for r in rows) for c in TUMOR_CLASSES}

    counts = {
        "train_real": class_counts(real_train), "train_medaug": class_counts(all_train), "test": class_counts(test),
        "test_subjects": {c: len({it["subject_id"] for it in test if TUMOR_CLASSES[it["class"]] == c}) for c in TUMOR_CLASSES},
        "volumes_train_real": volumes("train", False), "volumes_train_translated": volumes("train", True),
        "volumes_test": volumes("test", False),
    }
    if ungated_train is not None:
        counts["train_ungated"] = class_counts(ungated_train)
        ungated_rows = read_manifest(ungated) if ungated else []
        counts["volumes_train_translated_ungated"] = {
            c: sum(r["split"] == "train" and r["synthetic"] == "1" and r["class"] == c for r in ungated_rows) for c in TUMOR_CLASSES
        }
    test_items = [{"image": it["image"], "class": it["class"], "subject": it["subject_id"]} for it in test]
    return ArmItems(plain(real_train), plain(all_train), test_items, plain(ungated_train) if ungated_train is not None else None, counts)


# --- experiment --------------------------------------------------------------------------------


@dataclass
class ArmItems:
    """Classifier items ({"image": (1, crop, crop), "class": int}) of every arm, and their counts.

    `real_train` feeds arms (a) and (b), `medaug_train` arm (c), `ungated_train` the diagnostic
    arm (c') (None when the gate accepted); `test` is real patches of held-out subjects only.
    """

    real_train: list[dict[str, Any]]
    medaug_train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    ungated_train: list[dict[str, Any]] | None
    counts: dict[str, dict[str, int]]


def class_counts(items: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Items per class name."""
    return {c: sum(it["class"] == i for it in items) for i, c in enumerate(TUMOR_CLASSES)}


def tumor_patch_items(dataset: Path, crop: int, ungated: Path | None = None) -> ArmItems:
    """Arm items of the tumor-patches deployment: the dataset's patches, by split and flag."""
    from pipeline.manifest import read_manifest

    real_train = load_items(dataset, "train", synthetic=False, crop=crop)
    all_train = load_items(dataset, "train", synthetic=None, crop=crop)
    test = load_items(dataset, "test", synthetic=None, crop=crop)
    ungated_train = load_items(ungated, "train", synthetic=None, crop=crop) if ungated is not None else None
    counts = {"train_real": class_counts(real_train), "train_medaug": class_counts(all_train), "test": class_counts(test)}
    test_rows = [r for r in read_manifest(dataset) if r["split"] == "test"]
    counts["test_subjects"] = {c: len({r["subject_id"] for r in test_rows if r["class"] == c}) for c in TUMOR_CLASSES}
    if ungated_train is not None:
        counts["train_ungated"] = class_counts(ungated_train)
    return ArmItems(real_train, all_train, test, ungated_train, counts)


def run_arms(items: ArmItems, seeds: Sequence[int], steps: int, batch_size: int) -> dict[str, Any]:
    """Train arms (a), (b), (c) (and (c') when there are ungated items) for every seed; per-seed scores and summaries."""
    classes = TUMOR_CLASSES
    counts = items.counts
    test = items.test
    log.info("items: %s", counts)
    arms: dict[str, tuple[list[dict[str, Any]], bool, Callable[[dict[str, Any]], dict[str, Any]] | None]] = {
        "a_real": (items.real_train, False, None),
        "b_real_oversample_aug": (items.real_train, True, classical_augmentation()),
        "c_medaug_balanced": (items.medaug_train, False, None),
        # the comparison a researcher makes: synthetic data together with the same classical recipe as (b)
        "d_medaug_oversample_aug": (items.medaug_train, True, classical_augmentation()),
    }
    if items.ungated_train is not None:
        arms["c_ungated_diagnostic"] = (items.ungated_train, False, None)
    per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    for seed in seeds:
        for name, (train, balanced, transform) in arms.items():
            t0 = time.perf_counter()
            s = train_and_test(train, test, classes, seed, steps, batch_size, balanced, transform)
            per_seed[name].append({"seed": seed, "balanced_accuracy": s.balanced_accuracy, "minority_recall": s.minority_recall,
                                   "recalls": s.recalls, "seconds": round(time.perf_counter() - t0, 1),
                                   "correct": [int(c) for c in s.correct]})
            log.info("seed %d %s: balanced accuracy %.3f, %s recall %.3f", seed, name, s.balanced_accuracy, MINORITY, s.minority_recall)
    summary: dict[str, Any] = {}
    for name, rows in per_seed.items():
        summary[name] = {m: mean_ci([r[m] for r in rows]) for m in ("balanced_accuracy", "minority_recall")}
    for mine, tag in (("c_medaug_balanced", "c"), ("c_ungated_diagnostic", "cu")):
        if mine not in per_seed:
            continue
        for other in ("a_real", "b_real_oversample_aug"):
            summary[f"{tag}_minus_{other[0]}"] = {
                m: mean_ci([c[m] - o[m] for c, o in zip(per_seed[mine], per_seed[other], strict=True)])
                for m in ("balanced_accuracy", "minority_recall")
            }
    for mine, tag in (("d_medaug_oversample_aug", "d"), ("c_medaug_balanced", "c")):
        summary[f"{tag}_minus_b_seeds"] = {
            m: mean_ci([c[m] - o[m] for c, o in zip(per_seed[mine], per_seed["b_real_oversample_aug"], strict=True)])
            for m in ("balanced_accuracy", "minority_recall")
        }
        # the interval the claim rests on: over classifier seeds and test subjects, paired across arms
        summary[f"{tag}_minus_b_boot"] = paired_bootstrap(
            np.array([r["correct"] for r in per_seed[mine]], bool), np.array([r["correct"] for r in per_seed["b_real_oversample_aug"]], bool),
            [it["class"] for it in test], [str(it.get("subject", i)) for i, it in enumerate(test)], seed=0)
    return {"counts": counts, "per_seed": per_seed, "summary": summary}


def _fmt(ci: Sequence[float]) -> str:
    m, lo, hi = ci
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def verdict_text(summary: dict[str, Any], tag: str = "c", name: str = "(c) medaug") -> str:
    """Plain statement of whether (c) beats (a) and (b) (paired 95% CI of the difference above 0)."""
    lines = []
    for other, label in (("a", "(a) real"), ("b", "(b) real + oversampling + classical augmentation")):
        d = summary[f"{tag}_minus_{other}"]["balanced_accuracy"]
        r = summary[f"{tag}_minus_{other}"]["minority_recall"]
        if d[1] > 0:
            word = "beats"
        elif d[2] < 0:
            word = "is WORSE than"
        else:
            word = "does NOT clearly beat (CI of the difference includes 0)"
        lines.append(f"{name} {word} {label}: balanced accuracy difference {_fmt(d)}, minority recall difference {_fmt(r)}.")
    beaten = [f"({o})" for o in ("a", "b") if summary[f"{tag}_minus_{o}"]["balanced_accuracy"][1] > 0]
    not_beaten = [f"({o})" for o in ("a", "b") if f"({o})" not in beaten]
    if not not_beaten:
        lines.append(f"In short: {name} beats both (a) and (b) on balanced accuracy (paired 95% CI above 0).")
    else:
        lines.append(f"In short: {name} " + (f"beats {' and '.join(beaten)} but " if beaten else "")
                     + f"does NOT beat {' and '.join(not_beaten)} (paired 95% CI of the balanced-accuracy difference "
                     "not above 0), so it does not beat both.")
    return " ".join(lines)


def beyond_text(summary: dict[str, Any], verdict: str) -> str:
    """Plain statement of the claim (d) - (b): does medaug's data help on top of oversampling + classical augmentation?"""
    if "d_minus_b_boot" not in summary:
        return "not measured (no arm (d))."
    m, lo, hi = summary["d_minus_b_boot"]
    refused = "" if verdict == "accept" else " (the gate rejected the synthetic data, so (d) holds real items only)"
    if lo > 0:
        word = "YES: medaug's data helps beyond classical augmentation on this run"
    elif hi < 0:
        word = "NO: (d) is worse than (b) on this run"
    else:
        word = "NOT SHOWN: the interval includes 0, so this run does not show that medaug helps beyond classical augmentation"
    return f"{word}{refused}; (d) - (b) balanced accuracy {m:.3f} [{lo:.3f}, {hi:.3f}] (95%, seeds x test subjects)."


def markdown_section(result: dict[str, Any], command: str) -> str:
    """The RESULTS.md section of a run."""
    s = result["summary"]
    names = {"a_real": "(a) real, imbalanced", "b_real_oversample_aug": "(b) real + oversampling + MONAI aug",
             "c_medaug_balanced": "(c) medaug balanced (real + gated synthetic)",
             "d_medaug_oversample_aug": "(d) medaug + oversampling + MONAI aug (as (b))",
             "c_ungated_diagnostic": "(c') diagnostic: same fill, synthetic NOT gated"}
    cfg = result["config"]
    counts = result["counts"]
    failed = f" (failed: {', '.join(result['gate']['failed_checks'])})" if result["gate"]["failed_checks"] else ""
    if cfg.get("deployment", "tumor-patches") == "mri-ct":
        g = result["gate"]
        checks = ", ".join(f"{c['name']} {c['value']:.3g} {c['op']} {c['threshold']:.3g}" for c in g.get("checks", [])
                           if c.get("value") is not None and c.get("threshold") is not None)
        names["c_medaug_balanced"] = "(c) medaug balanced (real CT + gated MRI->CT translations)"
        names["c_ungated_diagnostic"] = "(c') diagnostic: same fill, translations NOT gated"
        head = [
            f"## Downstream classifier, mri-ct deployment: does the balanced CT dataset help? ({result['date']})",
            "",
            f"- Device: {result['device']}",
            f"- Command: `{command}`",
            f"- Cohort: {cfg['subjects']} phantom subjects at size {cfg['size']} (unpaired CT and MR training subjects, "
            f"held-out test subjects in both); CycleGAN configs/cyclegan.yaml, {g['cyclegan_steps']} steps; the MR training "
            f"split translated to CT with {g['checkpoint']}; gate (configs/mri-ct.yaml's: gate.yaml + the lesion HU check; "
            f"reference = the real CT training volumes) verdict **{g['verdict']}**{failed}: {checks}; per-volume filter {g['n_accepted']} accepted, "
            f"{g['n_rejected']} rejected.",
            f"- CT volumes per class: real train {counts['volumes_train_real']}, translated (MR source) in (c) "
            f"{counts['volumes_train_translated']}, test (real, held-out subjects) {counts['volumes_test']}"
            + (f"; translated in (c') {counts['volumes_train_translated_ungated']}" if "volumes_train_translated_ungated" in counts else "")
            + f". Dataset: configs/dataset.yaml + mri-ct.yaml (equalise, max synthetic share "
            f"{result['max_synthetic_share']}), content hash {result['dataset_content_hash'][:12]}.",
            f"- Patches per class (lesion-centred, 2D axial, largest-lesion slice +-2, CT window -100..200 HU): real train "
            f"{counts['train_real']}, medaug train {counts['train_medaug']}, test {counts['test']}"
            + (f"; ungated (c') train {counts['train_ungated']}" if "train_ungated" in counts else "") + ".",
        ]
    elif cfg.get("synthesis") == "insertion":
        g = result["gate"]
        checks = ", ".join(f"{c['name']} {c['value']:.3g} {c['op']} {c['threshold']:.3g}" for c in g.get("checks", [])
                           if c.get("value") is not None and c.get("threshold") is not None)
        names["c_medaug_balanced"] = "(c) medaug balanced (real CT + gated inserted lesions)"
        head = [
            f"## Downstream classifier, tumor-patches deployment by lesion insertion ({result['date']})"
            + (" -- ORACLE: real training lesions inserted, a diagnostic upper bound" if cfg.get("oracle_lesions") else ""),
            "",
            f"- Device: {result['device']}",
            f"- Command: `{command}`",
            f"- Cohort: {cfg['subjects']} phantom subjects at size {cfg['size']} (CT); tumor GAN {cfg['gan_steps']} steps, "
            f"its patch batch: gate (configs/tumor-patches.yaml's: class checks, lesion HU) **{g['patch_gate_verdict']}**"
            + (f" (failed: {', '.join(g['patch_failed_checks'])}), so every necrotic patch was offered to insertion" if g["patch_failed_checks"] else "")
            + f"; {g['n_inserted']} necrotic lesions inserted into real CT training volumes (pipeline/insertion.py, feathered); "
            f"insertion gate (configs/tumor-insertion.yaml's; lesion patches vs real training lesion patches, seam check on) **{g['verdict']}**{failed}: {checks}; "
            f"per volume {g['n_accepted']} accepted, {g['n_rejected']} rejected.",
            f"- CT volumes per class: real train {counts['volumes_train_real']}, inserted in (c)/(d) "
            f"{counts['volumes_train_translated']}, test (real, held-out subjects) {counts['volumes_test']}. Dataset content hash "
            f"{result['dataset_content_hash'][:12]} (equalise, max synthetic share {result['max_synthetic_share']}).",
            f"- Patches per class (lesion-centred, 2D axial, largest-lesion slice +-2, CT window -100..200 HU; inserted volumes: "
            f"the inserted lesion): real train {counts['train_real']}, medaug train {counts['train_medaug']}, test {counts['test']}.",
        ]
    else:
        head = [
            f"## Downstream classifier: does the balanced dataset help? ({result['date']})",
            "",
            f"- Device: {result['device']}",
            f"- Command: `{command}`",
            f"- Cohort: {cfg['subjects']} phantom subjects at size {cfg['size']} (CT), patches {cfg['patch_size']}x{cfg['patch_size']}, "
            f"tumor GAN {cfg['gan_steps']} steps, {cfg['n_synth']} necrotic samples drawn; gate verdict **{result['gate']['verdict']}**"
            + failed + ".",
            f"- Items per class: real train {counts['train_real']}, medaug train {counts['train_medaug']}, "
            f"test (real, held-out subjects) {counts['test']}"
            + (f"; ungated (c') train {counts['train_ungated']}" if "train_ungated" in counts else "") + ".",
        ]
    if cfg.get("minority_train") is not None:
        head.append(f"- Harder task (`--minority-train {cfg['minority_train']}`): only {cfg['minority_train']} of the cohort's necrotic CT "
                    "training subjects kept; the others never entered ingest, so no generator, gate, dataset or classifier saw "
                    "them. The test split" + (" and the MR training split are" if cfg.get("deployment") == "mri-ct" else " is")
                    + " the full cohort's.")
    lines = [
        *head,
        f"- Classifier: 3-block CNN (8-16-32 ch) on the central {cfg['crop']}x{cfg['crop']} of each lesion-centred patch, Adam 1e-3, {cfg['steps']} steps x batch {cfg['batch_size']} in every arm; "
        f"seeds {cfg['seeds']}; mean and 95% t-interval over seeds; the (x) - (b) rows marked 'seeds x subjects' are a paired "
        "bootstrap (2000 resamples) over classifier seeds and test subjects within each class (pipeline of bench/downstream.py "
        "`paired_bootstrap`).",
        "",
        "| arm | balanced accuracy | necrotic (minority) recall |",
        "|---|---|---|",
    ]
    for key, label in names.items():
        if key not in s:
            continue
        lines.append(f"| {label} | {_fmt(s[key]['balanced_accuracy'])} | {_fmt(s[key]['minority_recall'])} |")
    lines += [
        f"| (c) - (a), paired | {_fmt(s['c_minus_a']['balanced_accuracy'])} | {_fmt(s['c_minus_a']['minority_recall'])} |",
        f"| (c) - (b), paired | {_fmt(s['c_minus_b']['balanced_accuracy'])} | {_fmt(s['c_minus_b']['minority_recall'])} |",
    ]
    for tag in ("c", "d"):
        if f"{tag}_minus_b_boot" in s:
            lines += [f"| ({tag}) - (b), paired, seeds x subjects | {_fmt(s[f'{tag}_minus_b_boot'])} | |"]
    if "d_minus_b_seeds" in s:
        lines += [f"| (d) - (b), paired, seeds only | {_fmt(s['d_minus_b_seeds']['balanced_accuracy'])} | "
                  f"{_fmt(s['d_minus_b_seeds']['minority_recall'])} |"]
    if "cu_minus_a" in s:
        lines += [
            f"| (c') - (a), paired | {_fmt(s['cu_minus_a']['balanced_accuracy'])} | {_fmt(s['cu_minus_a']['minority_recall'])} |",
            f"| (c') - (b), paired | {_fmt(s['cu_minus_b']['balanced_accuracy'])} | {_fmt(s['cu_minus_b']['minority_recall'])} |",
        ]
    lines += [
        "",
        f"**Beyond classical augmentation:** {beyond_text(s, result['gate']['verdict'])}",
        "",
        f"**Verdict:** {verdict_text(s)}" if result["gate"]["verdict"] == "accept" else
        "**Verdict:** the gate rejected the synthetic batch, so medaug refused to add it: (c) holds no synthetic data (it is "
        "real-only, the same as (a)) and this run cannot show that (c) beats (a) or (b). It does not."
        + (f" Diagnostic only, outside the product's rules: {verdict_text(s, 'cu', '(c) built WITHOUT the gate')}" if "cu_minus_a" in s else ""),
        "",
        f"Stage times (s, when each stage ran): {result['timings']}. The test split has only {sum(result['counts']['test'].values())} patches from "
        f"held-out subjects (subjects per class: {result['counts']['test_subjects']}). The t-intervals are over classifier "
        "seeds only; the 'seeds x subjects' bootstrap rows also hold the test-set sampling uncertainty (test subjects "
        "resampled within each class), which is the larger part. These are this run's numbers, not a general claim."
        + (" The CycleGAN's best.pt was picked, as the augment flow picks it, by structure scores (input vs translation, "
           f"no truth, no classes) on {result['gate'].get('monitor_subjects', 0)} training-split subjects held out of its "
           "training (the phantom cohort has no validation split; pipeline.slices.plan_monitor); the test split "
           "played no part." if cfg.get("deployment") == "mri-ct" and "best.pt" in result["gate"].get("checkpoint", "") else ""),
        "",
    ]
    return "\n".join(lines)


def device_text() -> str:
    """CPU model, cores and torch version of this machine."""
    return f"CPU {cpu_name()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deployment", choices=["tumor-patches", "mri-ct"], default="tumor-patches",
                        help="tumor-patches: tumor GAN patches fill the minority; mri-ct: CycleGAN MRI->CT translations do.")
    parser.add_argument("--synthesis", choices=["patches", "insertion"], default="patches",
                        help="tumor-patches: the GAN's patches enter the dataset (patches) or are inserted into real training CTs (insertion).")
    parser.add_argument("--oracle-lesions", action="store_true",
                        help="insertion, diagnostic: insert the real necrotic training lesions instead of the GAN's "
                             "(what a perfect lesion generator could give; not a product mode).")
    parser.add_argument("--n-insert", type=int, default=None,
                        help="insertion: volumes to insert into (default: the training class gap plus a quarter).")
    parser.add_argument("--subjects", type=int, default=40, help="Phantom subjects (about 15%% necrotic).")
    parser.add_argument("--minority-train", type=int, default=None,
                        help="Harder task: keep only this many necrotic CT training subjects (the rest never enter ingest; "
                             "test split and MR untouched).")
    parser.add_argument("--size", type=int, default=64, help="Phantom volume side in voxels.")
    parser.add_argument("--patch-size", type=int, default=32, help="2D patch side (power of two).")
    parser.add_argument("--gan-steps", type=int, default=1500, help="tumor-patches: tumor GAN training steps.")
    parser.add_argument("--n-synth", type=int, default=160, help="tumor-patches: necrotic patches sampled (half as many of each other class).")
    parser.add_argument("--cyclegan-steps", type=int, default=None,
                        help="mri-ct: CycleGAN steps, half constant and half decaying learning rate (default: configs/cyclegan.yaml's 2000).")
    parser.add_argument("--max-share", type=float, default=None,
                        help="Dataset cap on the synthetic share per class (default: 0.9 for tumor-patches, configs/dataset.yaml's for mri-ct).")
    parser.add_argument("--seeds", type=int, default=5, help="Classifier seeds per arm.")
    parser.add_argument("--steps", type=int, default=300, help="Classifier optimiser steps per arm.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--crop", type=int, default=16, help="Central crop (pixels) the classifier sees.")
    parser.add_argument("--seed", type=int, default=0, help="Cohort, GAN, gate and dataset seed.")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "_work" / "downstream", help="Work folder (reused between runs).")
    parser.add_argument("--fresh", action="store_true", help="Delete the work folder first.")
    parser.add_argument("--record", action="store_true", help="Append the result section to bench/RESULTS.md.")
    args = parser.parse_args(argv)
    if args.oracle_lesions and args.synthesis != "insertion":
        parser.error("--oracle-lesions inserts real lesions: it needs --synthesis insertion")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)

    gate_info: dict[str, Any]
    if args.deployment == "mri-ct":
        inputs = build_mrict_inputs(args.work, args.subjects, args.size, args.seed, args.cyclegan_steps, args.minority_train)
        gate_info = {k: inputs[k] for k in ("verdict", "failed_checks", "checks", "n_accepted", "n_rejected", "checkpoint", "cyclegan_steps",
                                           "monitor_subjects")}
    else:
        inputs = build_inputs(args.work, args.subjects, args.size, args.seed, args.patch_size, args.gan_steps, args.n_synth,
                              args.minority_train)
        gate_info = {"verdict": inputs["verdict"], "failed_checks": inputs["failed_checks"]}
        if args.synthesis == "insertion" and args.oracle_lesions:
            inputs = oracle_lesion_inputs(args.work, inputs, args.patch_size, args.seed)
        if args.synthesis == "insertion":
            inputs = build_insertion_inputs(args.work, inputs, args.seed, args.patch_size, args.n_insert)
            gate_info = {k: inputs[k] for k in ("verdict", "failed_checks", "checks", "n_accepted", "n_rejected", "n_inserted",
                                               "patch_gate_verdict", "patch_failed_checks")}
    if inputs["verdict"] != "accept":
        # medaug refuses to build (c) from a rejected batch; (a) and (b) still run on the real-only dataset
        log.error("the gate rejected the synthetic data (%s): medaug refuses to build (c)", inputs["failed_checks"])
        inputs["gate"] = None
    t_ds = time.perf_counter()
    if args.deployment == "mri-ct":
        ds_cfg = mrict_dataset_config(args.work, args.seed, args.max_share)
        dataset = build_mrict_balanced(inputs, ds_cfg)
        ungated = build_mrict_balanced(inputs, ds_cfg, gated=False) if inputs["gate"] is None else None
        max_share = ds_cfg.max_synthetic_share
        items = mrict_items(dataset, args.crop, args.patch_size, args.seed, ungated)
    elif args.synthesis == "insertion":
        max_share = 0.9 if args.max_share is None else args.max_share
        dataset = build_insertion_balanced(args.work, inputs, args.seed, max_share)
        ungated = build_insertion_balanced(args.work, inputs, args.seed, max_share, gated=False) if inputs["gate"] is None else None
        items = mrict_items(dataset, args.crop, args.patch_size, args.seed, ungated, insertion=True)
    else:
        max_share = 0.9 if args.max_share is None else args.max_share
        dataset = build_balanced(args.work, inputs, args.seed, max_share)
        ungated = build_balanced(args.work, inputs, args.seed, max_share, gated=False) if inputs["gate"] is None else None
        items = tumor_patch_items(dataset, args.crop, ungated)
    t1 = time.perf_counter()
    result = run_arms(items, list(range(args.seeds)), args.steps, args.batch_size)
    inputs["timings"]["dataset" if args.deployment == "tumor-patches" else "dataset_and_patches"] = round(t1 - t_ds, 1)
    inputs["timings"]["classifiers"] = round(time.perf_counter() - t1, 1)
    result.update({
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_text(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"seeds": list(range(args.seeds))},
        "gate": gate_info,
        "timings": inputs["timings"],
        "max_synthetic_share": max_share,
        "dataset_content_hash": json.loads((dataset / "dataset.json").read_text())["content_hash"],
    })
    (args.work / "downstream_results.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + ".venv/bin/python bench/downstream.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    section = markdown_section(result, command.strip())
    print(section)
    if args.record:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
