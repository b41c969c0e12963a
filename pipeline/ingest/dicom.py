"""DICOM side of ingest: read headers, group slices into series, validate, convert.

Three steps, so that bad inputs are refused before any pixel is decoded:

1. `read_header` reads one file without its pixel data (pydicom `specific_tags`, the
   pixel element deferred) and returns a `DicomHeader`, or a `Disposition` saying why the
   file is skipped (not DICOM, DICOMDIR, SR / RTSTRUCT / presentation state, a modality
   other than CT or MR) or quarantined (empty, truncated, no pixel data, undecodable).
2. `plan_series` groups the image frames by series, orientation and echo, drops exact
   duplicates and localizers with a reason, checks that every frame shares rows, columns,
   pixel spacing and patient, and validates the stack with `geometry.stack_geometry`.
3. `convert_series` (run in worker processes) reads the pixels in the planned order,
   applies RescaleSlope/Intercept (HU for CT) and writes a canonical NIfTI.

No message built here holds a tag value that could identify anyone: only counts, sizes,
positions along the slice normal (mm), modality, transfer syntax and SOP class names.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.errors import GeometryError, InputRejected
from pipeline.ingest.discover import FileRef
from pipeline.ingest.geometry import orientation_key, slice_normal, stack_geometry

log = logging.getLogger(__name__)

IMAGE_MODALITIES = ("CT", "MR")

HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "Modality", "PatientID", "PatientName", "StudyInstanceUID",
    "SeriesInstanceUID", "SeriesNumber", "AcquisitionNumber", "EchoNumbers", "ImageType",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
    "NumberOfFrames", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
    "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "BurnedInAnnotation",
    "GantryDetectorTilt", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    "DirectoryRecordSequence", "PixelData", "FloatPixelData", "DoubleFloatPixelData",
]

NON_IMAGE_HINT = {
    "1.2.840.10008.5.1.4.1.1.481.3": "RT structure set",
    "1.2.840.10008.1.3.10": "DICOMDIR",
}


@dataclass(frozen=True)
class Disposition:
    """Why a file is not part of any volume: status 'skipped' or 'quarantined' and a reason."""

    status: str
    reason: str


@dataclass(frozen=True)
class Frame:
    """One 2-D frame of an image file with its geometry and rescale."""

    index: int
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float


@dataclass(frozen=True)
class DicomHeader:
    """What ingest needs from one image file's header (identifiers only for grouping)."""

    ref: FileRef
    modality: str
    patient: str
    series_uid: str
    sop_uid: str
    series_number: int
    echo: str
    rows: int
    columns: int
    localizer: bool
    transfer_syntax: str
    frames: tuple[Frame, ...]
    problem: str = ""
    """A reason that quarantines the whole series this file belongs to (e.g. truncated)."""


def _num(ds: Any, name: str, default: float) -> float:
    try:
        v = ds.get(name)
        if v is None or v == "":
            return default
        return float(v[0] if isinstance(v, Sequence) and not isinstance(v, str) else v)
    except (TypeError, ValueError):
        return default


def _floats(v: Any, n: int) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _sop_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return name if name and name != uid else "unknown SOP class"


