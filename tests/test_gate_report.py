"""The gate report: canonical id, JSON, Markdown, accepted.csv and PNG grids (pipeline/gate/report.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.gate.report import (
    ACCEPTED_CSV,
    CheckResult,
    GateReport,
    SampleDecision,
    image_grid,
    report_id,
    write_accepted,
    write_json,
    write_markdown,
)
from pipeline.manifest import read_manifest


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Small tensors gain nothing from threads, and on a busy 2-core machine OpenMP spin-waits
    make 2 threads ~8x slower than 1; restored afterwards so other modules keep their setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _report(verdict: str = "accept") -> GateReport:
    return GateReport(
        verdict=verdict,
        failed_checks=[] if verdict == "accept" else ["fid"],
        checks=[CheckResult("fid", 1.23456789, 3.0, "<=", verdict == "accept", "FID ratio")],
        metrics={"fid": {"value": 0.1, "ci_low": 0.05, "ci_high": math.nan}, "nearest_k": 5},
        per_class={"round": {"n_real": 10, "n_synthetic": 12, "fid": 0.2}},
        samples=[SampleDecision("a.nii.gz", "aa" * 32, "round", "accept", [], 3),
                 SampleDecision("b.nii.gz", "bb" * 32, "round", "reject", ["near-copy of training image x#z1"], 3)],
        feature_extractor={"name": "domain-simclr-v1", "sha256": "cc" * 32, "dim": 64},
        inputs={"real": {"n_items": 2, "n_slices": 6}, "synthetic": {"n_items": 2, "n_slices": 6}},
        config={"seed": 0},
        n_accepted=1,
        n_rejected=1,
    )


def test_report_id_is_canonical_and_content_sensitive() -> None:
    a, b = _report(), _report()
    assert report_id(a) == report_id(b) and len(report_id(a)) == 64
    # output folder and float noise below 6 significant digits do not change the id
    assert report_id(replace(a, out=Path("/elsewhere"))) == report_id(a)
    noisy = _report()
    noisy.checks[0].value = 1.234567891
    assert report_id(noisy) == report_id(a)
    assert report_id(_report("reject")) != report_id(a)
    assert report_id(replace(a, config={"seed": 1})) != report_id(a)


def test_json_has_no_nan_and_markdown_names_verdict(tmp_path: Path) -> None:
    r = _report("reject")
    r.report_id = report_id(r)
    doc = json.loads(write_json(r, tmp_path).read_text())
    assert doc["report_id"] == r.report_id and doc["metrics"]["fid"]["ci_high"] is None
    assert doc["failed_checks"] == ["fid"]
    md = write_markdown(r, tmp_path, ["near_copies.png"]).read_text()
    assert "**Verdict: REJECT** (failed: fid)" in md
    assert "| b.nii.gz | near-copy of training image x#z1 |" in md
    assert "![near_copies.png](near_copies.png)" in md


def test_markdown_shows_a_metric_spread_beside_its_value(tmp_path: Path) -> None:
    # the fid baseline's spread over half splits is what tells a reader how noisy the ratio is
    r = _report()
    r.metrics["fid_real_baseline"] = {"value": 0.05, "std": 0.012, "min": 0.03, "max": 0.09, "splits": 10.0}
    md = write_markdown(r, tmp_path, []).read_text()
    assert "| metric | value | CI low | CI high | spread and other |" in md
    assert "| fid_real_baseline | 0.05 | - | - | std 0.012, min 0.03, max 0.09, splits 10 |" in md
    assert "| fid | 0.1 | 0.05 | nan | |" not in md and "| nearest_k | 5 | | | |" in md


def test_accepted_csv_lists_kept_items_only_when_the_batch_passes(tmp_path: Path) -> None:
    rows = [{"path": "a.nii.gz", "class": "round"}, {"path": "b.nii.gz", "class": "round"}]
    write_accepted(_report(), rows, ["path", "class"], tmp_path)
    kept = read_manifest(tmp_path / ACCEPTED_CSV)
    assert kept == [{"path": "a.nii.gz", "class": "round", "sha256": "aa" * 32}]
    write_accepted(_report("reject"), rows, ["path", "class"], tmp_path)
    assert read_manifest(tmp_path / ACCEPTED_CSV) == []
    assert (tmp_path / ACCEPTED_CSV).read_text().startswith("path,class,sha256\n")


def test_image_grid_writes_a_png(tmp_path: Path) -> None:
    tiles = [[torch.zeros(1, 8, 8), torch.ones(1, 8, 8)], [torch.full((8, 8), -1.0), torch.zeros(8, 8)]]
    path = image_grid(tiles, ["pair 1", "pair 2"], tmp_path / "g.png", scale=2)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        assert im.width >= 2 * 16 and im.height >= 16


def test_markdown_names_the_inception_weights_by_sha256(tmp_path: Path) -> None:
    from pipeline.gate.features import inception_weights_note

    r = replace(_report(), feature_extractor={"name": "fid-inception-v3", "sha256": "6726825d" + "0" * 56, "dim": 2048,
                                              "weights": inception_weights_note("6726825d" + "0" * 56, False)})
    md = write_markdown(r, tmp_path, []).read_text()
    assert "fid-inception-v3 (sha256 `6726825d" in md and "weights: pytorch-fid's FID Inception weights" in md
    assert "weights:" not in write_markdown(_report(), tmp_path, []).read_text()  # the domain encoder has none
