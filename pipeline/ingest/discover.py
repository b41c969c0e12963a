"""Find the input files of an ingest run and keep the books on every one of them.

`discover` walks each source (a folder at any nesting depth, or a single file), skips the
output folder when it lies inside a source, and sorts files into Decathlon datasets (a
folder holding dataset.json), NIfTI files (with their BIDS JSON sidecars) and everything
else, which the DICOM reader probes. `Ledger` records one disposition per file seen (used,
skipped or quarantined, with a reason), so the report can prove that every file was counted
exactly once. Paths are kept relative to their input root and never logged.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.errors import FatalIngestError

log = logging.getLogger(__name__)

Status = Literal["used", "skipped", "quarantined"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True, order=True)
class FileRef:
    """One input file: its input root's index, its posix path relative to that root, its size."""

    root: int
    rel: str
    path: Path = field(compare=False)
    size: int = field(compare=False)


def is_nifti(name: str) -> bool:
    """True for .nii and .nii.gz names (any case)."""
    low = name.lower()
    return low.endswith(NIFTI_SUFFIXES)


def nifti_stem(name: str) -> str:
    """File name without .nii / .nii.gz.

    >>> nifti_stem("case_001.nii.gz"), nifti_stem("a.NII")
    ('case_001', 'a')
    """
    low = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class Discovery:
    """Files of one run, sorted by kind (each list sorted by (root, rel))."""

    files: list[FileRef]
    decathlon_roots: list[FileRef]
    """The dataset.json file of each Decathlon dataset."""
    nifti: list[FileRef]
    """NIfTI files outside Decathlon datasets."""
    json: list[FileRef]
    """JSON files outside Decathlon datasets (sidecars or not)."""
    other: list[FileRef]
    """Everything else outside Decathlon datasets: probed as DICOM."""
    in_decathlon: dict[FileRef, FileRef]
    """Each file inside a Decathlon dataset -> that dataset's dataset.json."""


_RANK: dict[Status, int] = {"skipped": 0, "quarantined": 1, "used": 2}


class Ledger:
    """One disposition per input file: used, skipped or quarantined, with a reason."""

    def __init__(self, files: list[FileRef]) -> None:
        self._files = files
        self._status: dict[FileRef, tuple[Status, str]] = {}

    def mark(self, ref: FileRef, status: Status, reason: str = "") -> None:
        """Record the disposition of `ref`; the first one stands (a file shared by two inputs,
        e.g. one label named by two dataset.json entries, is still counted once)."""
        old = self._status.get(ref)
        if old is not None:
            if old != (status, reason):
                log.debug("file already counted as %s; second disposition %s ignored", old[0], status)
            return
        self._status[ref] = (status, reason)

    def settle(self, ref: FileRef, status: Status, reason: str = "") -> None:
        """Record a disposition that outranks the one held: used > quarantined > skipped.

        A DICOM file can feed several volumes (enhanced multi-frame: frames of two series,
        of two time points); its status is the best one over all of them, so a file some of
        whose frames were written counts as used, once.
        """
        old = self._status.get(ref)
        if old is None or _RANK[status] > _RANK[old[0]]:
            self._status[ref] = (status, reason)

    def status(self, ref: FileRef) -> tuple[Status, str] | None:
        return self._status.get(ref)

    def unmarked(self) -> list[FileRef]:
        return [f for f in self._files if f not in self._status]

    def counts(self) -> dict[str, int]:
        c = Counter(s for s, _ in self._status.values())
        return {"files_seen": len(self._files), "files_used": c["used"], "skipped": c["skipped"],
                "quarantined": c["quarantined"]}

    def reasons(self, status: Status) -> dict[str, int]:
        """How many files got each reason, for files of `status` (reasons hold no identifiers)."""
        c = Counter(r for s, r in self._status.values() if s == status)
        return dict(sorted(c.items()))


def _walk(root: Path, skip: Path | None) -> list[Path]:
    out: list[Path] = []
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append):
        here = Path(dirpath)
        if skip is not None:
            dirnames[:] = [d for d in dirnames if (here / d).resolve() != skip]
        dirnames.sort()
        out.extend(here / f for f in sorted(filenames))
    if errors and not out and errors[0].filename and Path(errors[0].filename).resolve() == root.resolve():
        raise FatalIngestError("an input folder is not readable; check its permissions")
    return out


def discover(sources: list[Path], out: Path | None = None) -> Discovery:
    """Walk `sources` and sort their files by kind.

    Raises FatalIngestError when a source does not exist or cannot be read (by its position
    on the command line, not its path: the path may hold a patient name).
    """
    skip = out.resolve() if out is not None else None
    files: list[FileRef] = []
    for i, src in enumerate(sources):
        where = f"input {i + 1} of {len(sources)}"
        if not src.exists():
            raise FatalIngestError(f"{where} does not exist; check the path")
        if src.is_file():
            paths, root = [src], src.parent
        elif src.is_dir():
            if not os.access(src, os.R_OK | os.X_OK):
                raise FatalIngestError(f"{where} is a folder that cannot be read; check its permissions")
            paths, root = _walk(src, skip), src
        else:
            raise FatalIngestError(f"{where} is neither a file nor a folder")
        for p in paths:
            try:
                st = p.stat()
            except OSError:
                st = None
            if st is None or not p.is_file():
                continue
            files.append(FileRef(root=i, rel=p.relative_to(root).as_posix(), path=p, size=st.st_size))
    files.sort()

    deca_dirs = {(f.root, f.rel.rpartition("/")[0]): f for f in files if f.rel.rpartition("/")[2] == "dataset.json"}
    in_deca: dict[FileRef, FileRef] = {}
    nifti: list[FileRef] = []
    json_files: list[FileRef] = []
    other: list[FileRef] = []
    for f in files:
        parts = f.rel.split("/")
        owner = None
        for depth in range(len(parts) - 1, -1, -1):
            owner = deca_dirs.get((f.root, "/".join(parts[:depth])))
            if owner is not None:
                break
        if owner is not None:
            in_deca[f] = owner
        elif is_nifti(parts[-1]):
            nifti.append(f)
        elif parts[-1].lower().endswith(".json"):
            json_files.append(f)
        else:
            other.append(f)
    return Discovery(
        files=files, decathlon_roots=sorted(deca_dirs.values()), nifti=nifti, json=json_files,
        other=other, in_decathlon=in_deca,
    )
