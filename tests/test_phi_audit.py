"""PHI audit of the whole `augment` flow (what `medaug demo` runs) on a planted cohort.

A phantom cohort gets distinctive identifiers (ZZPHI_...) in every DICOM PS3.15 Annex E
basic-profile attribute pydicom can set here (names, IDs, dates, times, UIDs, institution,
accession, addresses, physicians, device serials, comments, ...), in a private tag, and in
its folder and file names. The flow runs in-process on configs/tiny.yaml with that cohort
as its ingest sources. No planted string (nor the planted dates in any usual format) may
appear in any byte under the run's output folder (data_manifests/ included; .gz files
decompressed, PNGs read as bytes), in the captured logging output and stdout/stderr, or in
the Prefect logs and artifacts of the run (read back with the Prefect client).
"""

from __future__ import annotations

import gzip
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest

from pipeline.phantoms import write_cohort

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

REPO = Path(__file__).resolve().parents[1]
TAG = "ZZPHI"
DATE, BIRTH = "19710203", "19450617"
DATE_FORMS = [DATE, BIRTH, "1971-02-03", "1945-06-17", "03/02/1971", "02/03/1971", "17/06/1945", "06/17/1945",
              "1971.02.03", "03.02.1971", "1945.06.17", "17.06.1945"]

PLANTED: dict[str, tuple[str, str]] = {
    # keyword: (VR, value); {i} is the patient's index, so each patient keeps its own identity
    "PatientName": ("PN", "ZZPHI_NAME_7731^P{i}"),
    "PatientID": ("LO", "ZZPHI_ID_{i}_5521"),
    "OtherPatientIDs": ("LO", "ZZPHI_OTHERID_4410"),
    "OtherPatientNames": ("PN", "ZZPHI_OTHERNAME_3301"),
    "PatientBirthName": ("PN", "ZZPHI_BIRTHNAME_2290"),
    "PatientMotherBirthName": ("PN", "ZZPHI_MOTHER_9921"),
    "PatientBirthDate": ("DA", BIRTH),
    "PatientBirthTime": ("TM", "101112"),
    "PatientAddress": ("LO", "ZZPHI_ADDRESS_1 Elm Street"),
    "PatientTelephoneNumbers": ("SH", "ZZPHI_TEL_555"),
    "PatientComments": ("LT", "ZZPHI_PATIENTCOMMENT_8812"),
    "MilitaryRank": ("LO", "ZZPHI_RANK_6612"),
    "MedicalRecordLocator": ("LO", "ZZPHI_MRL_7712"),
    "EthnicGroup": ("SH", "ZZPHI_ETHNIC"),
    "Occupation": ("SH", "ZZPHI_OCCUP"),
    "AdditionalPatientHistory": ("LT", "ZZPHI_HISTORY_4421"),
    "StudyDate": ("DA", DATE),
    "SeriesDate": ("DA", DATE),
    "AcquisitionDate": ("DA", DATE),
    "ContentDate": ("DA", DATE),
    "StudyTime": ("TM", "235959.123"),
    "AccessionNumber": ("SH", "ZZPHI_ACC_77"),
    "StudyID": ("SH", "ZZPHI_SID_1"),
    "StudyDescription": ("LO", "ZZPHI_STUDYDESC_6611"),
    "SeriesDescription": ("LO", "ZZPHI_SERIESDESC_6622"),
    "InstitutionName": ("LO", "ZZPHI_INSTITUTION_4433"),
    "InstitutionAddress": ("ST", "ZZPHI_INSTADDR_4434"),
    "InstitutionalDepartmentName": ("LO", "ZZPHI_DEPT_4435"),
    "ReferringPhysicianName": ("PN", "ZZPHI_REFPHYS_2211"),
    "ReferringPhysicianAddress": ("ST", "ZZPHI_REFADDR_2212"),
    "PerformingPhysicianName": ("PN", "ZZPHI_PERFPHYS_2213"),
    "NameOfPhysiciansReadingStudy": ("PN", "ZZPHI_READPHYS_2214"),
    "OperatorsName": ("PN", "ZZPHI_OPERATOR_2215"),
    "RequestingPhysician": ("PN", "ZZPHI_REQPHYS_2216"),
    "PhysiciansOfRecord": ("PN", "ZZPHI_RECPHYS_2217"),
    "StationName": ("SH", "ZZPHI_STATION_31"),
    "DeviceSerialNumber": ("LO", "ZZPHI_SERIAL_3344"),
    "ProtocolName": ("LO", "ZZPHI_PROTOCOL_3345"),
    "ImageComments": ("LT", "ZZPHI_IMGCOMMENT_5566"),
    "RequestAttributesSequence": ("SQ", ""),
    "StudyInstanceUID": ("UI", "1.2.826.0.1.3680043.9.7731.{i}"),
    "FrameOfReferenceUID": ("UI", "1.2.826.0.1.3680043.9.7732.{i}"),
}
UID_ROOT = "1.2.826.0.1.3680043.9.773"
PRIVATE = "ZZPHI_PRIVATE_TAG_9090"


