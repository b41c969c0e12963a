"""Run ingest: discover inputs, plan volumes, convert them in parallel, write the outputs.

`run_ingest(sources, out, modality=None, key=None)` is the one entry point (the CLI's
`medaug ingest` and the Prefect flow call it). It writes, in `out`:

* volumes/<pseudonym>_<CT|MR>_<k>.nii.gz: canonical RAS+ volumes (CT in HU), k counting
  each subject's volumes of one modality in a stable order (DICOM series by SeriesNumber,
  first slice position and series UID; NIfTI cases by split and keyed path hash), never by
  input file names;
* labels/<same name>: binary tumor masks where a Decathlon label map is known;
* manifest.csv (MANIFEST_COLUMNS), quarantine.csv (QUARANTINE_COLUMNS), ingest_report.json;
* .ingest_state.json: keyed content hashes per volume so a re-run skips unchanged inputs.

quarantine.csv names an input by `source`, a keyed reference of its path relative to its
input root ("f-" + 16 hex), not by the path itself: folder and file names may hold patient
names or IDs. `locate(sources, ref, key)` (CLI: `medaug ingest SRC --locate REF`) turns a
reference back into the path on the machine that holds the inputs and the key.

Every input file is counted exactly once in the report (used, skipped or quarantined).
Bad inputs never stop the run; only an unreadable input root or an unwritable output
folder raise FatalIngestError.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import FatalIngestError, InputRejected
from pipeline.ingest import dicom as dcm
from pipeline.ingest import nifti as nii
from pipeline.ingest import series as ser
from pipeline.ingest.deid import Deid
from pipeline.ingest.discover import Discovery, FileRef, Ledger, discover, nifti_stem
from pipeline.ingest.writer import (
    GZIP_LEVEL,
    Written,
    can_stream,
    slice_order,
    write_atomic,
    write_slices,
    write_volume,
)
from pipeline.manifest import sha256_file, write_manifest
from pipeline.types import Modality

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "label_path", "subject_id", "modality", "shape", "spacing", "sha256", "class",
                    "split", "source_kind", "volume_index", "echo", "b_value", "part", "gap_slices", "lossy")
"""volume_index: k of a 4D DICOM series (0-based; empty for 3D); echo: echo number (or effective echo
time of enhanced images) where the series is split by echo; b_value: diffusion b (s/mm2) where the
header gives it; part: "k/n" when missing slices split a series into n contiguous parts, with
gap_slices missing before part k; lossy: "1" when the pixels went through lossy compression."""
QUARANTINE_COLUMNS = ("source", "kind", "subject_id", "modality", "files", "reason")
STATE_NAME = ".ingest_state.json"
REPORT_NAME = "ingest_report.json"
OUTPUT_NAME = re.compile(r"^p[0-9a-f]{12}_(CT|MR)_\d+\.nii\.gz$")

MODALITY_NAMES: dict[str, Modality] = {
    "CT": "CT", "CAT": "CT", "MR": "MR", "MRI": "MR", "T1": "MR", "T1W": "MR", "T1GD": "MR", "T2": "MR",
    "T2W": "MR", "FLAIR": "MR", "ADC": "MR", "DWI": "MR", "PD": "MR",
}
"""Modality strings of dataset.json and sidecars (upper-cased) -> manifest modality."""

TUMOR_WORDS = ("tumo", "cancer", "lesion", "necro", "metasta", "neoplas")
"""A Decathlon label whose name contains one of these counts as tumor in the binary mask."""

SourceKind = Literal["dicom", "nifti", "decathlon"]


@dataclass
class IngestReport:
    """Counts of one ingest run (every file seen is in exactly one of used/skipped/quarantined)."""

    out: Path
    files_seen: int = 0
    files_used: int = 0
    skipped: int = 0
    quarantined: int = 0
    volumes_written: int = 0
    volumes_reused: int = 0
    """Volumes left as they were because their inputs did not change (not in the JSON report)."""
    labels_written: int = 0
    quarantine_rows: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    quarantined_reasons: dict[str, int] = field(default_factory=dict)
    stable_pseudonyms: bool = True
    gzip_level: int = GZIP_LEVEL
    files: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    """Per input file: keyed path reference -> (status, reason). Not written to the JSON report."""

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("out")
        d.pop("files")
        d.pop("volumes_reused")  # a re-run must write the same bytes as the first run
        return json.dumps(d, indent=2, sort_keys=True) + "\n"


@dataclass
class Job:
    """One candidate output volume (a DICOM series or a NIfTI case) and its bookkeeping."""

    kind: SourceKind
    subject: str
    modality: Modality | None
    sort_key: tuple[Any, ...]
    files: list[FileRef]
    """Input files this volume accounts for (image files, label, sidecar)."""
    state_key: str
    split: str = ""
    klass: str = ""
    problem: str = ""
    desc: str = ""
    # worker payload
    frames: list[dcm.FrameSpec] = field(default_factory=list)
    shape: tuple[int, int, int] = (0, 0, 0)
    affine: Any = None
    image: Path | None = None
    label: Path | None = None
    tumor_values: list[int] = field(default_factory=list)
    prev: dict[str, Any] | None = None
    tmp_volume: Path | None = None
    tmp_label: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    """Manifest columns of a DICOM volume (volume_index, echo, b_value, part, gap_slices, lossy)."""
    dropped: list[tuple[list[FileRef], str]] = field(default_factory=list)
    """Files of its series quarantined on their own (damaged, conflicting, cut off by a gap)."""
    series_desc: str = ""
    """"CT series 3 of 7" (without volume or part), for the quarantine rows of dropped files."""


@dataclass
class Result:
    """What a worker sends back for one Job (no arrays)."""

    ok: bool
    reason: str = ""
    shape: tuple[int, int, int] = (0, 0, 0)
    spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)
    content: str = ""
    reused: bool = False
    has_label: bool = False
    sha256: str = ""
    """sha256 of the volume file written (hashed as written); "" when reused (the state has it)."""
    label_sha256: str = ""


# --- worker ---------------------------------------------------------------------------


def content_digest(deid: Deid, paths: Sequence[Path], known: dict[Path, bytes] | None = None) -> str:
    """Keyed hash of the input files' content: HMAC over each unique file's `file_digest`, in order.

    `known` holds digests already computed while converting (files not read twice).
    """
    h = deid.content_hasher()
    for p in dict.fromkeys(paths):
        digest = (known or {}).get(p)
        h.update(digest if digest is not None else dcm.file_digest(p.read_bytes()))
    return h.hexdigest()


def _convert_dicom(job: Job, level: int, threads: int | None, digests: dict[Path, bytes]) -> Written:
    assert job.tmp_volume is not None
    cols, rows, n = job.shape
    dtype = dcm.output_dtype(job.frames)
    for attempt in (dtype, np.dtype(np.float32)):
        try:
            if can_stream(job.affine):  # axial-like: decode and compress overlap
                order = slice_order(job.affine, n)
                planes = dcm.iter_planes([job.frames[k] for k in order], rows, cols, attempt, digests)
                return write_slices(job.tmp_volume, planes, job.shape, attempt, job.affine, level=level, threads=threads)
            data = np.empty(job.shape, dtype=attempt, order="F")
            for k, plane in enumerate(dcm.iter_planes(job.frames, rows, cols, attempt, digests)):
                data[:, :, k] = plane.T
            return write_volume(job.tmp_volume, data, job.affine, level=level, threads=threads)
        except dcm.OutOfRange:
            log.debug("rescaled values exceed int16; writing float32")
    raise AssertionError("unreachable: float32 never overflows")


def convert(job: Job, deid: Deid, level: int = GZIP_LEVEL, threads: int | None = None) -> Result:
    """Convert one job into its temporary output files (runs in a worker process)."""
    paths = [f[0] for f in job.frames] if job.kind == "dicom" else [p for p in (job.image, job.label) if p]
    if job.prev is not None:
        content = content_digest(deid, paths)
        if content == job.prev.get("content"):
            return Result(ok=True, reused=True, content=content, shape=tuple(job.prev["shape"]),  # type: ignore[arg-type]
                          spacing=tuple(job.prev["spacing"]), has_label=bool(job.prev.get("label_sha256")))  # type: ignore[arg-type]
    assert job.tmp_volume is not None
    digests: dict[Path, bytes] = {}
    label_sha = ""
    try:
        if job.kind == "dicom":
            written = _convert_dicom(job, level, threads, digests)
        else:
            assert job.image is not None
            data, affine = nii.load_volume(job.image)
            label = nii.load_label(job.label, data.shape, affine, job.tumor_values) if job.label else None  # type: ignore[arg-type]
            written = write_volume(job.tmp_volume, data, affine, level=level, threads=threads)
            del data
            if label is not None and job.tmp_label is not None:
                label_sha = write_volume(job.tmp_label, label, affine, level=level, threads=threads).sha256
    except InputRejected as exc:
        return Result(ok=False, reason=str(exc))
    except MemoryError:
        return Result(ok=False, reason="volume too large for memory")
    except OSError as exc:  # inputs are read inside the try above and rejected there: this is the output
        raise FatalIngestError(
            f"writing to the output folder failed ({exc.strerror or type(exc).__name__}); check free space and permissions"
        ) from None
    content = content_digest(deid, paths, digests)
    return Result(ok=True, shape=written.shape, spacing=written.spacing, content=content, has_label=bool(label_sha),
                  sha256=written.sha256, label_sha256=label_sha)


# --- planning ---------------------------------------------------------------------------


def _case_identity(rel: str) -> str:
    """Patient identity of a NIfTI file: the BIDS sub- label, else the case name.

    >>> _case_identity("ds/sub-07/anat/sub-07_T1w.nii.gz"), _case_identity("imagesTr/liver_3_0000.nii.gz")
    ('sub-07', 'liver_3')
    """
    parts = rel.split("/")
    for p in parts:
        m = re.match(r"^(sub-[A-Za-z0-9]+)", p)
        if m:
            return m.group(1)
    return re.sub(r"_\d{4}$", "", nifti_stem(parts[-1]))


def _modality(value: Any) -> Modality | None:
    if isinstance(value, dict):
        vals = list(value.values())
        value = vals[0] if len(vals) == 1 else None
    return MODALITY_NAMES.get(str(value).strip().upper()) if value is not None else None


def _safe_class(value: Any) -> str:
    """A class name from dataset.json if it is a short plain token, else empty."""
    s = str(value or "")
    return s if re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", s) else ""


def _plan_decathlon(
    disc: Discovery, ledger: Ledger, deid: Deid, rows_q: list[dict[str, Any]], fallback: Modality | None
) -> list[Job]:
    jobs: list[Job] = []
    members: dict[FileRef, list[FileRef]] = defaultdict(list)
    for f, owner in disc.in_decathlon.items():
        members[owner].append(f)
    for ds_json in disc.decathlon_roots:
        base = ds_json.rel.rpartition("/")[0]
        files = {f.rel: f for f in members[ds_json]}
        try:
            meta = json.loads(ds_json.path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError
        except (OSError, ValueError, UnicodeDecodeError):
            reason = "Decathlon dataset.json cannot be parsed; whole dataset quarantined"
            for f in members[ds_json]:
                ledger.mark(f, "quarantined", reason)
            rows_q.append(_qrow(deid, ds_json, "decathlon", "", "", len(members[ds_json]), reason))
            continue
        ledger.mark(ds_json, "used")
        modality = _modality(meta.get("modality")) or fallback
        labels = meta.get("labels") or {}
        tumor_values = sorted(int(k) for k, v in labels.items() if str(k).isdigit() and int(k) > 0
                              and any(w in str(v).lower() for w in TUMOR_WORDS)) if isinstance(labels, dict) else []
        listed: set[str] = set()
        for split, entries in (("train", meta.get("training") or []), ("test", meta.get("test") or [])):
            for n, entry in enumerate(entries):
                item = entry if isinstance(entry, dict) else {"image": entry}
                rel_img = _join(base, str(item.get("image", "")))
                rel_lab = _join(base, str(item["label"])) if item.get("label") else ""
                if rel_img in listed:
                    continue
                listed.update({rel_img, rel_lab} - {""})
                img, lab = files.get(rel_img), files.get(rel_lab) if rel_lab else None
                if img is None:
                    rows_q.append(_qrow(deid, ds_json, "decathlon", "", modality or "", 0,
                                        f"dataset.json {split} entry {n + 1} names an image that does not exist"))
                    continue
                subject = deid.pseudonym(_case_identity(img.rel))
                job = Job(kind="decathlon", subject=subject, modality=modality,
                          sort_key=(split, deid.digest("path", img.rel)), files=[img] + ([lab] if lab else []),
                          state_key=deid.digest("state", f"{img.root}:{img.rel}"), split=split,
                          klass=_safe_class(item.get("class")), image=img.path,
                          label=lab.path if lab and tumor_values else None, tumor_values=tumor_values)
                if modality is None:
                    job.problem = ("modality unknown: dataset.json \"modality\" is not one CT or MR channel "
                                   "and no --modality")
                elif rel_lab and lab is None:
                    job.problem = "label named in dataset.json does not exist"
                jobs.append(job)
        for rel, f in files.items():
            if rel not in listed and f != ds_json:
                ledger.mark(f, "skipped", "file in a Decathlon dataset not listed in dataset.json")
    return jobs


def _join(base: str, rel: str) -> str:
    rel = rel[2:] if rel.startswith("./") else rel
    return f"{base}/{rel}" if base else rel


def _plan_nifti(disc: Discovery, ledger: Ledger, deid: Deid, modality: Modality | None) -> list[Job]:
    sidecars = {(j.root, j.rel): j for j in disc.json}
    used_sidecars: set[FileRef] = set()
    jobs: list[Job] = []
    for f in disc.nifti:
        stem = f.rel[: len(f.rel) - (len(f.rel.rpartition("/")[2]) - len(nifti_stem(f.rel.rpartition("/")[2])))]
        side = sidecars.get((f.root, stem + ".json"))
        mod: Modality | None = None
        if side is not None:
            used_sidecars.add(side)
            try:
                meta = json.loads(side.path.read_text(encoding="utf-8"))
                mod = _modality(meta.get("Modality")) if isinstance(meta, dict) else None
            except (OSError, ValueError, UnicodeDecodeError):
                mod = None
        mod = mod or modality
        job = Job(kind="nifti", subject=deid.pseudonym(_case_identity(f.rel)), modality=mod,
                  sort_key=("", deid.digest("path", f.rel)), files=[f] + ([side] if side else []),
                  state_key=deid.digest("state", f"{f.root}:{f.rel}"), image=f.path)
        if mod is None:
            job.problem = ("modality unknown: no Decathlon dataset.json, no JSON sidecar with \"Modality\" "
                           "and no --modality")
        jobs.append(job)
    for j in disc.json:
        if j not in used_sidecars:
            ledger.mark(j, "skipped", "JSON file that is not a NIfTI sidecar")
    return jobs


def _read_headers(refs: list[FileRef]) -> list[dcm.DicomHeader | dcm.Disposition]:
    return [dcm.read_header(r) for r in refs]


def _chunks(items: list[FileRef], n: int) -> Iterator[list[FileRef]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _read_all_headers(
    refs: list[FileRef], pool: ProcessPoolExecutor | None
) -> list[dcm.DicomHeader | dcm.Disposition]:
    """Headers of `refs` in order. The fast reader takes ~0.1 ms a file; files it cannot read
    go to pydicom (~3 ms a file), in the worker processes when there are many."""
    fast = [dcm.read_fast_header(r) for r in refs]
    slow = [r for r, res in zip(refs, fast, strict=True) if res is None]
    if pool is not None and len(slow) > 64:
        slow_res = [r for chunk in pool.map(_read_headers, list(_chunks(slow, 32))) for r in chunk]
    else:
        slow_res = _read_headers(slow)
    done = dict(zip(slow, slow_res, strict=True))
    return [res if res is not None else done[r] for r, res in zip(refs, fast, strict=True)]


def _dicom_extra(plan: ser.SeriesPlan) -> dict[str, str]:
    """Manifest columns of one DICOM volume (no identifier: indices, echo, b-value, part)."""
    return {
        "volume_index": str(plan.volume_index) if plan.volume_index >= 0 else "",
        "echo": plan.echo if re.fullmatch(r"[0-9]{1,4}(\.[0-9]{1,4})?", plan.echo) else "",  # a number, nothing else
        "b_value": f"{plan.b_value:g}" if plan.b_value is not None else "",
        # a volume that lost slices (gap, short run dropped) shows k/n even as 1/1: never looks whole
        "part": f"{plan.part}/{plan.n_parts}" if plan.n_parts > 1 or plan.lost_slices else "",
        "gap_slices": str(plan.gap_slices) if plan.n_parts > 1 or plan.lost_slices else "",
        "lossy": "1" if plan.lossy else "",
    }


def _plan_dicom(
    disc: Discovery, ledger: Ledger, deid: Deid, pool: ProcessPoolExecutor | None, rows_q: list[dict[str, Any]],
    strict: bool = False,
) -> list[Job]:
    refs = disc.other
    headers: list[dcm.DicomHeader] = []
    for ref, res in zip(refs, _read_all_headers(refs, pool), strict=True):
        if isinstance(res, dcm.Disposition):
            ledger.mark(ref, "skipped" if res.status == "skipped" else "quarantined", res.reason)
            if res.status == "quarantined":
                rows_q.append(_qrow(deid, ref, "file", "", "", 1, f"file: {res.reason}"))
        else:
            headers.append(res)
    jobs: list[Job] = []
    for plan in ser.plan_series(headers, strict=strict):
        subject = deid.pseudonym(plan.patient)
        mod: Modality = "CT" if plan.modality == "CT" else "MR"
        for ref, why in plan.excluded:  # settled: a file's status is its best over all its volumes
            ledger.settle(ref, "skipped", why)
        for files, why in plan.dropped:
            for ref in files:
                ledger.settle(ref, "quarantined", _generic(why))
        if not plan.files:  # no volume left: the dropped files' rows cannot wait for a job
            rows_q += [_qrow(deid, files[0], "file", subject, mod, len(files), f"{mod} series: {why}")
                       for files, why in plan.dropped]
            continue
        job = Job(kind="dicom", subject=subject, modality=mod,
                  sort_key=(plan.series_number, plan.first_position, deid.digest("series", plan.series_key),
                            plan.volume_index, plan.part),
                  files=plan.files, state_key=deid.digest("state", plan.uid_key), problem=plan.problem,
                  frames=[dcm.frame_spec(ref, fr) for ref, fr in plan.frames],
                  shape=plan.shape, affine=plan.affine, extra=_dicom_extra(plan), dropped=plan.dropped)
        jobs.append(job)
    return jobs


def _qrow(deid: Deid, first: FileRef, kind: str, subject: str, modality: str, n_files: int, reason: str) -> dict[str, Any]:
    return {"source": deid.path_ref(first.rel), "kind": kind, "subject_id": subject, "modality": modality,
            "files": n_files, "reason": reason}


# --- outputs ----------------------------------------------------------------------------


def _prepare_out(out: Path) -> None:
    try:
        for sub in ("volumes", "labels"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        raise FatalIngestError("the output folder cannot be created or written; check the --out path and its permissions") from None


def _load_state(out: Path) -> dict[str, Any]:
    try:
        state = json.loads((out / STATE_NAME).read_text(encoding="utf-8"))
        return state if isinstance(state, dict) and state.get("version") == 1 else {}
    except (OSError, ValueError):
        return {}


def _fmt_spacing(spacing: Sequence[float]) -> str:
    """'0.4883x0.4883x1.0' (mm, up to 4 decimals, at least one).

    >>> _fmt_spacing((3.4, 3.4, 4.0))
    '3.4x3.4x4.0'
    """
    out = []
    for v in spacing:
        s = f"{round(float(v), 4):.4f}".rstrip("0")
        out.append(s + "0" if s.endswith(".") else s)
    return "x".join(out)


def run_ingest(
    sources: Sequence[Path | str],
    out: Path | str,
    modality: Modality | None = None,
    key: bytes | None = None,
    workers: int = 2,
    level: int = GZIP_LEVEL,
    strict: bool = False,
) -> IngestReport:
    """Ingest DICOM folders, NIfTI files and Decathlon datasets into de-identified NIfTI.

    Args:
        sources: folders (searched at any depth) or single files.
        out: output folder (created; volumes/, labels/, manifest.csv, quarantine.csv,
            ingest_report.json).
        modality: modality of NIfTI inputs whose dataset.json or JSON sidecar does not give one.
        key: de-identification secret (HMAC key); None -> random per-run key, with a warning.
        workers: processes converting series in parallel (at most `workers` volumes in memory).
        level: gzip level of the written .nii.gz (1 = fast).
        strict: quarantine a whole DICOM series for one damaged file or missing slices
            (default: quarantine only the damaged files and write the contiguous parts).

    Returns the IngestReport (also written to out/ingest_report.json).
    Raises FatalIngestError for an unreadable input root or an unwritable output folder.
    """
    out = Path(out)
    srcs = [Path(s) for s in sources]
    if not srcs:
        raise FatalIngestError("no input given; name at least one DICOM folder, NIfTI file or dataset")
    disc = discover(srcs, out)
    _prepare_out(out)
    deid = Deid.create(key)
    ledger = Ledger(disc.files)
    rows_q: list[dict[str, Any]] = []
    prev_state = _load_state(out) if deid.stable else {}
    prev_entries: dict[str, Any] = prev_state.get("entries", {}) if prev_state.get("key_check") == deid.digest("check", "") else {}

    pool = _process_pool(workers) if workers > 1 else None  # processes start on first use
    try:
        jobs = _plan_decathlon(disc, ledger, deid, rows_q, modality) + _plan_nifti(disc, ledger, deid, modality)
        jobs += _plan_dicom(disc, ledger, deid, pool, rows_q, strict)
        _describe(jobs)
        results = _execute(_stage(jobs, out, prev_entries), deid, level, pool, workers)
    finally:
        if pool is not None:
            pool.shutdown()

    written = _account(jobs, results, ledger, deid, rows_q)
    manifest_rows, state_entries, reused = _place_outputs(out, written)
    for f in ledger.unmarked():  # every file must be accounted for; nothing should land here
        log.error("a file was not classified by ingest; counted as skipped")
        ledger.mark(f, "skipped", "not classified")

    counts = ledger.counts()
    report = IngestReport(
        out=out, files_seen=counts["files_seen"], files_used=counts["files_used"], skipped=counts["skipped"],
        quarantined=counts["quarantined"], volumes_written=len(manifest_rows), volumes_reused=reused,
        labels_written=sum(1 for r in manifest_rows if r["label_path"]), quarantine_rows=len(rows_q),
        skipped_reasons=ledger.reasons("skipped"), quarantined_reasons=ledger.reasons("quarantined"),
        stable_pseudonyms=deid.stable, gzip_level=level,
        files={deid.path_ref(f.rel): st for f in disc.files if (st := ledger.status(f)) is not None},
    )
    _write_records(out, report, manifest_rows, rows_q, deid, state_entries)
    log.info("ingest: %d files seen, %d volumes written (%d unchanged), %d files skipped, %d quarantined (%d rows)",
             report.files_seen, report.volumes_written, reused, report.skipped, report.quarantined, len(rows_q))
    return report


def _describe(jobs: list[Job]) -> None:
    """Sort jobs stably and give each a human-readable description ("CT series 3 of 7")."""
    jobs.sort(key=lambda j: (j.kind, j.modality or "", j.subject, j.sort_key))
    by_kind: dict[str, list[Job]] = defaultdict(list)
    for j in jobs:
        by_kind[j.kind].append(j)
    for kind, group in by_kind.items():
        what = {"dicom": "series", "nifti": "NIfTI file", "decathlon": "Decathlon case"}[kind]
        if kind == "dicom":  # the volumes and parts of one series share its number
            series = list(dict.fromkeys(j.sort_key[:3] for j in group))
            for j in group:
                j.series_desc = f"{j.modality} series {series.index(j.sort_key[:3]) + 1} of {len(series)}"
                j.desc = j.series_desc + _volume_words(j)
            continue
        for i, j in enumerate(group):
            j.desc = f"{j.modality + ' ' if j.modality else ''}{what} {i + 1} of {len(group)}"


def _volume_words(j: Job) -> str:
    """' (volume 3, part 2/3)' for the volumes and parts of a DICOM series, else ''."""
    bits = [f"volume {int(j.extra['volume_index']) + 1}"] if j.extra.get("volume_index") else []
    bits += [f"part {j.extra['part']}"] if j.extra.get("part") else []
    return f" ({', '.join(bits)})" if bits else ""


def _stage(jobs: list[Job], out: Path, prev_entries: dict[str, Any]) -> list[Job]:
    """The jobs to run, each with its temporary output names and its previous state entry."""
    todo: list[Job] = []
    for n, j in enumerate(jobs):
        if j.problem:
            continue
        j.tmp_volume = out / "volumes" / f".job-{n}.nii.gz"
        j.tmp_label = out / "labels" / f".job-{n}.nii.gz" if j.label else None
        prev = prev_entries.get(j.state_key)
        if prev and _prev_intact(out, prev):
            j.prev = prev
        todo.append(j)
    return todo


def _account(
    jobs: list[Job], results: dict[int, Result], ledger: Ledger, deid: Deid, rows_q: list[dict[str, Any]]
) -> list[tuple[Job, Result]]:
    """Settle every job's files used or quarantined (a file used by any written volume counts as
    used, even when other frames of it were dropped: enhanced multi-frame files can feed several
    volumes) and return the written jobs."""
    written: list[tuple[Job, Result]] = []
    failed: list[tuple[Job, str]] = []
    for j in jobs:
        res = results.get(id(j))
        if j.problem or res is None or not res.ok:
            failed.append((j, j.problem or (res.reason if res else "not converted")))
        else:
            written.append((j, res))
    for j, _ in written:
        for f in j.files:
            ledger.settle(f, "used")
    seen: set[tuple[tuple[FileRef, ...], str]] = set()  # one row per (files, reason)
    for j in jobs:  # files dropped from a series that goes on: one row per reason
        for files, why in j.dropped:
            if _first_time(seen, files, why):
                rows_q.append(_qrow(deid, files[0], "file", j.subject, j.modality or "", len(files),
                                    f"{j.series_desc}: {why}"))
    for j, reason in failed:
        text = f"{j.desc}: {reason}" + ("" if reason.endswith("quarantined") else "; quarantined")
        for f in j.files:
            ledger.settle(f, "quarantined", _generic(reason))
        if _first_time(seen, j.files, reason):
            rows_q.append(_qrow(deid, j.files[0], j.kind, j.subject, j.modality or "", len(j.files), text))
    return written


def _first_time(seen: set[tuple[tuple[FileRef, ...], str]], files: Sequence[FileRef], reason: str) -> bool:
    """True the first time (files, reason) is met: the volumes of one multi-frame file that
    fail for one reason (a truncated enhanced file) make one quarantine row, not one each."""
    key = (tuple(files), reason)
    if key in seen:
        return False
    seen.add(key)
    return True


def _write_records(
    out: Path, report: IngestReport, manifest_rows: list[dict[str, Any]], rows_q: list[dict[str, Any]], deid: Deid,
    state_entries: dict[str, Any],
) -> None:
    """manifest.csv, quarantine.csv, ingest_report.json and the incremental state, in a stable order."""
    manifest_rows.sort(key=lambda r: str(r["path"]))
    rows_q.sort(key=lambda r: (*(str(r[c]) for c in ("kind", "subject_id", "modality")), _natural(str(r["reason"])),
                               str(r["source"])))
    write_manifest(out, manifest_rows, MANIFEST_COLUMNS)
    write_manifest(out, rows_q, QUARANTINE_COLUMNS, name="quarantine.csv")
    write_atomic(out / REPORT_NAME, report.to_json().encode())
    if deid.stable:
        state = {"version": 1, "key_check": deid.digest("check", ""), "entries": dict(sorted(state_entries.items()))}
        write_atomic(out / STATE_NAME, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())
    else:
        (out / STATE_NAME).unlink(missing_ok=True)


def _natural(text: str) -> tuple[tuple[int, str], ...]:
    """Sort key that orders "series 2 of 10" before "series 10 of 10"."""
    return tuple((int(t), "") if t.isdigit() else (-1, t) for t in re.split(r"(\d+)", text))


def _generic(reason: str) -> str:
    """Reason without positions and counts, for the per-reason tallies of the report."""
    return re.sub(r"\d+(\.\d+)?", "N", reason)


def _prev_intact(out: Path, prev: dict[str, Any]) -> bool:
    try:
        if sha256_file(out / prev["volume"]) != prev["volume_sha256"]:
            return False
        return not prev.get("label") or sha256_file(out / prev["label"]) == prev["label_sha256"]
    except (OSError, KeyError, TypeError):
        return False


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes: fork when this process has one thread (the CLI: fast start), else
    forkserver (forking a multi-threaded process, e.g. under Prefect, can deadlock)."""
    import multiprocessing as mp
    import threading

    method = "fork" if threading.active_count() == 1 and "fork" in mp.get_all_start_methods() else "forkserver"
    if method not in mp.get_all_start_methods():
        method = "spawn"
    return ProcessPoolExecutor(workers, mp_context=mp.get_context(method))


