"""Write canonical, de-identified, byte-reproducible .nii.gz files for ingest.

A volume leaves ingest only through `write_volume`: the voxels are reoriented to RAS+
(nibabel `as_closest_canonical`), put in a fresh NIfTI-1 header that carries nothing but
geometry, datatype and units (descrip, aux_file, intent_name, db_name stay empty, so no
text from the input survives), and gzip-compressed with mtime 0 and no file name in the
gzip header, so the same input gives the same bytes.

Compression runs in threads on blocks, as pigz does (each block primed with the last 32 KiB
of the previous one and ended by a sync flush, so the result is one ordinary deflate stream
that any gunzip reads). zlib releases the GIL, so this uses every core a worker has. The
output does not depend on the thread count, only on the level and the block size.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt

GZIP_LEVEL = 1
"""Default gzip level: level 1 is ~3x faster than 6 and only ~10 % larger on CT volumes."""

BLOCK = 1 << 21
"""Uncompressed bytes per compression block (2 MiB)."""

_WINDOW = 1 << 15


def _compress_block(data: memoryview, start: int, end: int, level: int, last: bool) -> bytes:
    comp = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY,
                            zdict=bytes(data[max(0, start - _WINDOW):start]) if start else b"")
    out = comp.compress(data[start:end])
    return out + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def gzip_bytes(data: bytes | bytearray | memoryview, level: int = GZIP_LEVEL, threads: int | None = None) -> bytes:
    """Deterministic gzip member of `data` (mtime 0, no name), compressed in parallel blocks.

    >>> import gzip
    >>> gzip.decompress(gzip_bytes(b"abc" * 1000)) == b"abc" * 1000
    True
    >>> gzip_bytes(b"x" * 10, threads=1) == gzip_bytes(b"x" * 10, threads=4)
    True
    """
    view = memoryview(data).cast("B")
    n = len(view)
    starts = list(range(0, n, BLOCK)) or [0]
    threads = threads or min(len(starts), os.cpu_count() or 1)
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + (b"\x04" if level == 1 else b"\x00") + b"\xff"
    args = [(view, s, min(s + BLOCK, n), level, i == len(starts) - 1) for i, s in enumerate(starts)]
    if threads <= 1 or len(starts) == 1:
        blocks = [_compress_block(*a) for a in args]
        crc = zlib.crc32(view)
    else:
        with ThreadPoolExecutor(threads) as pool:
            futs = [pool.submit(_compress_block, *a) for a in args]
            crc = zlib.crc32(view)
            blocks = [f.result() for f in futs]
    return b"".join([header, *blocks, struct.pack("<II", crc & 0xFFFFFFFF, n & 0xFFFFFFFF)])


def write_atomic(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` through a temporary name in the same folder."""
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


def canonical_image(data: npt.NDArray[np.generic], affine: npt.NDArray[np.float64]) -> nib.Nifti1Image:
    """A RAS+ canonical NIfTI-1 image of `data` (i, j, k) with `affine`, in a clean header.

    Only geometry (sform/qform code 1, scanner coordinates), datatype and units (mm) are
    set; every free-text field is empty.
    """
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, affine, header=header)
    img = nib.as_closest_canonical(img)
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_sform(img.affine, code=1)
    hdr.set_qform(img.affine, code=1)
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
        hdr[field] = b""
    hdr["scl_slope"] = np.nan
    hdr["scl_inter"] = np.nan
    return img


def write_volume(
    path: Path, data: npt.NDArray[np.generic], affine: npt.NDArray[np.float64], level: int = GZIP_LEVEL,
    threads: int | None = None,
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Write `data` (i, j, k) with RAS `affine` as canonical .nii.gz; return (shape, spacing mm)."""
    img = canonical_image(data, affine)
    write_atomic(path, gzip_bytes(img.to_bytes(), level=level, threads=threads))
    shape = tuple(int(s) for s in img.shape[:3])
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return (shape[0], shape[1], shape[2]), (zooms[0], zooms[1], zooms[2])
