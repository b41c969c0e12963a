"""Ingest vs dcm2niix on DICOM this project had not used: the files nibabel and pydicom ship.

Four corpora, each copied as shipped (bench/RESULTS.md, "Ingest vs dcm2niix on corpora the
project had not seen", has the inventory): nibabel's Siemens files (two DWI mosaics stored
as .dcm.gz, single slices), nibabel's Philips enhanced MPRAGE (.dcm.gz, 176 frames),
pydicom's DICOMDIR test tree (GE CT and Philips MR, downsized to 16 x 16, plus headers
without pixels) and pydicom's 85 top-level test files (CT_small, MR_small in six transfer
syntaxes, colour, RT, NM, US, SR and deliberately broken files). dcm2niix converts the same
files (gunzipped: it does not read .dcm.gz). In world space, as in test_ingest_realworld:

- every volume ingest writes equals one dcm2niix 3D volume; a volume that equals none must
  be a part of a gapped series and equal, slice for slice, the DICOM slices pydicom decodes
  at its positions (dcm2niix writes a series of uneven spacing with a wrong slice step);
- at least 90 % of dcm2niix's 3D volumes of CT and MR with 3 or more slices are recovered
  (1-slice images are 2D, which ingest refuses by design; RT dose is not CT or MR), leaving
  out series dcm2niix itself marks as unevenly spaced (its `_Eq_` copy);
- every input file is counted once and no patient name or ID reaches an output byte.

nibabel's 0.dcm and 1.dcm are left out of the recovery corpus and tested on their own: their
pixels are a synthetic ramp in a 256 x 256 mosaic that does not divide into its 7 x 7 tiles,
and 1.dcm is 0.dcm moved one slice. Most nibabel files hold zeroed pixels (kept small): they
test geometry, not decoding. Runs in a few seconds; skipped without dcm2niix or the data.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest
from test_ingest_realworld import _corners, _match, _reference_volumes

from pipeline.ingest import run_ingest
from pipeline.manifest import read_manifest

KEY = b"test-key-unseen"


def _site() -> Path:
    return Path(nib.__file__).resolve().parents[1]


NIBABEL = _site() / "nibabel" / "nicom" / "tests" / "data"
PYDICOM = _site() / "pydicom" / "data" / "test_files"
CORPORA: dict[str, list[Path]] = {
    "nibabel-siemens": [NIBABEL / n for n in ("siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz", "csa_slice_norm.dcm",
                                              "decimal_rescale.dcm", "slicethickness_empty_string.dcm")],
    "nibabel-philips": [NIBABEL / "philips_mprage.dcm.gz"],
    "pydicom-dicomdir": [PYDICOM / "dicomdirtests"],
    "pydicom-files": sorted(p for p in PYDICOM.iterdir() if p.is_file()) if PYDICOM.is_dir() else [],
}
ALTERED = [NIBABEL / "0.dcm", NIBABEL / "1.dcm"]

needs_data = pytest.mark.skipif(
    shutil.which("dcm2niix") is None or not all(p.exists() for ps in CORPORA.values() for p in ps + ALTERED)
    or not CORPORA["pydicom-files"],
    reason="needs dcm2niix on PATH and the DICOM test files shipped with nibabel and pydicom",
)


def _copy(sources: list[Path], into: Path, plain: Path) -> None:
    """Copy `sources` into `into` as shipped and into `plain` with .gz files inflated (for dcm2niix)."""
    into.mkdir(parents=True)
    plain.mkdir(parents=True)
    for p in sources:
        if p.is_dir():
            shutil.copytree(p, into / p.name)
            shutil.copytree(p, plain / p.name)
        elif p.suffix == ".gz":
            shutil.copy(p, into / p.name)
            (plain / p.stem).write_bytes(gzip.decompress(p.read_bytes()))
        else:
            shutil.copy(p, into / p.name)
            shutil.copy(p, plain / p.name)


def _dcm2niix(plain: Path, out: Path) -> None:
    out.mkdir(parents=True)
    subprocess.run(["dcm2niix", "-p", "n", "-z", "n", "-f", "%s_%e_%p_%t", "-o", str(out), str(plain)],
                   capture_output=True, check=False, timeout=120)
    for f in out.glob("*.nii"):  # colour (RGB24) outputs: not CT/MR, and not readable as floats
        if nib.load(f).get_data_dtype().fields:
            f.unlink()


def _in_scope(ref_dir: Path, name: str, shape: tuple[int, ...]) -> bool:
    """A dcm2niix 3D frame ingest should recover: CT or MR, 3 or more slices, even spacing."""
    stem = name.split("/")[1].split(".nii")[0]
    sidecar = ref_dir / f"{stem}.json"
    modality = json.loads(sidecar.read_text()).get("Modality", "") if sidecar.exists() else ""
    uneven = "_Eq_" in stem or any(ref_dir.glob(f"{stem}_Eq_*.nii"))
    return modality in ("CT", "MR") and min(shape) >= 3 and not uneven


def _slice_image(ds: Any) -> nib.Nifti1Image:
    """One DICOM slice as a 1-slice NIfTI in RAS, values in physical units (pydicom decodes)."""
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)  # row spacing (between rows), column spacing
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = iop[:3] * dc, iop[3:] * dr, np.cross(iop[:3], iop[3:])
    lps[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    values = ds.pixel_array.T.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) \
        + float(ds.get("RescaleIntercept", 0) or 0)
    return nib.as_closest_canonical(nib.Nifti1Image(values[:, :, None], np.diag([-1, -1, 1, 1]) @ lps))


def _equals_pydicom_slices(data: npt.NDArray[Any], affine: npt.NDArray[np.float64], files: list[Path]) -> bool:
    """Every slice of the canonical volume equals the pydicom-decoded slice at its place."""
    import pydicom

    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            if ds.get("Modality") in ("CT", "MR") and "PixelData" in ds and "ImagePositionPatient" in ds:
                slices.append(_slice_image(ds))
        except Exception:  # noqa: BLE001, S112 - the broken test vectors are no reference
            continue
    for k in range(data.shape[2]):
        one = affine.copy()
        one[:3, 3] = (affine @ [0, 0, k, 1])[:3]
        hit = [s for s in slices if s.shape[:2] == data.shape[:2]
               and np.abs(_corners(s.affine, s.shape) - _corners(one, (*data.shape[:2], 1))).max() <= 0.01]
        if not any(np.allclose(np.asarray(s.dataobj)[:, :, 0], data[:, :, k]) for s in hit):
            return False
    return True


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("unseen")
    runs = {}
    for corpus, sources in CORPORA.items():
        into, plain, ref = root / corpus / "in", root / corpus / "plain", root / corpus / "dcm2niix"
        _copy(sources, into, plain)
        _dcm2niix(plain, ref)
        report = run_ingest([into], root / corpus / "out", key=KEY, workers=1)
        refs = _reference_volumes([ref])
        rows = read_manifest(root / corpus / "out")
        hits, unmatched_ok = {}, {}
        for row in rows:
            img = nib.load(root / corpus / "out" / row["path"])
            data = np.asarray(img.get_fdata(dtype=np.float64))
            hits[row["path"]] = _match(data, img.affine, refs)
            if not hits[row["path"]]:
                files = [p for p in plain.rglob("*") if p.is_file()]
                unmatched_ok[row["path"]] = bool(row["part"]) and _equals_pydicom_slices(data, img.affine, files)
        scope = {n for n, d, _ in refs if _in_scope(ref, n, d.shape)}
        runs[corpus] = {"root": root / corpus, "report": report, "rows": rows, "hits": hits,
                        "unmatched_ok": unmatched_ok, "scope": scope}
    return runs


@needs_data
def test_every_written_volume_matches_dcm2niix_or_the_dicom_slices(unseen: dict[str, Any]) -> None:
    written = 0
    for corpus, run in unseen.items():
        for row in run["rows"]:
            written += 1
            assert run["hits"][row["path"]] or run["unmatched_ok"][row["path"]], \
                f"{corpus}: {row['path']} ({row['shape']}, part {row['part'] or '-'}) matches no dcm2niix volume"
    assert written >= 5


@needs_data
def test_dcm2niix_volumes_of_unseen_corpora_are_recovered(unseen: dict[str, Any]) -> None:
    total, found = 0, 0
    for run in unseen.values():
        got = set().union(*run["hits"].values()) if run["hits"] else set()
        total += len(run["scope"])
        found += len(run["scope"] & got)
    # 4 of 4 at the time of writing: 2 DWI mosaics (.dcm.gz), the Philips enhanced MPRAGE, GE CT.
    assert total >= 4 and found / total >= 0.9, f"{found} of {total} dcm2niix volumes recovered"


@needs_data
def test_unseen_corpora_account_for_every_file_and_leak_no_identifier(unseen: dict[str, Any]) -> None:
    import pydicom

    siemens = unseen["nibabel-siemens"]
    # the two DWI mosaics are read from .dcm.gz (CSA header included): b = 0 and 1000
    assert sorted(float(r["b_value"]) for r in siemens["rows"]) == [0.0, 1000.0]
    for corpus, run in unseen.items():
        rep = run["report"]
        n_files = sum(1 for p in (run["root"] / "in").rglob("*") if p.is_file())
        assert rep.files_seen == n_files and rep.files_used + rep.skipped + rep.quarantined == n_files, corpus
        needles = set()
        for p in (run["root"] / "plain").rglob("*"):
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
                needles |= {str(ds.get(t, "") or "").strip() for t in ("PatientName", "PatientID")}
            except Exception:  # noqa: BLE001, S112 - not DICOM
                continue
        needles = {n.encode() for n in needles if len(n) >= 4}
        assert needles, corpus
        for out in (run["root"] / "out").rglob("*"):
            if out.is_file():
                blob = out.read_bytes()
                blob = gzip.decompress(blob) if out.suffix == ".gz" else blob
                assert not [n for n in needles if n in blob], (corpus, out.name)


@needs_data
def test_altered_nibabel_mosaics_are_quarantined_with_the_reason(tmp_path: Path) -> None:
    """0.dcm and 1.dcm: a 256 x 256 mosaic cannot hold 7 x 7 tiles of whole pixels (its
    AcquisitionMatrix says 128); nibabel cannot cut it either. Quarantined, not guessed."""
    _copy(ALTERED, tmp_path / "in", tmp_path / "plain")
    rep = run_ingest([tmp_path / "in"], tmp_path / "out", key=KEY, workers=1)
    assert (rep.files_seen, rep.quarantined, rep.volumes_written) == (2, 2, 0)
    (row,) = read_manifest(tmp_path / "out" / "quarantine.csv")
    assert "Siemens mosaic of 256 x 256 pixels cannot hold 7 x 7 tiles" in row["reason"]


@pytest.mark.skipif(not (NIBABEL / "siemens_dwi_1000.dcm.gz").exists(), reason="nibabel's DICOM test data not installed")
def test_gzip_mosaic_reads_its_csa_header_like_the_plain_file(tmp_path: Path) -> None:
    """A Siemens mosaic stored as .dcm.gz: its CSA header (larger than pydicom's defer size) is
    read while the inflated header is in memory, so the file gives the same volume as its
    gunzipped copy (it was quarantined as "without a readable CSA header")."""
    src = NIBABEL / "siemens_dwi_1000.dcm.gz"
    _copy([src], tmp_path / "gz", tmp_path / "plain")
    a = run_ingest([tmp_path / "gz"], tmp_path / "o1", key=KEY, workers=1)
    b = run_ingest([tmp_path / "plain"], tmp_path / "o2", key=KEY, workers=1)
    assert a.volumes_written == b.volumes_written == 1, a.quarantined_reasons
    (ra,), (rb,) = read_manifest(tmp_path / "o1"), read_manifest(tmp_path / "o2")
    assert (ra["shape"], ra["b_value"]) == (rb["shape"], rb["b_value"]) == ("128x128x48", "1000")
    ia, ib = nib.load(tmp_path / "o1" / ra["path"]), nib.load(tmp_path / "o2" / rb["path"])
    assert np.allclose(ia.affine, ib.affine) and np.array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj))
