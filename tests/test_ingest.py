"""Ingest on the phantom cohort and on hand-made series: known answers, geometry round trip,
pseudonym consistency, determinism and incremental re-runs."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ingest_corpus import stored_value, write_nifti, write_series

from pipeline.errors import GeometryError
from pipeline.ingest import MANIFEST_COLUMNS, run_ingest
from pipeline.ingest.deid import Deid
from pipeline.ingest.geometry import stack_geometry
from pipeline.ingest.run import STATE_NAME
from pipeline.ingest.writer import gzip_bytes
from pipeline.manifest import read_manifest, sha256_file

KEY = b"test-key-ingest"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.phantoms import write_cohort

    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root, n_subjects=4, size=32, seed=3)
    return root


@pytest.fixture(scope="module")
def ingested(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ingested") / "out"
    run_ingest([cohort / "dicom", cohort / "nifti"], out, key=KEY, workers=2)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- phantom cohort -------------------------------------------------------------------------


def test_cohort_manifest_and_files(cohort: Path, ingested: Path) -> None:
    rows = read_manifest(ingested)
    cohort_rows = read_manifest(cohort / "cohort.csv")
    assert len(rows) == 2 * len(cohort_rows)  # each volume once from DICOM, once from Decathlon
    header = (ingested / "manifest.csv").read_text().splitlines()[0]
    assert header == ",".join(MANIFEST_COLUMNS)
    assert read_manifest(ingested / "quarantine.csv") == []
    for r in rows:
        path = ingested / r["path"]
        assert sha256_file(path) == r["sha256"]
        assert Path(r["path"]).name.startswith(r["subject_id"] + "_" + r["modality"] + "_")
        img = nib.load(str(path))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert "x".join(map(str, img.shape)) == r["shape"] == "32x32x16"
        assert img.get_data_dtype() == (np.int16 if r["modality"] == "CT" else np.float32)
        for field in ("descrip", "aux_file", "intent_name", "db_name"):
            assert img.header[field].item() == b""
        if r["source_kind"] == "decathlon":
            lab = nib.load(str(ingested / r["label_path"]))
            assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= {0, 1}
            assert np.asarray(lab.dataobj).sum() > 0
            assert np.allclose(lab.affine, img.affine)
            assert r["class"] in ("round", "necrotic") and r["split"] in ("train", "test")
        else:
            assert r["label_path"] == "" and r["class"] == "" and r["split"] == ""


def test_cohort_dicom_equals_nifti_and_pseudonyms_pair(cohort: Path, ingested: Path) -> None:
    deid = Deid(KEY)
    rows = read_manifest(ingested)
    by = {(r["subject_id"], r["modality"], r["source_kind"]): r for r in rows}
    for c in read_manifest(cohort / "cohort.csv"):
        d = by[(deid.pseudonym(c["patient_id"]), c["modality"], "dicom")]
        n = by[(deid.pseudonym(c["case"]), c["modality"], "decathlon")]
        assert n["split"] == c["split"] and n["class"] == c["class"]
        a, b = nib.load(str(ingested / d["path"])), nib.load(str(ingested / n["path"]))
        assert np.allclose(a.affine, b.affine, atol=1e-3)
        tol = 0 if c["modality"] == "CT" else 0.125  # MR DICOM stores value / 0.25 as integers
        assert np.max(np.abs(a.get_fdata() - b.get_fdata())) <= tol
        assert d["spacing"] == n["spacing"]
        if c["partner"]:  # paired test subject: the other modality has the same pseudonyms
            other = "MR" if c["modality"] == "CT" else "CT"
            assert (deid.pseudonym(c["patient_id"]), other, "dicom") in by
            assert (deid.pseudonym(c["case"]), other, "decathlon") in by


def test_rerun_is_byte_identical_and_incremental(cohort: Path, ingested: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    run_ingest([cohort / "dicom", cohort / "nifti"], fresh, key=KEY, workers=1)
    assert _files(fresh) == _files(ingested)
    # Second run into the same folder re-uses every volume and rewrites identical bytes.
    report = run_ingest([cohort / "dicom", cohort / "nifti"], fresh, key=KEY, workers=2)
    assert report.volumes_reused == report.volumes_written == 12
    assert _files(fresh) == _files(ingested)


def test_written_volumes_are_hashed_as_written(cohort: Path, ingested: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh ingest reads no output back to hash it: the manifest's sha256 is taken from the
    bytes as the writer sends them to disk, and it is the sha256 of the file on disk."""
    import pipeline.ingest.run as ingest_run

    hashed: list[Path] = []
    monkeypatch.setattr(ingest_run, "sha256_file", lambda path, *a, **k: hashed.append(path) or sha256_file(path))
    run_ingest([cohort / "nifti"], tmp_path / "o", key=KEY, workers=1)
    assert hashed == []
    rows = read_manifest(tmp_path / "o")
    assert rows and all(r["label_path"] for r in rows if r["modality"] == "CT")
    for r in rows:
        assert r["sha256"] == sha256_file(tmp_path / "o" / r["path"])
    entries = json.loads((tmp_path / "o" / STATE_NAME).read_text())["entries"].values()
    assert {e["label_sha256"] for e in entries if e["label"]} == {
        sha256_file(tmp_path / "o" / r["label_path"]) for r in rows if r["label_path"]}


