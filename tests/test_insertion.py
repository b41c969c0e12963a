"""Lesion insertion (pipeline/insertion.py) and the gate's seam check (pipeline/gate/seam.py).

Known answers on phantom CTs: the inserted lesion lies in brain, away from bone and from the
host's lesion; everything away from it is the host's voxels; same seed, same bytes; a
feathered insertion has the seam score of real lesions, and the gate rejects a planted seam
(a lesion box pasted with a background 22 HU off the host's) by the batch check and per item.
The lesion patches are real phantom lesions cut as sample-tumors would write them (the GAN
is not needed to test the placement and the blend).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pipeline import insertion as I
from pipeline.errors import PatchError
from pipeline.manifest import read_manifest, sha256_file, write_manifest
from pipeline.phantoms import make_subject, render_ct, write_nifti

WINDOW = (-100.0, 200.0)


@pytest.fixture(scope="module")
def cohort() -> dict:
    subs = [make_subject(0, i, 64, "necrotic" if i % 3 == 0 else "round") for i in range(9)]
    cts = [render_ct(s, 0).astype(np.float32) for s in subs]
    masks = [s.tumor_mask for s in subs]
    real = [p for h, m in zip(cts, masks, strict=True) for p in I.inserted_patches(h, m, 32, 2, WINDOW, value=1)]
    src = I.inserted_patches(cts[0], masks[0], 32, 0, WINDOW, value=1)[0]
    return {"subs": subs, "cts": cts, "masks": masks, "real": real, "src": src, "stats": I.lesion_stats(masks),
            "spacing": subs[0].spacing}


def _insert(c: dict, k: int, seed: int, opts: I.InsertionOptions | None = None, offset: float = 0.0) -> I.Inserted:
    img, msk, _ = c["src"]
    return I.insert_lesion(c["cts"][k], c["masks"][k], c["spacing"], img + offset * (msk == 0), msk, c["stats"],
                           np.random.default_rng(seed), opts)


def test_lesion_lies_in_brain_away_from_bone_and_host_lesion(cohort: dict) -> None:
    opts = I.InsertionOptions()
    for k in (1, 2, 4):
        ins = _insert(cohort, k, k, opts)
        new = ins.label == I.INSERTED_LABEL
        assert new.sum() > 0
        np.testing.assert_array_equal(ins.label == I.HOST_LABEL, cohort["masks"][k] > 0)  # host lesion kept and labelled
        hu = cohort["cts"][k]
        sp = cohort["spacing"]
        dist_bone = ndimage.distance_transform_edt(hu <= I.BONE_HU, sampling=sp)
        assert dist_bone[new].min() >= opts.skull_margin_mm - max(sp)  # within a voxel of the margin
        dist_host = ndimage.distance_transform_edt(cohort["masks"][k] == 0, sampling=sp)
        assert dist_host[new].min() >= opts.lesion_margin_mm - max(sp)
        inside = ndimage.binary_fill_holes(hu > I.BONE_HU, structure=np.ones((3, 3, 1)))
        assert inside[new].all()
        # away from the lesion, the voxels are the host's (rounded to int16 HU)
        near = ndimage.binary_dilation(new, iterations=8)
        np.testing.assert_array_equal(ins.volume[~near], np.rint(hu[~near]).astype(np.int16))
        assert abs(len(np.flatnonzero(new.any(axis=(0, 1)))) - (2 * ins.placement["half_z"] + 1)) <= 2


def test_same_seed_same_volume_other_seed_other_place(cohort: dict) -> None:
    a, b, c = _insert(cohort, 1, 7), _insert(cohort, 1, 7), _insert(cohort, 1, 8)
    np.testing.assert_array_equal(a.volume, b.volume)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.placement == b.placement
    assert a.placement["centre"] != c.placement["centre"]


def test_no_room_is_a_clear_error(cohort: dict) -> None:
    with pytest.raises(PatchError, match="no brain voxel"):
        _insert(cohort, 1, 0, I.InsertionOptions(skull_margin_mm=200.0))


def test_placed_where_the_real_lesion_sits_in_its_brain(cohort: dict) -> None:
    """With positions in the stats, the inserted lesion's centre lies near the drawn real lesion's
    place carried into the host (lesion_position, on either side), not anywhere in the brain;
    a place no fitting centre is near is a clear error (the folder loop then tries another host)."""
    c = cohort
    sp = np.asarray(c["spacing"], np.float64)
    opts = I.InsertionOptions()
    real = [(k, I.lesion_position(c["cts"][k], c["masks"][k])) for k in (0, 3, 6)]  # the necrotic subjects
    near, anywhere = [], []
    for k in (1, 2, 4, 5):
        lo, hi = I.brain_box(c["cts"][k])
        for j, (src, pos) in enumerate(real):
            stats = I.lesion_stats([c["masks"][src]], [pos])
            img, msk, _ = c["src"]
            for place, o in ((near, opts), (anywhere, I.InsertionOptions(position_tolerance_mm=0.0))):
                try:
                    ins = I.insert_lesion(c["cts"][k], c["masks"][k], c["spacing"], img, msk, stats, np.random.default_rng(j), o)
                except PatchError as exc:
                    # this host has no room for so large a lesion at all, or none near the real place
                    assert "no brain voxel" in str(exc) or (o is opts and "of the real lesion's place" in str(exc))
                    continue
                centre = np.asarray(ins.placement["centre"], np.float64)
                sides = [np.asarray(pos), np.asarray(pos) * [-1, 1, 1] + [1, 0, 0]]
                place.append(min(float(np.linalg.norm((centre - (lo + u * (hi - lo))) * sp)) for u in sides))
    assert len(near) >= 4
    assert max(near) <= 2 * opts.position_tolerance_mm + max(sp)
    assert np.median(anywhere) > 2 * np.median(near)  # without it, the lesion goes anywhere in the brain
    with pytest.raises(PatchError, match="of the real lesion's place"):
        stats = I.lesion_stats([c["masks"][0]], [(0.0, 0.0, 0.0)])  # a corner of the box: no brain there
        I.insert_lesion(c["cts"][1], c["masks"][1], c["spacing"], c["src"][0], c["src"][1], stats, np.random.default_rng(0),
                        I.InsertionOptions(mirror=False))


def test_insert_lesions_sizes_and_places_from_the_class_lesions(cohort: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Necrotic insertions draw size and place from the real necrotic training lesions only (the
    round ones are smaller and elsewhere), and say so in the provenance."""
    import json

    real = _ingest_folder(cohort, tmp_path / "ingest", 9, n_train=9)
    lesions = _patch_folder(tmp_path / "samples", cohort["real"][:4], synthetic=True)
    I.insert_lesions(real, lesions, tmp_path / "ins", 4, "necrotic", seed=0)
    sizes = json.loads((tmp_path / "ins" / I.PROVENANCE_NAME).read_text())["calls"]["necrotic"]["lesion_sizes"]
    necrotic = [k for k in range(9) if k % 3 == 0]
    own = I.lesion_stats([cohort["masks"][k] for k in necrotic])
    assert sizes["of_class"] == "necrotic" and sizes["n_real_lesions"] == 3
    # 3 necrotic lesions are too few places (MIN_PLACE_LESIONS): the places are every lesion's
    assert sizes["places_of_class"] == "all" and len(sizes["positions"]) == 9
    assert sizes["area_voxels"] == [min(own.areas), max(own.areas)]
    assert min(own.areas) > max(I.lesion_stats([cohort["masks"][k] for k in range(9) if k % 3]).areas)  # round ones: smaller
    for r in read_manifest(tmp_path / "ins"):
        label = np.asarray(I._load(tmp_path / "ins" / r["label_path"]).dataobj)
        area = (label == I.INSERTED_LABEL).sum(axis=(0, 1)).max()
        assert area >= 0.7 * min(own.areas)  # sized like a necrotic lesion (resampling costs a few edge pixels)
    assert json.loads((tmp_path / "ins" / I.PROVENANCE_NAME).read_text())["calls"]["necrotic"]["placed_away_from_real_places"] < 4
    monkeypatch.setattr(I, "MIN_PLACE_LESIONS", 3)
    I.insert_lesions(real, lesions, tmp_path / "own", 2, "necrotic", seed=0)
    sizes = json.loads((tmp_path / "own" / I.PROVENANCE_NAME).read_text())["calls"]["necrotic"]["lesion_sizes"]
    assert sizes["places_of_class"] == "necrotic" and len(sizes["positions"]) == 3
    # no host has room that near a real lesion's place: the lesions go anywhere in the brain, counted
    far = I.insert_lesions(real, lesions, tmp_path / "far", 2, "necrotic", seed=0, opts=I.InsertionOptions(position_tolerance_mm=1e-4))
    assert len(far) == 2
    assert json.loads((tmp_path / "far" / I.PROVENANCE_NAME).read_text())["calls"]["necrotic"]["placed_away_from_real_places"] == 2


