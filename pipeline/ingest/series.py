"""Group DICOM frames into output volumes: series, duplicates, 4D volumes and gapped parts.

Second step of DICOM ingest, between `dicom.read_header` (one header per file, its frames:
a slice, an enhanced multi-frame item or a mosaic tile) and the conversion in worker
processes. `plan_series` turns the headers of one run into `SeriesPlan`s, one per output
volume or per refused series:

1. Files are grouped by SeriesInstanceUID, then split by SeriesNumber, ImageType (and the
   per-frame FrameType of enhanced images), echo, image size and orientation, as dcm2niix splits them:
   one UID reused for several acquisitions is several series.
2. Files sharing a SOPInstanceUID: same pixel bytes (or, for copies in different transfer
   syntaxes, same decoded values) is a duplicate (skipped, counted); an intact copy beside a
   damaged one wins; intact copies that differ are both quarantined.
3. A file that cannot be used (truncated, undecodable) is quarantined alone; its slice
   becomes a gap (`strict=True`: the whole series is quarantined, as before).
4. Repeated slice positions with equal counts are a 4D series (fMRI, DWI, multi-phase):
   it is split into 3D volumes, ordered by temporal position, acquisition number, time and
   InstanceNumber; volumes that no such label tells apart refuse the series (never path order).
5. Missing slices split a stack into contiguous runs, each written as "part k of n" with
   the number of slices missing before it; nothing is interpolated, so every voxel written
   is a voxel the scanner stored (runs shorter than geometry.MIN_SLICES are quarantined).
   `strict=True` quarantines the gapped series instead.

Messages hold counts, positions along the slice normal and codes only, never identifiers.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.errors import GeometryError
from pipeline.ingest.dicom import GZIP_HEAD, NATIVE_SYNTAXES, DicomHeader, Frame, decode_pixels, gunzip_dicom
from pipeline.ingest.discover import FileRef
from pipeline.ingest.geometry import (
    MIN_SLICES,
    contiguous_runs,
    orientation_key,
    position_groups,
    slice_normal,
    stack_geometry,
)

Unit = tuple[DicomHeader, Frame]
"""One frame with the header of its file."""


@dataclass
class SeriesPlan:
    """One output volume (a series, a volume of a 4D series, a part of a gapped series) or a
    refused series (`problem` set)."""

    modality: str
    patient: str
    series_key: str
    """SeriesInstanceUID + split key: identifies the series; hashed before use."""
    series_number: int
    first_position: float
    files: list[FileRef]
    """Files whose frames make this volume (all files of the series when refused)."""
    frames: list[tuple[FileRef, Frame]] = field(default_factory=list)
    """Frames in slice order (empty when refused)."""
    affine: npt.NDArray[np.float64] | None = None
    shape: tuple[int, int, int] = (0, 0, 0)
    problem: str = ""
    excluded: list[tuple[FileRef, str]] = field(default_factory=list)
    """Files skipped with a reason (localizers, exact duplicates, damaged copies)."""
    dropped: list[tuple[list[FileRef], str]] = field(default_factory=list)
    """Files quarantined on their own while the rest of the series goes on, with the reason."""
    volume_index: int = -1
    """Index of this volume in a 4D series (0-based), -1 for a 3D series."""
    n_volumes: int = 1
    echo: str = ""
    b_value: float | None = None
    part: int = 0
    """k of a series written as n contiguous parts (1-based), 0 when whole."""
    n_parts: int = 0
    gap_slices: int = 0
    """Slices missing between the previous part and this one (for the first part: slices of
    runs too short to keep, dropped before it)."""
    lost_slices: int = 0
    """Slices of this volume's series missing or dropped anywhere (gaps, short runs): > 0 marks
    the volume partial in the manifest even when it is a single part."""
    lossy: bool = False

    @property
    def uid_key(self) -> str:
        """Identifies this output volume across runs (hashed before use)."""
        return f"{self.series_key}|v{self.volume_index}|p{self.part}"


def plan_series(headers: list[DicomHeader], strict: bool = False) -> list[SeriesPlan]:
    """Group image headers into output volumes; refused series carry `problem`.

    `strict=True` keeps the old all-or-nothing rule: a damaged file or a gap quarantines
    the whole series.
    """
    by_uid: dict[str, list[DicomHeader]] = defaultdict(list)
    for h in headers:
        by_uid[h.series_uid or f"no-series-uid:{h.patient}:{h.modality}"].append(h)
    plans: list[SeriesPlan] = []
    for uid in sorted(by_uid):
        group = sorted(by_uid[uid], key=lambda h: h.ref)
        excluded, units = _drop_localizers(group)
        groups = _split_series(units)
        _drop_stray_orientations(groups, excluded)
        out: list[SeriesPlan] = []
        for key in sorted(groups, key=str):
            out += _plan_group(f"{uid}|{key}", groups[key], strict)
        if out:
            out[0].excluded = excluded + out[0].excluded
        elif excluded:  # nothing but localizers: the files stay accounted for as excluded
            first = group[0]
            out.append(SeriesPlan(first.modality, first.patient, uid, first.series_number, 0.0, [], excluded=excluded))
        plans += out
    return plans


def _drop_localizers(group: list[DicomHeader]) -> tuple[list[tuple[FileRef, str]], list[Unit]]:
    excluded: list[tuple[FileRef, str]] = []
    all_scouts = all(h.localizer for h in group)
    units: list[Unit] = []
    for h in group:
        if all_scouts:
            excluded.append((h.ref, "localizer series (scout images), not a volume; skipped"))
        elif h.localizer:
            excluded.append((h.ref, "localizer image mixed into a series; excluded, series kept"))
        elif not h.frames:  # no geometry: its problem quarantines it in its group
            units.append((h, Frame(0, (0.0, 0.0, 0.0), (), (0.0, 0.0), 1.0, 0.0)))
        else:
            units.extend((h, f) for f in h.frames)
    return excluded, units


def _split_series(units: list[Unit]) -> dict[tuple[Any, ...], list[Unit]]:
    """Frames of one SeriesInstanceUID split by SeriesNumber, ImageType/FrameType, echo number,
    echo time, image size and orientation (the last element of the key), as dcm2niix splits."""
    groups: dict[tuple[Any, ...], list[Unit]] = defaultdict(list)
    for h, f in units:
        o = orientation_key(f.orientation) if len(f.orientation) == 6 else ()
        groups[(h.series_number, h.image_type, f.frame_type, h.echo or f.echo, h.echo_time, h.rows, h.columns, o)].append(
            (h, f))
    return groups


def _drop_stray_orientations(groups: dict[tuple[Any, ...], list[Unit]], excluded: list[tuple[FileRef, str]]) -> None:
    """Files of fewer than 3 frames whose orientation differs from a bigger group that agrees
    on everything else are scouts mixed into the series: excluded, series kept."""
    if len(groups) < 2:
        return
    for key in sorted(groups, key=str):
        if key[-1] == ():  # no geometry at all: quarantined with that reason, not taken for a scout
            continue
        sub = groups[key]
        files = {h.ref for h, _ in sub}
        bigger = any(k[:-1] == key[:-1] and k[-1] != key[-1] and len(v) > len(sub) for k, v in groups.items())
        if len(files) < 3 and len(sub) < 3 and bigger:
            excluded.extend((ref, "localizer (orientation differs from the rest of the series); excluded, series kept")
                            for ref in sorted(files))
            del groups[key]


def _plan_group(series_key: str, units: list[Unit], strict: bool) -> list[SeriesPlan]:
    """Plans of one split series: its volumes and parts, or one refused plan."""
    headers = list({id(h): h for h, _ in units}.values())
    first = headers[0]
    normal = _normal(units)
    first_pos = round(min((float(np.dot(f.position, normal)) for _, f in units if len(f.position) == 3), default=0.0), 3)
    base = SeriesPlan(first.modality, first.patient, series_key, first.series_number, first_pos,
                      sorted(h.ref for h in headers), lossy=any(h.lossy for h in headers))
    kept, base.excluded, base.dropped = resolve_duplicates(headers)
    bad = [h for h in kept if h.problem]
    if bad and (strict or len(bad) == len(kept)):
        problems = sorted({h.problem for h in bad})
        base.problem = f"{problems[0]} (in {len(bad)} of {len(kept)} files)" if len(kept) > 1 else problems[0]
        base.files = sorted(h.ref for h in kept)
        return [base]
    by_problem: dict[str, list[FileRef]] = defaultdict(list)
    for h in bad:
        by_problem[h.problem].append(h.ref)
    base.dropped += [(refs, f"{why}; this file quarantined, the rest of its series kept") for why, refs in by_problem.items()]
    good = {id(h) for h in kept if not h.problem}
    units = [(h, f) for h, f in units if id(h) in good]
    base.files = sorted({h.ref for h, _ in units})
    if not units:  # every file was a duplicate or a conflicting copy: nothing left to stack
        return [base]
    base.problem = _consistency(units)
    volumes: list[list[Unit]] = []
    if not base.problem:
        volumes, base.problem = split_volumes(units, normal)
    if base.problem:
        return [base]
    per_volume = [_plan_volume(base, vi if len(volumes) > 1 else -1, len(volumes), vol, strict)
                  for vi, vol in enumerate(volumes)]
    _mark_short_volumes(per_volume, sum(len(h.frames) or 1 for h in bad))
    plans = [p for ps in per_volume for p in ps]
    plans[0].excluded, plans[0].dropped = base.excluded, base.dropped + plans[0].dropped
    return plans


def _normal(units: list[Unit]) -> npt.NDArray[np.float64]:
    try:
        return slice_normal(units[0][1].orientation)
    except GeometryError:  # a degenerate orientation: stack_geometry quarantines the series
        return np.array([0.0, 0.0, 1.0])


def _consistency(units: list[Unit]) -> str:
    """Why the frames of one series cannot form volumes (patients, sizes, pixel spacing), or ''."""
    headers = list({id(h): h for h, _ in units}.values())
    if len({h.patient for h in headers}) > 1:
        return "files of one series name different patients"
    if len({h.modality for h in headers}) > 1:
        return "files of one series have different modalities"
    if len({(h.rows, h.columns) for h in headers}) > 1:
        sizes = sorted({f"{h.columns}x{h.rows}" for h in headers})
        return f"slice sizes differ ({', '.join(sizes[:3])})"
    spacings = sorted({(round(f.pixel_spacing[0], 4), round(f.pixel_spacing[1], 4)) for _, f in units})
    if len(spacings) > 1:
        shown = ", ".join(f"{a:g}x{b:g}" for a, b in spacings[:3])
        return f"pixel spacing differs between slices ({shown} mm)"
    return ""


def split_volumes(units: list[Unit], normal: npt.NDArray[np.float64]) -> tuple[list[list[Unit]], str]:
    """The 3D volumes of a series: ([units], '') for a 3D series, one list per volume for a
    4D series (repeated positions), or ([], reason).

    When every position repeats the same number of times, frames at one position are ranked
    by `_rank` (temporal position, AcquisitionNumber, times, InstanceNumber, dimension index;
    then frame index within one file) and volume v takes the v-th frame of every position
    (dcm2niix orders volumes the same way). Two files at one position that tie on every label
    refuse the series: which volume each belongs to is unknown. When
    counts differ, ranks would mix time points, so volumes are formed only from an explicit
    label (TemporalPositionIdentifier/Index or AcquisitionNumber) that gives each position at
    most one frame per volume; a volume that lacks slices is then handled like any gapped
    stack. Without such a label the series is refused. A series whose positions mostly occur
    once is 3D with stray duplicates: returned whole, so that stack_geometry names them.
    """
    dist = [float(np.dot(f.position, normal)) if len(f.position) == 3 else float("nan") for _, f in units]
    if not np.all(np.isfinite(dist)):
        return [units], ""
    groups = position_groups(dist)
    counts = Counter(len(g) for g in groups)
    most = max(len(g) for g in groups)
    if most == 1 or counts.most_common(1)[0][0] == 1:
        return [units], ""
    if any(len(g) != most for g in groups):
        labelled = _volumes_by_label(units, groups, most)
        if labelled:
            return labelled, ""
        sizes = [sum(1 for g in groups if len(g) > v) for v in range(most)]
        return [], (f"4D series of {most} volumes with unequal slice counts ({min(sizes)} to {max(sizes)} slices) "
                    "and no temporal position or acquisition number to tell the volumes apart")

    volumes: list[list[Unit]] = [[] for _ in range(most)]
    for g in groups:
        ranked = sorted(g, key=lambda i: (_rank(units[i]), units[i][1].index))
        if any(_rank(units[a]) == _rank(units[b]) and units[a][0] is not units[b][0] for a, b in pairwise(ranked)):
            return [], (f"4D series: {most} volumes at each position cannot be told apart (no temporal position, "
                        "acquisition number, time or distinct instance number)")
        for v, i in enumerate(ranked):
            volumes[v].append(units[i])
    return volumes, ""


def _rank(unit: Unit) -> tuple[Any, ...]:
    """Where a frame falls among the frames at its position in a 4D series: temporal position,
    AcquisitionNumber, trigger/acquisition/content time, InstanceNumber, dimension index.

    Only labels the scanner wrote: never the file name, which a PACS export makes random.
    Frames of one enhanced file that tie on all of these keep their order in the file.
    """
    h, f = unit
    return (f.temporal or h.temporal, h.acquisition, h.times, h.instance, f.dim_index)


def _volumes_by_label(units: list[Unit], groups: list[list[int]], most: int) -> list[list[Unit]]:
    """Volumes keyed by an explicit per-frame label, or [] when no label separates them."""
    for label in (lambda h, f: f.temporal or h.temporal, lambda h, f: h.acquisition):
        keys = [label(h, f) for h, f in units]
        if 0 in keys or len(set(keys)) != most:
            continue
        if any(len({keys[i] for i in g}) != len(g) for g in groups):
            continue  # two frames of one position share a label: it does not name volumes
        return [[units[i] for i in range(len(units)) if keys[i] == k] for k in sorted(set(keys))]
    return []


def _plan_volume(base: SeriesPlan, vi: int, nv: int, units: list[Unit], strict: bool) -> list[SeriesPlan]:
    """Plans of one 3D volume: whole, or its contiguous parts when slices are missing."""
    normal = _normal(units)
    dist = [float(np.dot(f.position, normal)) for _, f in units]
    runs = None if strict else contiguous_runs(dist)
    b_values = {f.b_value for _, f in units}
    proto = dict(modality=base.modality, patient=base.patient, series_key=base.series_key,
                 series_number=base.series_number, first_position=base.first_position, volume_index=vi,
                 n_volumes=nv, echo=_echo(units), b_value=b_values.pop() if len(b_values) == 1 else None, lossy=base.lossy)
    if runs is None:
        return [_stack(SeriesPlan(files=[], **proto), units)]  # type: ignore[arg-type]
    plans: list[SeriesPlan] = []
    dropped: list[tuple[list[FileRef], str]] = []
    missing = 0
    for idx, gap in runs:
        missing += gap
        if len(idx) < MIN_SLICES:
            refs = sorted({units[i][0].ref for i in idx})
            dropped.append((refs, f"{len(idx)} slice{'s' if len(idx) > 1 else ''} cut off from the series by missing "
                                  f"slices; fewer than {MIN_SLICES} make no volume"))
            missing += len(idx)
            continue
        plan = SeriesPlan(files=[], gap_slices=missing, **proto)  # type: ignore[arg-type]
        plans.append(_stack(plan, [units[i] for i in idx]))
        missing = 0
    lost = sum(gap for _, gap in runs) + sum(len(idx) for idx, _ in runs if len(idx) < MIN_SLICES)
    for k, plan in enumerate(plans):
        plan.part, plan.n_parts, plan.lost_slices = k + 1, len(plans), lost
    if not plans:  # only short runs: the series is refused with what was seen
        refused = SeriesPlan(files=sorted({h.ref for h, _ in units}), **proto)  # type: ignore[arg-type]
        refused.problem = (f"slices missing everywhere: {len(runs)} runs of fewer than {MIN_SLICES} slices; "
                           "no volume can be built")
        return [refused]
    plans[0].dropped = dropped
    return plans


def _mark_short_volumes(per_volume: list[list[SeriesPlan]], n_bad: int) -> None:
    """Mark volumes that lost slices no gap shows (`lost_slices`), so none looks whole:

    - a volume of a 4D series with fewer slices than its fullest sibling (slices missing at an
      end of the stack leave no gap);
    - the only volume of a series from which `n_bad` damaged frames were quarantined, when no
      gap already marks it (the damaged slices were at an end).
    """
    def total(plans: list[SeriesPlan]) -> int:
        return sum(p.shape[2] for p in plans) + (plans[0].lost_slices if plans else 0)

    ok = [ps for ps in per_volume if ps and not any(p.problem for p in ps)]
    most = max((total(ps) for ps in ok), default=0)
    for ps in ok:
        short = most - total(ps) if len(per_volume) > 1 else (n_bad if ps[0].lost_slices == 0 else 0)
        for p in ps:
            p.lost_slices += short
            if short and not p.n_parts:  # a whole stack as far as its positions show: part 1 of 1
                p.part, p.n_parts = 1, 1


def _echo(units: list[Unit]) -> str:
    echoes = {units[0][0].echo or units[0][1].echo} | {h.echo or f.echo for h, f in units}
    return echoes.pop() if len(echoes) == 1 else ""


def _stack(plan: SeriesPlan, units: list[Unit]) -> SeriesPlan:
    """Validate the geometry of `units` into `plan` (frames in slice order, affine, shape)."""
    plan.files = sorted({h.ref for h, _ in units})
    frames = [(h.ref, f) for h, f in units]
    try:
        geom = stack_geometry([f.position for _, f in frames], frames[0][1].orientation, frames[0][1].pixel_spacing)
    except GeometryError as exc:
        plan.problem = str(exc)
        return plan
    plan.frames = [frames[i] for i in geom.order]
    plan.affine = geom.affine
    h = units[0][0]
    plan.shape = (h.columns, h.rows, len(frames))
    return plan


# --- duplicates -------------------------------------------------------------------------


def resolve_duplicates(
    headers: list[DicomHeader],
) -> tuple[list[DicomHeader], list[tuple[FileRef, str]], list[tuple[list[FileRef], str]]]:
    """Files of one series that share a SOPInstanceUID: (kept, skipped with reason,
    quarantined with reason).

    Same pixel bytes: the first file (path order) is kept, the others skipped as duplicates.
    Copies in different transfer syntaxes (one JPEG-lossless, one native) are compared after
    decoding: equal values are duplicates too (the native copy is kept).
    A damaged copy (truncated, undecodable) beside an intact one is skipped. Intact copies
    with different pixel bytes are both quarantined: which one is right cannot be told.
    """
    by_sop: dict[str, list[DicomHeader]] = defaultdict(list)
    for h in headers:
        by_sop[h.sop_uid or f"no-sop:{h.ref.root}:{h.ref.rel}"].append(h)
    kept: list[DicomHeader] = []
    skipped: list[tuple[FileRef, str]] = []
    quarantined: list[tuple[list[FileRef], str]] = []
    for copies in by_sop.values():
        intact = [h for h in copies if not h.problem]
        if len(copies) == 1 or not intact:
            kept.extend(copies)
            continue
        skipped += [(h.ref, "damaged copy of an instance whose intact copy is present; skipped")
                    for h in copies if h.problem]
        distinct: dict[bytes, DicomHeader] = {}
        for h in intact:
            digest = _pixel_digest(h)
            if digest in distinct:
                skipped.append((h.ref, "duplicate file (same SOP Instance UID and pixel data as another file); skipped"))
            else:
                distinct[digest] = h
        if len(distinct) > 1 and len({h.transfer_syntax for h in distinct.values()}) > 1:
            distinct = _merge_transcoded(distinct, skipped)  # rare: decode only here, never on the fast path
        if len(distinct) == 1:
            kept.extend(distinct.values())
        else:
            quarantined.append(([h.ref for h in distinct.values()], f"{len(distinct)} files share one SOP Instance UID "
                                                                    "but hold different pixel data; which is right is unknown"))
    return kept, skipped, quarantined


def _pixel_digest(h: DicomHeader) -> bytes:
    """SHA-256 of a file's stored pixel data bytes (as encoded), b'' when unreadable."""
    import pydicom

    try:
        data = gunzip_dicom(h.ref.path.read_bytes(), max((f.inflated_max for f in h.frames), default=0) or GZIP_HEAD)
        ds = pydicom.dcmread(io.BytesIO(data), force=True, specific_tags=["PixelData"])
        return hashlib.sha256(bytes(ds.PixelData)).digest()
    except Exception:  # noqa: BLE001 - a copy that cannot be read has no comparable pixels
        return b""


