"""Tests of pipeline.slices: slice geometry both ways and unpaired MRI/CT loading from ingest folders.

`make_ingest_like` (also used by the translate and evaluation tests) writes a phantom
cohort and an ingest-style manifest.csv over its NIfTI files, so these tests need
neither DICOM ingest nor any download.
"""

from __future__ import annotations

import doctest
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import pipeline.slices as sl
from pipeline.errors import DatasetError
from pipeline.manifest import read_manifest, sha256_file, write_manifest

INGEST_COLUMNS = ("path", "label_path", "subject_id", "modality", "shape", "spacing", "sha256", "class", "split", "source_kind")


def make_ingest_like(out: Path, n_subjects: int = 8, size: int = 32, seed: int = 0) -> Path:
    """A phantom cohort at `out` with an ingest-contract manifest.csv over its NIfTI volumes."""
    from pipeline.phantoms import write_cohort

    summary = write_cohort(out, n_subjects=n_subjects, size=size, seed=seed)
    rows = []
    for r in summary["rows"]:
        img = nib.load(str(out / r["nifti_image"]))
        rows.append({
            "path": r["nifti_image"],
            "label_path": r["nifti_label"],
            "subject_id": hashlib.sha256(r["subject"].encode()).hexdigest()[:16],
            "modality": r["modality"],
            "shape": "x".join(str(s) for s in img.shape),
            "spacing": "x".join(f"{z:g}" for z in img.header.get_zooms()),
            "sha256": sha256_file(out / r["nifti_image"]),
            "class": r["class"],
            "split": r["split"],
            "source_kind": "nifti",
        })
    write_manifest(out, rows, INGEST_COLUMNS)
    return out


@pytest.fixture(scope="module")
def ingest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ingest_like(tmp_path_factory.mktemp("ingest"))


def test_doctests() -> None:
    assert doctest.testmod(sl, raise_on_error=False).failed == 0


def test_volume_to_slices_context_channels_and_padding() -> None:
    vol = np.stack([np.full((4, 6), z / 10.0) for z in range(5)], axis=-1).astype(np.float32)  # value = z / 10
    out = sl.volume_to_slices(vol, image_size=6, context=2)
    assert out.shape == (5, 5, 6, 6) and out.dtype == torch.float32 and type(out) is torch.Tensor
    # channel 2 is the slice itself, others its neighbours clamped at the ends
    centre = out[:, :, 3, 3]
    assert torch.allclose(centre[:, 2], torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4]))
    assert torch.allclose(centre[0], torch.tensor([0.0, 0.0, 0.0, 0.1, 0.2]))
    assert torch.allclose(centre[4], torch.tensor([0.2, 0.3, 0.4, 0.4, 0.4]))
    # x (4) padded to 6 with -1 (air): one row each side
    assert (out[:, :, 0, :] == -1).all() and (out[:, :, 5, :] == -1).all()


@pytest.mark.parametrize("shape", [(12, 12, 3), (12, 9, 2), (7, 12, 2)])
def test_slices_round_trip_exact_without_resize(shape: tuple[int, int, int]) -> None:
    vol = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)
    side = max(shape[:2])
    back = sl.slices_to_volume(sl.volume_to_slices(vol, side)[:, 0], shape)
    np.testing.assert_array_equal(back, vol)


def test_slices_round_trip_with_resize_keeps_smooth_images() -> None:
    x, y = np.meshgrid(np.linspace(-1, 1, 40), np.linspace(-1, 1, 30), indexing="ij")
    vol = np.repeat((0.5 * x * y)[..., None], 2, axis=-1).astype(np.float32)
    back = sl.slices_to_volume(sl.volume_to_slices(vol, 32)[:, 0], vol.shape)
    assert back.shape == vol.shape
    assert np.abs(back - vol)[2:-2, 2:-2].max() < 0.05


def test_slices_to_volume_refuses_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"\(z, H, W\)"):
        sl.slices_to_volume(np.zeros((2, 3, 4, 4)), (4, 4))


