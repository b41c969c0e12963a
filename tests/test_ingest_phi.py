"""Planted-PHI test: identifiers planted in standard tags, private tags, NIfTI header text
fields and file/folder names must appear in no output byte (decompressed .nii.gz included),
in no log record, and the key must never be written."""

from __future__ import annotations

import gzip
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from ingest_corpus import write_nifti, write_series

from pipeline.ingest import run_ingest
from pipeline.manifest import read_manifest

KEY = b"phi-test-secret-KEY-0xC0FFEE"

PHI = {
    "PatientName": "Quixlerby^Zanthia",
    "PatientID": "MRN99173824",
    "PatientBirthDate": "19420817",
    "StudyDate": "20230911",
    "AccessionNumber": "ACC5550147",
    "InstitutionName": "Vorpalwood Clinic",
    "ReferringPhysicianName": "Drumblebrook^Osric",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.777123",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.777456",
}
PRIVATE = "PRIVATE-SECRET-ZEBRA"
FOLDER = "Quixlerby_Zanthia_MRN99173824"
FILE_TAG = "ACC5550147"
NIFTI_PHI = {"descrip": b"Quixlerby descrip", "aux_file": b"QXAUXFILE", "intent_name": b"QXINTENT", "db_name": b"QXDBNAME"}
NIFTI_CASE = "sub-QXCASE42"
NAME_EXT = "DOE"
NAME_MODALITY = "DOE JOHN"


def _needles() -> list[bytes]:
    words = [v for v in PHI.values()] + [PRIVATE, FOLDER, FILE_TAG, NIFTI_CASE, "QXDECATHLON_007", KEY.decode()]
    words += ["Quixlerby", "Zanthia", "MRN99173824", "1942-08-17", "2023-09-11", "Vorpalwood", "Drumblebrook"]
    words += [v.decode() for v in NIFTI_PHI.values()]
    words += [NAME_MODALITY, f".{NAME_EXT}"]
    return sorted({w.lower().encode() for w in words})


def _plant(ds) -> None:  # type: ignore[no-untyped-def]
    for k, v in PHI.items():
        if k not in ("SeriesInstanceUID",):
            setattr(ds, k, v)
    block = ds.private_block(0x0011, "QXPRIVATECREATOR", create=True)
    block.add_new(0x01, "LO", PRIVATE)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("phi")
    src = root / "in"
    # DICOM: PHI in standard and private tags, folder and file names; one good CT series,
    # an MR series of the same patient, and a broken series (so quarantine.csv has rows).
    series_dir = src / FOLDER / f"study_{FILE_TAG}"
    write_series(series_dir / "ct", series_uid=PHI["SeriesInstanceUID"], patient_id=PHI["PatientID"],
                 name=lambda k: f"{FILE_TAG}_{k:03d}.dcm", extra=_plant)
    write_series(series_dir / "mr", series_uid=PHI["SeriesInstanceUID"] + ".2", patient_id=PHI["PatientID"],
                 modality="MR", intercept=0, name=lambda k: f"Quixlerby_{k}", extra=_plant)
    write_series(series_dir / "broken", series_uid=PHI["SeriesInstanceUID"] + ".3", patient_id=PHI["PatientID"],
                 name=lambda k: f"{FILE_TAG}_b{k}.dcm", extra=_plant,
                 per_slice=lambda k, ds: setattr(ds, "PixelSpacing", ["0.5", "0.5"]) if k == 2 else None)
    (series_dir / f"{FILE_TAG}_empty.dcm").write_bytes(b"")
    # A name as a file extension and as a Modality value: skip reasons must name neither.
    (series_dir / f"notes.{NAME_EXT}").write_text("hello")
    write_series(series_dir / "odd", series_uid=PHI["SeriesInstanceUID"] + ".5", patient_id=PHI["PatientID"], n=3,
                 name=lambda k: f"odd{k}.dcm", extra=lambda ds: (_plant(ds), setattr(ds, "Modality", NAME_MODALITY)))
    # The same MR series once more without preamble (implicit VR): read through pydicom.
    import pydicom

    (series_dir / "raw").mkdir()
    for i, p in enumerate(sorted((series_dir / "mr").iterdir())):
        ds = pydicom.dcmread(p)
        del ds.file_meta
        ds.preamble = None
        ds.SeriesInstanceUID = PHI["SeriesInstanceUID"] + ".4"
        ds.SOPInstanceUID = PHI["SeriesInstanceUID"] + f".4.{i}"
        ds.save_as(series_dir / "raw" / f"Zanthia{i}", implicit_vr=True, little_endian=True, enforce_file_format=False)
    # NIfTI: PHI in header text fields and in the BIDS subject label / folder names.
    data = np.arange(6 * 6 * 4, dtype=np.float32).reshape(6, 6, 4)
    p = write_nifti(src / FOLDER / NIFTI_CASE / "anat" / f"{NIFTI_CASE}_T1w.nii.gz", data, sidecar={"Modality": "MR"})
    import nibabel as nib

    img = nib.load(str(p))
    for field, value in NIFTI_PHI.items():
        img.header[field] = value
    nib.save(img, str(p))
    # Decathlon with PHI in case names.
    deca = src / f"decathlon_{FOLDER}"
    write_nifti(deca / "imagesTr" / "QXDECATHLON_007.nii.gz", data)
    write_nifti(deca / "labelsTr" / "QXDECATHLON_007.nii.gz", (data > 50).astype(np.uint8))
    (deca / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "tumour"},
        "training": [{"image": "./imagesTr/QXDECATHLON_007.nii.gz", "label": "./labelsTr/QXDECATHLON_007.nii.gz",
                      "class": "round"}], "test": []}))
    out = root / "out"
    logger = logging.getLogger()
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    h = Grab(level=logging.DEBUG)
    logger.addHandler(h)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_ingest([src], out, key=KEY, workers=2)
    finally:
        logger.removeHandler(h)
        logger.setLevel(old)
    records += [str(w.message) for w in caught]
    return src, out, "\n".join(records)


