"""Proof of usefulness: does the balanced augmented dataset train a better tumor classifier?

The same small 2D CNN is trained on the phantom tumor classes ("round" majority, "necrotic"
minority) three ways and tested on the real-only test split (held-out subjects):

  (a) real:        the imbalanced real training patches, shuffled, no augmentation;
  (b) real+aug:    the same real patches with class-balanced oversampling
                   (class_balanced_sampler) and classical MONAI augmentation
                   (random affine, intensity scale/shift, Gaussian noise);
  (c) medaug:      the balanced dataset written by `medaug build-dataset` (real + gated
                   synthetic patches from the tumor GAN), shuffled, no augmentation.

When the gate rejects the synthetic batch, medaug refuses to add it and (c) is real-only; the
bench then also trains a diagnostic arm (c') on the same fill built without the gate, to show
what was refused (outside the product's rules, reported as such).

Every arm takes the same number of optimiser steps with the same batch size, for several
seeds; balanced accuracy and minority-class (necrotic) recall are reported per seed, as a
mean with a 95% t-interval over seeds, and as paired differences (c - a), (c - b).

Pipeline (all real stages, CPU, a few minutes): phantom cohort -> ingest -> real patches ->
tumor GAN -> sample tumors -> gate -> build-dataset -> classifiers.

    .venv/bin/python bench/downstream.py --subjects 40 --size 64 --seeds 5 --record
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
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
    """Items of a split of a medaug dataset as plain dicts {"image": (1, crop, crop), "class": int}."""
    from pipeline.dataset import BalancedDataset

    ds = BalancedDataset(root, split=split, synthetic=synthetic)
    return [{"image": _as_2d(it["image"], crop), "class": int(it["class"])} for it in (ds[i] for i in range(len(ds)))]


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
    return Scores(statistics.fmean(recalls.values()), recalls.get(MINORITY, float("nan")), recalls)


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (low, high) over seeds."""
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


# --- pipeline stages (each skipped when its output is already in the work folder) -----------


