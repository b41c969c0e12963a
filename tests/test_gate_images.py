"""Reading real and synthetic folders into gate images (pipeline/gate/images.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.errors import DatasetError
from pipeline.gate.config import GateConfig
from pipeline.gate.images import load_gate_set, resize_images
from pipeline.manifest import write_manifest


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Small tensors gain nothing from threads, and on a busy 2-core machine OpenMP spin-waits
    make 2 threads ~8x slower than 1; restored afterwards so other modules keep their setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.float32), np.diag([2.0, 2.0, 4.0, 1.0])), path)


def _ct_head(n_z: int = 6, empty: tuple[int, ...] = ()) -> np.ndarray:
    """A CT cylinder: air -1000 HU, body 40 HU with a 1000 HU rim; slices in `empty` are air."""
    x, y = np.meshgrid(np.arange(32) - 15.5, np.arange(32) - 15.5, indexing="ij")
    r = np.sqrt(x**2 + y**2)
    sl = np.where(r < 12, 40.0, -1000.0)
    sl[(r >= 10) & (r < 12)] = 1000.0
    vol = np.repeat(sl[..., None], n_z, axis=2)
    for z in empty:
        vol[..., z] = -1000.0
    return vol


def test_plain_ct_folder_is_windowed_and_empty_slices_dropped(tmp_path: Path) -> None:
    _save(tmp_path / "a.nii.gz", _ct_head(6, empty=(0, 5)))
    _save(tmp_path / "sub" / "b.nii", _ct_head(4))
    s = load_gate_set(tmp_path, GateConfig(gate_size=32), "synthetic")
    assert [it.path for it in s.items] == ["a.nii.gz", "sub/b.nii"]
    assert all(it.modality == "CT" and it.kind == "volume" for it in s.items)
    assert s.item_of.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert s.slice_of.tolist() == [1, 2, 3, 4, 0, 1, 2, 3]
    # HU window [-1000, 1000] -> [-1, 1]: air -1, body 40 HU -> 0.04, rim 1000 HU -> 1
    img = s.images[0, 0]
    assert float(img[0, 0]) == pytest.approx(-1.0)
    assert float(img[16, 16]) == pytest.approx(0.04, abs=1e-3)
    assert float(img.max()) == pytest.approx(1.0, abs=1e-3)


def test_mr_is_scaled_by_percentiles_and_volumes_resized(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vol = np.zeros((40, 40, 4), np.float32)
    vol[8:32, 8:32] = rng.uniform(100, 900, (24, 24, 4))
    _save(tmp_path / "a" / "mr.nii.gz", vol)
    s = load_gate_set(tmp_path / "a", GateConfig(gate_size=40), "synthetic")
    assert s.items[0].modality == "MR"
    assert type(s.images) is torch.Tensor
    # body percentiles 0.5 / 99.5 -> -1 / +1; values clipped
    assert float(s.images.min()) == -1.0 and float(s.images.max()) == pytest.approx(1.0, abs=1e-3)
    inside = s.images[:, 0, 8:32, 8:32]
    assert float((inside > -1).float().mean()) > 0.98
    # a non-square volume is padded with air and resized to gate_size
    _save(tmp_path / "b" / "mr.nii.gz", np.pad(vol, ((4, 4), (0, 0), (0, 0))))
    assert load_gate_set(tmp_path / "b", GateConfig(gate_size=32), "synthetic").images.shape == (4, 1, 32, 32)


def test_manifest_rows_choose_split_modality_and_class(tmp_path: Path) -> None:
    _save(tmp_path / "v" / "ct_train.nii.gz", _ct_head())
    _save(tmp_path / "v" / "ct_test.nii.gz", _ct_head())
    _save(tmp_path / "v" / "mr_train.nii.gz", _ct_head() + 1000.0)
    write_manifest(tmp_path, [
        {"path": "v/ct_train.nii.gz", "modality": "CT", "split": "train", "class": "round"},
        {"path": "v/ct_test.nii.gz", "modality": "CT", "split": "test", "class": "round"},
        {"path": "v/mr_train.nii.gz", "modality": "MR", "split": "train", "class": "necrotic"},
    ], ["path", "modality", "split", "class"])
    s = load_gate_set(tmp_path, GateConfig(gate_size=32), "real", modalities={"CT"})
    assert [it.path for it in s.items] == ["v/ct_train.nii.gz"]
    assert set(s.classes) == {"round"}
    everything = load_gate_set(tmp_path, GateConfig(gate_size=32, real_split=None), "real")
    assert len(everything.items) == 3 and everything.modalities == ["CT", "MR"]
    assert len(everything.content_sha256()) == 64


def test_patches_in_unit_range_are_taken_as_they_are(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(3):
        p = rng.uniform(-1, 1, (16, 16, 1)).astype(np.float32)
        _save(tmp_path / "patches" / f"p{i}.nii.gz", p)
        rows.append({"path": f"patches/p{i}.nii.gz", "class": "round", "modality": "CT", "synthetic": 1})
    np.save(tmp_path / "patches" / "p3.npy", rng.uniform(-1, 1, (16, 16)).astype(np.float32))
    rows.append({"path": "patches/p3.npy", "class": "healthy", "modality": "CT", "synthetic": 1})
    write_manifest(tmp_path, rows, ["path", "class", "modality", "synthetic"])
    s = load_gate_set(tmp_path, GateConfig(), "synthetic")
    assert s.images.shape == (4, 1, 16, 16)  # native patch size kept
    assert all(it.kind == "patch" for it in s.items)
    back = np.asarray(nib.load(tmp_path / "patches" / "p0.nii.gz").dataobj)[..., 0]  # type: ignore[attr-defined]
    assert np.allclose(s.images[0, 0].numpy(), back)


def test_patch_in_hounsfield_units_is_windowed(tmp_path: Path) -> None:
    _save(tmp_path / "p.nii.gz", np.full((16, 16, 1), 500.0))
    s = load_gate_set(tmp_path, GateConfig(modality="CT"), "synthetic")
    assert torch.allclose(s.images, torch.full((1, 1, 16, 16), 0.5))


def test_max_slices_takes_a_seeded_subset(tmp_path: Path) -> None:
    for i in range(4):
        _save(tmp_path / f"v{i}.nii.gz", _ct_head(8))
    a = load_gate_set(tmp_path, GateConfig(gate_size=32, max_slices=10), "real")
    b = load_gate_set(tmp_path, GateConfig(gate_size=32, max_slices=10), "real")
    assert len(a.item_of) == 10 and np.array_equal(a.slice_of, b.slice_of) and np.array_equal(a.item_of, b.item_of)


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is not a folder"):
        load_gate_set(tmp_path / "missing", GateConfig(), "real")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither a manifest.csv nor NIfTI"):
        load_gate_set(tmp_path / "empty", GateConfig(), "real")
    write_manifest(tmp_path / "listed", [{"path": "gone.nii.gz"}], ["path"])
    with pytest.raises(DatasetError, match="lists gone.nii.gz but the file is missing"):
        load_gate_set(tmp_path / "listed", GateConfig(), "synthetic")
    _save(tmp_path / "air" / "air.nii.gz", np.full((16, 16, 3), -1000.0))
    with pytest.raises(DatasetError, match="no synthetic item has a scored slice"):
        load_gate_set(tmp_path / "air", GateConfig(modality="CT"), "synthetic")
    nan = np.zeros((8, 8, 2))
    nan[0, 0, 0] = np.nan
    _save(tmp_path / "nan" / "nan.nii.gz", nan)
    with pytest.raises(DatasetError, match="NaN"):
        load_gate_set(tmp_path / "nan", GateConfig(), "synthetic")
    write_manifest(tmp_path / "mod", [{"path": "a.nii.gz", "modality": "PET"}], ["path", "modality"])
    _save(tmp_path / "mod" / "a.nii.gz", _ct_head())
    with pytest.raises(DatasetError, match="'PET' is not one of CT, MR"):
        load_gate_set(tmp_path / "mod", GateConfig(), "synthetic")


def test_resize_images() -> None:
    x = torch.rand(3, 1, 40, 40) * 2 - 1
    assert resize_images(x, 40) is x
    y = resize_images(x, 20)
    assert y.shape == (3, 1, 20, 20) and float(y.abs().max()) <= 1.0


def test_normalised_3d_patches_are_sliced_as_they_are(tmp_path: Path) -> None:
    cube = np.random.default_rng(2).uniform(-1, 1, (16, 16, 16)).astype(np.float32)
    _save(tmp_path / "c.nii.gz", cube)
    s = load_gate_set(tmp_path, GateConfig(), "synthetic")
    assert s.images.shape == (16, 1, 16, 16) and s.items[0].kind == "patch"
    assert np.allclose(s.images[3, 0].numpy(), cube[..., 3])