def _decoder_problem(ts_uid: str) -> str:
    """'' when pixel data in `ts_uid` can be decoded here, else a reason naming what is missing."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(ts_uid)
    if not uid.is_compressed:
        return ""
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"pixel data in {uid.name or 'an unknown transfer syntax'} has no decoder in pydicom"
    if decoder.is_available:
        return ""
    needs = " or ".join(
        sorted({dep.split(" - requires ")[1] if " - requires " in dep else dep for dep in decoder.missing_dependencies})
    )
    return f"pixel data compressed as {uid.name}; needs {needs} to decode"


def _plane(item: Any) -> tuple[Any, Any, Any, Any]:
    """(position, orientation, pixel spacing, value transform) of a functional-groups item."""
    def first(seq_name: str, tag: str) -> Any:
        seq = item.get(seq_name) if item is not None else None
        return seq[0].get(tag) if seq else None

    transform = item.get("PixelValueTransformationSequence") if item is not None else None
    return (
        first("PlanePositionSequence", "ImagePositionPatient"),
        first("PlaneOrientationSequence", "ImageOrientationPatient"),
        first("PixelMeasuresSequence", "PixelSpacing"),
        transform[0] if transform else None,
    )


def _frames(ds: Any) -> tuple[tuple[Frame, ...], str]:
    """Frames of an image dataset with geometry, or () and the reason they have none."""
    n_frames = int(_num(ds, "NumberOfFrames", 1))
    slope, intercept = _num(ds, "RescaleSlope", 1.0), _num(ds, "RescaleIntercept", 0.0)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
        s_pos, s_ori, s_sp, s_tr = _plane(shared)
        per = ds.PerFrameFunctionalGroupsSequence
        if len(per) != n_frames:
            return (), f"multi-frame image lists {len(per)} frame geometries for {n_frames} frames"
        frames = []
        for i, item in enumerate(per):
            pos, ori, sp, tr = _plane(item)
            pos, ori, sp, tr = pos or s_pos, ori or s_ori, sp or s_sp, tr or s_tr
            p, o, s = _floats(pos, 3), _floats(ori, 6), _floats(sp, 2)
            if p is None or o is None or s is None:
                return (), "multi-frame image without per-frame position, orientation or pixel spacing"
            fs, fi = (_num(tr, "RescaleSlope", 1.0), _num(tr, "RescaleIntercept", 0.0)) if tr else (slope, intercept)
            frames.append(Frame(i, (p[0], p[1], p[2]), o, (s[0], s[1]), fs, fi))
        return tuple(frames), ""
    p, o, s = _floats(ds.get("ImagePositionPatient"), 3), _floats(ds.get("ImageOrientationPatient"), 6), \
        _floats(ds.get("PixelSpacing"), 2)
    if p is None or o is None:
        return (), "no ImagePositionPatient/ImageOrientationPatient (slice geometry unknown)"
    if s is None:
        return (), "no PixelSpacing (pixel size unknown)"
    if n_frames != 1:
        return (), f"multi-frame image ({n_frames} frames) without per-frame positions"
    return (Frame(0, (p[0], p[1], p[2]), o, (s[0], s[1]), slope, intercept),), ""


def _looks_like_raw_dicom(head: bytes) -> bool:
    """Files without the 128-byte preamble: the first element is usually group 0002 or 0008."""
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[2:4] in (
        b"\x00\x00", b"\x01\x00", b"\x05\x00", b"\x08\x00", b"\x10\x00", b"\x12\x00", b"\x16\x00", b"\x18\x00",
    )


def _suffix(rel: str) -> str:
    """' (.csv)' for a short plain file extension, else '' (a long one could be a name)."""
    name = rel.rpartition("/")[2]
    ext = name.rpartition(".")[2].lower() if "." in name[1:] else ""
    return f" (.{ext})" if ext.isalnum() and len(ext) <= 5 else ""


def read_header(ref: FileRef) -> DicomHeader | Disposition:
    """Read one file's header (no pixels) and classify it.

    Returns a DicomHeader for a CT or MR image (its `problem` set when the file is truncated,
    lacks pixel data or cannot be decoded here) or a Disposition for everything else.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    named_dcm = ref.rel.lower().endswith((".dcm", ".dicom", ".ima"))
    if ref.size == 0:
        return Disposition("quarantined", "empty file (0 bytes)")
    try:
        with open(ref.path, "rb") as f:
            head = f.read(132)
            f.seek(0)
            force = False
            if head[128:132] != b"DICM":
                if not _looks_like_raw_dicom(head):
                    if named_dcm:
                        return Disposition("quarantined", "named like a DICOM file but is not DICOM (no DICM prefix)")
                    return Disposition("skipped", f"not a DICOM, NIfTI or JSON file{_suffix(ref.rel)}")
                force = True
            ds = pydicom.dcmread(f, defer_size=1024, specific_tags=HEADER_TAGS, force=force)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError, OverflowError) as exc:
        if isinstance(exc, EOFError) or "truncat" in str(exc).lower() or "end of file" in str(exc).lower():
            return Disposition("quarantined", "DICOM header is truncated; cannot be read")
        return Disposition("quarantined", f"DICOM header cannot be parsed ({type(exc).__name__})")

    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if sop_class == "1.2.840.10008.1.3.10" or "DirectoryRecordSequence" in ds:
        return Disposition("skipped", "DICOMDIR (a directory index; the files it lists are read directly)")
    has_pixels = any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    image_module = "Rows" in ds and "Columns" in ds
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if not has_pixels and not image_module:
        if "Image Storage" in _sop_name(sop_class):
            return Disposition("quarantined", f"{_sop_name(sop_class)} file without image attributes or pixel "
                                              "data (truncated or incomplete header)")
        return Disposition("skipped", f"non-image object ({_sop_name(sop_class)})")
    if modality not in IMAGE_MODALITIES:
        return Disposition("skipped", f"image of modality {modality or 'unknown'} ({_sop_name(sop_class)}); only CT and MR are ingested")

    ts = str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")) if meta is not None else "1.2.840.10008.1.2"
    frames, geom_problem = _frames(ds)
    problem = ""
    rows, cols = int(_num(ds, "Rows", 0)), int(_num(ds, "Columns", 0))
    if not has_pixels:
        problem = f"{modality} image without pixel data"
    elif rows <= 0 or cols <= 0:
        problem = f"image of {rows} x {cols} pixels"
    elif int(_num(ds, "SamplesPerPixel", 1)) != 1 or not str(ds.get("PhotometricInterpretation", "MONOCHROME2")).startswith("MONOCHROME"):
        problem = f"colour image ({ds.get('PhotometricInterpretation', 'unknown')}); CT and MR must be greyscale"
    elif str(ds.get("BurnedInAnnotation", "NO")).upper() == "YES":
        problem = "pixel data has burned-in annotation (may show identifiers)"
    elif geom_problem:
        problem = geom_problem
    else:
        problem = _decoder_problem(ts)
        if not problem and "PixelData" in ds and str(ts) not in ("1.2.840.10008.1.2.1.99",):
            from pydicom.uid import UID

            raw = ds.get_item("PixelData")
            length, tell = getattr(raw, "length", None), getattr(raw, "value_tell", None)
            if not UID(ts).is_compressed:
                n_frames = max(1, int(_num(ds, "NumberOfFrames", 1)))
                expected = rows * cols * n_frames * max(1, int(_num(ds, "BitsAllocated", 16))) // 8
                if ref.size < expected or (isinstance(length, int) and length < expected):
                    problem = f"pixel data too short for the image size ({expected} bytes needed)"
            if not problem and isinstance(length, int) and isinstance(tell, int) and length != 0xFFFFFFFF \
                    and tell + length > ref.size:
                problem = f"file is truncated ({tell + length - ref.size} bytes of pixel data missing)"

    ident = str(ds.get("PatientID", "") or "").strip()
    if not ident:
        name = str(ds.get("PatientName", "") or "").strip()
        ident = f"name:{name}" if name else f"study:{ds.get('StudyInstanceUID', '')}"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    echo = ds.get("EchoNumbers", "")
    return DicomHeader(
        ref=ref,
        modality=modality,
        patient=ident,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        series_number=int(_num(ds, "SeriesNumber", 0)),
        echo=str(echo[0] if isinstance(echo, Sequence) and not isinstance(echo, str) and len(echo) else echo or ""),
        rows=rows,
        columns=cols,
        localizer="LOCALIZER" in image_type or "SCOUT" in image_type,
        transfer_syntax=str(ts),
        frames=frames,
        problem=problem,
    )