def test_incremental_reconverts_only_changed_series(cohort: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(cohort / "dicom", src)
    out = tmp_path / "out"
    run_ingest([src], out, key=KEY, workers=1)
    before = _files(out)
    import pydicom

    first_series = sorted(p for p in src.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(first_series)
    arr = ds.pixel_array.copy()
    arr[0, 0] += 7
    ds.PixelData = arr.tobytes()
    ds.save_as(first_series)
    report = run_ingest([src], out, key=KEY, workers=1)
    assert report.volumes_written == 6 and report.volumes_reused == 5
    after = _files(out)
    changed = {k for k in after if k.startswith("volumes/") and after[k] != before.get(k)}
    assert len(changed) == 1


def test_without_key_warns_and_pseudonyms_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_series(tmp_path / "in")
    with caplog.at_level(logging.WARNING):
        r1 = run_ingest([tmp_path / "in"], tmp_path / "o1", key=None, workers=1)
    assert "MEDAUG_DEID_KEY is not set" in caplog.text
    run_ingest([tmp_path / "in"], tmp_path / "o2", key=None, workers=1)
    assert not r1.stable_pseudonyms
    assert read_manifest(tmp_path / "o1")[0]["subject_id"] != read_manifest(tmp_path / "o2")[0]["subject_id"]
    assert not (tmp_path / "o1" / ".ingest_state.json").exists()


# --- geometry round trip ----------------------------------------------------------------------


def _world_ras(ipp: np.ndarray, iop: np.ndarray, ps: tuple[float, float], r: int, c: int) -> np.ndarray:
    lps = ipp + c * ps[1] * iop[:3] + r * ps[0] * iop[3:]
    return np.array([-lps[0], -lps[1], lps[2]])


@pytest.mark.parametrize(
    "iop",
    [
        (1, 0, 0, 0, 1, 0),  # axial
        (0, 1, 0, 0, 0, -1),  # sagittal
        (1, 0, 0, 0, 0, -1),  # coronal
        (0.866025, 0.5, 0, -0.5, 0.866025, 0),  # oblique axial (30 degrees)
    ],
)
def test_world_coordinates_round_trip(tmp_path: Path, iop: tuple[float, ...]) -> None:
    import pydicom

    # Files named in reverse slice order: the order must come from positions, not names.
    paths = write_series(tmp_path / "in", n=5, rows=7, cols=9, pixel_spacing=(0.8, 0.6), step=-2.5, iop=iop,
                         name=lambda k: f"z{9 - k}.dcm", intercept=-1000.0)
    run_ingest([tmp_path / "in"], tmp_path / "out", key=KEY, workers=1)
    (row,) = read_manifest(tmp_path / "out")
    img = nib.load(str(tmp_path / "out" / row["path"]))
    data = np.asarray(img.dataobj)
    inv = np.linalg.inv(img.affine)
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        o = np.array([float(v) for v in ds.ImageOrientationPatient])
        for r, c in ((0, 0), (6, 0), (0, 8), (3, 5)):
            world = _world_ras(ipp, o, (0.8, 0.6), r, c)
            ijk = inv @ np.append(world, 1.0)
            idx = np.rint(ijk[:3]).astype(int)
            assert np.allclose(ijk[:3], idx, atol=1e-3), (k, r, c, ijk)
            assert data[tuple(idx)] == stored_value(k, r, c) - 1000
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")


def test_series_mixed_in_one_folder_and_echoes_split(tmp_path: Path) -> None:
    write_series(tmp_path / "in", series_uid="1.2.9.1", series_number=7, name=lambda k: f"a{k}")
    write_series(tmp_path / "in", series_uid="1.2.9.2", series_number=2, name=lambda k: f"b{k}", n=4)
    # Two echoes in one series UID: two volumes.
    for echo in (1, 2):
        write_series(tmp_path / "in" / "me", series_uid="1.2.9.3", modality="MR", series_number=9, intercept=0,
                     name=lambda k, e=echo: f"e{e}_{k}", extra=lambda ds, e=echo: setattr(ds, "EchoNumbers", e),
                     per_slice=lambda k, ds, e=echo: setattr(ds, "SOPInstanceUID", f"1.2.9.3.{e}.{k}"))
    report = run_ingest([tmp_path / "in"], tmp_path / "out", key=KEY, workers=2)
    rows = read_manifest(tmp_path / "out")
    assert report.volumes_written == 4
    names = sorted(Path(r["path"]).name for r in rows)
    pid = Deid(KEY).pseudonym("PAT0001")
    assert names == [f"{pid}_CT_0.nii.gz", f"{pid}_CT_1.nii.gz", f"{pid}_MR_0.nii.gz", f"{pid}_MR_1.nii.gz"]
    shapes = {Path(r["path"]).name: r["shape"] for r in rows}
    assert shapes[f"{pid}_CT_0.nii.gz"] == "10x8x4"  # series number 2 comes first
    assert shapes[f"{pid}_CT_1.nii.gz"] == "10x8x6"


def test_compressed_series_decodes_like_uncompressed(tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import RLELossless

    paths = write_series(tmp_path / "raw", series_uid="1.2.9.10")
    run_ingest([tmp_path / "raw"], tmp_path / "o1", key=KEY, workers=1)
    (tmp_path / "rle").mkdir()
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.compress(RLELossless)
        ds.save_as(tmp_path / "rle" / p.name)
    run_ingest([tmp_path / "rle"], tmp_path / "o2", key=KEY, workers=1)
    assert read_manifest(tmp_path / "o1")[0]["sha256"] == read_manifest(tmp_path / "o2")[0]["sha256"]


def test_nifti_sources_sidecar_bids_and_flag(tmp_path: Path) -> None:
    data = (np.arange(6 * 5 * 4).reshape(6, 5, 4) * 1.0).astype(np.float32)
    aff = np.array([[-2.0, 0, 0, 10], [0, 2.0, 0, -5], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    write_nifti(tmp_path / "bids" / "sub-17" / "anat" / "sub-17_ct.nii.gz", data, aff, sidecar={"Modality": "CT"})
    write_nifti(tmp_path / "bids" / "sub-17" / "anat" / "sub-17_T1w.nii.gz", data + 0.5, aff, sidecar={"Modality": "MR"})
    write_nifti(tmp_path / "loose" / "scan.nii", data, aff)
    run_ingest([tmp_path / "bids", tmp_path / "loose" / "scan.nii"], tmp_path / "out", key=KEY, modality="MR", workers=1)
    rows = read_manifest(tmp_path / "out")
    deid = Deid(KEY)
    got = sorted((r["subject_id"], r["modality"], r["shape"], r["spacing"]) for r in rows)
    assert got == sorted([(deid.pseudonym("sub-17"), "CT", "6x5x4", "2.0x2.0x3.0"),
                          (deid.pseudonym("sub-17"), "MR", "6x5x4", "2.0x2.0x3.0"),
                          (deid.pseudonym("scan"), "MR", "6x5x4", "2.0x2.0x3.0")])
    ct = next(r for r in rows if r["modality"] == "CT")
    img = nib.load(str(tmp_path / "out" / ct["path"]))
    assert img.get_data_dtype() == np.int16
    # The x axis was flipped to reach RAS+: the world position of each value is kept.
    assert np.allclose(img.affine @ [0, 0, 0, 1], aff @ [5, 0, 0, 1])
    assert np.asarray(img.dataobj)[0, 0, 0] == data[5, 0, 0]


# --- units ------------------------------------------------------------------------------------


def test_stack_geometry_known_answers() -> None:
    g = stack_geometry([[0, 0, 3.0], [0, 0, 0.0], [0, 0, 1.5]], [1, 0, 0, 0, 1, 0], (0.5, 0.7))
    assert g.order.tolist() == [1, 2, 0]
    assert g.spacing == (0.7, 0.5, 1.5)
    assert np.allclose(g.affine, [[-0.7, 0, 0, 0], [0, -0.5, 0, 0], [0, 0, 1.5, 0], [0, 0, 0, 1]])
    with pytest.raises(GeometryError, match=r"2 slices missing between positions 79.5 and 84.0"):
        stack_geometry([[0, 0, z] for z in (76.5, 78.0, 79.5, 84.0, 85.5)], [1, 0, 0, 0, 1, 0], (1, 1))
    with pytest.raises(GeometryError, match="duplicate"):
        stack_geometry([[0, 0, z] for z in (0, 1, 1, 2)], [1, 0, 0, 0, 1, 0], (1, 1))
    with pytest.raises(GeometryError, match="sheared by 45.0 degrees"):
        stack_geometry([[0, z, z] for z in (0, 1, 2, 3)], [1, 0, 0, 0, 1, 0], (1, 1))
    with pytest.raises(GeometryError, match="1 slice only"):
        stack_geometry([[0, 0, 0]], [1, 0, 0, 0, 1, 0], (1, 1))


def test_gzip_is_standard_deterministic_and_thread_independent() -> None:
    rng = np.random.default_rng(0)
    payload = (rng.integers(0, 40, size=3 << 20, dtype=np.uint8)).tobytes()
    one = gzip_bytes(payload, level=1, threads=1)
    assert one == gzip_bytes(payload, level=1, threads=3)
    assert gzip.decompress(one) == payload
    assert one[4:8] == b"\0\0\0\0"  # mtime 0


@pytest.mark.parametrize("level", [1, 2, 3, 6, 9])
def test_gzip_level_picks_the_deflate_library(level: int) -> None:
    """Levels 1-3 deflate with ISA-L, 4-9 with zlib; each round-trips through stdlib gzip."""
    import zlib

    from isal import isal_zlib

    payload = np.random.default_rng(level).integers(0, 40, size=1 << 20, dtype=np.uint8).tobytes()
    out = gzip_bytes(payload, level=level, threads=1)
    assert gzip.decompress(out) == payload
    body = out[10:-8]  # one block: header and trailer around one raw deflate stream
    lib = isal_zlib if level <= 3 else zlib
    other = zlib if level <= 3 else isal_zlib
    want = lib.compressobj(level, lib.DEFLATED, -15, 8, lib.Z_DEFAULT_STRATEGY)
    assert body == want.compress(payload) + want.flush(lib.Z_FINISH)
    if level <= 3:  # ISA-L's stream differs from zlib's at the same level
        not_want = other.compressobj(level, other.DEFLATED, -15, 8, other.Z_DEFAULT_STRATEGY)
        assert body != not_want.compress(payload) + not_want.flush(other.Z_FINISH)


def test_deid_keyed_and_stable() -> None:
    a, b = Deid(b"k1"), Deid(b"k2")
    assert a.pseudonym("PAT-1") == Deid(b"k1").pseudonym("PAT-1 ")
    assert a.pseudonym("PAT-1") != b.pseudonym("PAT-1")
    assert a.pseudonym("PAT-1") != a.pseudonym("PAT-2")
    assert a.path_ref("x/y.dcm") != a.digest("subject", "x/y.dcm")[:16]


def test_enhanced_multiframe_uses_per_frame_geometry(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian

    n, rows, cols = 5, 6, 7
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.9.50.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedMRImageStorage, "1.2.9.50.1"
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", "PAT-MF", "1.2.9.50", 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    shared = Dataset()
    ori, meas, trans = Dataset(), Dataset(), Dataset()
    ori.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    meas.PixelSpacing = [0.9, 1.1]
    meas.SliceThickness = 2
    trans.RescaleSlope, trans.RescaleIntercept, trans.RescaleType = 2, 5, "US"
    shared.PlaneOrientationSequence = Seq([ori])
    shared.PixelMeasuresSequence = Seq([meas])
    shared.PixelValueTransformationSequence = Seq([trans])
    ds.SharedFunctionalGroupsSequence = Seq([shared])
    per = []
    order = [3, 0, 4, 1, 2]  # frames stored out of slice order
    for f in range(n):
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0, 0, 2.0 * order[f]]
        item.PlanePositionSequence = Seq([pos])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Seq(per)
    frames = np.stack([np.full((rows, cols), 10 * order[f], np.uint16) + np.arange(cols, dtype=np.uint16)
                       for f in range(n)])
    ds.PixelData = frames.tobytes()
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "enhanced.dcm", enforce_file_format=True)
    run_ingest([tmp_path / "in"], tmp_path / "out", key=KEY, workers=1)
    (row,) = read_manifest(tmp_path / "out")
    assert row["shape"] == "7x6x5" and row["spacing"] == "1.1x0.9x2.0"
    img = nib.load(str(tmp_path / "out" / row["path"]))
    data = np.asarray(img.dataobj)
    assert data.dtype == np.int16
    # RAS: x flips (column 0 is the most right-ward... i.e. last), z ascends with the slice position.
    for z in range(n):
        assert data[cols - 1, 0, z] == 2 * (10 * z) + 5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fast_header_reader_agrees_with_pydicom(cohort: Path, tmp_path: Path) -> None:
    from ingest_corpus import build_bad_corpus, testdata

    from pipeline.ingest.dicom import read_header
    from pipeline.ingest.discover import FileRef
    from pipeline.ingest.fastheader import read_fast

    build_bad_corpus(tmp_path / "bad")
    write_series(tmp_path / "mr", modality="MR", slope=0.5, intercept=3.0)
    paths = sorted(p for p in (tmp_path).rglob("*") if p.is_file())
    paths += sorted((cohort / "dicom").rglob("*.dcm"))[:40]
    paths += sorted(testdata("CT_small.dcm").parent.glob("*.dcm"))
    n_fast = 0
    for p in paths:
        ref = FileRef(root=0, rel=p.name, path=p, size=p.stat().st_size)
        n_fast += read_fast(p) is not None
        assert read_header(ref) == read_header(ref, use_fast=False), p.name
    assert n_fast > 40  # the fast path is really taken


def test_own_nifti_header_and_reorientation_match_nibabel(tmp_path: Path) -> None:
    from scipy.spatial.transform import Rotation

    from pipeline.ingest.writer import canonical, nifti_header, write_volume

    rng = np.random.default_rng(1)
    data = rng.integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)
    affines = [np.diag([-0.7, -0.5, 2.0, 1.0]), np.diag([1.0, 1.0, 1.0, 1.0])]
    for seed in range(6):
        a = np.eye(4)
        a[:3, :3] = Rotation.random(random_state=seed).as_matrix() @ np.diag(rng.uniform(0.3, 4.0, 3))
        a[:3, 3] = rng.uniform(-100, 100, 3)
        if seed % 2:
            a[:3, 0] *= -1  # left-handed voxel axes (qfac -1)
        affines.append(a)
    for aff in affines:
        ref = nib.as_closest_canonical(nib.Nifti1Image(data, aff))
        arr, new_aff = canonical(data, aff)
        assert np.array_equal(arr, np.asarray(ref.dataobj)) and np.allclose(new_aff, ref.affine)
        path = tmp_path / "v.nii.gz"
        write_volume(path, data, aff)
        img = nib.load(str(path))
        assert np.array_equal(np.asarray(img.dataobj), arr)
        assert np.allclose(img.header.get_sform(), new_aff, atol=1e-4)
        assert np.allclose(img.header.get_qform(), new_aff, atol=1e-4)
        assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 1
        hdr = nifti_header((5, 6, 7), np.dtype(np.float32), aff)
        assert len(hdr) == 352 and hdr[344:348] == b"n+1\0"


def test_series_without_preamble_or_extension_implicit_vr(tmp_path: Path) -> None:
    import pydicom

    paths = write_series(tmp_path / "raw", series_uid="1.2.9.20")
    (tmp_path / "bare" / "deep" / "er").mkdir(parents=True)
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(tmp_path / "bare" / "deep" / "er" / f"{i:08d}", implicit_vr=True, little_endian=True,
                   enforce_file_format=False)
    assert (tmp_path / "bare" / "deep" / "er" / "00000000").read_bytes()[128:132] != b"DICM"
    run_ingest([tmp_path / "raw"], tmp_path / "o1", key=KEY, workers=1)
    run_ingest([tmp_path / "bare"], tmp_path / "o2", key=KEY, workers=1)
    assert read_manifest(tmp_path / "o1")[0]["sha256"] == read_manifest(tmp_path / "o2")[0]["sha256"]


def test_whole_cohort_folder_counts_every_file_once(cohort: Path, tmp_path: Path) -> None:
    report = run_ingest([cohort], tmp_path / "out", key=KEY, workers=2)
    n_files = sum(1 for p in cohort.rglob("*") if p.is_file())
    assert report.files_seen == n_files == report.files_used + report.skipped + report.quarantined
    assert report.volumes_written == 12
    # Tissue maps have no modality (quarantined); cohort.csv is not an image (skipped).
    assert report.quarantined == len(list((cohort / "truth").iterdir()))
    assert report.skipped_reasons == {"not a DICOM, NIfTI or JSON file (.csv)": 1}


@pytest.mark.parametrize("signed", [0, 1])
def test_12_bit_stored_values_masked_like_pydicom(tmp_path: Path, signed: int) -> None:
    import pydicom

    rng = np.random.default_rng(signed)

    def twelve_bit(k: int, ds: object) -> None:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, signed  # type: ignore[attr-defined]
        raw = rng.integers(0, 1 << 16, size=(8, 10), dtype=np.uint16)  # garbage in the 4 high bits
        ds.PixelData = raw.astype("<u2").tobytes()  # type: ignore[attr-defined]

    paths = write_series(tmp_path / "in", per_slice=twelve_bit, intercept=-1024.0)
    run_ingest([tmp_path / "in"], tmp_path / "out", key=KEY, workers=1)
    (row,) = read_manifest(tmp_path / "out")
    got = np.asarray(nib.load(str(tmp_path / "out" / row["path"])).dataobj)
    want = np.stack([pydicom.dcmread(p).pixel_array.T.astype(np.int32) - 1024 for p in paths], axis=2)
    assert np.array_equal(got, want[::-1, ::-1, :])  # LPS -> RAS flips x and y


def test_same_bytes_from_threaded_caller_forkserver_workers(tmp_path: Path) -> None:
    """Under a multi-threaded caller (e.g. a Prefect flow) workers start by forkserver."""
    import threading

    write_series(tmp_path / "in" / "a", series_uid="1.2.9.30")
    write_series(tmp_path / "in" / "b", series_uid="1.2.9.31", series_number=4)
    run_ingest([tmp_path / "in"], tmp_path / "o1", key=KEY, workers=2)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_ingest([tmp_path / "in"], tmp_path / "o2", key=KEY, workers=2)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join(60)
    assert not errors
    assert _files(tmp_path / "o1") == _files(tmp_path / "o2")


def test_key_not_in_repr() -> None:
    assert "secret" not in repr(Deid(b"secret")) and "secret" not in str(Deid(b"secret"))
