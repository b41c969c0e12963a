"""Slice geometry of a DICOM series: validate it, sort it and turn it into a NIfTI affine.

Pure numpy, no file access: `stack_geometry` gets the ImagePositionPatient of every slice,
the shared ImageOrientationPatient and PixelSpacing (DICOM PS3.3 C.7.6.2) and either
returns the slice order and the RAS+ affine of the stacked volume or raises GeometryError
saying what is wrong (duplicates, missing slices, uneven spacing, gantry tilt). ingest's
dicom module stacks pixel data in the returned order; nothing here knows about patients.

Axes convention: the stacked array is indexed [i, j, k] = [column, row, slice], i.e. the
transpose of pydicom's (Rows, Columns) slice arrays, so that the affine columns are
(row direction * column spacing, column direction * row spacing, slice step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipeline.errors import GeometryError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM patient coordinates are LPS; NIfTI world coordinates are RAS."""

MIN_SLICES = 3
"""Fewer slices than this is a 2-D image or a scout, not a volume."""

DUPLICATE_TOL_MM = 0.01
"""Two slices closer than this along the normal sit at the same position."""

ORIENTATION_TOL = 1e-3
"""Direction cosines that differ by less than this are the same orientation."""

TILT_TOL_DEG = 0.05
"""Slice stacks sheared by more than this angle are gantry-tilted."""


def spacing_tolerance(step: float) -> float:
    """Largest deviation (mm) of one slice step from the nominal one still called even.

    Positions in real headers are rounded (often to 0.1 mm or 1e-3 mm), so the tolerance
    is relative (5 %) with a floor of 0.05 mm.

    >>> spacing_tolerance(1.0)
    0.05
    >>> spacing_tolerance(5.0)
    0.25
    """
    return max(0.05, 0.05 * abs(step))


@dataclass(frozen=True)
class SeriesGeometry:
    """Validated geometry of a slice stack.

    order: indices into the given slices, sorted along the slice normal (ascending).
    affine: 4x4 RAS+ affine of the stacked array [i, j, k] (mm).
    spacing: (column spacing, row spacing, slice step) in mm along i, j, k.
    """

    order: npt.NDArray[np.intp]
    affine: npt.NDArray[np.float64]
    spacing: tuple[float, float, float]


def orientation_key(iop: npt.ArrayLike, decimals: int = 3) -> tuple[float, ...]:
    """ImageOrientationPatient rounded so that equal orientations compare equal.

    >>> orientation_key([1, 0, 0, 0, 1.00001, 0])
    (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    """
    return tuple(float(round(v, decimals)) + 0.0 for v in np.asarray(iop, dtype=float).ravel())