# --- planning -------------------------------------------------------------------------


@dataclass
class SeriesPlan:
    """A validated (or refused) series: the frames in slice order and the stack geometry."""

    modality: str
    patient: str
    uid_key: str
    """SeriesInstanceUID + orientation + echo: identifies the series; hashed before use."""
    series_number: int
    first_position: float
    files: list[FileRef]
    """Every file of the series (sorted by FileRef), the unit of accounting."""
    frames: list[tuple[FileRef, Frame]] = field(default_factory=list)
    """Frames in slice order (empty when refused)."""
    affine: npt.NDArray[np.float64] | None = None
    shape: tuple[int, int, int] = (0, 0, 0)
    problem: str = ""
    excluded: list[tuple[FileRef, str]] = field(default_factory=list)
    """Files left out of the series (localizers, exact duplicates) with the reason."""

    def sort_key(self) -> tuple[Any, ...]:
        return (self.series_number, self.first_position, self.uid_key)


def plan_series(headers: list[DicomHeader]) -> list[SeriesPlan]:
    """Group image headers into series and validate each; refused series carry `problem`."""
    by_uid: dict[str, list[DicomHeader]] = defaultdict(list)
    for h in headers:
        by_uid[h.series_uid or f"no-series-uid:{h.patient}:{h.modality}"].append(h)

    plans: list[SeriesPlan] = []
    for uid in sorted(by_uid):
        group = sorted(by_uid[uid], key=lambda h: h.ref)
        excluded: list[tuple[FileRef, str]] = []
        # Exact duplicates: the same SOP instance stored twice.
        seen: dict[str, DicomHeader] = {}
        unique: list[DicomHeader] = []
        for h in group:
            if h.sop_uid and h.sop_uid in seen:
                excluded.append((h.ref, "duplicate file (same SOP Instance UID as another file); skipped"))
            else:
                seen[h.sop_uid] = h
                unique.append(h)
        # Split by orientation and echo; small off-orientation groups and LOCALIZER images
        # are scouts mixed into the series.
        subgroups: dict[tuple[Any, ...], list[DicomHeader]] = defaultdict(list)
        all_scouts = all(x.localizer for x in unique)
        for h in unique:
            if all_scouts:
                excluded.append((h.ref, "localizer series (scout images), not a volume; skipped"))
                continue
            if h.localizer:
                excluded.append((h.ref, "localizer image mixed into a series; excluded, series kept"))
                continue
            o = orientation_key(h.frames[0].orientation) if h.frames else ()
            subgroups[(o, h.echo)].append(h)
        if len(subgroups) > 1:
            biggest = max(len(v) for v in subgroups.values())
            for key in sorted(subgroups, key=str):
                sub = subgroups[key]
                same_echo_main = any(len(v) == biggest and k[1] == key[1] for k, v in subgroups.items())
                if len(sub) < 3 and len(sub) < biggest and same_echo_main:
                    excluded.extend((h.ref, "localizer (orientation differs from the rest of the series); excluded, series kept") for h in sub)
                    del subgroups[key]
        for i, (key, sub) in enumerate(sorted(subgroups.items(), key=lambda kv: str(kv[0]))):
            plan = _plan_one(uid, key, sub)
            if i == 0:
                plan.excluded = excluded
            plans.append(plan)
        if not subgroups and excluded:
            # Nothing but localizers or duplicates: the files stay accounted for as excluded.
            first = group[0]
            plans.append(SeriesPlan(first.modality, first.patient, uid, first.series_number, 0.0, [],
                                    problem="", excluded=excluded))
    return plans


