"""Integrity of the commands after ingest (issue 14; RELIABILITY.md "After ingest"): a gate
verdict bound to the bytes it judged, output folders locked and kept apart from inputs, the
demo's Prefect server dying with its parent, one clear line for bad inputs, and warnings for
silent surprises.

Inputs are tiny NIfTI folders (tests/test_dataset.py builders) or phantoms of 16-32 voxels;
the concurrent-writer and kill -9 cases start real processes for a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medaug.cli import app
from pipeline.dataset.inputs import read_gate
from pipeline.errors import ConfigError, GateMismatchError
from pipeline.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]


def _builders() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_dataset_builders_i14", Path(__file__).with_name("test_dataset.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _builders()


def _invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(res: Any) -> str:
    """The CLI's error output: exit 2, one `error:` line, no traceback."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit), res.output
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def _dataset_args(inputs: dict[str, Path], out: Path, tmp: Path) -> list[Any]:
    return ["build-dataset", "--real", inputs["real"], "--out", out, "--config", REPO / "configs" / "dataset.yaml",
            "--manifests-dir", tmp / "dm", "--set", "dataset.fractions.test=0.0", "--set", "dataset.fractions.val=0.3",
            "--generator-card", inputs["card"]]


# --- a gate verdict bound to the bytes it judged -----------------------------------------------------------------


def _altered_copy(synthetic: Path, dst: Path) -> Path:
    """Set B: a copy of a synthetic folder (same file names and manifest), one patch's voxels different."""
    shutil.copytree(synthetic, dst)
    victim = dst / "patches" / "sample_0010.nii.gz"
    img: Any = nib.load(str(victim))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1.0, img.affine), str(victim))
    return dst


def test_gate_report_for_another_synthetic_set_is_refused(tmp_path: Path) -> None:
    inputs = B.make_tumor_inputs(tmp_path / "a")
    other = _altered_copy(inputs["synthetic"], tmp_path / "b_synthetic")
    out = tmp_path / "ds"
    res = _invoke([*_dataset_args(inputs, out, tmp_path), "--synthetic", other, "--gate", inputs["gate"]])
    line = _one_line_error(res)
    assert "never judged by gate report" in line and "sample_0010" in line and "another synthetic set" in line
    assert not out.exists()
    # the set the gate judged still builds, and ships only the bytes it accepted
    res = _invoke([*_dataset_args(inputs, out, tmp_path), "--synthetic", inputs["synthetic"], "--gate", inputs["gate"]])
    assert res.exit_code == 0, res.output
    accepted = {s["sha256"] for s in json.loads((inputs["gate"] / "gate_report.json").read_text())["samples"]
                if s["decision"] == "accept"}
    from pipeline.manifest import sha256_file

    shipped = [r for r in read_manifest(out) if r["synthetic"] == "1"]
    assert shipped
    # the writer recompresses; the voxels it shipped came from an accepted file (same id = input sha256 prefix)
    assert all(any(a.startswith(r["id"][1:]) for a in accepted) for r in shipped)
    assert all(sha256_file(out / r["path"]) == r["sha256"] for r in shipped)


def test_ungated_synthetic_is_refused_unless_allowed_and_then_said(tmp_path: Path) -> None:
    inputs = B.make_tumor_inputs(tmp_path / "a")
    out = tmp_path / "ds"
    res = _invoke([*_dataset_args(inputs, out, tmp_path), "--synthetic", inputs["synthetic"]])
    line = _one_line_error(res)
    assert "no gate report" in line and "--allow-ungated" in line
    assert not out.exists()
    res = _invoke([*_dataset_args(inputs, out, tmp_path), "--synthetic", inputs["synthetic"], "--allow-ungated"])
    assert res.exit_code == 0, res.output
    assert "UNGATED" in res.output
    assert "UNGATED" in (out / "datasheet.md").read_text(encoding="utf-8")
    # real-only datasets need no gate
    res = _invoke([*_dataset_args(inputs, tmp_path / "real_only", tmp_path)])
    assert res.exit_code == 0, res.output


def test_edited_or_old_gate_report_is_refused(tmp_path: Path) -> None:
    inputs = B.make_tumor_inputs(tmp_path / "a", gate_drop=3)
    path = inputs["gate"] / "gate_report.json"
    report = json.loads(path.read_text())
    report["samples"][0]["decision"] = "accept"  # flip a rejected item to accepted by hand
    path.write_text(json.dumps(report))
    with pytest.raises(ConfigError, match="changed after the gate wrote it"):
        read_gate(inputs["gate"])
    del report["samples"]
    path.write_text(json.dumps(report))
    with pytest.raises(ConfigError, match="lists no judged items by sha256"):
        read_gate(inputs["gate"])


def test_a_report_written_by_the_gate_verifies(tmp_path: Path) -> None:
    """pipeline/gate/report.py's report_id equals the id read_gate recomputes from the written JSON."""
    from pipeline.gate.report import CheckResult, GateReport, SampleDecision, report_id, write_json

    rep = GateReport(
        verdict="accept", failed_checks=[], checks=[CheckResult("fid", 0.123456789, 0.5, "<=", True, "x")],
        metrics={"fid": {"value": 1.0 / 3.0, "ci_low": float("nan"), "ci_high": 2e-7}},
        per_class={}, samples=[SampleDecision("a.nii.gz", "ab" * 32, "round", "accept", [], 3, pixel_ratio=0.1)],
        feature_extractor={"name": "domain"}, inputs={"synthetic": {"content_sha256": "c" * 64}}, config={},
        n_accepted=1, n_rejected=0,
    )
    rep.report_id = report_id(rep)
    write_json(rep, tmp_path)
    info = read_gate(tmp_path)
    assert info.report_id == rep.report_id and info.accepted_sha256 == {"ab" * 32}


def test_gate_mismatch_is_raised_by_the_library_too(tmp_path: Path) -> None:
    """The Prefect flow's dataset stage calls pipeline.dataset.build_dataset: the same rule holds there."""
    from pipeline.dataset.writer import build_dataset

    inputs = B.make_tumor_inputs(tmp_path / "a")
    other = _altered_copy(inputs["synthetic"], tmp_path / "b_synthetic")
    with pytest.raises(GateMismatchError, match="1 of 34 items"):
        build_dataset(inputs["real"], [other], tmp_path / "ds", B.tumor_config(tmp_path),
                      gates=[inputs["gate"]], generator_cards=[inputs["card"]])