def _seam_ratio(c: dict, opts: I.InsertionOptions, offset: float) -> float:
    real = np.median([I.seam_score(p, m) for p, m, _ in c["real"]])
    scores = [I.seam_score(p, m) for k in (1, 2, 4, 5, 7, 8)
              for p, m, _ in I.inserted_patches(_insert(c, k, k, opts, offset).volume, _insert(c, k, k, opts, offset).label, 32, 2, WINDOW)]
    return float(np.median(scores) / real)


def test_feathered_insertion_has_no_seam_a_pasted_box_has(cohort: dict) -> None:
    feather = _seam_ratio(cohort, I.InsertionOptions(), 0.15)
    box = _seam_ratio(cohort, I.InsertionOptions(blend="box"), 0.15)
    assert 0.5 < feather < 1.2, feather
    assert box > 1.6, box


def _patch_folder(out: Path, patches: list, synthetic: bool, klass: str = "necrotic") -> Path:
    rows = []
    for i, (img, msk, _) in enumerate(patches):
        name = f"p{i:03d}.nii.gz"
        write_nifti(img[..., None].astype(np.float32), np.eye(4), out / "patches" / name)
        write_nifti(msk[..., None].astype(np.uint8), np.eye(4), out / "masks" / name)
        rows.append({"path": f"patches/{name}", "label_path": f"masks/{name}", "class": klass, "split": "train",
                     "modality": "CT", "synthetic": "1" if synthetic else "0", "checkpoint_sha256": "ab" * 32})
    write_manifest(out, rows, ["path", "label_path", "class", "split", "modality", "synthetic", "checkpoint_sha256"])
    return out


