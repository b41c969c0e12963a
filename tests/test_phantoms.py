"""Tests of the phantom cohort generator (pipeline/phantoms.py) and `medaug phantoms`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from pipeline.errors import ConfigError
from pipeline.manifest import sha256_file
from pipeline.phantoms import (
    AIR,
    BONE,
    COHORT_COLUMNS,
    CSF,
    GM,
    NECROSIS,
    SKIN_FAT,
    TUMOR,
    WM,
    TagKey,
    make_subject,
    phantom_affine,
    plan_cohort,
    write_cohort,
    write_dicom_series,
)

N_SUBJECTS = 8


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[dict[str, str]]]:
    out = tmp_path_factory.mktemp("cohort")
    summary = write_cohort(out, n_subjects=N_SUBJECTS, size=64, seed=7)
    with open(out / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, summary, rows


def _nii(path: Path) -> nib.Nifti1Image:
    img = nib.load(path)
    assert isinstance(img, nib.Nifti1Image)
    return img


def _load(path: Path) -> np.ndarray:
    return np.asanyarray(_nii(path).dataobj)


def _interior(tissue: np.ndarray, label: int) -> np.ndarray:
    """Voxels of `label` whose whole 3x3x3 neighbourhood has that label (no partial volume)."""
    return ndimage.binary_erosion(tissue == label, np.ones((3, 3, 3), bool))


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


# --- cohort layout -------------------------------------------------------------------------


def test_layout_and_cohort_csv(cohort: tuple[Path, dict[str, Any], list[dict[str, str]]]) -> None:
    out, summary, rows = cohort
    with open(out / "cohort.csv", newline="") as f:
        assert next(csv.reader(f)) == list(COHORT_COLUMNS)
    assert summary["rows"] == rows
    n_test = sum(1 for r in rows if r["split"] == "test") // 2
    assert len(rows) == N_SUBJECTS + n_test
    assert len({r["case"] for r in rows}) == N_SUBJECTS
    for r in rows:
        for key in ("nifti_image", "nifti_label", "tissue_map"):
            assert (out / r[key]).is_file(), r[key]
        series = sorted((out / r["dicom_series_dir"]).glob("*.dcm"))
        assert len(series) == 32  # one file per slice
        assert r["dicom_series_dir"] == f"dicom/{r['case']}/{r['modality']}"
        assert r["patient_id"].startswith("PH") and r["patient_id"][2:].isdigit()


def test_dataset_json_loads_with_monai(cohort: tuple[Path, dict[str, Any], list[dict[str, str]]]) -> None:
    from monai.data import load_decathlon_datalist

    out, _, rows = cohort
    for modality in ("CT", "MR"):
        path = out / "nifti" / modality / "dataset.json"
        doc = json.loads(path.read_text())
        assert doc["modality"] == {"0": modality}
        assert doc["labels"] == {"0": "background", "1": "tumor"}
        assert doc["tumor_classes"] == ["round", "necrotic"]
        for key, split, folder in (("training", "train", "imagesTr"), ("test", "test", "imagesTs")):
            items = load_decathlon_datalist(path, data_list_key=key)
            expected = {r["case"] for r in rows if r["modality"] == modality and r["split"] == split}
            assert {Path(i["image"]).name.removesuffix(".nii.gz") for i in items} == expected
            assert len(items) == doc["numTraining" if key == "training" else "numTest"]
            for item in items:
                assert Path(item["image"]).is_file() and Path(item["label"]).is_file()
                assert Path(item["image"]).parent.name == folder
                assert item["class"] in ("round", "necrotic")


def test_train_unpaired_test_paired(cohort: tuple[Path, dict[str, Any], list[dict[str, str]]]) -> None:
    out, _, rows = cohort
    by_case: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    n_test = 0
    for case, entries in by_case.items():
        if entries[0]["split"] == "train":
            assert len(entries) == 1 and entries[0]["partner"] == ""
            continue
        n_test += 1
        assert sorted(e["modality"] for e in entries) == ["CT", "MR"], case
        ct, mr = sorted(entries, key=lambda e: e["modality"])
        assert ct["partner"] == mr["nifti_image"] and mr["partner"] == ct["nifti_image"]
        assert ct["tissue_map"] == mr["tissue_map"] and ct["class"] == mr["class"]
        assert ct["patient_id"] == mr["patient_id"]
        np.testing.assert_array_equal(_load(out / ct["nifti_label"]), _load(out / mr["nifti_label"]))
        assert _nii(out / ct["nifti_image"]).shape == _nii(out / mr["nifti_image"]).shape
        np.testing.assert_allclose(_nii(out / ct["nifti_image"]).affine, _nii(out / mr["nifti_image"]).affine)
        # Same patient in both DICOM studies, different studies.
        d_ct = pydicom.dcmread(next((out / ct["dicom_series_dir"]).glob("*.dcm")), stop_before_pixels=True)
        d_mr = pydicom.dcmread(next((out / mr["dicom_series_dir"]).glob("*.dcm")), stop_before_pixels=True)
        assert (d_ct.PatientID, d_ct.PatientName, d_ct.PatientBirthDate) == (
            d_mr.PatientID,
            d_mr.PatientName,
            d_mr.PatientBirthDate,
        )
        assert d_ct.StudyInstanceUID != d_mr.StudyInstanceUID
    assert n_test >= 2
    train = [r for r in rows if r["split"] == "train"]
    assert abs(sum(r["modality"] == "CT" for r in train) - sum(r["modality"] == "MR" for r in train)) <= 1


def test_tumor_mask_matches_tissue_map(cohort: tuple[Path, dict[str, Any], list[dict[str, str]]]) -> None:
    out, _, rows = cohort
    for r in rows:
        tissue = _load(out / r["tissue_map"])
        label = _load(out / r["nifti_label"])
        assert tissue.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
        np.testing.assert_array_equal(label, (tissue >= TUMOR).astype(np.uint8))
        assert (tissue == NECROSIS).any() == (r["class"] == "necrotic")


# --- classes and quotas ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [8, 9, 12, 16, 23, 40, 64])
@pytest.mark.parametrize("seed", [0, 1, 5])
def test_class_quotas(n: int, seed: int) -> None:
    plan = plan_cohort(n, seed)
    assert len(plan) == n
    test = [s for s in plan if s.split == "test"]
    assert len(test) >= 2 and all(s.modalities == ("CT", "MR") for s in test)
    assert {s.tumor_class for s in test} == {"round", "necrotic"}
    for modality in ("CT", "MR"):
        train = [s for s in plan if s.split == "train" and s.modalities == (modality,)]
        assert {s.tumor_class for s in train} == {"round", "necrotic"}, (n, seed, modality)
    minority = sum(s.tumor_class == "necrotic" for s in plan) / n
    assert minority <= 0.4 and (n < 20 or 0.1 <= minority <= 0.2)
    assert plan == plan_cohort(n, seed)


def test_cohort_counts_are_imbalanced(cohort: tuple[Path, dict[str, Any], list[dict[str, str]]]) -> None:
    _, summary, rows = cohort
    subjects = {r["case"]: r["class"] for r in rows}
    assert sum(c == "round" for c in subjects.values()) > sum(c == "necrotic" for c in subjects.values())
    assert sum(summary["counts"].values()) == len(rows)


def test_bad_arguments_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 2 subjects"):
        write_cohort(tmp_path, n_subjects=1)
    with pytest.raises(ConfigError, match="minority_fraction"):
        plan_cohort(10, minority_fraction=1.5)
    with pytest.raises(ConfigError, match="round"):
        make_subject(0, 0, 32, "square")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="size"):
        make_subject(0, 0, 8)


# --- appearance ----------------------------------------------------------------------------


def _modality_rows(rows: list[dict[str, str]], modality: str) -> list[dict[str, str]]:
    return [r for r in rows if r["modality"] == modality]


def test_ct_tissue_hu_ranges(cohort: tuple[Path, dict[str, Any], list[dict[str, str]]]) -> None:
    out, _, rows = cohort
    ranges = {
        0: (-1010, -990),
        SKIN_FAT: (-110, 10),
        BONE: (600, 1300),
        CSF: (0, 20),
        GM: (32, 48),
        WM: (25, 35),
    }
    samples: dict[int, list[np.ndarray]] = {k: [] for k in ranges}
    tumor: dict[str, list[float]] = {"round": [], "necrotic": []}
    for r in _modality_rows(rows, "CT"):
        img = _load(out / r["nifti_image"])
        tissue = _load(out / r["tissue_map"])
        assert img.dtype == np.int16 and img.min() >= -1024
        # Brain tissues away from the skull (a 3.4 mm voxel blurs CSF with bone otherwise).
        near_skull = ndimage.binary_dilation(tissue <= BONE, iterations=2)
        for label in ranges:
            if label in (AIR, WM):
                mask = _interior(tissue, label)
            elif label in (SKIN_FAT, BONE):
                mask = tissue == label
            else:
                mask = (tissue == label) & ~near_skull
            samples[label].append(img[mask])
        tumor[r["class"]].append(float(np.median(img[tissue == TUMOR])))
    for label, (lo, hi) in ranges.items():
        median = float(np.median(np.concatenate(samples[label])))
        assert lo <= median <= hi, (label, median)
    # Round tumors enhance more than the rim of necrotic ones; both are brighter than brain.
    assert min(tumor["round"]) > max(tumor["necrotic"]) > 35


def test_mr_tissue_ordering(cohort: tuple[Path, dict[str, Any], list[dict[str, str]]]) -> None:
    out, _, rows = cohort
    for r in _modality_rows(rows, "MR"):
        img = _load(out / r["nifti_image"])
        tissue = _load(out / r["tissue_map"])
        assert img.dtype == np.float32 and img.min() >= 0 and img.max() < 1500
        wm, gm = np.median(img[_interior(tissue, WM)]), np.median(img[tissue == GM])
        csf = np.median(img[tissue == CSF])
        assert wm > gm > csf, (r["case"], wm, gm, csf)
        assert np.median(img[_interior(tissue, 0)]) < 40  # air: Rician noise floor only
        if r["class"] == "necrotic":
            assert np.median(img[tissue == NECROSIS]) < gm < np.median(img[tissue == TUMOR])
        else:
            assert np.median(img[tissue == TUMOR]) > wm


# --- DICOM ---------------------------------------------------------------------------------


def _dicom_world_ras(ds: pydicom.Dataset) -> np.ndarray:
    """(rows, cols, 3) RAS world coordinates (mm) of every pixel of one slice."""
    ipp = np.array(ds.ImagePositionPatient, float)
    iop = np.array(ds.ImageOrientationPatient, float)
    row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
    r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
    lps = ipp + c[..., None] * col_sp * iop[:3] + r[..., None] * row_sp * iop[3:]
    return lps * np.array([-1.0, -1.0, 1.0])


def test_dicom_geometry_and_values_match_nifti(
    cohort: tuple[Path, dict[str, Any], list[dict[str, str]]],
) -> None:
    out, _, rows = cohort
    for modality in ("CT", "MR"):
        r = _modality_rows(rows, modality)[0]
        nii = _nii(out / r["nifti_image"])
        data = np.asanyarray(nii.dataobj).astype(np.float64)
        inv = np.linalg.inv(nii.affine)
        files = sorted((out / r["dicom_series_dir"]).glob("*.dcm"))
        positions = []
        for path in files:
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            sop = pydicom.uid.CTImageStorage if modality == "CT" else pydicom.uid.MRImageStorage
            assert ds.SOPClassUID == sop == ds.file_meta.MediaStorageSOPClassUID
            assert ds.Modality == modality and ds.BitsAllocated == 16
            assert ds.PixelRepresentation == (1 if modality == "CT" else 0)
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert float(ds.SliceThickness) == pytest.approx(float(ds.SpacingBetweenSlices))
            assert float(ds.SliceLocation) == pytest.approx(float(ds.ImagePositionPatient[2]))
            positions.append(float(ds.ImagePositionPatient[2]))
            # Every DICOM pixel, through IPP/IOP/PixelSpacing -> LPS -> RAS -> NIfTI voxel index.
            ras = _dicom_world_ras(ds)
            ijk = np.einsum("ab,rcb->rca", inv[:3, :3], ras) + inv[:3, 3]
            idx = np.rint(ijk).astype(int)
            np.testing.assert_allclose(ijk, idx, atol=1e-3)
            values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            np.testing.assert_array_equal(values, data[idx[..., 0], idx[..., 1], idx[..., 2]])
        assert np.allclose(np.diff(positions), float(ds.SpacingBetweenSlices))
        assert [pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber for p in files] == list(
            range(1, len(files) + 1)
        )


def test_dicom_patient_tags_are_realistic(cohort: tuple[Path, dict[str, Any], list[dict[str, str]]]) -> None:
    out, _, rows = cohort
    ids = set()
    for r in rows:
        ds = pydicom.dcmread(next((out / r["dicom_series_dir"]).glob("*.dcm")), stop_before_pixels=True)
        assert ds.PatientID == r["patient_id"]
        assert "^" in str(ds.PatientName) and ds.PatientSex in ("F", "M")
        assert len(ds.PatientBirthDate) == 8 and ds.PatientBirthDate < ds.StudyDate
        for keyword in ("AccessionNumber", "InstitutionName", "ReferringPhysicianName", "StudyDescription",
                        "SeriesDescription", "Manufacturer", "StudyTime"):  # fmt: skip
            assert str(ds.get(keyword, "")), keyword
        ids.add(ds.PatientID)
    assert len(ids) == N_SUBJECTS


def test_write_dicom_series_plants_tags(tmp_path: Path) -> None:
    vol = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3) * 10 - 300
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    tags: dict[TagKey, Any] = {
        "PatientID": "PH123456",
        "PatientName": "Planted^Name",
        "InstitutionName": None,  # delete a default
        (0x0011, 0x0010): ("LO", "ACME PRIVATE"),
        (0x0011, 0x1001): ("LO", "Planted^Private"),
        "SliceThickness": lambda k: str(2.0 + k),  # per-slice value
    }
    paths = write_dicom_series(vol, affine, tmp_path / "s", tags, "CT")
    assert [p.name for p in paths] == ["IM0001.dcm", "IM0002.dcm", "IM0003.dcm"]
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.PatientName == "Planted^Name" and "InstitutionName" not in ds
        assert ds[0x0011, 0x1001].value == "Planted^Private"
        assert float(ds.SliceThickness) == 2.0 + k
        assert (ds.Rows, ds.Columns) == (5, 4)
        # Canonical RAS affine -> DICOM flipped to IOP [1,0,0,0,1,0]; corner (0,0) is voxel (3,4,k).
        assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.5]
        np.testing.assert_array_equal(ds.pixel_array + float(ds.RescaleIntercept), vol[::-1, ::-1, k].T)
    with pytest.raises(ValueError, match="VR"):
        write_dicom_series(vol, affine, tmp_path / "t", {(0x0013, 0x1001): "x"}, "CT")
    with pytest.raises(ValueError, match="modality"):
        write_dicom_series(vol, affine, tmp_path / "u", {}, "PET")  # type: ignore[arg-type]


# --- determinism and geometry ----------------------------------------------------------------


def test_same_seed_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    write_cohort(tmp_path / "a", n_subjects=3, size=32, seed=11)
    write_cohort(tmp_path / "b", n_subjects=3, size=32, seed=11)
    write_cohort(tmp_path / "c", n_subjects=3, size=32, seed=12)
    a, b, c = (_tree_hashes(tmp_path / x) for x in "abc")
    assert a == b and len(a) > 10
    assert a.keys() == c.keys()
    differing = [k for k in a if a[k] != c[k]]
    assert len(differing) > len(a) // 2
    assert all(a[k] != c[k] for k in a if k.startswith(("truth/", "dicom/")))


def test_anatomy_is_head_like_and_independent_of_size() -> None:
    small, large = make_subject(3, 2, 32, "necrotic"), make_subject(3, 2, 64, "necrotic")
    assert small.tissue.shape == (32, 32, 16) and large.tissue.shape == (64, 64, 32)
    np.testing.assert_allclose(large.affine, phantom_affine(64))
    assert large.spacing == pytest.approx((220 / 64, 220 / 64, 4.0))
    # Head fits in the field of view: no head voxel on the in-plane border or the top slice.
    head = large.tissue > 0
    assert not head[[0, -1]].any() and not head[:, [0, -1]].any() and not head[:, :, -1].any()
    # Nested layers: brain inside the skull.
    fractions = np.bincount(large.tissue.ravel(), minlength=8) / head.sum()
    assert fractions[WM] > 0.2 and fractions[BONE] > 0.05 and fractions[NECROSIS] > 0
    # Same anatomy at both sizes: tissue volumes in ml agree within 15 %.
    for label in (BONE, GM, WM, TUMOR):
        ml = [(t.tissue == label).sum() * np.prod(t.spacing) / 1000 for t in (small, large)]
        assert ml[0] == pytest.approx(ml[1], rel=0.15), label


def test_tumor_classes_differ_in_size() -> None:
    round_ = [make_subject(0, i, 64, "round").tumor_mask.sum() for i in range(3)]
    necrotic = [make_subject(0, i, 64, "necrotic").tumor_mask.sum() for i in range(3)]
    assert min(round_) > 0 and max(round_) < min(necrotic)


# --- CLI -----------------------------------------------------------------------------------


def test_cli_phantoms(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medaug.cli import app

    result = CliRunner().invoke(app, ["phantoms", "--out", str(tmp_path), "--subjects", "2", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert "necrotic" in result.output and "round" in result.output
    assert (tmp_path / "cohort.csv").is_file()
    bad = CliRunner().invoke(app, ["phantoms", "--out", str(tmp_path / "x"), "--subjects", "1"])
    assert bad.exit_code == 2


def test_simpleitk_reads_dicom_and_nifti_as_the_same_image(
    cohort: tuple[Path, dict[str, Any], list[dict[str, str]]],
) -> None:
    """An independent reader (ITK, LPS world) sees the same voxels at the same places."""
    import SimpleITK as sitk

    out, _, rows = cohort
    for modality in ("CT", "MR"):
        r = _modality_rows(rows, modality)[0]
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(out / r["dicom_series_dir"])))
        dicom = reader.Execute()
        nifti = sitk.ReadImage(str(out / r["nifti_image"]))
        assert dicom.GetSize() == nifti.GetSize()
        np.testing.assert_allclose(dicom.GetSpacing(), nifti.GetSpacing(), atol=1e-4)
        # Same physical space: resampling DICOM onto the NIfTI grid with identity is lossless.
        resampled = sitk.Resample(dicom, nifti, sitk.Transform(), sitk.sitkNearestNeighbor, -5000.0)
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(resampled).astype(np.float64),
            sitk.GetArrayFromImage(nifti).astype(np.float64),
        )


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([-0.8, -0.8, 2.5, 1.0]),  # LPS-ordered array
        np.diag([0.8, -0.8, -2.5, 1.0]),  # slices stored superior to inferior
        np.array(
            [[0.0, 0.9, 0.0, 10.0], [1.1, 0.0, 0.0, -20.0], [0.0, 0.0, 3.0, 5.0], [0, 0, 0, 1]]
        ),  # x/y swapped
    ],
)
def test_write_dicom_series_geometry_for_any_axis_aligned_affine(tmp_path: Path, affine: np.ndarray) -> None:
    vol = np.random.default_rng(0).integers(0, 400, (6, 5, 4)).astype(np.float32)
    for path in write_dicom_series(vol, affine, tmp_path, {}, "MR"):
        ds = pydicom.dcmread(path)
        ras = _dicom_world_ras(ds)
        ijk = np.einsum("ab,rcb->rca", np.linalg.inv(affine)[:3, :3], ras) + np.linalg.inv(affine)[:3, 3]
        idx = np.rint(ijk).astype(int)
        np.testing.assert_allclose(ijk, idx, atol=1e-3)
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(values, vol[idx[..., 0], idx[..., 1], idx[..., 2]])


def test_rewriting_a_cohort_leaves_no_stale_cases(tmp_path: Path) -> None:
    write_cohort(tmp_path / "c", n_subjects=4, size=32, seed=1)
    write_cohort(tmp_path / "c", n_subjects=2, size=32, seed=1)
    assert sorted(p.name for p in (tmp_path / "c" / "dicom").iterdir()) == ["phantom_000", "phantom_001"]
    (tmp_path / "d" / "nifti").mkdir(parents=True)
    with pytest.raises(ConfigError, match="not a phantom cohort"):
        write_cohort(tmp_path / "d", n_subjects=2, size=32)
