"""The gate's lesion check (pipeline/gate/lesion.py): synthetic lesions must have their class's HU.

Known answers on phantom CT lesion patches: other subjects' real lesions pass (a few HU);
the same lesions with +30 HU planted inside the mask fail by about 30 HU, whatever the
pooled image statistics say; an inserted volume is judged on its inserted lesion (label 2),
not the host's; the check is off by default and says "not computed" when nothing has a mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import insertion as I
from pipeline.gate.config import GateConfig
from pipeline.gate.images import load_gate_set
from pipeline.gate.lesion import lesion_gate, lesion_values_hu
from pipeline.manifest import write_manifest
from pipeline.phantoms import make_subject, render_ct, write_nifti

WINDOW = (-100.0, 200.0)


@pytest.fixture(scope="module")
def lesions() -> dict:
    """Lesion patches (image in [-1, 1] through WINDOW, mask) of 12 phantom subjects, by class."""
    out: dict[str, list] = {"round": [], "necrotic": []}
    for i in range(12):
        klass = "necrotic" if i % 2 else "round"
        s = make_subject(3, i, 64, klass)
        out[klass].append(I.inserted_patches(render_ct(s, 3).astype(np.float32), s.tumor_mask, 32, 1, WINDOW, value=1))
    return out


def _folder(out: Path, patches: dict[str, list], synthetic: bool, shift_hu: float = 0.0, masks: bool = True) -> Path:
    rows = []
    for klass, subjects in patches.items():
        for j, subject in enumerate(subjects):
            for k, (img, msk, _) in enumerate(subject):
                name = f"{klass}_{j}_{k}.nii.gz"
                img = img + (shift_hu / 150.0) * (msk > 0)  # 300 HU over [-1, 1]: 150 HU per unit
                write_nifti(img[..., None].astype(np.float32), np.eye(4), out / "patches" / name)
                write_nifti(msk[..., None].astype(np.uint8), np.eye(4), out / "masks" / name)
                rows.append({"path": f"patches/{name}", "label_path": f"masks/{name}" if masks else "", "class": klass,
                             "split": "train", "modality": "CT", "synthetic": "1" if synthetic else "0"})
    write_manifest(out, rows, list(rows[0]))
    return out


def _sets(tmp_path: Path, lesions: dict, shift_hu: float, masks: bool = True) -> tuple:
    cfg = GateConfig()
    real = _folder(tmp_path / "real", {k: v[:4] for k, v in lesions.items()}, synthetic=False)
    syn = _folder(tmp_path / f"syn{shift_hu:g}{masks}", {k: v[4:] for k, v in lesions.items()}, synthetic=True, shift_hu=shift_hu,
                  masks=masks)
    return load_gate_set(real, cfg, "real"), load_gate_set(syn, cfg, "synthetic", cap=False)


def test_other_subjects_real_lesions_pass_a_planted_hu_shift_fails(lesions: dict, tmp_path: Path) -> None:
    ref, syn = _sets(tmp_path, lesions, 0.0)
    check, metric = lesion_gate(ref, syn, 5.0)
    assert check is not None and check.passed and check.value is not None and check.value < 5.0
    assert set(metric["classes"]) == {"round", "necrotic"}
    # the planted class phantoms: round ~62 HU, necrotic rim ~48 with a darker core
    assert metric["classes"]["round"]["real_median_hu"] == pytest.approx(62, abs=8)
    assert metric["classes"]["necrotic"]["real_median_hu"] < metric["classes"]["round"]["real_median_hu"]

    ref, shifted = _sets(tmp_path, lesions, 30.0)
    check, metric = lesion_gate(ref, shifted, 5.0)
    assert check is not None and not check.passed and check.value == pytest.approx(30.0, abs=5.0)
    assert "worst class" in check.detail and "HU" in check.detail


def test_lesion_check_is_off_by_default_and_not_computed_without_masks(lesions: dict, tmp_path: Path) -> None:
    assert GateConfig().lesion_hu_max is None
    ref, syn = _sets(tmp_path, lesions, 30.0)
    assert lesion_gate(ref, syn, None) == (None, {})
    ref, unmasked = _sets(tmp_path, lesions, 30.0, masks=False)
    check, metric = lesion_gate(ref, unmasked, 5.0)
    assert check is not None and check.passed and check.value is None and "not computed" in check.detail
    assert metric == {"classes": {}}


def test_an_inserted_volume_is_judged_on_its_inserted_lesion(tmp_path: Path) -> None:
    """Label 2 (inserted) is scored, label 1 (the host's real lesion) is not."""
    s = make_subject(3, 0, 64, "round")
    hu = render_ct(s, 3).astype(np.float32)
    label = s.tumor_mask.astype(np.uint8)
    fake = np.zeros_like(label, bool)
    fake[10:14, 10:14, 8:10] = True
    hu[fake] = 300.0  # an implausible "lesion": bone-bright
    label[fake] = I.INSERTED_LABEL
    write_nifti(hu.astype(np.int16), s.affine, tmp_path / "ins" / "v.nii.gz")
    write_nifti(label, s.affine, tmp_path / "ins" / "l.nii.gz")
    write_manifest(tmp_path / "ins", [{"path": "v.nii.gz", "label_path": "l.nii.gz", "class": "round", "split": "train",
                                       "modality": "CT", "synthetic": "1"}], ["path", "label_path", "class", "split", "modality", "synthetic"])
    values = lesion_values_hu(load_gate_set(tmp_path / "ins", GateConfig(), "synthetic", cap=False))
    assert len(values["round"]) == fake.sum() and np.all(values["round"] == 300.0)


def test_run_gate_rejects_a_batch_whose_lesions_have_the_wrong_hu(lesions: dict, tmp_path: Path) -> None:
    from pipeline.gate.run import run_gate

    cfg = GateConfig(encoder_steps=20, n_bootstrap=0, fid_baseline_splits=2, max_pairs=20, kid_subsets=2, lesion_hu_max=5.0, min_samples=8,
                     intensity_max=None, fid_max_excess=None, precision_min=None, recall_min=None, coverage_min=None,
                     diversity_max_excess=None, max_duplicate_fraction=None, max_copy_fraction=None)
    real = _folder(tmp_path / "real", {k: v[:4] for k, v in lesions.items()}, synthetic=False)
    syn = _folder(tmp_path / "syn", {k: v[4:] for k, v in lesions.items()}, synthetic=True, shift_hu=-35.0)
    report = run_gate(real, syn, tmp_path / "gate", cfg)
    assert report.verdict == "reject" and report.failed_checks == ["lesion"]
    assert "lesion_hu" in report.metrics and report.metrics["lesion_hu"]["value"] == pytest.approx(35.0, abs=5.0)


def test_a_class_subset_is_judged_on_its_own_items(lesions: dict, tmp_path: Path) -> None:
    """The class checks gate GateSet.subset()s: a subset's lesion values are its own items' only,
    so a bad class does not fail a good one; a (s, s) mask beside an (s, s, 1) patch is read too."""
    ref, syn = _sets(tmp_path, lesions, 0.0)
    rows = [i for i, c in enumerate(syn.classes) if c == "round"]
    assert set(lesion_values_hu(syn.subset(np.asarray(rows)))) == {"round"}
    folder = syn.folder
    before = sum(len(v) for v in lesion_values_hu(syn).values())
    for item in syn.items[:3]:  # masks written without the trailing axis
        mask = np.asarray(I._load(folder / item.row["label_path"]).dataobj)[..., 0]
        write_nifti(mask.astype(np.uint8), np.eye(4), folder / item.row["label_path"])
    values = lesion_values_hu(load_gate_set(folder, GateConfig(), "synthetic", cap=False))
    assert sum(len(v) for v in values.values()) == before  # no item left out


def test_a_mask_that_does_not_fit_its_image_is_left_out_with_a_log_line(lesions: dict, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    ref, syn = _sets(tmp_path, lesions, 0.0)
    before = {k: len(v) for k, v in lesion_values_hu(syn).items()}
    item = syn.items[0]
    write_nifti(np.ones((8, 8, 1), np.uint8), np.eye(4), syn.folder / item.row["label_path"])  # 8x8 mask, 32x32 patch
    with caplog.at_level("WARNING", logger="pipeline.gate.lesion"):
        after = {k: len(v) for k, v in lesion_values_hu(load_gate_set(syn.folder, GateConfig(), "synthetic", cap=False)).items()}
    assert "mask shape (8, 8) is not the image's (32, 32); left out" in caplog.text
    assert after[item.klass] < before[item.klass] and sum(after.values()) < sum(before.values())
