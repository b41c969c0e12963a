"""Manifest CSV files: the one table format every stage reads and writes.

Each stage's output folder (ingest, translate, sample-tumors, gate, dataset) holds a
`manifest.csv` with one row per file and at least a `path` column relative to the folder.
Rows are written in a stable order with a fixed column order and "\n" line endings so the
same content gives byte-identical files (and the same sha256).

A file a stage writes is hashed as it is written (`HashingWriter`, `save_nifti`), and a file
a manifest already lists travels with that manifest's sha256: no stage reads a file back only
to hash it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

MANIFEST_NAME = "manifest.csv"

_SHA256 = re.compile(r"[0-9a-f]{64}")


def manifest_sha256(row: Mapping[str, object], column: str = "sha256") -> str:
    """The row's `column` when it holds a sha256 (64 hex digits), lower-case; else "".

    A manifest is input: its hash column may hold anything ("n/a", "../x"), so a value is used
    (as a file's id, or in an output file name) only once it is known to be 64 hex digits.

    >>> manifest_sha256({"sha256": "AB" * 32}) == "ab" * 32, manifest_sha256({"sha256": "../evil"}), manifest_sha256({"sha256": 7})
    (True, '', '')
    """
    value = str(row.get(column) or "").strip().lower()  # a JSON report may hold a number or a list here
    return value if _SHA256.fullmatch(value) else ""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes.

    >>> sha256_file(Path("/dev/null"))
    'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class HashingWriter(io.RawIOBase):
    """A writable binary stream that sha256-hashes every byte on its way to `f`.

    Put between a writer (gzip, nibabel) and the file it writes, it gives the hash of the
    bytes on disk in the same pass, so a file just written is never read back to hash it.
    Write-only and sequential: `tell` counts the bytes written; `seek` only to where it is.

    >>> buf = io.BytesIO()
    >>> w = HashingWriter(buf)
    >>> _ = w.write(b"ab"), w.write(memoryview(b"c"))
    >>> w.hexdigest() == hashlib.sha256(b"abc").hexdigest() and buf.getvalue() == b"abc", w.tell()
    (True, 3)
    """

    def __init__(self, f: IO[bytes]) -> None:
        super().__init__()
        self._f = f
        self._hash = hashlib.sha256()
        self._n = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._f.write(view)
        self._n += len(view)
        return len(view)

    def tell(self) -> int:
        return self._n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Only to where the stream is (nibabel seeks to its start before writing); else UnsupportedOperation."""
        target = offset if whence == io.SEEK_SET else self._n + offset if whence == io.SEEK_CUR else -1
        if target != self._n:
            raise io.UnsupportedOperation("HashingWriter writes sequentially and cannot seek")
        return self._n

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        """Hex sha256 of all bytes written so far."""
        return self._hash.hexdigest()


def save_nifti(img: Any, path: Path, compresslevel: int = 1) -> str:
    """Write a nibabel image to `path` (.nii or .nii.gz); return the sha256 of the bytes written.

    The bytes are those of `nib.save(img, path)` (for .nii.gz nibabel's gzip: level
    `compresslevel`, default 1 as nibabel's, mtime 0, no file name), hashed on their way to
    disk. A .nii.gz of the same image gives the same bytes, so the same sha256, every time.
    """
    with open(path, "wb") as raw:
        sink = HashingWriter(raw)
        if path.name.endswith(".gz"):
            # GzipFile writes the header, the deflate stream and the trailer to `sink` only
            with gzip.GzipFile(filename="", mode="wb", fileobj=sink, compresslevel=compresslevel, mtime=0) as gz:
                img.to_stream(gz)
        else:
            img.to_stream(sink)
    return sink.hexdigest()


def manifest_text(rows: Iterable[Mapping[str, object]], columns: Sequence[str]) -> str:
    """CSV text of `rows` with exactly `columns` (missing keys become empty cells)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    return buf.getvalue()


def write_manifest(
    folder: Path, rows: Iterable[Mapping[str, object]], columns: Sequence[str], name: str = MANIFEST_NAME
) -> Path:
    """Write `folder/name` atomically (temp file + rename) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    tmp = folder / f".{name}.tmp"
    tmp.write_text(manifest_text(rows, columns), encoding="utf-8")
    os.replace(tmp, target)
    return target


def read_manifest(folder_or_file: Path) -> list[dict[str, str]]:
    """Rows of a manifest.csv (given the folder that holds it, or the file itself)."""
    path = folder_or_file / MANIFEST_NAME if folder_or_file.is_dir() else folder_or_file
    with open(path, newline="", encoding="utf-8") as f:
        return [dict(r) for r in csv.DictReader(f)]
