"""Patch extraction (pipeline/patches.py): lesion-centred and healthy patches, determinism, folders."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_tumor_gan_data import make_ingest_folder

from pipeline.errors import PatchError
from pipeline.manifest import read_manifest, sha256_file
from pipeline.patches import (
    HEALTHY,
    _crop,
    extract_patches,
    load_patches,
    read_patch_folder,
    write_patch_folder,
)


@pytest.fixture(scope="module")
def ingest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ingest_folder(tmp_path_factory.mktemp("ingest"), n_subjects=4, size=48, depth=8, seed=1)


def test_crop_pads_outside_the_array() -> None:
    a = np.arange(9).reshape(3, 3)
    assert _crop(a, [-1, 1], [3, 3], -5).tolist() == [[-5, -5, -5], [1, 2, -5], [4, 5, -5]]


def test_lesion_patches_are_centred_and_healthy_patches_hold_no_lesion(ingest_dir: Path) -> None:
    ps = extract_patches([ingest_dir], patch_size=16, seed=0, neighbours=1, healthy_per_volume=2)
    counts = ps.counts()
    assert set(counts) == {"round", "necrotic", HEALTHY}
    assert counts[HEALTHY] == 8
    assert ps.images.shape[1:] == (16, 16) and ps.images.dtype == np.float32
    assert ps.images.min() >= -1.0 and ps.images.max() <= 1.0
    for img, mask, row in zip(ps.images, ps.masks, ps.rows, strict=True):
        if row["class"] == HEALTHY:
            assert mask.sum() == 0
        else:
            assert mask[8, 8] == 1, "lesion patches are centred on the lesion"
            assert img[8, 8] > img[0, 0] or row["class"] == "necrotic"
        assert row["synthetic"] == "0" and len(row["source_sha256"]) == 64


def test_largest_lesion_slice_comes_first_with_its_neighbours(ingest_dir: Path) -> None:
    ps = extract_patches([ingest_dir], patch_size=16, neighbours=1, healthy_per_volume=0)
    rows = read_manifest(ingest_dir)
    lab = np.asarray(nib.load(ingest_dir / rows[0]["label_path"]).dataobj) > 0
    z0 = int(np.argmax(lab.sum(axis=(0, 1))))
    zs = sorted(int(r["centre"].split("x")[2]) for r in ps.rows if r["source_sha256"] == rows[0]["sha256"])
    assert z0 in zs and all(abs(z - z0) <= 1 for z in zs)


def test_extraction_is_deterministic_and_seeded(ingest_dir: Path) -> None:
    a = extract_patches([ingest_dir], patch_size=16, seed=3)
    b = extract_patches([ingest_dir], patch_size=16, seed=3)
    c = extract_patches([ingest_dir], patch_size=16, seed=4)
    assert np.array_equal(a.images, b.images) and a.rows == b.rows
    centres = lambda ps: [r["centre"] for r in ps.rows if r["class"] == HEALTHY]  # noqa: E731
    assert centres(a) != centres(c)


def test_3d_patches_are_cubes(ingest_dir: Path) -> None:
    ps = extract_patches([ingest_dir], patch_size=8, dims=3, healthy_per_volume=1)
    assert ps.images.shape[1:] == (8, 8, 8)
    lesion = [m for m, r in zip(ps.masks, ps.rows, strict=True) if r["class"] != HEALTHY]
    assert all(m[4, 4, 4] == 1 for m in lesion)


def test_patch_folder_round_trip_is_byte_identical(ingest_dir: Path, tmp_path: Path) -> None:
    ps = extract_patches([ingest_dir], patch_size=16, seed=0)
    m1 = write_patch_folder(ps, tmp_path / "a")
    m2 = write_patch_folder(extract_patches([ingest_dir], patch_size=16, seed=0), tmp_path / "b")
    assert sha256_file(m1) == sha256_file(m2)
    rows = read_manifest(m1)
    assert set(rows[0]) >= {"path", "label_path", "class", "subject_id", "split", "modality", "synthetic", "source_sha256", "centre"}
    for r in rows:
        assert sha256_file(tmp_path / "a" / r["path"]) == sha256_file(tmp_path / "b" / r["path"])
    back = read_patch_folder(tmp_path / "a")
    assert back.images.shape == ps.images.shape
    assert sorted(back.counts().items()) == sorted(ps.counts().items())
    # The patch affine places the patch where it was cut from in the source volume.
    r = next(r for r in rows if r["class"] != HEALTHY)
    src = next(s for s in read_manifest(ingest_dir) if s["sha256"] == r["source_sha256"])
    cx, cy, cz = (int(v) for v in r["centre"].split("x"))
    patch_aff = nib.load(tmp_path / "a" / r["path"]).affine
    src_aff = nib.load(ingest_dir / src["path"]).affine
    assert np.allclose(patch_aff @ [8, 8, 0, 1], src_aff @ [cx, cy, cz, 1])
    # load_patches reads patch folders as they are.
    assert len(load_patches([tmp_path / "a"])) == len(ps)


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PatchError, match="no manifest.csv"):
        extract_patches([tmp_path])
    with pytest.raises(PatchError, match="dims"):
        extract_patches([tmp_path], dims=4)
    with pytest.raises(PatchError, match="no manifest.csv"):
        read_patch_folder(tmp_path)


def test_healthy_patches_sit_in_brain_below_the_skull(ingest_dir: Path) -> None:
    ps = extract_patches([ingest_dir], patch_size=8, healthy_per_volume=3, brain_margin_mm=12.0)
    rows = {r["sha256"]: r for r in read_manifest(ingest_dir)}
    for r in (r for r in ps.rows if r["class"] == HEALTHY):
        vol = np.asarray(nib.load(ingest_dir / rows[r["source_sha256"]]["path"]).dataobj)
        x, y, z = (int(v) for v in r["centre"].split("x"))
        # 12 mm = 6 voxels of 2 mm: no air within 5 voxels (10 mm) in-plane of the centre
        xx, yy = np.mgrid[-5:6, -5:6]
        disc = xx**2 + yy**2 <= 25
        assert (vol[x - 5 : x + 6, y - 5 : y + 6, z][disc] > -500).all()
    assert HEALTHY not in extract_patches([ingest_dir], patch_size=8, brain_margin_mm=1000.0).counts()