def _plant(path: Path, i: int, series: int, k: int) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for keyword, (vr, value) in PLANTED.items():
        if vr == "SQ":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setattr(ds, keyword, value.format(i=i))
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.9.7733.{i}.{series}"
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.9.7734.{i}.{series}.{k}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    block = ds.private_block(0x0011, "ZZPHI_CREATOR", create=True)
    block.add_new(0x01, "LO", PRIVATE)
    ds.save_as(path)


def _planted_cohort(root: Path) -> Path:
    """write_cohort, then identifiers planted in every DICOM file and in folder and file names."""
    cohort = root / "cohort"
    write_cohort(cohort, n_subjects=8, size=32, seed=0)
    for i, patient in enumerate(sorted(p for p in (cohort / "dicom").iterdir() if p.is_dir())):
        for s, series in enumerate(sorted(p for p in patient.iterdir() if p.is_dir())):
            for k, f in enumerate(sorted(series.iterdir())):
                _plant(f, i, s, k)
                f.rename(series / f"ZZPHI_FILE_{i}_{k}.dcm")
            series.rename(patient / f"ZZPHI_SERIESDIR_{s}")
        patient.rename(cohort / "dicom" / f"ZZPHI_NAME_7731_{i}")
    return cohort


def _needles() -> list[bytes]:
    words = [TAG, PRIVATE, UID_ROOT, *DATE_FORMS]
    words += [v.format(i=0).split("^")[0] for vr, v in PLANTED.values() if vr not in ("SQ", "DA", "TM")]
    return sorted({w.lower().encode() for w in words})


def _hits(data: bytes, where: str) -> list[str]:
    low = data.lower()
    return [f"{n.decode()} in {where}" for n in _needles() if n in low]


def _prefect_text() -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    parts: list[str] = []
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(limit=200, offset=len(parts)):
            parts += [log.message for log in batch]
        offset = 0
        while arts := client.read_artifacts(sort=ArtifactSort.CREATED_DESC, limit=200, offset=offset):
            parts += [f"{a.key}\n{a.description}\n{a.data}" for a in arts]
            offset += len(arts)
    return "\n".join(parts)


def test_no_planted_identifier_anywhere_after_the_full_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    cohort = _planted_cohort(tmp_path)
    series_dirs = [p for p in (cohort / "dicom").glob("*/*") if p.is_dir()]
    sample = next((cohort / "dicom" / "ZZPHI_NAME_7731_0" / "ZZPHI_SERIESDIR_0").iterdir())
    planted = {h.split(" in ")[0] for h in _hits(sample.read_bytes() + str(sample).encode(), "input")}
    assert len(planted) >= len(_needles()) - len(DATE_FORMS) + 2, "planting failed"  # the audit can see them
    out = tmp_path / "run"
    config = tmp_path / "planted.yaml"
    config.write_text(
        f"include:\n  - {REPO / 'configs' / 'tiny.yaml'}\n"
        "phantoms:\n  enabled: false\n"
        f"ingest:\n  sources:\n    - {cohort / 'nifti' / 'CT'}\n    - {cohort / 'nifti' / 'MR'}\n"
        f"  dicom_sources:\n    - {cohort / 'dicom'}\n"
    )
    monkeypatch.setenv("MEDAUG_DEID_KEY", "phi-audit-key")
    from flows.augment import augment

    caplog.set_level(logging.INFO)
    for name in ("pipeline", "models", "flows", "medaug"):
        caplog.set_level(logging.DEBUG, logger=name)
    result: dict[str, Any] = augment(config=str(config), out=str(out))
    assert Path(result["ingest_dicom"]).is_dir() and Path(result["dataset"]).is_dir()
    assert (out / "data_manifests").is_dir()
    from pipeline.manifest import read_manifest

    assert len(read_manifest(Path(result["ingest_dicom"]))) == len(series_dirs)  # every series went through

    leaked: list[str] = []
    n_files = 0
    for f in sorted(out.rglob("*")):
        if f.is_symlink() or not f.is_file() or ".prefect" in f.parts:
            continue
        n_files += 1
        data = f.read_bytes()
        if f.suffix == ".gz":
            data = gzip.decompress(data)
        leaked += _hits(data, str(f.relative_to(out)))
        leaked += _hits(str(f.relative_to(out)).encode(), "a file name")
    assert n_files > 20
    leaked += _hits("\n".join(r.getMessage() for r in caplog.records).encode(), "the logging output")
    captured = capfd.readouterr()
    leaked += _hits((captured.out + captured.err).encode(), "stdout/stderr")
    leaked += _hits(_prefect_text().encode(), "the Prefect logs/artifacts")
    assert not leaked, "planted identifiers leaked:\n" + "\n".join(leaked[:40])