def _plan_one(uid: str, key: tuple[Any, ...], sub: list[DicomHeader]) -> SeriesPlan:
    first = sub[0]
    files = sorted(h.ref for h in sub)
    normal = slice_normal(first.frames[0].orientation) if first.frames else np.array([0.0, 0.0, 1.0])
    first_pos = min((float(np.dot(f.position, normal)) for h in sub for f in h.frames), default=0.0)
    plan = SeriesPlan(
        modality=first.modality, patient=first.patient, uid_key=f"{uid}|{key}", series_number=first.series_number,
        first_position=round(first_pos, 3), files=files,
    )
    problems = sorted({h.problem for h in sub if h.problem})
    if problems:
        n_bad = sum(1 for h in sub if h.problem)
        plan.problem = f"{problems[0]} (in {n_bad} of {len(sub)} files)" if len(sub) > 1 else problems[0]
        return plan
    if len({h.patient for h in sub}) > 1:
        plan.problem = "files of one series name different patients"
        return plan
    if len({h.modality for h in sub}) > 1:
        plan.problem = "files of one series have different modalities"
        return plan
    if len({(h.rows, h.columns) for h in sub}) > 1:
        sizes = sorted({f"{h.columns}x{h.rows}" for h in sub})
        plan.problem = f"slice sizes differ ({', '.join(sizes[:3])})"
        return plan
    frames = [(h.ref, f) for h in sub for f in h.frames]
    spacings = sorted({(round(f.pixel_spacing[0], 4), round(f.pixel_spacing[1], 4)) for _, f in frames})
    if len(spacings) > 1:
        shown = ", ".join(f"{a:g}x{b:g}" for a, b in spacings[:3])
        plan.problem = f"pixel spacing differs between slices ({shown} mm)"
        return plan
    if len({h.transfer_syntax for h in sub}) > 1:
        log.debug("series mixes transfer syntaxes; decoding each file on its own")
    try:
        geom = stack_geometry([f.position for _, f in frames], frames[0][1].orientation, frames[0][1].pixel_spacing)
    except GeometryError as exc:
        plan.problem = str(exc)
        return plan
    plan.frames = [frames[i] for i in geom.order]
    plan.affine = geom.affine
    plan.shape = (first.columns, first.rows, len(frames))
    return plan


