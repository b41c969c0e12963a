"""Hostile inputs to the ingest: absurd dimensions refused before any allocation, symlink
loops, file names with control characters, separators-like and unicode characters, and a
folder tree 200 levels deep. Every case must finish without an exception and account for
every file (used + skipped + quarantined == files_seen)."""

from __future__ import annotations

import os
import struct
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ingest_corpus import write_nifti, write_series

from pipeline.ingest import run_ingest
from pipeline.manifest import read_manifest

KEY = b"hostile-test-key"
PEAK_LIMIT = 64 * 2**20
"""Python-heap peak allowed for ingesting a header that claims 100000^3 voxels (bytes)."""


def _ingest(sources: list[Path], out: Path, modality: Any = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run_ingest(sources, out, modality=modality, key=KEY, workers=1)
    assert report.files_used + report.skipped + report.quarantined == report.files_seen, report
    return report


def _peak(fn: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_nifti_claiming_100000_cubed_voxels_is_refused_before_allocation(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    path = write_nifti(src / "huge.nii", np.zeros((4, 4, 4), np.int16))
    data = bytearray(path.read_bytes())
    for axis in range(3):
        struct.pack_into("<h", data, 42 + 2 * axis, 30000)  # int16 caps a NIfTI-1 dim; 30000^3 = 2.7e13 voxels
    path.write_bytes(bytes(data))
    report, peak = _peak(lambda: _ingest([src], tmp_path / "out", modality="CT"))
    assert report.files_used == 0 and report.files_seen == 1
    assert peak < PEAK_LIMIT, f"peak {peak / 2**20:.0f} MiB"


def test_dicom_claiming_huge_rows_columns_and_frames_is_refused_before_allocation(tmp_path: Path) -> None:
    def huge(ds: Any) -> None:
        ds.Rows = 65535
        ds.Columns = 65535
        ds.NumberOfFrames = 100000  # 100000 x 65535^2 x 2 bytes claimed, a few hundred bytes present

    write_series(tmp_path / "src", n=3, extra=huge)
    report, peak = _peak(lambda: _ingest([tmp_path / "src"], tmp_path / "out"))
    assert report.files_used == 0 and report.files_seen == 3
    assert peak < PEAK_LIMIT, f"peak {peak / 2**20:.0f} MiB"


def test_symlink_loops_do_not_hang_or_double_count(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_series(src / "series", n=4)
    os.symlink(src, src / "series" / "loop")  # src/series/loop -> src (a cycle)
    os.symlink("self", src / "self")  # a link to itself
    os.symlink(src / "missing", src / "dangling")
    report = _ingest([src], tmp_path / "out")
    assert report.volumes_written == 1
    assert report.files_used == 4


@pytest.mark.parametrize("name", ["new\nline.dcm", "tab\there.dcm", "ünïcødé_日本.dcm", "..\\..\\etc.dcm", "a:b|c?.dcm",
                                  "\x1b[31mred.dcm", " lead and trail .dcm"])
def test_hostile_file_names_are_ingested_and_never_echoed(tmp_path: Path, name: str) -> None:
    src = tmp_path / "src"
    write_series(src / "s", n=3, name=lambda k: f"{k}_{name}")
    out = tmp_path / "out"
    report = _ingest([src], out)
    assert report.volumes_written == 1
    rows = read_manifest(out)
    assert len(rows) == 1 and Path(out / rows[0]["path"]).is_file()
    for f in out.rglob("*"):
        assert "\n" not in f.name and "\t" not in f.name
    for f in out.iterdir():
        if f.is_file() and f.suffix in {".csv", ".json"}:
            assert name not in f.read_text(errors="replace")


def test_200_level_deep_folder_tree(tmp_path: Path) -> None:
    deep = tmp_path / "src"
    for level in range(200):
        deep = deep / f"d{level % 10}"
    write_series(deep, n=3)
    report = _ingest([tmp_path / "src"], tmp_path / "out")
    assert report.volumes_written == 1 and report.files_seen == 3
