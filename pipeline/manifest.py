"""Manifest CSV files: the one table format every stage reads and writes.

Each stage's output folder (ingest, translate, sample-tumors, gate, dataset) holds a
`manifest.csv` with one row per file and at least a `path` column relative to the folder.
Rows are written in a stable order with a fixed column order and "\n" line endings so the
same content gives byte-identical files (and the same sha256).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

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