def _execute(todo: list[Job], deid: Deid, level: int, pool: ProcessPoolExecutor | None, workers: int) -> dict[int, Result]:
    results: dict[int, Result] = {}
    if pool is None or len(todo) == 1:  # one volume: no process to start, threads compress
        for j in todo:
            try:
                results[id(j)] = convert(j, deid, level)
            except FatalIngestError:
                raise
            except Exception as exc:  # an unexpected failure quarantines its job, the run goes on
                # No traceback in the log: exception texts can carry input paths.
                results[id(j)] = Result(ok=False, reason=f"conversion failed ({type(exc).__name__})")
        return results
    threads = max(1, (os.cpu_count() or 1) // max(1, min(workers, len(todo))))
    pending: dict[Future[Result], Job] = {}
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < workers:  # bounded: at most `workers` volumes in memory
            j = queue.pop(0)
            pending[pool.submit(convert, j, deid, level, threads)] = j
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            j = pending.pop(fut)
            try:
                results[id(j)] = fut.result()
            except FatalIngestError:
                raise
            except Exception as exc:  # a crashed worker quarantines its job, the run goes on
                results[id(j)] = Result(ok=False, reason=f"conversion failed ({type(exc).__name__})")
    return results


def _place_outputs(out: Path, written: list[tuple[Job, Result]]) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    """Move temporary/reused files to their final names; return manifest rows and state."""
    counter: dict[tuple[str, str], int] = defaultdict(int)
    names: list[str] = []
    for j, _ in written:
        key = (j.subject, j.modality or "")
        names.append(f"{j.subject}_{j.modality}_{counter[key]}.nii.gz")
        counter[key] += 1
    # Phase 1: reused outputs move aside first, so no final name is overwritten while in use.
    staged: list[tuple[Path, Path | None]] = []
    for n, (j, res) in enumerate(written):
        if res.reused and j.prev is not None:
            vol = out / "volumes" / f".reuse-{n}.nii.gz"
            os.replace(out / j.prev["volume"], vol)
            lab = None
            if j.prev.get("label"):
                lab = out / "labels" / f".reuse-{n}.nii.gz"
                os.replace(out / j.prev["label"], lab)
            staged.append((vol, lab))
        else:
            assert j.tmp_volume is not None
            staged.append((j.tmp_volume, j.tmp_label if res.has_label else None))
    rows: list[dict[str, Any]] = []
    state: dict[str, Any] = {}
    keep: set[str] = set()
    for (j, res), name, (vol, lab) in zip(written, names, staged, strict=True):
        os.replace(vol, out / "volumes" / name)
        keep.add(name)
        # hashed as the worker wrote them, or checked against the state before reuse (_prev_intact)
        hashes = (j.prev["volume_sha256"], j.prev.get("label_sha256", "")) if res.reused and j.prev else (res.sha256, res.label_sha256)
        vol_sha, label_rel, label_sha = hashes[0], "", ""
        if lab is not None:
            os.replace(lab, out / "labels" / name)
            label_rel, label_sha = f"labels/{name}", hashes[1]
        rows.append({"path": f"volumes/{name}", "label_path": label_rel, "subject_id": j.subject,
                     "modality": j.modality, "shape": "x".join(map(str, res.shape)), "spacing": _fmt_spacing(res.spacing),
                     "sha256": vol_sha, "class": j.klass, "split": j.split, "source_kind": j.kind,
                     **{c: j.extra.get(c, "") for c in MANIFEST_COLUMNS[10:]}})
        state[j.state_key] = {"content": res.content, "volume": f"volumes/{name}", "volume_sha256": vol_sha,
                              "label": label_rel, "label_sha256": label_sha, "shape": list(res.shape),
                              "spacing": list(res.spacing)}
    # Stale outputs of earlier runs (same naming scheme) and leftovers of failed jobs go.
    for sub in ("volumes", "labels"):
        for p in (out / sub).iterdir():
            if (OUTPUT_NAME.match(p.name) and p.name not in keep) or p.name.startswith((".job-", ".reuse-")):
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
    reused = sum(1 for _, r in written if r.reused)
    return rows, state, reused


def locate(sources: Sequence[Path | str], ref: str, key: bytes) -> list[str]:
    """Input paths (relative to their root) whose keyed reference is `ref` (quarantine.csv `source`).

    Needs the same key as the run that wrote the reference; prints nothing itself.
    """
    deid = Deid.create(key)
    disc = discover([Path(s) for s in sources])
    return [f.rel for f in disc.files if deid.path_ref(f.rel) == ref]