def test_gate_rejects_a_planted_seam(cohort: dict, tmp_path: Path) -> None:
    from pipeline.gate.config import SEAM_MAX_RATIO, GateConfig
    from pipeline.gate.run import run_gate

    cfg = GateConfig(encoder_steps=20, n_bootstrap=0, fid_baseline_splits=2, max_pairs=20, kid_subsets=2,
                     seam_max_ratio=SEAM_MAX_RATIO)
    real = _patch_folder(tmp_path / "real", cohort["real"], synthetic=False)
    verdicts = {}
    for name, opts in (("feather", I.InsertionOptions()), ("box", I.InsertionOptions(blend="box"))):
        patches = [p for k in (1, 2, 4, 5, 7, 8) for p in I.inserted_patches(_insert(cohort, k, k, opts, 0.15).volume,
                                                                              _insert(cohort, k, k, opts, 0.15).label, 32, 2, WINDOW)]
        report = run_gate(real, _patch_folder(tmp_path / name, patches, synthetic=True), tmp_path / f"gate_{name}", cfg)
        seam = next(c for c in report.checks if c.name == "seam")
        verdicts[name] = (seam.passed, seam.value, sum(any("visible seam" in r for r in s.reasons) for s in report.samples))
    assert verdicts["feather"][0], verdicts
    assert not verdicts["box"][0], verdicts
    assert verdicts["box"][2] > 0 and verdicts["feather"][2] <= 1, verdicts


def test_seam_check_is_off_by_default(cohort: dict, tmp_path: Path) -> None:
    from pipeline.gate.config import GateConfig

    assert GateConfig().seam_max_ratio is None


def _ingest_folder(cohort: dict, real: Path, n: int, n_train: int = 3) -> Path:
    """An ingest-format folder of the cohort's first `n` CTs with their masks; the first `n_train`
    are training subjects, the rest test subjects."""
    rows = []
    for i, (s, h) in enumerate(zip(cohort["subs"][:n], cohort["cts"][:n], strict=True)):
        write_nifti(h.astype(np.int16), s.affine, real / "volumes" / f"v{i}.nii.gz")
        write_nifti(s.tumor_mask, s.affine, real / "labels" / f"v{i}.nii.gz")
        rows.append({"path": f"volumes/v{i}.nii.gz", "label_path": f"labels/v{i}.nii.gz", "subject_id": f"anon{i:02d}",
                     "modality": "CT", "split": "train" if i < n_train else "test", "class": s.tumor_class,
                     "sha256": sha256_file(real / "volumes" / f"v{i}.nii.gz")})
    write_manifest(real, rows, list(rows[0]))
    return real


