"""Known-answer tests of pipeline.evaluate_translation: metrics, structure scores, baseline, report."""

from __future__ import annotations

import doctest
import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_slices import INGEST_COLUMNS, make_ingest_like
from test_translate import train_tiny

import pipeline.evaluate_translation as ev
import pipeline.structure as st
from pipeline.errors import ProvenanceError
from pipeline.manifest import read_manifest, write_manifest
from pipeline.preprocess import ct_to_unit


def test_doctests() -> None:
    assert doctest.testmod(ev, raise_on_error=False).failed == 0
    assert doctest.testmod(st, raise_on_error=False).failed == 0


def _phantom_ct(size: int = 24) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (size, size, size // 2)), indexing="ij")
    r = np.sqrt(x**2 + y**2)
    ct = np.full(x.shape, -1000.0, np.float32)
    ct[r < 0.8] = 800.0  # skull
    ct[r < 0.65] = 35.0  # brain
    ct[(r < 0.65) & (np.abs(x) < 0.1)] = 8.0  # a CSF sheet
    return ct


def test_identical_volumes_known_answers() -> None:
    ct = _phantom_ct()
    unit = ct_to_unit(ct)
    body = ct > -500
    m = ev.paired_metrics(unit, unit, body, "mri2ct", truth_raw=ct)
    assert m["mae"] == 0.0 and m["psnr"] == math.inf and m["ssim"] == pytest.approx(1.0)
    assert st.dice(body, body) == 1.0
    s = st.structure_measures(unit, unit, "ct2mri") | st.structure_measures(unit, unit, "mri2ct")
    assert s["body_dice"] == 1.0 and s["edge_corr"] == pytest.approx(1.0) and s["edge_dice"] == 1.0


def test_metrics_known_values() -> None:
    a = np.zeros((8, 8, 2))
    b = np.full((8, 8, 2), 0.2)
    assert ev.mae(a, b) == pytest.approx(0.2)
    assert ev.psnr(a, b, data_range=2.0) == pytest.approx(20.0, abs=1e-4)  # 20 log10(2 / 0.2)
    assert ev.ssim(a, -a + 1) < 0.1
    assert st.dice(np.zeros(4, bool), np.ones(4, bool)) == 0.0
    assert st.correlation(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)


def test_mae_in_hu_inside_the_body_only() -> None:
    ct = _phantom_ct()
    pred = ct.copy()
    pred[ct < -500] = 0.0  # wrong outside the body: not counted
    pred[ct == 35.0] += 50.0  # +50 HU in all brain voxels
    body = ct > -500
    expected = 50.0 * (ct == 35.0).sum() / body.sum()
    m = ev.paired_metrics(ct_to_unit(pred), ct_to_unit(ct), body, "mri2ct", truth_raw=ct)
    assert m["mae"] == pytest.approx(expected, rel=1e-4)
    assert m["mae_bone"] == pytest.approx(0.0, abs=1e-3)  # the skull (800 HU) is untouched
    assert m["mae_soft"] == pytest.approx(50.0 * (ct == 35.0).sum() / (body & (ct < 300)).sum(), rel=1e-4)


def test_structure_catches_a_destroyed_body() -> None:
    unit = ct_to_unit(_phantom_ct())
    empty = np.full_like(unit, -1.0)
    s = st.structure_measures(unit, empty, "ct2mri")
    assert s["body_dice"] == 0.0 and s["edge_corr"] == 0.0


def test_hu_plausibility_per_class() -> None:
    mr = np.full((10, 10), -1.0)
    mr[2:8, 2:8] = 0.5  # soft tissue
    mr[4:6, 4:6] = -0.9  # signal void inside the body
    hu = np.where(mr > -1, 40.0, -1000.0)
    hu[4:6, 4:6] = 900.0  # bone where MR is dark: plausible
    hu[2, 2:8] = 900.0  # bone where MR is bright: implausible (6 of 32 soft voxels)
    p = st.hu_plausibility(ct_to_unit(hu), mr)
    assert p["air"] == 1.0 and p["dark"] == 1.0 and p["soft"] == pytest.approx(26 / 32)
    assert p["all"] == pytest.approx(94 / 100)


def test_histogram_matching_recovers_a_monotone_contrast() -> None:
    rng = np.random.default_rng(0)
    ref_ct = _phantom_ct() + rng.normal(0, 5, (24, 24, 12)).astype(np.float32)
    body = _phantom_ct() > -500
    matcher = ev.HistogramMatcher.fit([ref_ct], [body], background=-1000.0)
    # an "MR" that is a monotone function of the same anatomy's CT (here: a square root)
    mr = np.sqrt(ref_ct + 1100.0) * 20.0
    out = matcher.apply(mr, body)
    assert np.abs(out[body] - ref_ct[body]).mean() < 5.0
    assert (out[~body] == -1000.0).all()


def test_histogram_matching_cannot_fix_inverted_contrast() -> None:
    ct = _phantom_ct()
    body = ct > -500
    matcher = ev.HistogramMatcher.fit([ct], [body], background=-1000.0)
    inverted = -ct  # bone dark, as in T1 MR
    out = matcher.apply(inverted, body)
    assert np.abs(out[body] - ct[body]).mean() > 100.0


def test_histogram_matcher_needs_a_reference() -> None:
    with pytest.raises(ev.DatasetError, match="reference volume"):
        ev.HistogramMatcher.fit([np.zeros((4, 4, 2))], [np.zeros((4, 4, 2), bool)], background=0.0)


class _Const(torch.nn.Module):
    """A generator that outputs a constant (and has a parameter, as real ones do)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) + self.value


class _Flip(torch.nn.Module):
    """The exact translation between `_batches`' fake MR and CT: negate everything but air (-1)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x <= -0.999, x, -x) * self.w


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    ct = torch.as_tensor(ct_to_unit(_phantom_ct(16)))  # (16, 16, 8)
    slices = ct.permute(2, 0, 1)[:, None]  # (8, 1, 16, 16)
    mr = torch.where(slices <= -0.999, slices, -slices)  # T1-like: dark bone, air still -1
    return [(mr[:4], slices[:4]), (mr[4:], slices[4:])]


def test_structure_scores_callback() -> None:
    good = st.structure_scores(_Flip(), _Flip(), _batches())
    bad = st.structure_scores(_Const(-1.0), _Const(-1.0), _batches())
    assert st.STRUCTURE_KEY in good and all(isinstance(v, float) for v in good.values())
    assert {"mri2ct_body_dice", "ct2mri_edge_corr", "mri2ct_hu_plausible_all"} <= set(good)
    assert good["mri2ct_body_dice"] == pytest.approx(1.0) and good["ct2mri_body_dice"] == pytest.approx(1.0)
    assert bad["mri2ct_body_dice"] == 0.0
    assert good[st.STRUCTURE_KEY] > bad[st.STRUCTURE_KEY]


def test_structure_scores_restores_training_mode() -> None:
    g1, g2 = _Flip(), _Flip()
    g1.train()
    g2.eval()
    st.structure_scores(g1, g2, _batches())
    assert g1.training and not g2.training


def test_held_out_batches_are_fixed_and_paired_in_count() -> None:
    a = [torch.full((1, 8, 8), float(i)) for i in range(10)]
    b = [torch.full((1, 8, 8), float(i)) for i in range(3)]
    data = SimpleNamespace(a=a, b=b, meta={})
    batches = st.held_out_batches(data, batch_size=2, max_batches=3)
    assert [x.shape[0] for x, _ in batches] == [2, 1] and [y.shape[0] for _, y in batches] == [2, 1]
    assert st.held_out_batches(data, 2, 3)[0][0].equal(batches[0][0])


def test_save_grid_png(tmp_path: Path) -> None:
    vol = ct_to_unit(_phantom_ct(16))
    path = ev.save_grid([[vol, vol, vol], [vol, -vol, vol]], tmp_path / "g.png", ["a", "b", "c"], scale=2)
    img = Image.open(path)
    assert img.size == (3 * 32, 14 + 2 * 32)


def test_report_json_is_strict(tmp_path: Path) -> None:
    assert ev._jsonable({"psnr": math.inf, "x": [math.nan, 1.0]}) == {"psnr": None, "x": [None, 1.0]}
    md = ev.evaluation_markdown({"checkpoint_sha256": "ab", "paired": None, "structure_only": {"mri2ct": {"body_dice": 0.9}}})
    assert "body_dice | 0.900" in md
    json.dumps(ev._jsonable({"a": math.inf}), allow_nan=False)


# --- the whole evaluation with a tiny trained checkpoint ------------------------------------


@pytest.fixture(scope="module")
def ingest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ingest_like(tmp_path_factory.mktemp("ingest"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, ingest: Path) -> Path:
    return train_tiny(ingest, tmp_path_factory.mktemp("run"))


def _strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_run_evaluate_translation_report(tmp_path: Path, ingest: Path, tiny_run: Path) -> None:
    report = ev.run_evaluate_translation(tiny_run, [ingest], tmp_path, device="cpu")
    saved = _strict_json(tmp_path / "evaluation.json")
    assert saved["n_paired_subjects"] == 2 and isinstance(saved["beats_baseline"], bool)
    for direction in ("mri2ct", "ct2mri"):
        res = saved["paired"][direction]
        for method in ("cyclegan", "baseline"):
            extra = {"mae_bone", "mae_soft"} if direction == "mri2ct" else set()
            assert set(res[method]) == {"mae", "psnr", "ssim"} | extra
            assert all(math.isfinite(v) for v in res[method].values())
        assert {"body_dice", "edge_corr"} <= set(res["structure_truth"])
        assert (tmp_path / f"{direction}_grid.png").is_file()
    assert saved["paired"]["mri2ct"]["structure_truth"]["body_dice"] > 0.9
    assert report["paired"]["mri2ct"]["units"]["mae"].startswith("HU")
    md = (tmp_path / "evaluation.md").read_text()
    assert "| mae |" in md and "mri2ct_grid.png" in md


def test_evaluation_refuses_a_generator_trained_on_test_subjects(tmp_path: Path, ingest: Path, tiny_run: Path) -> None:
    ckpt = tmp_path / "last.pt"
    shutil.copyfile(tiny_run, ckpt)
    card = json.loads(tiny_run.with_suffix(".json").read_text())
    card["train_subjects"] += [r["subject_id"] for r in read_manifest(ingest) if r["split"] == "test"]
    ckpt.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ProvenanceError, match="paired test subjects were in the generator's training data"):
        ev.run_evaluate_translation(ckpt, [ingest], tmp_path / "out", device="cpu")


def test_structure_only_without_paired_truth(tmp_path: Path, ingest: Path, tiny_run: Path) -> None:
    rows = [r for r in read_manifest(ingest) if not (r["split"] == "test" and r["modality"] == "CT")]
    for r in rows:
        r["path"] = str((ingest / r["path"]).resolve())
    data = tmp_path / "data"
    write_manifest(data, rows, INGEST_COLUMNS)
    report = ev.run_evaluate_translation(tiny_run, [data], tmp_path / "out", device="cpu")
    assert report["paired"] is None and report["beats_baseline"] is None
    only = report["structure_only"]
    assert set(only) == {"mri2ct"} and only["mri2ct"]["n_volumes"] == 2.0
    assert "structure scores only" in (tmp_path / "out" / "evaluation.md").read_text()


@pytest.mark.slow
def test_end_to_end_phantoms_ingest_train_translate_evaluate(tmp_path: Path) -> None:
    """Phantoms (size 32) -> ingest -> `medaug train cyclegan` (36 steps, tiny, CPU, < 60 s) -> translate -> evaluate."""
    from typer.testing import CliRunner

    from medaug.cli import app
    from pipeline.ingest import run_ingest
    from pipeline.phantoms import write_cohort

    start = time.perf_counter()
    write_cohort(tmp_path / "ph", n_subjects=8, size=32, seed=1)
    run_ingest([tmp_path / "ph" / "nifti" / "CT", tmp_path / "ph" / "nifti" / "MR"], tmp_path / "ingest",
               key=b"test-key-0123456789abcdef0123456", workers=1)
    runner = CliRunner()
    t0 = time.perf_counter()
    res = runner.invoke(app, ["train", "cyclegan", "--data", str(tmp_path / "ingest"), "--out", str(tmp_path / "run"),
                              "--config", str(Path(__file__).resolve().parents[1] / "configs" / "cyclegan-tiny.yaml"),
                              "--steps", "36", "--device", "cpu"])
    train_s = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    assert train_s < 60.0, f"36 tiny CPU steps took {train_s:.1f} s"
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    assert ckpt.is_file() and (tmp_path / "run" / "checkpoints" / "last.json").is_file()
    res = runner.invoke(app, ["translate", str(tmp_path / "ingest"), "--checkpoint", str(ckpt),
                              "--direction", "mri2ct", "--out", str(tmp_path / "syn"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    syn = read_manifest(tmp_path / "syn")
    assert syn and all(r["synthetic"] == "1" and r["modality"] == "CT" for r in syn)
    res = runner.invoke(app, ["evaluate-translation", "--checkpoint", str(ckpt), "--data", str(tmp_path / "ingest"),
                              "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = _strict_json(tmp_path / "eval" / "evaluation.json")
    assert report["n_paired_subjects"] == 2 and report["paired"]["mri2ct"]["cyclegan"]["mae"] is not None
    assert time.perf_counter() - start < 60.0


def test_cli_train_refuses_data_without_ct(tmp_path: Path, ingest: Path) -> None:
    from typer.testing import CliRunner

    from medaug.cli import app

    rows = [r for r in read_manifest(ingest) if r["modality"] == "MR"]
    for r in rows:
        r["path"] = str((ingest / r["path"]).resolve())
    write_manifest(tmp_path / "mr_only", rows, INGEST_COLUMNS)
    res = CliRunner().invoke(app, ["train", "cyclegan", "--data", str(tmp_path / "mr_only"), "--out", str(tmp_path / "r"),
                                   "--config", str(Path(__file__).resolve().parents[1] / "configs" / "cyclegan-tiny.yaml")])
    assert res.exit_code == 2 and "no usable CT volume" in res.output
    res = CliRunner().invoke(app, ["train", "cyclegan", "--data", str(ingest), "--out", str(tmp_path / "r"),
                                   "--image-size", "30"])
    assert res.exit_code == 2 and "image_size" in res.output


def test_bench_per_subject_scores_average_to_the_report(tmp_path: Path, ingest: Path, tiny_run: Path) -> None:
    """bench/cyclegan_quality.py scores each paired subject with evaluate-translation's code: their mean is the report's."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_cyclegan_quality", Path(__file__).resolve().parents[1] / "bench" / "cyclegan_quality.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = ev.run_evaluate_translation(tiny_run, [ingest], tmp_path / "eval", device="cpu")
    rows, preds = bench.score(tiny_run, [ingest])
    assert len(rows) == 2 and set(preds) == {r["subject"] for r in rows}
    for key in ("mae", "mae_bone", "psnr"):
        assert np.mean([r[key] for r in rows]) == pytest.approx(report["paired"]["mri2ct"]["cyclegan"][key], rel=1e-6)
    argv = sys.argv
    try:
        sys.argv = ["cyclegan_quality.py", "--data", str(ingest), "--run", f"a={tiny_run}", "--run", f"b={tiny_run}",
                    "--png", str(tmp_path / "fig.png"), "--live"]
        bench.main()
    finally:
        sys.argv = argv
    with Image.open(tmp_path / "fig.png") as im:
        assert im.size[0] > im.size[1] // 2  # 4 columns: MR, truth, a, b
