"""Tests of pipeline.translate: volume translation, exact source geometry, provenance, synthetic marks."""

from __future__ import annotations

import doctest
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_slices import make_ingest_like

import pipeline.translate as tr
from pipeline.errors import CheckpointError, DatasetError, InputRejected
from pipeline.manifest import read_manifest, sha256_file
from pipeline.preprocess import mr_landmarks, mr_to_unit, unit_to_ct

IDENTITY = torch.nn.Identity()
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def train_tiny(ingest: Path, run_dir: Path, steps: int = 4) -> Path:
    """Train the tiny CycleGAN (configs/cyclegan-tiny.yaml) for `steps` on CPU; its last.pt."""
    from medaug.config import load_section
    from models.train_cyclegan import CycleGANConfig, train_cyclegan
    from pipeline.slices import load_unpaired_slices

    cfg = load_section(CycleGANConfig, CONFIGS / "cyclegan-tiny.yaml", "cyclegan", [f"cyclegan.steps={steps}"])
    data = load_unpaired_slices([ingest], cfg.image_size, context=(cfg.in_channels - 1) // 2)
    train_cyclegan(cfg, data, run_dir, device="cpu")
    return run_dir / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def ingest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ingest_like(tmp_path_factory.mktemp("ingest"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, ingest: Path) -> Path:
    return train_tiny(ingest, tmp_path_factory.mktemp("run"))


def _mr_volume(shape: tuple[int, int, int] = (20, 16, 6), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    head = (x**2 + y**2) < 0.6
    return (head * (300.0 + 500.0 * (x + 1) / 2) + rng.normal(0, 5, shape) * head).astype(np.float32)


def ramp_generator(x: torch.Tensor) -> torch.Tensor:
    """Ignores its input: a ramp from -1 to 1 along H (the RAS x axis), the same in every channel."""
    ramp = torch.linspace(-1.0, 1.0, x.shape[-2])[:, None].expand(x.shape[-2], x.shape[-1])
    return ramp.expand_as(x).clone()


def test_doctests() -> None:
    assert doctest.testmod(tr, raise_on_error=False).failed == 0


def test_identity_generator_maps_mr_scale_onto_hu_window() -> None:
    mr = _mr_volume()
    settings = tr.TranslationSettings(image_size=20)
    ct = tr.translate_volume(IDENTITY, mr, "mri2ct", settings)
    expected = unit_to_ct(mr_to_unit(mr, mr_landmarks(mr)))
    assert ct.shape == mr.shape and ct.dtype == np.float32
    np.testing.assert_allclose(ct, expected, atol=1e-3)


def test_ct2mri_output_scale_is_documented_range() -> None:
    ct = np.full((8, 8, 3), -1000.0, np.float32)
    ct[2:6, 2:6] = 1000.0
    mr = tr.translate_volume(IDENTITY, ct, "ct2mri", tr.TranslationSettings(image_size=8))
    assert set(np.unique(mr).tolist()) == set(tr.MR_OUTPUT_LANDMARKS)


def test_batches_and_resizing_do_not_change_the_result() -> None:
    mr = _mr_volume()
    settings = tr.TranslationSettings(image_size=12, context=1)
    one = tr.translate_volume(IDENTITY, mr, "mri2ct", settings, batch_size=1)
    many = tr.translate_volume(IDENTITY, mr, "mri2ct", settings, batch_size=5)
    np.testing.assert_array_equal(one, many)
    assert one.shape == mr.shape


def test_bad_direction_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match="mri2ct, ct2mri"):
        tr.translate_volume(IDENTITY, _mr_volume(), "mr2ct")  # type: ignore[arg-type]


def _oblique_lps_affine() -> np.ndarray:
    """A non-RAS affine: axes permuted and flipped (x->P, y->L, z->I), 0.9 x 1.1 x 3 mm, rotated."""
    aff = np.array([[0.0, -1.1, 0.0, 40.0], [-0.9, 0.0, 0.0, 30.0], [0.0, 0.0, -3.0, 12.0], [0, 0, 0, 1]])
    c, s = np.cos(0.1), np.sin(0.1)
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    return rot @ aff


def test_translated_image_keeps_exact_source_geometry_and_is_marked(tmp_path: Path) -> None:
    made = nib.Nifti1Image(_mr_volume((16, 20, 5)), _oblique_lps_affine())
    made.header.set_xyzt_units("mm")
    made.header["aux_file"] = b"DOE^JOHN"
    made.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"PatientName=DOE^JOHN"))
    nib.save(made, str(tmp_path / "src.nii.gz"))
    src_img = nib.load(str(tmp_path / "src.nii.gz"))  # the geometry as a file holds it (float32)
    data = tr.translate_image(IDENTITY, src_img, "mri2ct", tr.TranslationSettings(image_size=16))
    out = tmp_path / "syn.nii.gz"
    tr.write_like(data, src_img, out)
    back = nib.load(str(out))
    assert back.shape == src_img.shape
    np.testing.assert_array_equal(back.affine, src_img.affine)
    np.testing.assert_array_equal(back.get_qform(), src_img.get_qform())
    np.testing.assert_array_equal(back.get_sform(), src_img.get_sform())
    assert back.header.get_zooms() == src_img.header.get_zooms()
    assert back.header["descrip"].tobytes().rstrip(b"\0") == b"medaug synthetic"
    assert back.get_data_dtype() == np.float32
    assert b"DOE" in gzip.decompress((tmp_path / "src.nii.gz").read_bytes())
    assert b"DOE" not in gzip.decompress(out.read_bytes()) and len(back.header.extensions) == 0