def _merge_transcoded(distinct: dict[bytes, DicomHeader], skipped: list[tuple[FileRef, str]]) -> dict[bytes, DicomHeader]:
    """Copies of one instance whose encoded pixel data differ, merged when their decoded values
    (and rescale) are equal; the merged-away copies are added to `skipped`. Native copies come
    first, so the kept one reads through the fast path."""
    out: dict[bytes, DicomHeader] = {}
    for h in sorted(distinct.values(), key=lambda h: (h.transfer_syntax not in NATIVE_SYNTAXES, h.ref)):
        digest = _decoded_digest(h) or b"undecodable:" + str(h.ref.rel).encode()
        if digest in out:
            skipped.append((h.ref, "duplicate file (same SOP Instance UID, same pixel values stored in another "
                                   "transfer syntax); skipped"))
        else:
            out[digest] = h
    return out


def _decoded_digest(h: DicomHeader) -> bytes:
    """SHA-256 of a file's decoded pixel values (as float64, with shape and each frame's
    rescale), b'' when they cannot be decoded."""
    try:
        data = gunzip_dicom(h.ref.path.read_bytes(), max((f.inflated_max for f in h.frames), default=0) or GZIP_HEAD)
        arr = np.asarray(decode_pixels(data), dtype=np.float64)
    except Exception:  # noqa: BLE001 - a copy that cannot be decoded has no comparable pixels
        return b""
    rescale = repr([(f.slope, f.intercept) for f in h.frames]).encode()
    return hashlib.sha256(repr(arr.shape).encode() + rescale + arr.tobytes()).digest()