def build_inputs(work: Path, subjects: int, size: int, seed: int, patch_size: int, gan_steps: int, n_synth: int) -> dict[str, Any]:
    """Phantom cohort -> ingest -> real patches -> tumor GAN -> samples -> gate. Returns paths and the gate verdict."""
    from models.train_tumor_gan import TumorGANConfig, train_tumor_gan
    from pipeline.gate.config import GateConfig
    from pipeline.gate.run import run_gate
    from pipeline.ingest import run_ingest
    from pipeline.patches import extract_patches, to_train_data, write_patch_folder
    from pipeline.phantoms import write_cohort
    from pipeline.sample_tumors import sample_tumors

    # a stage found done in the work folder keeps the time it took when it ran
    timings_path = work / "stage_timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def timed(name: str, t0: float) -> None:
        took = round(time.perf_counter() - t0, 1)
        if took >= 1.0 or name not in timings:
            timings[name] = took
        timings_path.write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")
        log.info("stage %s: %.1f s", name, took)

    cohort = work / "cohort"
    t0 = time.perf_counter()
    if not (cohort / "cohort.csv").is_file():
        write_cohort(cohort, n_subjects=subjects, size=size, seed=seed)
    timed("cohort", t0)

    ingest = work / "ingest"
    t0 = time.perf_counter()
    if not (ingest / "manifest.csv").is_file():
        run_ingest([cohort / "nifti" / "CT"], ingest, key=b"bench-downstream")
    timed("ingest", t0)

    real = work / "patches_real"
    t0 = time.perf_counter()
    if not (real / "manifest.csv").is_file():
        write_patch_folder(extract_patches([ingest], patch_size=patch_size, dims=2, seed=seed, neighbours=2), real)
    timed("patches", t0)

    from pipeline.patches import read_patch_folder

    run = work / "tumor_gan"
    t0 = time.perf_counter()
    if not (run / "checkpoints" / "last.pt").is_file():
        data = to_train_data(read_patch_folder(real, synthetic=False), modality="CT")
        cfg = TumorGANConfig.model_validate({
            "patch_size": patch_size, "latent_dim": 64, "g_channels": 16, "d_channels": 16, "batch_size": 32,
            "steps": gan_steps, "seed": seed, "minibatch_std": True, "mode_seeking_weight": 1.0,
            "diffaug": ["translation", "cutout"], "log_every": 100, "sample_every": 500, "checkpoint_every": gan_steps,
            # a short CPU run: EMA over ~100 steps, not the recipe's ~1000, or it still averages the early noise
            "ema_decay": 0.99,
        })
        train_tumor_gan(cfg, data, run, device="cpu")
    timed("tumor_gan", t0)
    ckpt = run / "checkpoints" / "last.pt"

    synthetic = work / "synthetic"
    t0 = time.perf_counter()
    if not (synthetic / "manifest.csv").is_file():
        for klass in ("healthy", "round", "necrotic"):
            # the gate compares the whole batch with the real patches, so every class is sampled;
            # the minority is sampled most, since the dataset fills it
            sample_tumors(ckpt, klass, n_synth if klass == MINORITY else n_synth // 2, seed, synthetic)
    timed("sample", t0)

    gate = work / "gate"
    t0 = time.perf_counter()
    if not (gate / "gate_report.json").is_file():
        run_gate(real, synthetic, gate, GateConfig.model_validate({"seed": seed}))
    timed("gate", t0)
    verdict = json.loads((gate / "gate_report.json").read_text())
    return {"real": real, "synthetic": synthetic, "gate": gate, "card": run / "checkpoints" / "last.json",
            "verdict": verdict.get("verdict"), "failed_checks": verdict.get("failed_checks", []), "timings": timings}


def build_balanced(work: Path, inputs: dict[str, Any], seed: int, max_share: float, gated: bool = True) -> Path:
    """The medaug dataset of the tumor classes: splits from ingest (held-out test subjects), all
    other subjects in training (the GAN saw them), necrotic filled with gated synthetic patches.

    `gated=False` builds the diagnostic dataset of arm (c'): the same fill without the gate
    (only used when the gate rejected the batch, to measure what medaug refused)."""
    from pipeline.dataset import DatasetConfig, build_dataset

    cfg = DatasetConfig(
        deployment="tumor-patches", target_modality="CT", classes=TUMOR_CLASSES, strategy="equalise",
        max_synthetic_share=max_share, seed=seed, fractions={"train": 1.0, "val": 0.0, "test": 0.0},  # type: ignore[arg-type]
        manifests_dir=work / "data_manifests",
    )
    if not gated:
        out = work / "dataset_ungated"
        build_dataset(inputs["real"], [inputs["synthetic"]], out, cfg, generator_cards=[inputs["card"]], overwrite=True)
        return out
    out = work / "dataset"
    if inputs["gate"] is None:  # rejected batch: a real-only dataset, so (c) equals (a) and the report says so
        build_dataset(inputs["real"], [], out, cfg, overwrite=True)
    else:
        build_dataset(inputs["real"], [inputs["synthetic"]], out, cfg, gates=[inputs["gate"]], generator_cards=[inputs["card"]], overwrite=True)
    return out


# --- experiment --------------------------------------------------------------------------------


def run_arms(dataset: Path, seeds: Sequence[int], steps: int, batch_size: int, crop: int, ungated: Path | None = None) -> dict[str, Any]:
    """Train arms (a), (b), (c) (and (c') on `ungated`) for every seed; per-seed scores and summaries."""
    real_train = load_items(dataset, "train", synthetic=False, crop=crop)
    all_train = load_items(dataset, "train", synthetic=None, crop=crop)
    test = load_items(dataset, "test", synthetic=None, crop=crop)
    ungated_train = load_items(ungated, "train", synthetic=None, crop=crop) if ungated is not None else []
    classes = TUMOR_CLASSES
    counts = {
        "train_real": {c: sum(it["class"] == i for it in real_train) for i, c in enumerate(classes)},
        "train_medaug": {c: sum(it["class"] == i for it in all_train) for i, c in enumerate(classes)},
        "test": {c: sum(it["class"] == i for it in test) for i, c in enumerate(classes)},
    }
    from pipeline.manifest import read_manifest

    test_rows = [r for r in read_manifest(dataset) if r["split"] == "test"]
    counts["test_subjects"] = {c: len({r["subject_id"] for r in test_rows if r["class"] == c}) for c in classes}
    if ungated is not None:
        counts["train_ungated"] = {c: sum(it["class"] == i for it in ungated_train) for i, c in enumerate(classes)}
    log.info("items: %s", counts)
    arms: dict[str, tuple[list[dict[str, Any]], bool, Callable[[dict[str, Any]], dict[str, Any]] | None]] = {
        "a_real": (real_train, False, None),
        "b_real_oversample_aug": (real_train, True, classical_augmentation()),
        "c_medaug_balanced": (all_train, False, None),
    }
    if ungated is not None:
        arms["c_ungated_diagnostic"] = (ungated_train, False, None)
    per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    for seed in seeds:
        for name, (items, balanced, transform) in arms.items():
            t0 = time.perf_counter()
            s = train_and_test(items, test, classes, seed, steps, batch_size, balanced, transform)
            per_seed[name].append({"seed": seed, "balanced_accuracy": s.balanced_accuracy, "minority_recall": s.minority_recall,
                                   "recalls": s.recalls, "seconds": round(time.perf_counter() - t0, 1)})
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
    return " ".join(lines)


def markdown_section(result: dict[str, Any], command: str) -> str:
    """The RESULTS.md section of a run."""
    s = result["summary"]
    names = {"a_real": "(a) real, imbalanced", "b_real_oversample_aug": "(b) real + oversampling + MONAI aug",
             "c_medaug_balanced": "(c) medaug balanced (real + gated synthetic)",
             "c_ungated_diagnostic": "(c') diagnostic: same fill, synthetic NOT gated"}
    cfg = result["config"]
    lines = [
        f"## Downstream classifier: does the balanced dataset help? ({result['date']})",
        "",
        f"- Device: {result['device']}",
        f"- Command: `{command}`",
        f"- Cohort: {cfg['subjects']} phantom subjects at size {cfg['size']} (CT), patches {cfg['patch_size']}x{cfg['patch_size']}, "
        f"tumor GAN {cfg['gan_steps']} steps, {cfg['n_synth']} necrotic samples drawn; gate verdict **{result['gate']['verdict']}**"
        + (f" (failed: {', '.join(result['gate']['failed_checks'])})" if result["gate"]["failed_checks"] else "")
        + ".",
        f"- Items per class: real train {result['counts']['train_real']}, medaug train {result['counts']['train_medaug']}, "
        f"test (real, held-out subjects) {result['counts']['test']}"
        + (f"; ungated (c') train {result['counts']['train_ungated']}" if "train_ungated" in result["counts"] else "") + ".",
        f"- Classifier: 3-block CNN (8-16-32 ch) on the central {cfg['crop']}x{cfg['crop']} of each lesion-centred patch, Adam 1e-3, {cfg['steps']} steps x batch {cfg['batch_size']} in every arm; "
        f"seeds {cfg['seeds']}; mean and 95% t-interval over seeds.",
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
    if "cu_minus_a" in s:
        lines += [
            f"| (c') - (a), paired | {_fmt(s['cu_minus_a']['balanced_accuracy'])} | {_fmt(s['cu_minus_a']['minority_recall'])} |",
            f"| (c') - (b), paired | {_fmt(s['cu_minus_b']['balanced_accuracy'])} | {_fmt(s['cu_minus_b']['minority_recall'])} |",
        ]
    lines += [
        "",
        f"**Verdict:** {verdict_text(s)}" if result["gate"]["verdict"] == "accept" else
        "**Verdict:** the gate rejected the synthetic batch, so medaug refused to add it: (c) holds no synthetic data and "
        "this run cannot show that (c) beats (a) or (b). It does not."
        + (f" Diagnostic only, outside the product's rules: {verdict_text(s, 'cu', '(c) built WITHOUT the gate')}" if "cu_minus_a" in s else ""),
        "",
        f"Stage times (s, when each stage ran): {result['timings']}. The test split has only {sum(result['counts']['test'].values())} patches from "
        f"held-out subjects (subjects per class: {result['counts']['test_subjects']}), and the intervals are over classifier "
        "seeds only: they do not hold the test-set sampling uncertainty, which is larger. These are this run's numbers, "
        "not a general claim.",
        "",
    ]
    return "\n".join(lines)


def device_text() -> str:
    """CPU model, cores and torch version of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=40, help="Phantom subjects (about 15%% necrotic).")
    parser.add_argument("--size", type=int, default=64, help="Phantom volume side in voxels.")
    parser.add_argument("--patch-size", type=int, default=32, help="2D patch side (power of two).")
    parser.add_argument("--gan-steps", type=int, default=1500, help="Tumor GAN training steps.")
    parser.add_argument("--n-synth", type=int, default=160, help="Necrotic patches sampled (half as many of each other class).")
    parser.add_argument("--max-share", type=float, default=0.9, help="Dataset cap on the synthetic share per class.")
    parser.add_argument("--seeds", type=int, default=5, help="Classifier seeds per arm.")
    parser.add_argument("--steps", type=int, default=300, help="Classifier optimiser steps per arm.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--crop", type=int, default=16, help="Central crop (pixels) the classifier sees.")
    parser.add_argument("--seed", type=int, default=0, help="Cohort, GAN, gate and dataset seed.")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "_work" / "downstream", help="Work folder (reused between runs).")
    parser.add_argument("--fresh", action="store_true", help="Delete the work folder first.")
    parser.add_argument("--record", action="store_true", help="Append the result section to bench/RESULTS.md.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)

    inputs = build_inputs(args.work, args.subjects, args.size, args.seed, args.patch_size, args.gan_steps, args.n_synth)
    if inputs["verdict"] != "accept":
        # medaug refuses to build (c) from a rejected batch; (a) and (b) still run on the real-only dataset
        log.error("the gate rejected the synthetic patches (%s): medaug refuses to build (c)", inputs["failed_checks"])
        inputs["gate"] = None
    t_ds = time.perf_counter()
    dataset = build_balanced(args.work, inputs, args.seed, args.max_share)
    ungated = build_balanced(args.work, inputs, args.seed, args.max_share, gated=False) if inputs["gate"] is None else None
    t1 = time.perf_counter()
    result = run_arms(dataset, list(range(args.seeds)), args.steps, args.batch_size, args.crop, ungated)
    inputs["timings"]["dataset"] = round(t1 - t_ds, 1)
    inputs["timings"]["classifiers"] = round(time.perf_counter() - t1, 1)
    result.update({
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_text(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"seeds": list(range(args.seeds))},
        "gate": {"verdict": inputs["verdict"], "failed_checks": inputs["failed_checks"]},
        "timings": inputs["timings"],
        "dataset_content_hash": json.loads((dataset / "dataset.json").read_text())["content_hash"],
    })
    (args.work / "downstream_results.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    command = "OMP_NUM_THREADS=1 .venv/bin/python bench/downstream.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown_section(result, command.strip())
    print(section)
    if args.record:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