# --- conversion (worker process) --------------------------------------------------------


def load_series(
    frames: list[tuple[Path, int, float, float]], shape: tuple[int, int, int], hasher: Any | None = None
) -> npt.NDArray[np.generic]:
    """Stack frames into an (i, j, k) array in real units (HU for CT).

    Args:
        frames: (file, frame index, RescaleSlope, RescaleIntercept) in slice order.
        shape: (columns, rows, slices).
        hasher: optional hashlib-like object fed every file's bytes once (incremental state).

    Returns int16 when every rescaled value is an integer in int16 range, else float32.
    Raises InputRejected naming the slice when a file cannot be decoded.
    """
    import pydicom

    integral = all(float(s).is_integer() and float(b).is_integer() for _, _, s, b in frames)
    out: npt.NDArray[np.generic] = np.empty(shape, dtype=np.int16 if integral else np.float32, order="F")
    cache: dict[Path, npt.NDArray[np.generic]] = {}
    for k, (path, index, slope, intercept) in enumerate(frames):
        if path not in cache:
            cache.clear()
            try:
                data = path.read_bytes()
                if hasher is not None:
                    hasher.update(data)
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
                arr = ds.pixel_array
            except Exception as exc:  # any decoder failure quarantines the series
                why = "truncated" if "truncat" in str(exc).lower() or "short" in str(exc).lower() else type(exc).__name__
                raise InputRejected(f"slice {k + 1} of {shape[2]}: pixel data cannot be decoded ({why})") from None
            cache[path] = arr
        arr = cache[path]
        plane = arr[index] if arr.ndim == 3 else arr
        if plane.shape != (shape[1], shape[0]):
            raise InputRejected(f"slice {k + 1} of {shape[2]}: pixel array is {plane.shape}, header says {shape[1]}x{shape[0]}")
        if out.dtype == np.int16:
            vals = plane.astype(np.int32) if slope == 1 and intercept == 0 else plane.astype(np.int64) * int(slope) + int(intercept)
            if vals.min(initial=0) < -32768 or vals.max(initial=0) > 32767:
                out = out.astype(np.float32, order="F")
                out[:, :, k] = vals.T
            else:
                out[:, :, k] = vals.T
        else:
            out[:, :, k] = (plane.astype(np.float64) * slope + intercept).T
    if out.dtype != np.int16 and np.all(np.isfinite(out)) and np.array_equal(out, np.round(out)) \
            and out.min(initial=0) >= -32768 and out.max(initial=0) <= 32767:
        out = out.astype(np.int16, order="F")
    return out