def test_insert_lesions_writes_marked_training_volumes(cohort: dict, tmp_path: Path) -> None:
    real = _ingest_folder(cohort, tmp_path / "ingest", 4)
    lesions = _patch_folder(tmp_path / "samples", cohort["real"][:5], synthetic=True)
    a = I.insert_lesions(real, lesions, tmp_path / "ins_a", 4, "necrotic", seed=3)
    b = I.insert_lesions(real, lesions, tmp_path / "ins_b", 4, "necrotic", seed=3)
    assert [r["sha256"] for r in a] == [r["sha256"] for r in b]  # same seed, same bytes
    for r in read_manifest(tmp_path / "ins_a"):
        assert r["synthetic"] == "1" and r["split"] == "train" and r["class"] == "necrotic"
        assert r["subject_id"] in {"anon00", "anon01", "anon02"}  # training hosts only, never the test subject
        assert r["checkpoint_sha256"] == "ab" * 32 and r["patch_sha256"] and r["placement"]
        assert sha256_file(tmp_path / "ins_a" / r["path"]) == r["sha256"]
    with pytest.raises(PatchError, match="no round lesion patch"):
        I.insert_lesions(real, lesions, tmp_path / "ins_c", 1, "round")
    for r in read_manifest(real):  # no real lesion left to size and place from
        if r["split"] == "train":
            write_nifti(np.zeros_like(cohort["masks"][0]), cohort["subs"][0].affine, real / r["label_path"])
    with pytest.raises(PatchError, match="no training volume has a lesion in its mask"):
        I.insert_lesions(real, lesions, tmp_path / "ins_d", 1, "necrotic")


def test_insertion_counts_fill_the_gap_and_classes_merge(cohort: dict, tmp_path: Path) -> None:
    real = _ingest_folder(cohort, tmp_path / "ingest", 9, n_train=9)
    # 3 necrotic (i = 0, 3, 6) and 6 round training volumes: a gap of 3, times 1.25, rounded up
    assert I.insertion_counts(real, 1.25) == {"necrotic": 4}
    lesions = _patch_folder(tmp_path / "samples", cohort["real"][:4], synthetic=True)
    _patch_folder(tmp_path / "round_samples", cohort["real"][4:8], synthetic=True, klass="round")
    rows_r = read_manifest(tmp_path / "round_samples")
    write_manifest(lesions, read_manifest(lesions) + [r | {"path": "../round_samples/" + r["path"],
                                                           "label_path": "../round_samples/" + r["label_path"]} for r in rows_r],
                   list(rows_r[0]))
    I.insert_lesions(real, lesions, tmp_path / "ins", 2, "necrotic", seed=0)
    I.insert_lesions(real, lesions, tmp_path / "ins", 1, "round", seed=0)
    assert sorted(r["class"] for r in read_manifest(tmp_path / "ins")) == ["necrotic", "necrotic", "round"]


def test_dataset_config_synthesis_is_patches_or_insertion() -> None:
    from pydantic import ValidationError

    from pipeline.dataset.config import DatasetConfig

    assert DatasetConfig().synthesis == "patches"
    assert DatasetConfig(synthesis="insertion").synthesis == "insertion"
    with pytest.raises(ValidationError, match="patches"):
        DatasetConfig(synthesis="paste")  # type: ignore[arg-type]


def test_insertion_gate_report_binds_bytes_and_is_signed(cohort: dict, tmp_path: Path) -> None:
    """The insertion gate's report follows `medaug gate`'s rules: each volume by the sha256 of its
    bytes and of its mask, a content id, and an HMAC under the gate key that build-dataset checks."""
    from pipeline.dataset.inputs import read_gate
    from pipeline.errors import GateRejected, GateSignatureError
    from pipeline.gate.config import GateConfig

    real = _ingest_folder(cohort, tmp_path / "ingest", 3)
    ins = tmp_path / "ins"
    I.insert_lesions(real, _patch_folder(tmp_path / "samples", cohort["real"][:5], synthetic=True), ins, 3, "necrotic", seed=1)
    cfg = GateConfig(encoder_steps=20, n_bootstrap=0, fid_baseline_splits=2, max_pairs=20, kid_subsets=2, min_samples=2)
    report = I.gate_insertions(_patch_folder(tmp_path / "real", cohort["real"], synthetic=False), ins, tmp_path / "gate",
                               cfg, 32, key=b"k1")
    by_path = {r["path"]: r for r in read_manifest(ins)}
    for s in report["samples"]:
        assert s["sha256"] == sha256_file(ins / s["path"])
        assert s["label_sha256"] == sha256_file(ins / by_path[s["path"]]["label_path"])
    assert report["signature"]["key_id"]
    try:
        info = read_gate(tmp_path / "gate", key=b"k1")
        assert info.signature == "verified"
    except GateRejected:  # a 5-patch reference may reject: the signature was checked before the verdict
        pass
    with pytest.raises(GateSignatureError):
        read_gate(tmp_path / "gate", key=b"k2")
