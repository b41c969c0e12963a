"""Builders of small DICOM series, NIfTI files and a bad-input corpus for the ingest tests.

`write_series` writes a tiny CT/MR series with pydicom whose every geometry field can be
overridden per slice; `build_bad_corpus` writes one folder per bad-input case and returns
what ingest must do with each (status and a phrase of the reason). Nothing is downloaded:
pydicom's shipped test files are used where a real-world oddity is needed.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt


def stored_value(k: int, r: int, c: int) -> int:
    """Stored pixel of slice k (file order), row r, column c in `write_series` (distinct per voxel)."""
    return (k * 37 + r * 5 + c * 3) % 900


def write_series(
    folder: Path,
    *,
    n: int = 6,
    rows: int = 8,
    cols: int = 10,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    step: float = 2.0,
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-10.0, 20.0, 30.0),
    modality: str = "CT",
    patient_id: str = "PAT0001",
    series_uid: str = "1.2.826.0.1.3680043.9.7777.1",
    series_number: int = 3,
    name: Callable[[int], str] = lambda k: f"IM{k:04d}.dcm",
    per_slice: Callable[[int, Any], None] | None = None,
    extra: Callable[[Any], None] | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
) -> list[Path]:
    """Write an n-slice series (one file per slice, explicit VR little endian).

    Slice k sits at origin + k * step * normal (LPS mm); its stored pixels are
    `stored_value(k, r, c)`; real value = stored * slope + intercept. `per_slice(k, ds)`
    and `extra(ds)` may change anything before saving (break geometry, plant tags).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

    folder.mkdir(parents=True, exist_ok=True)
    row = np.asarray(iop[:3], float)
    col = np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    paths = []
    for k in range(n):
        sop_class = CTImageStorage if modality == "CT" else MRImageStorage
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = f"{series_uid}.{k + 1}"
        ds.Modality = modality
        ds.PatientID = patient_id
        ds.StudyInstanceUID = series_uid + ".0"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        pos = np.asarray(origin, float) + k * step * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = [f"{v}" for v in pixel_spacing]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{slope}"
        ds.RescaleIntercept = f"{intercept}"
        px = np.fromfunction(lambda r, c, k=k: stored_value(k, r.astype(int), c.astype(int)), (rows, cols))
        ds.PixelData = px.astype("<i2").tobytes()
        if per_slice is not None:
            per_slice(k, ds)
        if extra is not None:
            extra(ds)
        path = folder / name(k)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_nifti(
    path: Path, data: npt.NDArray[Any], affine: npt.NDArray[np.float64] | None = None, *, qform: int = 1,
    sform: int = 1, sidecar: dict[str, Any] | None = None,
) -> Path:
    """Write a NIfTI-1 file (and a JSON sidecar beside it when given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine
    if qform == 0 and sform == 0:  # nibabel sets an sform from any affine given; give none
        img = nib.Nifti1Image(data, None)
    else:
        img = nib.Nifti1Image(data, affine)
        img.header.set_qform(affine, code=qform)
        img.header.set_sform(affine, code=sform)
    nib.save(img, str(path))
    if sidecar is not None:
        (path.parent / (path.name.split(".nii")[0] + ".json")).write_text(json.dumps(sidecar))
    return path


def testdata(name: str) -> Path:
    """A file shipped with pydicom (no download)."""
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name, download=False)
    assert p is not None, name
    return Path(str(p))


@dataclass(frozen=True)
class Case:
    """A bad-input case: its folder (relative to the corpus root), expected status and reason phrase.

    `files` are the relative paths whose disposition is checked (default: every file of the
    folder); `volumes` is how many volumes the folder must still yield.
    """

    folder: str
    status: str
    phrase: str
    files: tuple[str, ...] = ()
    volumes: int = 0


def _ones(shape: tuple[int, ...], dtype: Any = np.float32) -> npt.NDArray[Any]:
    return np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape) % 50


def build_bad_corpus(root: Path) -> list[Case]:
    """Write one folder per bad-input case under `root`; return the expected outcomes."""
    cases: list[Case] = []

    def case(folder: str, status: str, phrase: str, files: tuple[str, ...] = (), volumes: int = 0) -> Path:
        cases.append(Case(folder, status, phrase, files, volumes))
        return root / folder

    # --- DICOM ----------------------------------------------------------------------
    # A damaged or missing slice costs only itself: the intact runs around it are written as parts.
    d = case("truncated_slice", "quarantined", "truncated", files=("truncated_slice/IM0004.dcm",), volumes=2)
    paths = write_series(d, n=8, series_uid="1.2.3.100")
    data = paths[4].read_bytes()
    paths[4].write_bytes(data[: len(data) - 60])

    d = case("missing_pixel_data", "quarantined", "without pixel data", files=("missing_pixel_data/IM0004.dcm",),
             volumes=2)
    write_series(d, n=8, series_uid="1.2.3.101", per_slice=lambda k, ds: ds.__delattr__("PixelData") if k == 4 else None)

    d = case("not_dicom_named_dcm", "quarantined", "is not DICOM")
    d.mkdir(parents=True)
    (d / "scan.dcm").write_bytes(b"this is a text file, not an image\n" * 20)

    d = case("missing_slices", "used", "", volumes=2)
    write_series(d, n=8, series_uid="1.2.3.102", origin=(0, 0, 30.0), per_slice=None)
    (d / "IM0003.dcm").unlink()
    (d / "IM0004.dcm").unlink()

    d = case("gap_leaves_one_slice", "quarantined", "1 slice cut off from the series by missing slices",
             files=("gap_leaves_one_slice/IM0000.dcm",), volumes=1)
    write_series(d, n=7, series_uid="1.2.3.113")
    (d / "IM0001.dcm").unlink()

    d = case("same_uid_different_pixels", "quarantined", "share one SOP Instance UID but hold different pixel data",
             files=("same_uid_different_pixels/IM0004.dcm", "same_uid_different_pixels/IM0004_other.dcm"), volumes=2)
    paths = write_series(d, n=8, series_uid="1.2.3.114")
    write_series(d, n=8, series_uid="1.2.3.114", name=lambda k: "IM0004_other.dcm" if k == 4 else f"tmp{k}.dcm",
                 per_slice=lambda k, ds: setattr(ds, "PixelData", bytes(len(ds.PixelData))) if k == 4 else None)
    for p in d.glob("tmp*.dcm"):
        p.unlink()

    d = case("truncated_duplicate", "skipped", "damaged copy of an instance whose intact copy is present",
             files=("truncated_duplicate/IM0002_copy.dcm",), volumes=1)
    paths = write_series(d, series_uid="1.2.3.115")
    (d / "IM0002_copy.dcm").write_bytes(paths[2].read_bytes()[:-100])

    d = case("gzip_compressed", "used", "", volumes=1)
    for p in write_series(d, series_uid="1.2.3.116"):
        p.with_name(p.name + ".gz").write_bytes(gzip.compress(p.read_bytes()))
        p.unlink()

    d = case("gzip_truncated", "quarantined", "gzip-compressed file is truncated or corrupt")
    d.mkdir(parents=True)
    (d / "a.dcm.gz").write_bytes(gzip.compress(paths[0].read_bytes())[:300])

    d = case("gzip_not_dicom", "skipped", "not a DICOM, NIfTI or JSON file (.gz)")
    d.mkdir(parents=True)
    (d / "scanner_log.gz").write_bytes(gzip.compress(b"log line, not an image\n" * 500))

    d = case("four_d_unequal", "quarantined", "4D series of 3 volumes with unequal slice counts")
    for v in range(3):
        write_series(d, n=5 if v != 1 else 4, series_uid="1.2.3.117", name=lambda k, v=v: f"v{v}_{k}.dcm",
                     per_slice=lambda k, ds, v=v: (setattr(ds, "SOPInstanceUID", f"1.2.3.117.{v}.{k}"),
                                                   setattr(ds, "InstanceNumber", v * 10 + k + 1)))

    def dup_pos(k: int, ds: Any) -> None:
        if k == 4:
            ds.ImagePositionPatient = [f"{v:.4f}" for v in (-10.0, 20.0, 30.0 + 3 * 2.0)]

    case("duplicate_positions", "quarantined", "duplicate another slice's position")
    write_series(root / "duplicate_positions", series_uid="1.2.3.103", per_slice=dup_pos)

    d = case("duplicate_file", "skipped", "duplicate file", files=("duplicate_file/copy_of_3.dcm",), volumes=1)
    paths = write_series(d, series_uid="1.2.3.104")
    shutil.copy(paths[3], d / "copy_of_3.dcm")

    def localizer(k: int, ds: Any) -> None:
        if k == 0:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
            ds.ImagePositionPatient = ["0", "0", "0"]

    case("localizer_mixed_in", "skipped", "localizer", files=("localizer_mixed_in/IM0000.dcm",), volumes=1)
    write_series(root / "localizer_mixed_in", n=7, series_uid="1.2.3.105", per_slice=localizer)

    def tilt(k: int, ds: Any) -> None:
        ds.ImagePositionPatient = [f"{v:.4f}" for v in (-10.0, 20.0 + k * 2.0 * np.tan(np.radians(15)), 30.0 + k * 2.0)]
        ds.GantryDetectorTilt = "15"

    case("gantry_tilt", "quarantined", "gantry tilt")
    write_series(root / "gantry_tilt", series_uid="1.2.3.106", per_slice=tilt)

    def spacing(k: int, ds: Any) -> None:
        if k == 2:
            ds.PixelSpacing = ["0.9", "0.7"]

    case("pixel_spacing_differs", "quarantined", "pixel spacing differs")
    write_series(root / "pixel_spacing_differs", series_uid="1.2.3.107", per_slice=spacing)

    def uneven(k: int, ds: Any) -> None:
        z = [0.0, 2.0, 4.0, 6.5, 8.3, 10.0][k]
        ds.ImagePositionPatient = ["-10", "20", f"{z}"]

    case("uneven_spacing", "quarantined", "slice spacing varies")
    write_series(root / "uneven_spacing", series_uid="1.2.3.108", per_slice=uneven)

    def size(k: int, ds: Any) -> None:
        if k == 5:
            ds.Rows = 4
            ds.PixelData = np.zeros((4, 10), "<i2").tobytes()

    # A slice of another size is another image (split off, as dcm2niix does): alone, it is no volume.
    case("slice_size_differs", "quarantined", "1 slice only", files=("slice_size_differs/IM0005.dcm",), volumes=1)
    write_series(root / "slice_size_differs", series_uid="1.2.3.109", per_slice=size)

    case("one_slice_without_geometry", "quarantined", "ImagePositionPatient",
         files=("one_slice_without_geometry/IM0005.dcm",), volumes=1)
    write_series(root / "one_slice_without_geometry", series_uid="1.2.3.119",
                 per_slice=lambda k, ds: ds.__delattr__("ImagePositionPatient") if k == 5 else None)

    case("no_geometry", "quarantined", "ImagePositionPatient")
    write_series(root / "no_geometry", series_uid="1.2.3.110", per_slice=lambda k, ds: ds.__delattr__("ImagePositionPatient"))

    case("burned_in", "quarantined", "burned-in annotation")
    write_series(root / "burned_in", series_uid="1.2.3.111", extra=lambda ds: setattr(ds, "BurnedInAnnotation", "YES"))

    d = case("single_slice", "quarantined", "1 slice only")
    d.mkdir(parents=True)
    shutil.copy(testdata("CT_small.dcm"), d / "ct_small.dcm")

    d = case("zero_size_file", "quarantined", "empty file (0 bytes)")
    d.mkdir(parents=True)
    (d / "empty.dcm").write_bytes(b"")

    def mpeg2(ds: Any) -> None:  # a video transfer syntax: no pixel handler decodes it
        from pydicom.encaps import encapsulate

        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.PixelData = encapsulate([bytes(ds.PixelData)])
        ds["PixelData"].VR = "OB"

    d = case("no_decoder", "quarantined", "has no decoder")
    write_series(d, series_uid="1.2.3.118", extra=mpeg2)

    d = case("truncated_header", "quarantined", "truncated")
    paths = write_series(d, n=1, series_uid="1.2.3.112")
    paths[0].write_bytes(paths[0].read_bytes()[:300])

    d = case("rtstruct", "skipped", "non-image object (RT Structure Set Storage)")
    d.mkdir(parents=True)
    shutil.copy(testdata("rtstruct.dcm"), d / "rtstruct.dcm")

    d = case("structured_report", "skipped", "non-image object")
    d.mkdir(parents=True)
    shutil.copy(testdata("test-SR.dcm"), d / "sr.dcm")

    d = case("rtplan", "skipped", "non-image object")
    d.mkdir(parents=True)
    shutil.copy(testdata("rtplan.dcm"), d / "plan")

    d = case("dicomdir", "skipped", "DICOMDIR")
    d.mkdir(parents=True)
    shutil.copy(testdata("dicomdirtests") / "DICOMDIR", d / "DICOMDIR")

    d = case("colour_secondary_capture", "skipped", "only CT and MR")
    d.mkdir(parents=True)
    shutil.copy(testdata("SC_rgb_jpeg_dcmd.dcm"), d / "sc.dcm")

    d = case("random_binary_no_extension", "skipped", "not a DICOM, NIfTI or JSON file")
    d.mkdir(parents=True)
    (d / "blob").write_bytes(bytes(range(256)) * 4)

    # --- NIfTI ------------------------------------------------------------------------
    sc_ct = {"Modality": "CT"}
    nan = _ones((6, 6, 4))
    nan[1, 2, 3] = np.nan
    case("nifti_nan", "quarantined", "1 NaN voxel")
    write_nifti(root / "nifti_nan" / "a.nii.gz", nan, sidecar=sc_ct)

    inf = _ones((6, 6, 4))
    inf[0, 0, 0] = np.inf
    inf[0, 0, 1] = -np.inf
    case("nifti_inf", "quarantined", "2 Inf voxels")
    write_nifti(root / "nifti_inf" / "a.nii.gz", inf, sidecar=sc_ct)

    case("nifti_no_modality", "quarantined", "modality unknown")
    write_nifti(root / "nifti_no_modality" / "a.nii.gz", _ones((6, 6, 4)))

    case("nifti_no_orientation", "quarantined", "qform_code and sform_code are both 0")
    write_nifti(root / "nifti_no_orientation" / "a.nii.gz", _ones((6, 6, 4)), qform=0, sform=0, sidecar=sc_ct)

    case("nifti_4d", "quarantined", "with 3 volumes")
    write_nifti(root / "nifti_4d" / "a.nii.gz", _ones((6, 6, 4, 3)), sidecar=sc_ct)

    # Absurd dimensions: a header that claims 30000^3 voxels over a tiny body.
    d = case("nifti_absurd_dims", "quarantined", "refused before reading")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(np.eye(4), code=1)
    d.mkdir(parents=True)
    (d / "a.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 1000)
    (d / "a.json").write_text(json.dumps(sc_ct))

    d = case("nifti_zero_dim", "quarantined", "empty NIfTI")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((0, 0, 0))
    hdr.set_qform(np.eye(4), code=1)
    d.mkdir(parents=True)
    (d / "a.nii").write_bytes(hdr.binaryblock + b"\0" * 4)
    (d / "a.json").write_text(json.dumps(sc_ct))

    d = case("nifti_corrupt_gzip", "quarantined", "corrupt gzip")
    good = write_nifti(d / "a.nii.gz", _ones((16, 16, 8)), sidecar=sc_ct)
    raw = bytearray(good.read_bytes())
    raw[200:260] = b"\xff" * 60
    good.write_bytes(bytes(raw))

    d = case("nifti_truncated", "quarantined", "truncated")
    p = write_nifti(d / "a.nii", _ones((16, 16, 8)), sidecar=sc_ct)
    p.write_bytes(p.read_bytes()[:2000])

    d = case("nifti_not_gzip", "quarantined", "NIfTI")
    d.mkdir(parents=True)
    (d / "a.nii.gz").write_bytes(gzip.compress(b"not a nifti header at all" * 3))
    (d / "a.json").write_text(json.dumps(sc_ct))

    d = case("decathlon_bad_json", "quarantined", "dataset.json cannot be parsed")
    d.mkdir(parents=True)
    (d / "dataset.json").write_text("{ not json")
    write_nifti(d / "imagesTr" / "c_001.nii.gz", _ones((6, 6, 4)))

    d = case("decathlon_unlisted_file", "skipped", "not listed in dataset.json",
             files=("decathlon_unlisted_file/imagesTr/stray.nii.gz",), volumes=1)
    (d / "imagesTr").mkdir(parents=True)
    write_nifti(d / "imagesTr" / "c_001.nii.gz", _ones((6, 6, 4)))
    write_nifti(d / "imagesTr" / "stray.nii.gz", _ones((6, 6, 4)))
    (d / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}, "labels": {"0": "background"},
                                                "training": [{"image": "./imagesTr/c_001.nii.gz"}], "test": []}))

    d = case("json_not_sidecar", "skipped", "not a NIfTI sidecar")
    d.mkdir(parents=True)
    (d / "notes.json").write_text("{}")
    return cases
