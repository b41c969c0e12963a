"""Write canonical, de-identified, byte-reproducible .nii.gz files for ingest.

A volume leaves ingest only through this module: the voxels are reoriented to RAS+ (the
same flips and transposes as nibabel's `as_closest_canonical`), put behind a fresh NIfTI-1
header that carries nothing but geometry, datatype and units (descrip, aux_file,
intent_name, db_name stay empty, so no text from the input survives), and gzip-compressed
with mtime 0 and no file name in the gzip header, so the same input gives the same bytes.

Compression runs in threads on blocks, as pigz does (each block primed with the last
32 KiB of the previous one and ended by a sync flush, so the result is one ordinary deflate
stream that any gunzip reads). Levels 1-3 deflate with Intel ISA-L (igzip, the `isal`
package), 4-9 with zlib: on the CT of bench/ingest.py ISA-L's files are 0.1 % smaller than
zlib's at level 1, 1 % smaller at 2 and 0.1 % larger at 3, for a quarter of the CPU time. Both release the GIL, so blocks compress on every core while
the caller keeps decoding slices: `SliceStreamWriter` takes the slices of a volume whose
slice axis stays the last axis after reorientation (axial series) one at a time, so reading
DICOM and compressing overlap. The bytes do not depend on the thread count or on the path
taken (whole array or streamed), only on the data, the level, the block size and the deflate
library: re-running on one machine gives the same bytes; ISA-L picks its code by CPU family
(AVX2/AVX-512, NEON), so another machine may write other (equally valid) gzip bytes of the
same voxels.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
from isal import isal_zlib

from pipeline.manifest import HashingWriter

GZIP_LEVEL = 1
"""Default gzip level. Measured on 32 MiB of the synthetic 512x512 CT of bench/ingest.py
(AMD EPYC, 2 MiB blocks): zlib 1.2.13 at level 1 takes 0.18 s CPU for a ratio of 0.2248,
at level 6 1.23 s for 0.2166 (7x the time for 4 % smaller files); ISA-L at level 1 takes
0.046 s for 0.2246."""

ISAL_LEVELS = range(1, 4)
"""Levels compressed with ISA-L (its levels 1-3); the rest go to zlib. The bytes written
depend on the library version, which is why pyproject.toml pins `isal`."""

BLOCK = 1 << 21
"""Uncompressed bytes per compression block (2 MiB)."""

_WINDOW = 1 << 15
_VOX_OFFSET = 352


class _Writable(Protocol):
    def write(self, data: bytes, /) -> Any: ...


class Written(NamedTuple):
    """What `write_volume` / `write_slices` wrote: shape (i, j, k), spacing (mm) and the sha256
    of the file's bytes (hashed on their way to disk: the manifest needs no second read)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    sha256: str


def _compress_block(data: bytes, prime: bytes, level: int, last: bool) -> bytes:
    """Raw deflate of one block, primed with the previous block's tail, ended by a sync flush
    (or the final block)."""
    lib: Any = isal_zlib if level in ISAL_LEVELS else zlib
    # memLevel 8 (zlib's default, as gzip and pigz use): faster and smaller than 9 on CT.
    args = (level, lib.DEFLATED, -15, 8, lib.Z_DEFAULT_STRATEGY)
    comp = lib.compressobj(*args, zdict=prime) if prime else lib.compressobj(*args)
    out = comp.compress(data)
    return out + comp.flush(lib.Z_FINISH if last else lib.Z_SYNC_FLUSH)


class GzipStream:
    """Deterministic gzip member written to `f` from fed bytes, blocks compressed in threads.

    >>> import gzip, io
    >>> buf = io.BytesIO()
    >>> with GzipStream(buf, level=1, threads=2) as gz:
    ...     gz.feed(b"abc" * 1000)
    >>> gzip.decompress(buf.getvalue()) == b"abc" * 1000
    True
    """

    def __init__(self, f: _Writable, level: int = GZIP_LEVEL, threads: int | None = None) -> None:
        self._f = f
        self._level = level
        self._threads = max(1, threads or (os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self._threads)
        self._pending: deque[Future[bytes]] = deque()
        self._buf = bytearray()
        self._prime = b""
        self._crc = 0
        self._size = 0
        f.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + (b"\x04" if level == 1 else b"\x00") + b"\xff")

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append uncompressed bytes."""
        view = memoryview(data).cast("B")
        self._crc = isal_zlib.crc32(view, self._crc)  # same CRC-32 as zlib's, 7x faster
        self._size += len(view)
        self._buf += view
        while len(self._buf) > BLOCK:  # keep at least one byte: the last block ends the stream
            block = bytes(self._buf[:BLOCK])
            del self._buf[:BLOCK]
            self._submit(block, last=False)

    def _submit(self, block: bytes, last: bool) -> None:
        self._pending.append(self._pool.submit(_compress_block, block, self._prime, self._level, last))
        self._prime = block[-_WINDOW:]
        while len(self._pending) > 2 * self._threads or (self._pending and self._pending[0].done()):
            self._f.write(self._pending.popleft().result())

    def close(self) -> None:
        """Compress the rest, write the trailer (CRC-32, size mod 2^32)."""
        self._submit(bytes(self._buf), last=True)
        self._buf = bytearray()
        while self._pending:
            self._f.write(self._pending.popleft().result())
        self._pool.shutdown()
        self._f.write(struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF))

    def __enter__(self) -> GzipStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._pool.shutdown(cancel_futures=True)


def gzip_bytes(data: bytes | bytearray | memoryview, level: int = GZIP_LEVEL, threads: int | None = None) -> bytes:
    """Deterministic gzip member of `data` (mtime 0, no name), compressed in parallel blocks.

    >>> import gzip
    >>> gzip.decompress(gzip_bytes(b"abc" * 1000)) == b"abc" * 1000
    True
    >>> gzip_bytes(b"x" * 10, threads=1) == gzip_bytes(b"x" * 10, threads=4)
    True
    """
    import io

    buf = io.BytesIO()
    with GzipStream(buf, level=level, threads=threads) as gz:
        gz.feed(data)
    return buf.getvalue()


def write_atomic(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` through a temporary name in the same folder."""
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