def test_translation_happens_in_ras_whatever_the_file_orientation() -> None:
    vol_ras = _mr_volume((12, 12, 4))
    img_ras = nib.Nifti1Image(vol_ras, np.diag([2.0, 2.0, 4.0, 1.0]))
    # the same voxels stored flipped and permuted: RAS (x, y, z) -> file axes (y, -x, z)
    lps = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("ALS"))
    data_file = nib.orientations.apply_orientation(vol_ras, lps)
    aff_file = img_ras.affine @ nib.orientations.inv_ornt_aff(lps, vol_ras.shape)
    img_file = nib.Nifti1Image(data_file.astype(np.float32), aff_file)
    assert nib.aff2axcodes(img_file.affine) == ("A", "L", "S")
    settings = tr.TranslationSettings(image_size=12)
    out_file = tr.translate_image(ramp_generator, img_file, "mri2ct", settings)
    out_ras = nib.as_closest_canonical(nib.Nifti1Image(out_file, img_file.affine)).get_fdata()
    expected = tr.translate_volume(ramp_generator, vol_ras, "mri2ct", settings)
    np.testing.assert_allclose(out_ras, expected, atol=1e-4)
    assert expected[0, 5, 2] < expected[-1, 5, 2]  # the ramp runs along RAS x


def test_multi_frame_volume_is_rejected() -> None:
    img = nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), np.eye(4))
    with pytest.raises(InputRejected, match="not 3-D"):
        tr.translate_image(IDENTITY, img, "mri2ct", tr.TranslationSettings(image_size=8))


def test_find_sources_ingest_nifti_and_bad(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(tmp_path / "a.nii.gz"))
    (tmp_path / "sub").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(tmp_path / "sub" / "b.nii"))
    assert [s.path.name for s in tr.find_sources(tmp_path, "MR")] == ["a.nii.gz", "b.nii"]
    assert len(tr.find_sources(tmp_path / "a.nii.gz", "CT")) == 1
    with pytest.raises(DatasetError, match="is not an ingest folder"):
        tr.find_sources(tmp_path / "sub" / "nothing", "MR")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither"):
        tr.find_sources(tmp_path / "empty", "MR")


def test_settings_from_card_reads_nested_meta() -> None:
    card = {"meta": {"hu_window": [-500, 1500], "image_size": 32, "context": 1, "mr_percentiles": [1, 99]}}
    s = tr.TranslationSettings.from_card(card)
    assert s == tr.TranslationSettings((-500.0, 1500.0), (1.0, 99.0), 32, 1)


# --- run_translate with a real (tiny) checkpoint ----------------------------------------------


def test_run_translate_writes_synthetic_folder(tmp_path: Path, tiny_run: Path, ingest: Path) -> None:
    ckpt = tiny_run
    out = tmp_path / "out"
    rows = tr.run_translate(ckpt, "mri2ct", ingest, out, batch_size=4, device="cpu")
    src_rows = [r for r in read_manifest(ingest) if r["modality"] == "MR"]
    assert len(rows) == len(src_rows)
    manifest = read_manifest(out)
    assert list(manifest[0]) == list(tr.TRANSLATE_COLUMNS)
    by_sha = {r["sha256"]: r for r in src_rows}
    for row in manifest:
        src = by_sha[row["source_sha256"]]
        assert row["synthetic"] == "1" and row["modality"] == "CT" and row["direction"] == "mri2ct"
        assert row["subject_id"] == src["subject_id"] and row["class"] == src["class"] and row["split"] == src["split"]
        assert row["checkpoint_sha256"] == sha256_file(ckpt)
        src_img, syn = nib.load(str(ingest / src["path"])), nib.load(str(out / row["path"]))
        assert syn.shape == src_img.shape
        np.testing.assert_array_equal(syn.affine, src_img.affine)
        assert syn.header["descrip"].tobytes().rstrip(b"\0") == b"medaug synthetic"
        hu = np.asarray(syn.dataobj)
        assert np.isfinite(hu).all() and hu.min() >= -1000.0 and hu.max() <= 1000.0
        assert row["sha256"] == sha256_file(out / row["path"])
        # the label is the source's, byte for byte
        assert sha256_file(out / row["label_path"]) == sha256_file(ingest / src["label_path"]) == row["label_sha256"]
        sidecar = json.loads((out / row["path"].replace(".nii.gz", ".json")).read_text())
        assert sidecar["synthetic"] is True and sidecar["source_sha256"] == src["sha256"]
        assert sidecar["checkpoint_sha256"] == row["checkpoint_sha256"] and sidecar["direction"] == "mri2ct"
        assert "config" in sidecar and "seed" in sidecar
        assert sidecar["source_in_generator_training"] is (src["split"] == "train")
        text = json.dumps(sidecar) + (out / "manifest.csv").read_text()
        assert Path(src["path"]).name.split(".")[0] not in text  # no source file name anywhere


