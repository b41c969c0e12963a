"""Known-answer tests of pipeline.preprocess: HU window, MR percentile scaling, body masks."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.preprocess as pp


def test_doctests() -> None:
    assert doctest.testmod(pp, raise_on_error=False).failed == 0


def test_ct_window_known_values() -> None:
    hu = np.array([-1024.0, -1000.0, -500.0, 0.0, 1000.0, 3000.0])
    assert pp.ct_to_unit(hu, (-1000, 1000)).tolist() == [-1.0, -1.0, -0.5, 0.0, 1.0, 1.0]
    assert pp.ct_to_unit(np.array([-160.0, 240.0]), (-160, 240)).tolist() == [-1.0, 1.0]


@settings(max_examples=40, deadline=None)
@given(
    lo=st.floats(-1500, 0),
    width=st.floats(10, 4000),
    frac=st.lists(st.floats(0, 1), min_size=1, max_size=20),
)
def test_ct_round_trip_inside_window(lo: float, width: float, frac: list[float]) -> None:
    window = (lo, lo + width)
    hu = np.array([lo + f * width for f in frac])
    back = pp.unit_to_ct(pp.ct_to_unit(hu, window), window)
    np.testing.assert_allclose(back, hu, atol=1e-3 * width)


def test_ct_round_trip_clips_outside_window() -> None:
    back = pp.unit_to_ct(pp.ct_to_unit(np.array([-3000.0, 2500.0]), (-1000, 1000)), (-1000, 1000))
    assert back.tolist() == [-1000.0, 1000.0]


def test_bad_window_is_refused() -> None:
    with pytest.raises(ValueError, match="high > low"):
        pp.ct_to_unit(np.zeros(3), (100, 100))


def _head(size: int = 24, value: float = 500.0, background: float = 0.0) -> np.ndarray:
    """A ball of `value` in a (size, size, size//2) box of `background`."""
    x, y, z = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in (size, size, size // 2)), indexing="ij")
    vol = np.full(x.shape, background, np.float32)
    vol[x**2 + y**2 + (2 * z) ** 2 < (0.4 * size) ** 2] = value
    return vol


def test_mr_landmarks_and_round_trip() -> None:
    rng = np.random.default_rng(0)
    vol = _head() * rng.uniform(0.5, 1.5, (24, 24, 12)).astype(np.float32)
    mask = vol > 0
    lo, hi = pp.mr_landmarks(vol, mask, (0.5, 99.5))
    np.testing.assert_allclose((lo, hi), np.percentile(vol[mask], [0.5, 99.5]))
    unit = pp.mr_to_unit(vol, (lo, hi))
    assert unit.min() == -1.0 and unit.max() == 1.0 and unit.dtype == np.float32
    inside = mask & (vol >= lo) & (vol <= hi)
    np.testing.assert_allclose(pp.unit_to_mr(unit, (lo, hi))[inside], vol[inside], rtol=1e-4)


def test_mr_scaling_is_invariant_to_scanner_gain() -> None:
    vol = _head() * np.linspace(0.5, 1.5, 24)[:, None, None].astype(np.float32)
    a = pp.mr_to_unit(vol, pp.mr_landmarks(vol))
    b = pp.mr_to_unit(3.7 * vol, pp.mr_landmarks(3.7 * vol))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_constant_mr_volume_still_invertible() -> None:
    lo, hi = pp.mr_landmarks(np.full((4, 4, 4), 7.0))
    assert hi > lo


def test_to_unit_dispatches_and_refuses_unknown_modality() -> None:
    vol = _head(value=40.0, background=-1000.0)
    unit, info = pp.to_unit(vol, "CT")
    assert info == {"modality": "CT", "hu_window": [-1000.0, 1000.0]}
    assert unit.min() == -1.0
    _, info = pp.to_unit(_head(), "MR")
    assert set(info) == {"modality", "mr_landmarks"}
    with pytest.raises(ValueError, match="CT, MR"):
        pp.to_unit(vol, "PET")  # type: ignore[arg-type]


def test_to_unit_mr_uses_the_given_foreground() -> None:
    """A caller's body mask picks the MR landmarks; without one, to_unit computes the same mask itself."""
    v = np.zeros((6, 6, 2))
    v[1:5, 1:5] = np.arange(16, dtype=float).reshape(4, 4)[..., None] * 10 + 100  # body 100..250, air 0
    own, params = pp.to_unit(v, "MR", mr_percentiles=(0.0, 100.0))
    given_mask, same = pp.to_unit(v, "MR", mr_percentiles=(0.0, 100.0), mask=pp.body_mask(v, "MR"))
    assert params == same == {"modality": "MR", "mr_landmarks": [100.0, 250.0]}
    assert np.array_equal(own, given_mask)
    inner = np.zeros_like(v, dtype=bool)
    inner[2:4, 2:4] = True  # values 150..200
    assert pp.to_unit(v, "MR", mr_percentiles=(0.0, 100.0), mask=inner)[1]["mr_landmarks"] == [150.0, 200.0]


def test_body_mask_known_answer() -> None:
    ct = _head(value=40.0, background=-1000.0)
    truth = ct > -1000
    # a hole (air pocket) inside the body and a separate blob (the table) outside
    ct[10:13, 10:13, 5:7] = -1000.0
    ct[0:2, 0:2, :] = 40.0
    mask = pp.body_mask(ct, "CT")
    np.testing.assert_array_equal(mask, truth)


def test_body_mask_mr_and_empty() -> None:
    mr = _head(value=600.0, background=0.0) + 5.0
    assert (pp.body_mask(mr, "MR") == (mr > 5.0)).all()
    assert not pp.body_mask(np.full((8, 8, 4), -1000.0), "CT").any()
    with pytest.raises(ValueError, match="2-D slice or a 3-D volume"):
        pp.body_mask(np.zeros(4), "CT")


def test_foreground_fraction() -> None:
    m = np.zeros((4, 4, 3), bool)
    m[:2, :, 1] = True
    m[:, :, 2] = True
    assert pp.foreground_fraction(m).tolist() == [0.0, 0.5, 1.0]
