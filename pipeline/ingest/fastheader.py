"""A minimal reader for the common DICOM header, ~10x faster than pydicom per file.

Ingest reads every header before any pixel; for a 400-slice CT, pydicom's general parser
(values converted on access, every tag built as an object) costs more than decoding the
pixels. `read_fast` handles only the plain case: a Part 10 file (preamble + DICM), explicit
VR little endian, single frame, all wanted strings ASCII, pixel data found within the first
64 KiB. It returns a small read-only view with the few calls dicom.read_header makes on a
pydicom Dataset (`get`, `in`, `file_meta`, `get_item(...).value_tell/length`). For anything
else (and for Siemens mosaics, whose CSA header nibabel parses) it returns None and the caller uses pydicom, so this is a speed path, never a second
source of truth (tests compare both readers on the same files).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXPLICIT_LE = "1.2.840.10008.1.2.1"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_HEAD_BYTES = 1 << 16

WANTED: dict[int, str] = {
    0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x00080060: "Modality", 0x00100020: "PatientID",
    0x00100010: "PatientName", 0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID",
    0x00200011: "SeriesNumber", 0x00200012: "AcquisitionNumber", 0x00180086: "EchoNumbers", 0x00080008: "ImageType",
    0x00200032: "ImagePositionPatient", 0x00200037: "ImageOrientationPatient", 0x00280030: "PixelSpacing",
    0x00280010: "Rows", 0x00280011: "Columns", 0x00280008: "NumberOfFrames", 0x00280100: "BitsAllocated",
    0x00280101: "BitsStored", 0x00280102: "HighBit", 0x00280103: "PixelRepresentation", 0x00280002: "SamplesPerPixel",
    0x00280004: "PhotometricInterpretation", 0x00281053: "RescaleSlope", 0x00281052: "RescaleIntercept",
    0x00280301: "BurnedInAnnotation", 0x00181120: "GantryDetectorTilt", 0x00200013: "InstanceNumber",
    0x00200100: "TemporalPositionIdentifier", 0x00282110: "LossyImageCompression", 0x00180088: "SpacingBetweenSlices",
    0x00180050: "SliceThickness", 0x00189087: "DiffusionBValue", 0x00180081: "EchoTime", 0x00181060: "TriggerTime",
    0x00080032: "AcquisitionTime", 0x00080033: "ContentTime",
}
"""Tags read (strings, US or FD values in the files this reader accepts)."""

_REFUSE = {0x52009229, 0x52009230, 0x00041220, 0x7FE00008, 0x7FE00009}
"""Shared/per-frame functional groups, DICOMDIR records, float pixel data: pydicom reads those."""

_PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class _Raw:
    value_tell: int
    length: int


class FastDataset:
    """Read-only stand-in for the parts of a pydicom Dataset that dicom.read_header uses."""

    def __init__(self, values: dict[str, Any], meta: dict[str, Any], pixel: _Raw | None) -> None:
        self._values = values
        self.file_meta = meta
        self._pixel = pixel

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def __contains__(self, name: object) -> bool:
        if name == "PixelData":
            return self._pixel is not None
        return name in self._values

    def get_item(self, name: str, keep_deferred: bool = True) -> _Raw | None:
        return self._pixel if name == "PixelData" else None


def _text(raw: bytes) -> str | list[str] | None:
    if any(b >= 0x80 for b in raw):
        return None  # non-ASCII: let pydicom apply the character set
    s = raw.decode("ascii").rstrip("\0 ").lstrip(" ")
    parts = [p.strip() for p in s.split("\\")]
    return parts if len(parts) > 1 else parts[0]


def _skip_items(buf: bytes, pos: int) -> int | None:
    """Position after an undefined-length sequence starting at `pos` (its first item), or None."""
    while pos + 8 <= len(buf):
        group, elem, length = struct.unpack_from("<HHI", buf, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000):
            return None
        if length != _UNDEFINED:
            pos += length
            continue
        # Undefined-length item: elements up to the item delimiter.
        while True:
            if pos + 8 > len(buf):
                return None
            g, e = struct.unpack_from("<HH", buf, pos)
            if (g, e) == (0xFFFE, 0xE00D):
                pos += 8
                break
            nxt = _skip_element(buf, pos)
            if nxt is None:
                return None
            pos = nxt
    return None


def _skip_element(buf: bytes, pos: int) -> int | None:
    if pos + 8 > len(buf):
        return None
    vr = buf[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            return None
        (length,) = struct.unpack_from("<I", buf, pos + 8)
        start = pos + 12
    else:
        (length,) = struct.unpack_from("<H", buf, pos + 6)
        start = pos + 8
    if length == _UNDEFINED:
        return _skip_items(buf, start) if vr == b"SQ" else None
    return start + length


def _mosaic(values: dict[str, Any]) -> bool:
    """A Siemens mosaic: its tiles need the CSA header, which pydicom and nibabel read."""
    image_type = values.get("ImageType", "")
    return "MOSAIC" in ([image_type] if isinstance(image_type, str) else image_type)


def _element(buf: bytes, pos: int) -> tuple[int, bytes, int, int] | None:
    """(tag, VR, value length, value start) of the explicit-VR element at `pos`, or None."""
    n = len(buf)
    group, elem = struct.unpack_from("<HH", buf, pos)
    vr = buf[pos + 4 : pos + 6]
    if not (vr[:1].isalpha() and vr[1:].isalpha() and vr.isupper()):
        return None
    if vr in _LONG_VRS:
        if pos + 12 > n:
            return None
        return (group << 16) | elem, vr, struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
    return (group << 16) | elem, vr, struct.unpack_from("<H", buf, pos + 6)[0], pos + 8


def _value(vr: bytes, raw: bytes) -> Any:
    """A wanted element's value: int or list of ints (US), float (FD), text; None to refuse the file."""
    if vr == b"US":
        nums = struct.unpack(f"<{len(raw) // 2}H", raw[: len(raw) // 2 * 2])
        return nums[0] if len(nums) == 1 else list(nums)
    if vr == b"FD":
        return struct.unpack("<d", raw)[0] if len(raw) == 8 else None
    if vr in (b"SQ", b"OB", b"OW", b"UN"):
        return None
    return _text(raw)


def _store(tag: int, vr: bytes, raw: bytes, meta: dict[str, Any], values: dict[str, Any]) -> bool:
    """Keep a file-meta or wanted element's value; False when the file needs pydicom."""
    if tag >> 16 == 0x0002:
        if tag in (0x00020002, 0x00020010):
            v = _text(raw)
            if not isinstance(v, str):
                return False
            meta["MediaStorageSOPClassUID" if tag == 0x00020002 else "TransferSyntaxUID"] = v
        return True
    if tag in WANTED:
        v = _value(vr, raw)
        if v is None:
            return False
        if v != "":
            values[WANTED[tag]] = v
    return True


def read_fast(path: Path) -> FastDataset | None:
    """Header of a plain explicit-VR-little-endian Part 10 file, or None to use pydicom."""
    try:
        with open(path, "rb") as f:
            buf = f.read(_HEAD_BYTES)
    except OSError:
        return None
    if len(buf) < 140 or buf[128:132] != b"DICM":
        return None
    meta: dict[str, Any] = {}
    values: dict[str, Any] = {}
    pos = 132
    while pos + 8 <= len(buf):
        el = _element(buf, pos)
        if el is None:
            return None
        tag, vr, length, start = el
        if tag >> 16 != 0x0002 and meta.get("TransferSyntaxUID") != EXPLICIT_LE:
            return None
        if tag == _PIXEL_DATA:
            if length == _UNDEFINED or vr not in (b"OW", b"OB") or _mosaic(values):
                return None
            return FastDataset(values, meta, _Raw(value_tell=start, length=length))
        if tag in _REFUSE or (length == _UNDEFINED and vr != b"SQ"):
            return None
        if length == _UNDEFINED:
            nxt = _skip_items(buf, start)
            if nxt is None:
                return None
            pos = nxt
            continue
        end = start + length
        if end > len(buf) or not _store(tag, vr, buf[start:end], meta, values):
            return None
        pos = end
    return None