def test_outputs_exist(planted: tuple[Path, Path, str]) -> None:
    _, out, _ = planted
    rows = read_manifest(out)
    assert sorted((r["modality"], r["source_kind"]) for r in rows) == [("CT", "decathlon"), ("CT", "dicom"),
                                                                        ("MR", "dicom"), ("MR", "dicom"),
                                                                        ("MR", "nifti")]
    assert len(read_manifest(out / "quarantine.csv")) == 2  # broken series + empty file
    ct = next(r for r in rows if r["source_kind"] == "dicom" and r["modality"] == "CT")
    mr = next(r for r in rows if r["source_kind"] == "dicom" and r["modality"] == "MR")
    assert ct["subject_id"] == mr["subject_id"]


def test_identifiers_were_really_planted(planted: tuple[Path, Path, str]) -> None:
    src, _, _ = planted
    blob = b"\n".join([p.relative_to(src).as_posix().encode() for p in src.rglob("*")]
                      + [p.read_bytes() for p in src.rglob("*") if p.is_file()])
    blob += b"\n".join(gzip.decompress(p.read_bytes()) for p in src.rglob("*.nii.gz"))
    for needle in (PRIVATE, FOLDER, FILE_TAG, NIFTI_CASE, "QXDECATHLON_007", *PHI.values(), *NIFTI_PHI, NAME_MODALITY,
                   f".{NAME_EXT}"):
        if needle not in NIFTI_PHI:
            assert needle.encode() in blob, needle
    for value in NIFTI_PHI.values():
        assert value in blob


def test_no_planted_identifier_in_any_output_byte(planted: tuple[Path, Path, str]) -> None:
    _, out, logs = planted
    blobs: dict[str, bytes] = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        blobs["name:" + rel] = rel.encode()
        if p.is_file():
            raw = p.read_bytes()
            blobs[rel] = raw
            if p.name.endswith(".gz"):
                blobs[rel + " (decompressed)"] = gzip.decompress(raw)
    blobs["logs"] = logs.encode()
    assert any(k.endswith("(decompressed)") for k in blobs)
    for where, blob in blobs.items():
        low = blob.lower()
        for needle in _needles():
            assert needle not in low, f"{needle!r} found in {where}"


def test_name_like_extension_and_modality_are_skipped_without_naming_them(planted: tuple[Path, Path, str]) -> None:
    _, out, _ = planted
    reasons = json.loads((out / "ingest_report.json").read_text())["skipped_reasons"]
    assert reasons.get("not a DICOM, NIfTI or JSON file (other extension)") == 1, reasons
    assert any(r.startswith("image of modality unlisted value") for r in reasons), reasons


def test_key_not_written_even_as_hex(planted: tuple[Path, Path, str]) -> None:
    _, out, _ = planted
    for p in out.rglob("*"):
        if p.is_file():
            raw = p.read_bytes()
            assert KEY not in raw and KEY.hex().encode() not in raw