def test_run_translate_ct2mri_from_nifti_file(tmp_path: Path, tiny_run: Path, ingest: Path) -> None:
    ct_row = next(r for r in read_manifest(ingest) if r["modality"] == "CT")
    rows = tr.run_translate(tiny_run, "ct2mri", ingest / ct_row["path"], tmp_path / "o", device="cpu")
    assert len(rows) == 1 and rows[0]["modality"] == "MR" and rows[0]["label_path"] == ""
    syn = nib.load(str(tmp_path / "o" / rows[0]["path"]))
    assert syn.shape == nib.load(str(ingest / ct_row["path"])).shape
    lo, hi = tr.MR_OUTPUT_LANDMARKS
    assert lo <= float(np.min(syn.dataobj)) and float(np.max(syn.dataobj)) <= hi


def test_run_translate_split_filter_and_bad_checkpoint(tmp_path: Path, tiny_run: Path, ingest: Path) -> None:
    rows = tr.run_translate(tiny_run, "mri2ct", ingest, tmp_path / "t", split="test", device="cpu")
    assert rows and all(r["split"] == "test" for r in rows)
    with pytest.raises(DatasetError, match="no CT volume in split 'val'"):
        tr.run_translate(tiny_run, "ct2mri", ingest, tmp_path / "v", split="val", device="cpu")
    bogus = tmp_path / "bogus.pt"
    torch.save({"format": "something else"}, bogus)
    with pytest.raises(CheckpointError, match="bogus.pt is not a medaug checkpoint"):
        tr.run_translate(bogus, "mri2ct", ingest, tmp_path / "b", device="cpu")


def test_cli_translate_and_its_errors(tmp_path: Path, tiny_run: Path, ingest: Path) -> None:
    from typer.testing import CliRunner

    from medaug.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["translate", str(ingest), "--checkpoint", str(tiny_run), "--direction", "ct2mri",
                             "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert "translated" in ok.output and (tmp_path / "o" / "manifest.csv").is_file()
    bad = runner.invoke(app, ["translate", str(ingest), "--checkpoint", str(tiny_run), "--direction", "mr2ct",
                              "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "mri2ct, ct2mri" in bad.output
    missing = runner.invoke(app, ["translate", str(ingest), "--checkpoint", str(tmp_path / "none.pt"),
                                  "--direction", "mri2ct", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_files_are_hashed_once(tmp_path: Path, tiny_run: Path, ingest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ingest manifest's sha256 travels with each source, and each volume written is hashed as
    its bytes go to disk: translate reads no file back to hash it (the checkpoint, which no
    manifest lists, is the one file it hashes). The hashes are those of the files on disk."""
    hashed: list[Path] = []
    real_sha256_file = tr.sha256_file

    def recording(path: Path) -> str:
        hashed.append(Path(path).resolve())
        return real_sha256_file(path)

    monkeypatch.setattr(tr, "sha256_file", recording)
    rows = tr.run_translate(tiny_run, "mri2ct", ingest, tmp_path / "out", batch_size=4, device="cpu", split="test")
    assert rows and hashed == [Path(tiny_run).resolve()]
    assert {r["source_sha256"] for r in rows} <= {r["sha256"] for r in read_manifest(ingest)}
    for r in rows:
        assert r["sha256"] == real_sha256_file(tmp_path / "out" / r["path"])
        if r["label_path"]:
            assert r["label_sha256"] == real_sha256_file(tmp_path / "out" / r["label_path"])


def test_manifest_sha256_that_is_not_a_hash_never_names_an_output(tmp_path: Path, tiny_run: Path, ingest: Path) -> None:
    """A sha256 column holding "../evil" or "n/a" is not used in output file names: the file is hashed instead."""
    src = tmp_path / "ingest"
    import shutil

    shutil.copytree(ingest, src)
    rows = read_manifest(src)
    mr = [r for r in rows if r["modality"] == "MR" and r.get("split") == "test"]
    assert len(mr) >= 1
    mr[0]["sha256"] = "../evil"
    for r in mr[1:]:
        r["sha256"] = "n/a"
    from pipeline.manifest import write_manifest

    write_manifest(src, rows, list(rows[0].keys()))
    out = tmp_path / "out"
    written = tr.run_translate(tiny_run, "mri2ct", src, out, batch_size=4, device="cpu", split="test")
    assert not (tmp_path / "evil").exists() and not list(tmp_path.glob("*evil*"))
    assert {Path(r["path"]).parent.name for r in written} == {"volumes"}
    assert {r["source_sha256"] for r in written} == {sha256_file(src / r["path"]) for r in mr}
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))
