"""NIfTI side of ingest: header checks before allocation, then load, check and scale.

`check_header` reads only the 348-byte header (nibabel loads lazily) and refuses files
that cannot be a sensible 3-D volume (empty or absurd dimensions, 4-D with several volumes,
no orientation, non-positive voxel sizes, non-finite scaling) without allocating the data
the header claims. `load_volume` then reads the voxels (scl_slope/scl_inter applied),
refuses NaN/Inf and returns int16 where every value is an integer that fits, else float32.
`load_label` reads a Decathlon label map and turns it into the binary tumor mask.

Messages name sizes and codes, never the file or folder name (they may hold identifiers).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.errors import GeometryError, InputRejected

MAX_DIM = 4096
"""Largest accepted size of one axis (voxels)."""

MAX_VOXELS = 1 << 30
"""Largest accepted voxel count (1 Gi voxels, 4 GiB as float32)."""

_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, TypeError, MemoryError)


def _load(path: Path) -> Any:
    import nibabel as nib

    try:
        return nib.load(str(path), mmap=False)
    except _READ_ERRORS as exc:
        raise InputRejected(f"NIfTI header cannot be read ({_why(exc)})") from None
    except Exception as exc:  # nibabel raises its own ImageFileError and friends
        raise InputRejected(f"not a readable NIfTI file ({type(exc).__name__})") from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, gzip.BadGzipFile | zlib.error):
        return "corrupt gzip stream"
    if isinstance(exc, EOFError):
        return "file is truncated"
    return type(exc).__name__


def check_header(path: Path) -> tuple[Any, tuple[int, int, int], npt.NDArray[np.float64]]:
    """Validate a NIfTI header without touching the voxel data.

    Returns (lazy nibabel image, 3-D shape, 4x4 affine in mm). Raises InputRejected or
    GeometryError with the reason.
    """
    import nibabel as nib

    img = _load(path)
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputRejected(f"{type(img).__name__} is not a NIfTI-1/2 image")
    hdr = img.header
    dim = [int(x) for x in hdr["dim"]]
    ndim = dim[0]
    if ndim < 1 or ndim > 7:
        raise InputRejected(f"NIfTI header dim[0] = {ndim} (must be 3, or 4 with one volume)")
    sizes = dim[1 : ndim + 1]
    if any(s <= 0 for s in sizes):
        raise InputRejected(f"empty NIfTI (dimensions {'x'.join(map(str, sizes))})")
    n_vox = int(np.prod(np.array(sizes, dtype=np.float64)))
    if any(s > MAX_DIM for s in sizes[:3]) or n_vox > MAX_VOXELS:
        raise InputRejected(
            f"NIfTI header claims {'x'.join(map(str, sizes))} voxels (limit {MAX_DIM} per axis, "
            f"{MAX_VOXELS} in all); refused before reading"
        )
    if ndim < 3:
        raise InputRejected(f"{ndim}-D NIfTI ({'x'.join(map(str, sizes))}); a volume needs 3 dimensions")
    if any(s != 1 for s in sizes[3:]):
        raise InputRejected(
            f"{ndim}-D NIfTI with {int(np.prod(sizes[3:]))} volumes ({'x'.join(map(str, sizes))}); give one 3-D volume per file"
        )
    if not path.name.lower().endswith(".gz"):
        need = int(hdr["vox_offset"]) + n_vox * hdr.get_data_dtype().itemsize
        have = path.stat().st_size
        if have < need:
            raise InputRejected(f"NIfTI file is truncated (data needs {need} bytes, file has {have})")
    affine = _checked_affine(hdr)
    slope, inter = hdr.get_slope_inter()
    for v in (slope, inter):
        if v is not None and not np.isfinite(v):
            raise InputRejected("scl_slope/scl_inter are not finite")
    if slope == 0:
        raise InputRejected("scl_slope is 0 (all voxels would be equal)")
    return img, (sizes[0], sizes[1], sizes[2]), affine


def _checked_affine(hdr: Any) -> npt.NDArray[np.float64]:
    """The sform (else qform) affine of a NIfTI header; GeometryError when there is none usable."""
    zooms = np.asarray(hdr["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise GeometryError(f"voxel sizes {zooms.tolist()} mm are not positive")
    s_code, q_code = int(hdr["sform_code"]), int(hdr["qform_code"])
    if s_code > 0:
        affine = np.asarray(hdr.get_sform(), dtype=np.float64)
    elif q_code > 0:
        affine = np.asarray(hdr.get_qform(), dtype=np.float64)
    else:
        raise GeometryError("no orientation: qform_code and sform_code are both 0; set one (e.g. with nibabel)")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise GeometryError("orientation matrix is singular or not finite")
    return affine


def _read_data(img: Any) -> npt.NDArray[np.floating[Any]] | npt.NDArray[np.integer[Any]]:
    try:
        data = np.asanyarray(img.dataobj)
    except _READ_ERRORS as exc:
        raise InputRejected(f"NIfTI voxel data cannot be read ({_why(exc)})") from None
    except Exception as exc:  # nibabel's own errors
        raise InputRejected(f"NIfTI voxel data cannot be read ({type(exc).__name__})") from None
    return data.reshape(data.shape[:3])


def load_volume(path: Path) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64]]:
    """Voxels (i, j, k) in real units and the affine of a checked NIfTI file.

    Returns int16 data when every value is an integer within int16 range, else float32.
    Raises InputRejected for unreadable data or NaN/Inf voxels.
    """
    img, _, affine = check_header(path)
    data = _read_data(img)
    if data.dtype.kind == "c" or data.dtype.kind not in "biuf":
        raise InputRejected(f"voxel type {data.dtype} is not a real number type")
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            n_nan = int(np.isnan(data).sum())
            n_inf = int(bad.sum()) - n_nan
            parts = [f"{n} {name} voxel{'s' if n > 1 else ''}" for n, name in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
            raise InputRejected(f"volume contains {' and '.join(parts)}")
    return as_compact(data), affine


def as_compact(data: npt.NDArray[Any]) -> npt.NDArray[np.generic]:
    """int16 if every value is an integer in int16 range, else float32.

    >>> as_compact(np.array([1.0, -1024.0])).dtype, as_compact(np.array([0.5])).dtype
    (dtype('int16'), dtype('float32'))
    """
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if lo >= -32768 and hi <= 32767 and (data.dtype.kind in "biu" or np.array_equal(data, np.round(data))):
        return data.astype(np.int16)
    return data.astype(np.float32)


def load_label(
    path: Path, shape: tuple[int, int, int], affine: npt.NDArray[np.float64], tumor_values: list[int]
) -> npt.NDArray[np.uint8]:
    """Binary tumor mask (uint8, 0/1) of a label map that must match the image grid.

    Args:
        path: label NIfTI.
        shape, affine: the image's grid; the label must have the same (within 1e-3 mm).
        tumor_values: label values that count as tumor (from dataset.json "labels").
    """
    img, lshape, laffine = check_header(path)
    if lshape != shape:
        raise GeometryError(f"label is {'x'.join(map(str, lshape))}, image is {'x'.join(map(str, shape))}")
    if not np.allclose(laffine, affine, atol=1e-3):
        raise GeometryError("label and image orientations differ")
    data = _read_data(img)
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise InputRejected("label contains NaN or Inf")
    return np.isin(np.rint(data).astype(np.int64), tumor_values).astype(np.uint8)