def test_load_unpaired_slices_sides_and_meta(ingest: Path) -> None:
    data = sl.load_unpaired_slices([ingest], image_size=16, context=1, min_foreground=0.1)
    rows = read_manifest(ingest)
    train_subjects = sorted({r["subject_id"] for r in rows if r["split"] == "train"})
    test_subjects = {r["subject_id"] for r in rows if r["split"] == "test"}
    for side in (data.a, data.b):
        x = side[0]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert float(side.slices.min()) >= -1.0 and float(side.slices.max()) <= 1.0
        assert float(side.foreground.min()) >= 0.1
    meta = data.meta
    assert meta["modality"] == {"a": "MR", "b": "CT"}
    assert meta["hu_window"] == [-1000.0, 1000.0] and meta["mr_percentiles"] == [0.5, 99.5]
    assert meta["context"] == 1 and meta["in_channels"] == 3 and meta["image_size"] == 16
    assert meta["train_subjects"] == train_subjects and not set(meta["train_subjects"]) & test_subjects
    assert set(meta["spacing"]) == {"MR", "CT"} and len(meta["spacing"]["CT"]) == 3
    lo, hi = meta["mr_landmarks_median"]
    assert 0 <= lo < hi  # raw MR units of the training volumes
    assert type(data.a[0]) is torch.Tensor
    # MR subjects only on side a, CT only on side b
    mr_subjects = {r["subject_id"] for r in rows if r["split"] == "train" and r["modality"] == "MR"}
    assert set(data.a.subject) == mr_subjects
    assert meta["n_slices"] == {"MR": len(data.a), "CT": len(data.b)}


def test_load_unpaired_slices_test_split_and_cap(ingest: Path) -> None:
    data = sl.load_unpaired_slices([ingest], image_size=16, split="test", max_slices=5, seed=3)
    test_subjects = {r["subject_id"] for r in read_manifest(ingest) if r["split"] == "test"}
    assert set(data.meta["train_subjects"]) == test_subjects
    assert len(data.a) == 5 and len(data.b) == 5
    again = sl.load_unpaired_slices([ingest], image_size=16, split="test", max_slices=5, seed=3)
    assert torch.equal(data.a.slices, again.a.slices)


def test_foreground_filter_drops_empty_slices(ingest: Path) -> None:
    loose = sl.load_unpaired_slices([ingest], image_size=16, min_foreground=0.0)
    strict = sl.load_unpaired_slices([ingest], image_size=16, min_foreground=0.3)
    assert len(strict.a) < len(loose.a) and float(strict.a.foreground.min()) >= 0.3


def test_empty_split_counts_as_train(tmp_path: Path, ingest: Path) -> None:
    rows = read_manifest(ingest)
    for r in rows:
        r["path"] = str((ingest / r["path"]).resolve())
        r["split"] = "" if r["split"] == "train" else r["split"]
    write_manifest(tmp_path, rows, INGEST_COLUMNS)
    data = sl.load_unpaired_slices([tmp_path], image_size=16)
    assert data.meta["n_volumes"] == {"MR": 3, "CT": 3}


def test_bad_inputs_name_the_problem(tmp_path: Path, ingest: Path) -> None:
    with pytest.raises(DatasetError, match="no manifest.csv"):
        sl.load_unpaired_slices([tmp_path], image_size=16)
    rows = [r for r in read_manifest(ingest) if r["modality"] == "CT"]
    for r in rows:
        r["path"] = str((ingest / r["path"]).resolve())
    write_manifest(tmp_path, rows, INGEST_COLUMNS)
    with pytest.raises(DatasetError, match="no usable MR volume"):
        sl.load_unpaired_slices([tmp_path], image_size=16)
    with pytest.raises(ValueError, match="min_foreground"):
        sl.load_unpaired_slices([ingest], image_size=16, min_foreground=1.5)


def _copy_manifest(src: Path, dst: Path, split_of: dict[str, str] | None = None) -> Path:
    """dst/manifest.csv: src's rows with absolute paths, splits reassigned by subject where given."""
    rows = read_manifest(src)
    for r in rows:
        r["path"] = str((src / r["path"]).resolve())
        r["split"] = (split_of or {}).get(r["subject_id"], r["split"])
    write_manifest(dst, rows, INGEST_COLUMNS)
    return dst


def test_load_training_inputs_holds_train_subjects_out_for_structure_scores(ingest: Path) -> None:
    # no val split: one MR and one CT train subject are held out of training (10 % of 3, at least 1),
    # and the test split is not touched (selecting best.pt on it would leak it into model selection)
    inputs = sl.load_training_inputs([ingest], image_size=32, in_channels=3)
    assert inputs.monitor is not None and inputs.monitor.split == "train" and inputs.evaluate is not None
    held = inputs.monitor.subjects or frozenset()
    rows = read_manifest(ingest)
    train = {m: {r["subject_id"] for r in rows if r["modality"] == m and r["split"] == "train"} for m in ("MR", "CT")}
    assert len(held & train["MR"]) == 1 and len(held & train["CT"]) == 1 and len(held) == 2
    assert not held & set(inputs.data.meta["train_subjects"])  # never trained on
    assert inputs.data.meta["n_volumes"] == {"MR": 2, "CT": 2}
    assert inputs.data.meta["in_channels"] == 3 and inputs.data.a[0].shape == (3, 32, 32)
    identity = torch.nn.Conv2d(3, 3, 1)
    scores = inputs.evaluate(identity, identity)
    assert "structure" in scores and all(isinstance(v, float) for v in scores.values())
    # seeded: the same subjects again; and listed for the model card
    assert sl.plan_monitor([ingest], 0.1, 0) == inputs.monitor
    assert inputs.data.meta["monitor_subjects"] == sorted(held)
    with pytest.raises(ValueError, match="odd"):
        sl.load_training_inputs([ingest], image_size=32, in_channels=2)


