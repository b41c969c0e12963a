"""Sampling (pipeline/sample_tumors.py) and evaluation (pipeline/tumor_eval.py) of the tumor GAN,
plus the planted mode-collapse test: toolkit off collapses diversity, mode seeking restores it."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_tumor_gan_data import make_ingest_folder, tiny_patch_data

from models.train_tumor_gan import TumorGANConfig, generate, load_tumor_generator, train_tumor_gan
from pipeline.errors import CheckpointError, PatchError
from pipeline.manifest import read_manifest, sha256_file
from pipeline.patches import extract_patches, to_train_data, write_patch_folder
from pipeline.sample_tumors import sample_tumors
from pipeline.tumor_eval import boundary_faces, class_ms_ssim, compactness, evaluate_tumors, mask_stats

TINY = dict(patch_size=16, latent_dim=8, g_channels=4, d_channels=4, batch_size=8, steps=4, log_every=2,
            sample_every=0, checkpoint_every=4, diversity_samples=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, real patch folder) of a 4-step run on patches of a tiny ingest folder."""
    root = tmp_path_factory.mktemp("tg")
    ingest = make_ingest_folder(root / "ingest", n_subjects=6, size=48, depth=8, seed=2, test_every=3)
    ps = extract_patches([ingest], patch_size=16, seed=0)
    write_patch_folder(ps, root / "real")
    result = train_tumor_gan(TumorGANConfig.model_validate(TINY), to_train_data(ps), root / "run", device="cpu")
    return result.checkpoint, root / "real"


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# --- training data ---------------------------------------------------------------------------


def test_training_data_holds_only_train_subjects(tmp_path: Path) -> None:
    ingest = make_ingest_folder(tmp_path / "ingest", n_subjects=6, size=48, depth=8, seed=2, test_every=3)
    ps = extract_patches([ingest], patch_size=16)
    data = to_train_data(ps)
    test_subjects = {r["subject_id"] for r in read_manifest(ingest) if r["split"] == "test"}
    assert test_subjects and not test_subjects & set(data.train_subjects)
    assert data.classes == ["healthy", "necrotic", "round"] and data.images.shape[1:] == (1, 16, 16)
    assert data.normalisation["hu_window"] == [-100.0, 200.0] and data.spacing == (2.0, 2.0, 4.0)
    with pytest.raises(PatchError, match="no MR training patches"):
        to_train_data(ps, modality="MR")


# --- sampling --------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = trained
    sample_tumors(ckpt, "round", 3, 5, tmp_path / "a")
    sample_tumors(ckpt, "round", 3, 5, tmp_path / "b")
    assert folder_hashes(tmp_path / "a") == folder_hashes(tmp_path / "b")
    sample_tumors(ckpt, "round", 3, 6, tmp_path / "c")
    a = np.asarray(nib.load(tmp_path / "a" / read_manifest(tmp_path / "a")[0]["path"]).dataobj)
    c = np.asarray(nib.load(tmp_path / "c" / read_manifest(tmp_path / "c")[0]["path"]).dataobj)
    assert not np.array_equal(a, c)


