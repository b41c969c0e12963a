"""The tumor GAN's commands end to end on a tiny ingest folder: extract-patches, train tumor-gan
(with --resume), sample-tumors, evaluate-tumors, and their one-line errors; bench/tumor_gan.py --smoke,
its rows printed as measured and kept when SIGTERM stops it."""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from test_tumor_gan_data import make_ingest_folder
from typer.testing import CliRunner

from medaug.cli import app
from models.checkpoint import load_checkpoint
from models.common import read_metrics
from pipeline.manifest import read_manifest

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tumor_gan-tiny.yaml"
runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def ingest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ingest_folder(tmp_path_factory.mktemp("ing") / "ingest", n_subjects=6, size=64, depth=8, seed=3, test_every=3)


def test_extract_train_resume_sample_evaluate(ingest: Path, tmp_path: Path) -> None:
    out = invoke("extract-patches", "--data", str(ingest), "--out", str(tmp_path / "real"), "--patch-size", "32", "--seed", "1")
    assert "healthy" in out and "round" in out
    assert {r["class"] for r in read_manifest(tmp_path / "real")} == {"healthy", "round", "necrotic"}

    start = time.monotonic()
    run = tmp_path / "run"
    invoke("train", "tumor-gan", "--data", str(ingest), "--out", str(run), "--config", str(TINY_CONFIG),
           "--steps", "24", "--device", "cpu")
    assert time.monotonic() - start < 60, "a few dozen tiny steps on CPU take well under a minute"
    ckpt = run / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["step"] == 24
    card = json.loads((run / "checkpoints" / "last.json").read_text())
    test_subjects = {r["subject_id"] for r in read_manifest(ingest) if r["split"] == "test"}
    assert card["train_subjects"] and not test_subjects & set(card["train_subjects"])
    assert card["patch_size"] == 32 and card["modality"] == "CT"
    assert list((run / "samples").glob("*.png"))

    result = runner.invoke(app, ["train", "tumor-gan", "--data", str(tmp_path / "real"), "--out", str(run), "--config",
                                 str(TINY_CONFIG), "--steps", "30", "--device", "cpu", "--resume"])
    assert result.exit_code == 2 and "training patches differ" in result.output
    invoke("train", "tumor-gan", "--data", str(ingest), "--out", str(run), "--config", str(TINY_CONFIG),
           "--steps", "30", "--device", "cpu", "--resume")
    assert load_checkpoint(ckpt)["step"] == 30
    assert [r["step"] for r in read_metrics(run)] == [10, 20, 24, 30]

    invoke("sample-tumors", "--checkpoint", str(ckpt), "--class", "necrotic", "--n", "3", "--seed", "1", "--out", str(tmp_path / "syn"))
    rows = read_manifest(tmp_path / "syn")
    assert [r["synthetic"] for r in rows] == ["1"] * 3

    out = invoke("evaluate-tumors", "--checkpoint", str(ckpt), "--real", str(tmp_path / "real"), "--out", str(tmp_path / "eval"),
                 "--n-per-class", "4", "--classifier-steps", "5")
    report = json.loads((tmp_path / "eval" / "tumor_eval.json").read_text())
    assert set(report["per_class"]) == {"healthy", "necrotic", "round"} and "fidelity" in out


def test_errors_are_one_line(ingest: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["extract-patches", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "no manifest.csv" in result.output
    result = runner.invoke(app, ["train", "tumor-gan", "--data", str(ingest), "--out", str(tmp_path / "r"),
                                 "--patch-size", "48", "--steps", "1", "--device", "cpu"])
    assert result.exit_code == 2 and "power of two" in result.output
    result = runner.invoke(app, ["sample-tumors", "--checkpoint", str(tmp_path / "none.pt"), "--class", "round",
                                 "--n", "2", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "does not exist" in result.output


def _tumor_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_tumor_gan", Path(__file__).resolve().parents[1] / "bench" / "tumor_gan.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_smoke_runs_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    report = _tumor_bench().main(["--smoke"])
    assert "| baseline: fp32, batch 4 |" in report and "fastest / baseline" in report
    assert capsys.readouterr().out == report  # printed line by line, as measured
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert rows[0] == "| setting | train patches/s | sample patches/s |" and len(rows) == 1 + 2
    assert "stopped" not in report


def test_benchmark_failing_setting_is_a_row_and_the_ratio_names_its_row(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _tumor_bench()
    time_setting = bench.time_setting

    def fastest_fails(base: Any, s: Any, *args: Any) -> dict[str, float]:
        if s.name.startswith("fastest"):
            raise RuntimeError("compile: planted failure\nmore")
        return dict(time_setting(base, s, *args))

    monkeypatch.setattr(bench, "time_setting", fastest_fails)
    report = bench.main(["--smoke"])
    assert "| fastest: batch 8 | failed: RuntimeError: compile: planted failure | |" in report
    assert "fastest / baseline: no row besides the baseline ran" in report
    monkeypatch.setattr(bench, "time_setting", time_setting)
    assert "(fastest: batch 8)" in bench.main(["--smoke"])


def test_benchmark_sigterm_keeps_measured_rows(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _tumor_bench()
    time_setting = bench.time_setting
    calls = 0

    def second_row_gets_sigterm(*args: Any) -> dict[str, float]:
        nonlocal calls
        calls += 1
        if calls == 2:
            signal.raise_signal(signal.SIGTERM)  # as `timeout` would, while row 2 is being measured
        return dict(time_setting(*args))

    monkeypatch.setattr(bench, "time_setting", second_row_gets_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--smoke"])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the bench's handler is gone again
    out = capsys.readouterr().out
    assert "| setting | train patches/s |" in out and "| baseline: fp32, batch 4 |" in out
    assert "| fastest" not in out and "fastest / baseline" not in out
    assert out.rstrip().endswith("- stopped by SIGTERM after 1 of 2 rows")