def test_a_val_split_is_the_monitor_and_training_keeps_every_train_subject(tmp_path: Path, ingest: Path) -> None:
    rows = read_manifest(ingest)
    test = sorted({r["subject_id"] for r in rows if r["split"] == "test"})
    folder = _copy_manifest(ingest, tmp_path, {test[0]: "val"})  # a paired subject: MR and CT in val
    inputs = sl.load_training_inputs([folder], image_size=16)
    assert inputs.monitor == sl.Monitor("val") and inputs.monitor.skip == frozenset()
    assert inputs.data.meta["n_volumes"] == {"MR": 3, "CT": 3}


def test_too_few_train_subjects_give_no_monitor(tmp_path: Path, ingest: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = read_manifest(ingest)
    ct_train = sorted({r["subject_id"] for r in rows if r["split"] == "train" and r["modality"] == "CT"})
    folder = _copy_manifest(ingest, tmp_path, {ct_train[0]: "test"})  # 2 CT train subjects: none to spare
    with caplog.at_level("WARNING"):
        inputs = sl.load_training_inputs([folder], image_size=16)
    assert inputs.monitor is None and inputs.evaluate is None and "no best.pt" in caplog.text
    assert inputs.data.meta["n_volumes"] == {"MR": 3, "CT": 2}
    assert sl.load_training_inputs([ingest], image_size=16, data_cfg=sl.SliceConfig(monitor_fraction=0)).monitor is None
    with pytest.raises(ValueError, match="monitor_fraction"):
        sl.SliceConfig(monitor_fraction=0.5)


def _rows(spec: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"path": f"v{i}.nii.gz", "subject_id": sid, "modality": mod, "split": "train"} for i, (sid, mod) in enumerate(spec)]


def test_plan_monitor_holds_out_whole_subjects_without_overfilling(tmp_path: Path) -> None:
    # 4 MR and 4 CT subjects, one (s0) with both: 10 % -> 1 of each; whatever the seed, never 2 of one
    spec = [("s0", "MR"), ("s0", "CT")] + [(f"m{i}", "MR") for i in range(3)] + [(f"c{i}", "CT") for i in range(3)]
    write_manifest(tmp_path, _rows(spec), ("path", "subject_id", "modality", "split"))
    for seed in range(20):
        m = sl.plan_monitor([tmp_path], 0.1, seed)
        assert m is not None and m.subjects is not None
        mr = {s for s in m.subjects if s == "s0" or s.startswith("m")}
        ct = {s for s in m.subjects if s == "s0" or s.startswith("c")}
        assert len(mr) == 1 and len(ct) == 1, (seed, m.subjects)


def test_plan_monitor_never_holds_out_rows_without_a_subject(tmp_path: Path) -> None:
    # 8 MR volumes with no subject_id would be one "subject" "": holding it out would drop them all
    spec = [("", "MR")] * 8 + [("m1", "MR"), ("m2", "MR"), ("m3", "MR")] + [(f"c{i}", "CT") for i in range(10)]
    write_manifest(tmp_path, _rows(spec), ("path", "subject_id", "modality", "split"))
    for seed in range(20):
        m = sl.plan_monitor([tmp_path], 0.1, seed)
        assert m is not None and m.subjects and "" not in m.subjects


def test_monitor_volumes_without_usable_slices_switch_structure_scores_off(
    ingest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = sl.SliceConfig(min_foreground=0.99)  # no slice of any volume is 99 % body
    monitor = sl.plan_monitor([ingest], cfg.monitor_fraction, cfg.seed)
    with caplog.at_level("WARNING"):
        assert sl.monitor_scores([ingest], monitor, 32, 0, cfg) is None
    assert "structure scores off (no best.pt)" in caplog.text


def test_slice_config_validates() -> None:
    assert sl.SliceConfig().hu_window == (-1000.0, 1000.0)
    with pytest.raises(ValueError, match="hu_window"):
        sl.SliceConfig(hu_window=(100.0, -100.0))
    with pytest.raises(ValueError, match="extra"):
        sl.SliceConfig.model_validate({"min_forground": 0.2})