def _quaternion(r: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Unit quaternion (w, x, y, z), w >= 0, of a proper rotation matrix (Shepperd's method)."""
    m = r
    tr = np.trace(m)
    if tr > 0:
        s = np.sqrt(tr + 1.0) * 2
        q = np.array([0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s])
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = np.array([(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s])
    elif m[1, 1] > m[2, 2]:
        s = np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = np.array([(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s])
    else:
        s = np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = np.array([(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s])
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


_NIFTI_CODES = {np.dtype(np.uint8): (2, 8), np.dtype(np.int16): (4, 16), np.dtype(np.int32): (8, 32),
                np.dtype(np.float32): (16, 32), np.dtype(np.float64): (64, 64), np.dtype(np.int8): (256, 8),
                np.dtype(np.uint16): (512, 16)}


def nifti_header(shape: tuple[int, int, int], dtype: np.dtype[Any], affine: npt.NDArray[np.float64]) -> bytes:
    """352 bytes: a clean NIfTI-1 single-file header (NIfTI-1.1 layout) plus an empty extension flag.

    Only geometry (sform and qform, code 1 = scanner), datatype, shape and units (mm, s) are
    set; every free-text field (descrip, aux_file, intent_name, db_name) is empty and
    scl_slope = 0 means "no scaling". Written here rather than through nibabel so the DICOM
    path needs neither nibabel nor pydicom imported (nibabel imports pydicom); the tests
    check that nibabel reads it back with the same affine.
    """
    code, bitpix = _NIFTI_CODES[np.dtype(dtype)]
    aff = np.asarray(affine, dtype=np.float64)
    rzs = aff[:3, :3]
    zooms = np.sqrt((rzs**2).sum(axis=0))
    rot = rzs / zooms
    qfac = 1.0
    if np.linalg.det(rot) < 0:
        rot[:, 2] *= -1
        qfac = -1.0
    u, _, vt = np.linalg.svd(rot)  # nearest orthogonal matrix: qform cannot hold shears
    quat = _quaternion(u @ vt)
    dim = [3, *shape, 1, 1, 1, 1]
    pixdim = [qfac, *zooms.tolist(), 1.0, 1.0, 1.0, 1.0]
    hdr = struct.pack(
        "<i10s18sihcb8h3fhhhh8ffffhcb4f2i80s24shh6f4f4f4f16s4s",
        348, b"", b"", 0, 0, b"r", 0, *dim, 0.0, 0.0, 0.0, 0, code, bitpix, 0, *pixdim, float(_VOX_OFFSET),
        0.0, 0.0, 0, b"\0", 10, 0.0, 0.0, 0.0, 0.0, 0, 0, b"", b"", 1, 1, *quat[1:].tolist(), *aff[:3, 3].tolist(),
        *aff[0].tolist(), *aff[1].tolist(), *aff[2].tolist(), b"", b"n+1\0",
    )
    assert len(hdr) == 348
    return hdr + b"\0\0\0\0"


def io_orientation(affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """(3, 2) array: for each voxel axis, the RAS world axis it runs closest to and the sign.

    Same rule as nibabel.orientations.io_orientation for non-degenerate affines: axes are
    matched greedily, largest direction cosine first.

    >>> io_orientation(np.diag([-2.0, 3.0, 1.0, 1.0])).tolist()
    [[0.0, -1.0], [1.0, 1.0], [2.0, 1.0]]
    """
    rzs = np.asarray(affine, dtype=np.float64)[:3, :3]
    cos = rzs / np.sqrt((rzs**2).sum(axis=0))
    u, _, vt = np.linalg.svd(cos)
    cos = u @ vt
    ornt = np.full((3, 2), np.nan)
    free_world = [0, 1, 2]
    for col in np.argsort(-np.abs(cos).max(axis=0), kind="stable"):
        w = free_world[int(np.argmax([abs(cos[r, col]) for r in free_world]))]
        free_world.remove(w)
        ornt[col] = (w, 1.0 if cos[w, col] >= 0 else -1.0)
    return ornt


def _reorient(data: npt.NDArray[Any], ornt: npt.NDArray[np.float64]) -> npt.NDArray[Any]:
    """Flip and transpose (i, j, k) `data` so that axis w of the result is world axis w."""
    arr = data
    for col in range(arr.ndim):
        if ornt[col, 1] < 0:
            arr = np.flip(arr, col)
    perm = [int(np.flatnonzero(ornt[: arr.ndim, 0] == w)[0]) for w in range(arr.ndim)]
    return arr.transpose(perm)


def _reoriented_affine(
    affine: npt.NDArray[np.float64], ornt: npt.NDArray[np.float64], shape: tuple[int, ...]
) -> npt.NDArray[np.float64]:
    """Affine of the reoriented array: new index -> old index -> world."""
    t = np.zeros((4, 4))
    t[3, 3] = 1.0
    for col in range(3):
        w, sign = int(ornt[col, 0]), float(ornt[col, 1])
        t[col, w] = sign
        if sign < 0:
            t[col, 3] = shape[col] - 1
    return np.asarray(affine, dtype=np.float64) @ t


def canonical(
    data: npt.NDArray[np.generic], affine: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64]]:
    """`data` (i, j, k) and `affine` reoriented to the closest RAS+ axes (flips/transposes only)."""
    ornt = io_orientation(affine)
    return _reorient(data, ornt), _reoriented_affine(affine, ornt, data.shape)


def _zooms(affine: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    z = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return (float(z[0]), float(z[1]), float(z[2]))


def write_volume(
    path: Path, data: npt.NDArray[np.generic], affine: npt.NDArray[np.float64], level: int = GZIP_LEVEL,
    threads: int | None = None,
) -> Written:
    """Write `data` (i, j, k) with RAS `affine` as canonical .nii.gz; return (shape, spacing mm, sha256)."""
    arr, aff = canonical(data, affine)
    shape = (int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2]))
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as f, GzipStream(sink := HashingWriter(f), level=level, threads=threads) as gz:
        gz.feed(nifti_header(shape, arr.dtype, aff))
        for k in range(shape[2]):  # slab by slab: no full Fortran-order copy of the volume
            gz.feed(arr[:, :, k].tobytes(order="F"))
    os.replace(tmp, path)
    return Written(shape, _zooms(aff), sink.hexdigest())


def can_stream(affine: npt.NDArray[np.float64]) -> bool:
    """True when the slice axis (k) stays the last axis in RAS+ order, so slices can be streamed."""
    return int(io_orientation(affine)[2, 0]) == 2


def write_slices(
    path: Path,
    planes: Iterable[npt.NDArray[np.generic]],
    shape: tuple[int, int, int],
    dtype: np.dtype[Any],
    affine: npt.NDArray[np.float64],
    level: int = GZIP_LEVEL,
    threads: int | None = None,
) -> Written:
    """Stream a volume slice by slice; same bytes as `write_volume` on the stacked array.

    Args:
        planes: the (j, i) = (rows, columns) planes, in the order given by `slice_order`.
        shape: (i, j, k) of the stacked volume; affine: its RAS affine. Needs can_stream.
    """
    ornt = io_orientation(affine)
    assert int(ornt[2, 0]) == 2, "slice axis must stay last; use write_volume"
    aff = _reoriented_affine(affine, ornt, shape)
    plane_ornt = ornt[:2]
    out_shape = tuple(int(shape[int(a)]) for a in ornt[:, 0].argsort())
    out_shape3 = (out_shape[0], out_shape[1], out_shape[2])
    tmp = path.with_name(f".{path.name}.part")
    n = 0
    with open(tmp, "wb") as f, GzipStream(sink := HashingWriter(f), level=level, threads=threads) as gz:
        gz.feed(nifti_header(out_shape3, np.dtype(dtype), aff))
        for plane in planes:
            # plane is (j, i) as DICOM stores it; .T is (i, j); one copy into output order.
            gz.feed(_reorient(np.asarray(plane, dtype=dtype).T, plane_ornt).tobytes(order="F"))
            n += 1
    if n != shape[2]:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"expected {shape[2]} slices, got {n}")
    os.replace(tmp, path)
    return Written(out_shape3, _zooms(aff), sink.hexdigest())


def slice_order(affine: npt.NDArray[np.float64], n: int) -> list[int]:
    """Order in which to feed the n slices to `write_slices` (reversed when k flips)."""
    return list(range(n - 1, -1, -1)) if io_orientation(affine)[2, 1] < 0 else list(range(n))