def slice_normal(iop: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Unit normal (LPS) of slices with ImageOrientationPatient `iop` (6 direction cosines).

    >>> slice_normal([1, 0, 0, 0, 1, 0]).tolist()
    [0.0, 0.0, 1.0]
    """
    row, col = _directions(iop)
    n = np.cross(row, col)
    return np.asarray(n / np.linalg.norm(n), dtype=np.float64)


def _directions(iop: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    v = np.asarray(iop, dtype=np.float64).ravel()
    if v.shape != (6,) or not np.all(np.isfinite(v)):
        raise GeometryError("ImageOrientationPatient is not 6 finite numbers")
    row, col = v[:3], v[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if nr < 0.5 or nc < 0.5:
        raise GeometryError("ImageOrientationPatient has a zero direction")
    row, col = row / nr, col / nc
    if abs(float(row @ col)) > ORIENTATION_TOL * 10:
        raise GeometryError("ImageOrientationPatient row and column directions are not orthogonal")
    return row, col


def _fmt(x: float) -> str:
    """Millimetres for messages: one decimal unless more are needed."""
    return f"{x:.1f}" if abs(x * 10 - round(x * 10)) < 1e-6 else f"{x:.2f}"


def position_groups(dist: npt.ArrayLike) -> list[list[int]]:
    """Indices of slices grouped by position along the normal (closer than DUPLICATE_TOL_MM),
    groups in ascending position.

    >>> position_groups([2.0, 0.0, 2.001, 0.0])
    [[1, 3], [0, 2]]
    """
    d = np.asarray(dist, dtype=np.float64)
    order = np.argsort(d, kind="stable")
    groups: list[list[int]] = []
    for i in order.tolist():
        if groups and d[i] - d[groups[-1][0]] < DUPLICATE_TOL_MM:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def contiguous_runs(dist: npt.ArrayLike) -> list[tuple[list[int], int]] | None:
    """Split a stack with missing slices into its contiguous runs.

    `dist` is each slice's position along the normal (mm). When every step is a whole
    multiple of the smallest one (within `spacing_tolerance`) and some step is more than
    one, returns [(indices of the run in ascending order, slices missing before it), ...];
    otherwise None (an even stack, or uneven steps that no gap explains: stack_geometry
    then accepts or refuses the whole stack).

    >>> contiguous_runs([0.0, 2.0, 4.0, 10.0, 12.0, 14.0])
    [([0, 1, 2], 0), ([3, 4, 5], 2)]
    >>> contiguous_runs([0.0, 2.0, 4.0]) is None, contiguous_runs([0.0, 2.0, 5.0]) is None
    (True, True)
    """
    d = np.asarray(dist, dtype=np.float64)
    if d.size < 2 or not np.all(np.isfinite(d)):
        return None
    order = np.argsort(d, kind="stable")
    steps = np.diff(d[order])
    lo = float(steps.min())
    if lo < DUPLICATE_TOL_MM:
        return None
    ratios = steps / lo
    whole = np.round(ratios)
    if np.any(np.abs(ratios - whole) > spacing_tolerance(lo) / lo) or np.all(whole == 1):
        return None
    runs: list[tuple[list[int], int]] = [([int(order[0])], 0)]
    for i, w in enumerate(whole.tolist()):
        if w > 1:
            runs.append(([], int(w) - 1))
        runs[-1][0].append(int(order[i + 1]))
    return runs


def stack_geometry(
    positions: npt.ArrayLike, iop: npt.ArrayLike, pixel_spacing: tuple[float, float]
) -> SeriesGeometry:
    """Validate and sort slices; return the order and the RAS+ affine of the stack.

    Args:
        positions: (N, 3) ImagePositionPatient of each slice (mm, LPS).
        iop: ImageOrientationPatient shared by all slices (6 direction cosines).
        pixel_spacing: DICOM PixelSpacing (row spacing, column spacing) in mm.

    Raises GeometryError (message without series prefix) on fewer than MIN_SLICES slices,
    duplicate positions, uneven spacing or missing slices, and gantry tilt.

    >>> g = stack_geometry([[0, 0, 2.0], [0, 0, 0.0], [0, 0, 1.0]], [1, 0, 0, 0, 1, 0], (0.5, 0.7))
    >>> g.order.tolist(), g.spacing
    ([1, 2, 0], (0.7, 0.5, 1.0))
    >>> g.affine[:2, :2].tolist()  # LPS -> RAS: x and y flip sign
    [[-0.7, 0.0], [0.0, -0.5]]
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    n_slices = pos.shape[0]
    if not np.all(np.isfinite(pos)):
        raise GeometryError("ImagePositionPatient is not finite on every slice")
    row_sp, col_sp = (float(pixel_spacing[0]), float(pixel_spacing[1]))
    if not (math.isfinite(row_sp) and math.isfinite(col_sp)) or row_sp <= 0 or col_sp <= 0:
        raise GeometryError(f"pixel spacing {row_sp} x {col_sp} mm is not positive")
    if n_slices < MIN_SLICES:
        raise GeometryError(
            f"{n_slices} slice{'s' if n_slices != 1 else ''} only; a volume needs at least {MIN_SLICES}"
        )
    row, col = _directions(iop)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)

    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    d = dist[order]
    steps = np.diff(d)

    dup = steps < DUPLICATE_TOL_MM
    if dup.any():
        first = float(d[1:][dup][0])
        raise GeometryError(
            f"{int(dup.sum())} slice{'s' if dup.sum() > 1 else ''} duplicate another slice's position "
            f"(first at {_fmt(first)} mm along the normal); remove duplicates or split the acquisitions"
        )

    lo, hi = float(steps.min()), float(steps.max())
    if hi - lo > spacing_tolerance(lo):
        ratios = steps / lo
        near_int = np.abs(ratios - np.round(ratios)) <= spacing_tolerance(lo) / lo
        if near_int.all():
            gaps = np.flatnonzero(np.round(ratios) > 1)
            missing = int(np.sum(np.round(ratios[gaps]) - 1))
            g0 = int(gaps[0])
            where = f"between positions {_fmt(float(d[g0]))} and {_fmt(float(d[g0 + 1]))}"
            if len(gaps) > 1:
                where += f" and {len(gaps) - 1} more gap{'s' if len(gaps) > 2 else ''}"
            detail = f"{missing} slice{'s' if missing > 1 else ''} missing {where}"
        else:
            g0 = int(np.argmax(np.abs(steps - np.median(steps))))
            detail = f"uneven steps, e.g. between positions {_fmt(float(d[g0]))} and {_fmt(float(d[g0 + 1]))}"
        raise GeometryError(f"slice spacing varies ({_fmt(lo)} to {_fmt(hi)} mm, {detail})")

    # Gantry tilt: successive positions move off the normal (a sheared stack).
    span = pos[order[-1]] - pos[order[0]]
    along = float(span @ normal)
    inplane = span - along * normal
    tilt = math.degrees(math.atan2(float(np.linalg.norm(inplane)), abs(along)))
    if tilt > TILT_TOL_DEG:
        raise GeometryError(
            f"slices are sheared by {tilt:.1f} degrees (gantry tilt); re-slice to an orthogonal grid first"
        )
    # Positions must lie on one line (every slice, not only the ends).
    fitted = pos[order[0]] + np.outer(d - d[0], normal)
    resid = float(np.max(np.linalg.norm(pos[order] - fitted, axis=1)))
    if resid > max(0.1, 0.05 * min(row_sp, col_sp)):
        raise GeometryError(f"slice positions do not lie on one line (off by up to {_fmt(resid)} mm)")

    step = (d[-1] - d[0]) / (n_slices - 1)
    lps = np.eye(4)
    lps[:3, 0] = row * col_sp
    lps[:3, 1] = col * row_sp
    lps[:3, 2] = normal * step
    lps[:3, 3] = pos[order[0]]
    affine = LPS_TO_RAS @ lps
    return SeriesGeometry(order=order, affine=affine, spacing=(col_sp, row_sp, float(step)))
