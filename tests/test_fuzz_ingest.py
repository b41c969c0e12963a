"""Fuzz test of the ingest's DICOM and NIfTI header handling (hypothesis).

Valid small inputs (a 4-slice DICOM series from tests/ingest_corpus.py, a NIfTI-1 file)
are mutated: raw byte flips in the header region, truncation, tag values set through
pydicom to wrong-VR / negative / zero / huge values, inconsistent NumberOfFrames, and
NaN/inf/zero pixdim, scl_slope and odd qform/sform codes in NIfTI. The ingest must never
raise, and every file seen must end up used, skipped or quarantined (the report counts
add up to files_seen, each quarantine or skip with a reason). Bounded: 40 examples each.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingest_corpus import write_nifti, write_series

from pipeline.ingest import run_ingest

KEY = b"fuzz-test-key"
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _check(report: Any) -> None:
    assert report.files_seen >= 1
    assert report.files_used + report.skipped + report.quarantined == report.files_seen, report
    assert sum(report.skipped_reasons.values()) == report.skipped
    assert sum(report.quarantined_reasons.values()) == report.quarantined
    assert all(reason.strip() for reason in (*report.skipped_reasons, *report.quarantined_reasons))
    for status, reason in report.files.values():
        assert status in {"used", "skipped", "quarantined"} or status, status
        if status != "used":
            assert reason, f"{status} without a reason"


def _ingest(src: Path, out: Path, modality: Any = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_ingest([src], out, modality=modality, key=KEY, workers=1)


TAG_MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "PixelSpacing": st.sampled_from([[0, 0], [-1, 1], [1e30, 1], ["nan", 1], [1]]),
    "SliceThickness": st.sampled_from([0, -3, "nan", 1e308]),
    "Rows": st.sampled_from([0, 1, 65535, 3]),
    "Columns": st.sampled_from([0, 65535, 7]),
    "NumberOfFrames": st.sampled_from([0, 2, 1000, -1]),
    "BitsAllocated": st.sampled_from([0, 1, 12, 64]),
    "BitsStored": st.sampled_from([0, 17, 32]),
    "SamplesPerPixel": st.sampled_from([0, 3]),
    "ImagePositionPatient": st.sampled_from([[0, 0], ["nan", 0, 0], [1e300, 0, 0], None]),
    "ImageOrientationPatient": st.sampled_from([[0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], [1, 0, 0], None]),
    "RescaleSlope": st.sampled_from([0, "nan", "inf", -1e300]),
    "PhotometricInterpretation": st.sampled_from(["RGB", "PALETTE COLOR", ""]),
    "Modality": st.sampled_from(["", "XX", "CT\\MR"]),
}


@FUZZ
@given(
    mutations=st.dictionaries(st.sampled_from(sorted(TAG_MUTATIONS)), st.just(None), min_size=1, max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({k: TAG_MUTATIONS[k] for k in keys})
    ),
    which=st.sampled_from(["all", "one"]),
)
def test_dicom_tag_mutations_never_crash(tmp_path_factory: Any, mutations: dict[str, Any], which: str) -> None:
    root = tmp_path_factory.mktemp("dtag")

    def plant(k: int, ds: Any) -> None:
        if which == "one" and k != 1:
            return
        for name, value in mutations.items():
            if value is None:
                if name in ds:
                    delattr(ds, name)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    setattr(ds, name, value)

    write_series(root / "src", n=4, per_slice=plant)
    _check(_ingest(root / "src", root / "out"))


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 1400), st.integers(1, 255)), min_size=1, max_size=8),
    truncate=st.one_of(st.none(), st.integers(0, 1500)),
)
def test_dicom_byte_flips_and_truncation_never_crash(
    tmp_path_factory: Any, flips: list[tuple[int, int]], truncate: int | None
) -> None:
    root = tmp_path_factory.mktemp("dbyte")
    paths = write_series(root / "src", n=4)
    target = paths[2]
    data = bytearray(target.read_bytes())
    for pos, xor in flips:
        if pos < len(data):
            data[pos] ^= xor
    if truncate is not None:
        data = data[:truncate]
    target.write_bytes(bytes(data))
    _check(_ingest(root / "src", root / "out"))


NIFTI_FIELDS = {
    # name: (byte offset in the NIfTI-1 header, struct format)
    "dim0": (40, "<h"), "dim1": (42, "<h"), "dim3": (46, "<h"),
    "datatype": (70, "<h"), "bitpix": (72, "<h"),
    "pixdim1": (80, "<f"), "pixdim3": (88, "<f"), "vox_offset": (108, "<f"),
    "scl_slope": (112, "<f"), "scl_inter": (116, "<f"),
    "qform_code": (252, "<h"), "sform_code": (254, "<h"), "quatern_b": (256, "<f"), "srow_x0": (280, "<f"),
}
NIFTI_VALUES = st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e30, 32767.0, -32768.0, 3.0, 7.0])


@FUZZ
@given(
    fields=st.dictionaries(st.sampled_from(sorted(NIFTI_FIELDS)), NIFTI_VALUES, min_size=1, max_size=3),
    flips=st.lists(st.tuples(st.integers(0, 351), st.integers(1, 255)), max_size=3),
    truncate=st.one_of(st.none(), st.integers(0, 600)),
)
def test_nifti_header_mutations_never_crash(
    tmp_path_factory: Any, fields: dict[str, float], flips: list[tuple[int, int]], truncate: int | None
) -> None:
    root = tmp_path_factory.mktemp("nii")
    src = root / "src"
    src.mkdir()
    path = write_nifti(src / "case.nii", np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4))
    data = bytearray(path.read_bytes())
    for name, value in fields.items():
        offset, fmt = NIFTI_FIELDS[name]
        if fmt == "<h":
            value = int(np.clip(np.nan_to_num(value, posinf=32767, neginf=-32768), -32768, 32767))
        struct.pack_into(fmt, data, offset, value)
    for pos, xor in flips:
        data[pos] ^= xor
    if truncate is not None:
        data = data[:truncate]
    path.write_bytes(bytes(data))
    _check(_ingest(src, root / "out", modality="CT"))