def test_sampled_files_carry_geometry_and_provenance(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = trained
    sample_tumors(ckpt, "necrotic", 2, 1, tmp_path)
    rows = read_manifest(tmp_path)
    assert [r["index"] for r in rows] == ["0", "1"]
    r = rows[0]
    assert r["synthetic"] == "1" and r["class"] == "necrotic" and r["modality"] == "CT" and r["seed"] == "1"
    assert r["checkpoint_sha256"] == sha256_file(ckpt)
    img, msk = nib.load(tmp_path / r["path"]), nib.load(tmp_path / r["label_path"])
    # each patch and its mask by content: the gate binds the mask to the patch, build-dataset checks both
    assert r["sha256"] == sha256_file(tmp_path / r["path"]) and r["label_sha256"] == sha256_file(tmp_path / r["label_path"])
    assert img.shape == (16, 16, 1) and np.allclose(np.diag(img.affine), [2, 2, 4, 1])
    assert set(np.unique(np.asarray(msk.dataobj))) <= {0, 1} and msk.get_data_dtype() == np.uint8
    assert b"seed=1" in img.header["descrip"].tobytes()
    prov = json.loads((tmp_path / "provenance.json").read_text())
    card = prov["checkpoints"][r["checkpoint_sha256"]]
    assert card["train_subjects"] and card["classes"] == ["healthy", "necrotic", "round"]


def test_calls_for_several_classes_merge_in_a_fixed_order(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = trained
    for cls in ("round", "necrotic"):
        sample_tumors(ckpt, cls, 2, 0, tmp_path / "a")
    for cls in ("necrotic", "round"):
        sample_tumors(ckpt, cls, 2, 0, tmp_path / "b")
    assert folder_hashes(tmp_path / "a") == folder_hashes(tmp_path / "b")
    assert len(read_manifest(tmp_path / "a")) == 4
    sample_tumors(ckpt, "round", 1, 0, tmp_path / "a")  # a re-run replaces that call's rows and files
    rows = read_manifest(tmp_path / "a")
    assert sorted(r["class"] for r in rows) == ["necrotic", "necrotic", "round"]
    assert len(list((tmp_path / "a" / "patches").glob("*.nii.gz"))) == 3


def test_unknown_class_lists_the_known_ones(trained: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(PatchError, match="healthy, necrotic, round"):
        sample_tumors(trained[0], "glioma", 2, 0, tmp_path)
    with pytest.raises(CheckpointError, match="missing.pt does not exist"):
        sample_tumors(tmp_path / "missing.pt", "round", 2, 0, tmp_path)


# --- evaluation --------------------------------------------------------------------------------


def test_mask_statistics_known_answers() -> None:
    assert boundary_faces(np.ones((3, 3), bool)) == 12
    assert compactness(np.ones((4, 4), bool)) == pytest.approx(np.pi / 4)
    assert compactness(np.ones((1, 16), bool)) < 0.4  # a line is not compact
    assert np.isnan(compactness(np.zeros((4, 4), bool)))
    assert compactness(np.ones((3, 3, 3), bool)) == pytest.approx(np.pi ** (1 / 3) * 162 ** (2 / 3) / 54)
    stats = mask_stats(np.stack([np.ones((4, 4)), np.zeros((4, 4))]), voxel_volume=2.0)
    assert stats["area_vox_mean"] == 8.0 and stats["area_mm_mean"] == 16.0 and stats["empty_fraction"] == 0.5


def test_ms_ssim_diversity_known_answers() -> None:
    same = np.tile(np.random.default_rng(0).uniform(-1, 1, (1, 32, 32)).astype(np.float32), (4, 1, 1))
    assert class_ms_ssim(same, np.arange(4), 0) == pytest.approx(1.0, abs=1e-4)
    noise = np.random.default_rng(1).uniform(-1, 1, (6, 32, 32)).astype(np.float32)
    assert class_ms_ssim(noise, np.arange(6), 0) < 0.2
    assert class_ms_ssim(noise[:1], np.arange(1), 0) is None


def test_evaluate_tumors_reports_fidelity_diversity_and_masks(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, real = trained
    report = evaluate_tumors(ckpt, real, tmp_path, n_per_class=6, classifier_steps=20, max_pairs=20)
    assert json.loads((tmp_path / "tumor_eval.json").read_text()) == report
    assert (tmp_path / "real_vs_generated.png").is_file()
    assert report["classifier"]["real_accuracy_on"] == "test"
    for cls in ("healthy", "necrotic", "round"):
        r = report["per_class"][cls]
        assert 0.0 <= r["fidelity_accuracy"] <= 1.0 and 0.0 <= r["ms_ssim_generated"] <= 1.0
        assert (r["mask_real"]["area_vox_mean"] > 0) == (cls != "healthy") and "compactness_mean" in r["mask_generated"]
    assert report["per_class"]["healthy"]["mask_real"]["area_vox_mean"] == 0.0
    with pytest.raises(PatchError, match="no manifest"):
        evaluate_tumors(ckpt, tmp_path / "nothing", tmp_path)


@pytest.mark.slow
def test_planted_collapse_is_caught_and_mode_seeking_restores_diversity(tmp_path: Path) -> None:
    """Equal learning rates (no TTUR), no EMA, no toolkit, 12 patches: after 120 steps G ignores z and
    its samples are far more alike (pairwise MS-SSIM) than the real ones; the same run with the
    mode-seeking loss keeps them as varied as the real data. Two seeds, margins far from the
    values seen (collapsed 0.6-0.9, restored 0.1-0.2, real 0.24)."""
    data = tiny_patch_data(n=12, size=16, seed=0)
    labels, real = data.labels.numpy(), data.images[:, 0].numpy()
    real_ms = np.mean([class_ms_ssim(real[labels == k], np.arange(4), 0) for k in range(3)])
    base = dict(TINY, latent_dim=16, g_channels=8, d_channels=8, steps=120, log_every=120, checkpoint_every=120,
                ema_decay=None, lr_g=1e-3, lr_d=1e-3, diversity_samples=2)

    def diversity(run: Path, **kw: object) -> float:
        train_tumor_gan(TumorGANConfig.model_validate(base | kw), data, run, device="cpu")
        g, _ = load_tumor_generator(run / "checkpoints" / "last.pt")
        x = [generate(g, k, 12, 7, 16, torch.device("cpu"))[:, 0].numpy() for k in range(3)]
        return float(np.mean([class_ms_ssim(v, np.arange(12), 0, 100) for v in x]))

    for seed in (0, 1):
        off = diversity(tmp_path / f"off{seed}", seed=seed)
        on = diversity(tmp_path / f"ms{seed}", seed=seed, mode_seeking_weight=1.0)
        assert off > real_ms + 0.2, f"seed {seed}: toolkit off should collapse ({off:.3f} vs real {real_ms:.3f})"
        assert on < real_ms + 0.1, f"seed {seed}: mode seeking should restore diversity ({on:.3f} vs real {real_ms:.3f})"


def test_3d_patches_train_sample_and_evaluate(tmp_path: Path) -> None:
    ingest = make_ingest_folder(tmp_path / "ingest", n_subjects=3, size=40, depth=12, seed=4)
    ps = extract_patches([ingest], patch_size=8, dims=3, healthy_per_volume=1)
    write_patch_folder(ps, tmp_path / "real")
    cfg = TumorGANConfig.model_validate(TINY | dict(patch_size=8, spatial_dims=3, steps=2, checkpoint_every=2))
    result = train_tumor_gan(cfg, to_train_data(ps), tmp_path / "run", device="cpu")
    sample_tumors(result.checkpoint, "round", 2, 0, tmp_path / "syn")
    img = nib.load(tmp_path / "syn" / read_manifest(tmp_path / "syn")[0]["path"])
    assert img.shape == (8, 8, 8)
    report = evaluate_tumors(result.checkpoint, tmp_path / "real", tmp_path / "eval", n_per_class=3, classifier_steps=2)
    assert set(report["per_class"]) == set(ps.counts())
