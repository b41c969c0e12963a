"""Bad-input corpus: every case lands in quarantine or is skipped with a specific reason,
none stops the run, and every file is counted exactly once. Also the CLI exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ingest_corpus import Case, build_bad_corpus, write_nifti, write_series
from typer.testing import CliRunner

from pipeline.errors import FatalIngestError
from pipeline.ingest import run_ingest
from pipeline.ingest.deid import Deid
from pipeline.manifest import read_manifest

KEY = b"test-key-bad-corpus"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Case], object]:
    root = tmp_path_factory.mktemp("bad")
    src = root / "in"
    cases = build_bad_corpus(src)
    out = root / "out"
    report = run_ingest([src], out, key=KEY, workers=2)
    return src, out, cases, report


def test_corpus_has_at_least_20_cases(corpus: tuple) -> None:
    assert len(corpus[2]) >= 20


def _case_ids() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return [c.folder for c in build_bad_corpus(Path(d))]


@pytest.mark.parametrize("folder", _case_ids())
def test_bad_input_lands_with_specific_reason(corpus: tuple, folder: str) -> None:
    src, out, cases, report = corpus
    case = next(c for c in cases if c.folder == folder)
    deid = Deid(KEY)
    files = case.files or tuple(p.relative_to(src).as_posix() for p in sorted((src / folder).rglob("*")) if p.is_file())
    assert files
    for rel in files:
        status, reason = report.files[deid.path_ref(rel)]
        assert status == case.status, (rel, status, reason)
        if case.status == "skipped":
            assert case.phrase in reason, (rel, reason)
    if case.status == "quarantined":
        rows = read_manifest(out / "quarantine.csv")
        refs = {deid.path_ref(r) for r in files}
        hits = [r for r in rows if r["source"] in refs]
        assert hits, f"no quarantine row for {folder}"
        assert any(case.phrase in r["reason"] for r in hits), [r["reason"] for r in hits]
    statuses = {rel: report.files[deid.path_ref(rel)][0]
                for rel in (p.relative_to(src).as_posix() for p in (src / folder).rglob("*") if p.is_file())}
    rest = [status for rel, status in statuses.items() if rel not in case.files]
    if case.volumes:  # the bad files are dropped, the rest of the folder is used (or skipped as a duplicate)
        assert "used" in rest and set(rest) <= {"used", "skipped"}, statuses
    else:
        assert "used" not in statuses.values(), statuses


def test_written_volumes_are_what_the_cases_still_yield(corpus: tuple) -> None:
    src, out, cases, _ = corpus
    assert len(read_manifest(out)) == sum(c.volumes for c in cases)


def test_every_file_counted_exactly_once(corpus: tuple) -> None:
    src, out, _, report = corpus
    all_files = [p for p in src.rglob("*") if p.is_file()]
    rep = json.loads((out / "ingest_report.json").read_text())
    assert rep["files_seen"] == len(all_files) == len(report.files)
    assert rep["files_used"] + rep["skipped"] + rep["quarantined"] == rep["files_seen"]
    assert sum(rep["skipped_reasons"].values()) == rep["skipped"]
    assert sum(rep["quarantined_reasons"].values()) == rep["quarantined"]
    assert "not classified" not in rep["skipped_reasons"]


def test_good_parts_of_bad_folders_still_written(corpus: tuple) -> None:
    _, out, cases, report = corpus
    assert report.volumes_written == sum(c.volumes for c in cases)
    for row in read_manifest(out):
        assert (out / row["path"]).is_file()


def test_quarantine_reason_names_series_and_gap(corpus: tuple, tmp_path: Path) -> None:
    src = corpus[0]
    run_ingest([src / "missing_slices"], tmp_path, key=KEY, workers=1, strict=True)  # --strict: today's quarantine
    reasons = [r["reason"] for r in read_manifest(tmp_path / "quarantine.csv")]
    gap = [r for r in reasons if "slices missing" in r]
    assert len(gap) == 1
    assert gap[0].startswith("CT series ") and " of " in gap[0]
    assert "slice spacing varies (2.0 to 6.0 mm, 2 slices missing between positions 34.0 and 40.0)" in gap[0]
    assert gap[0].endswith("; quarantined")


# --- CLI ----------------------------------------------------------------------------------


def test_cli_exit_0_with_quarantine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medaug.cli import app

    write_series(tmp_path / "in" / "good")
    write_nifti(tmp_path / "in" / "x.nii.gz", __import__("numpy").zeros((4, 4, 4), "float32"))  # no modality
    monkeypatch.setenv("MEDAUG_DEID_KEY", "k1")
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "1 volumes written" in res.output
    assert len(read_manifest(tmp_path / "out" / "quarantine.csv")) == 1
    # --modality applies to the NIfTI inputs of the call.
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--modality", "mr"])
    assert res.exit_code == 0, res.output
    assert "2 volumes written" in res.output
    # --locate finds a quarantined input again with the same key.
    ref = Deid(b"k1").path_ref("x.nii.gz")
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "in"), "--out", str(tmp_path / "o2"), "--locate", ref])
    assert res.exit_code == 0 and res.output.strip() == "x.nii.gz"
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "in"), "--locate", ref])  # no output folder needed
    assert res.exit_code == 0 and res.output.strip() == "x.nii.gz"
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "in")])  # but an ingest needs one
    assert res.exit_code == 2 and "--out DIR" in res.output


def test_cli_exit_2_on_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medaug.cli import app

    monkeypatch.setenv("MEDAUG_DEID_KEY", "k1")
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "input 1 of 1 does not exist" in res.output
    assert not (tmp_path / "out").exists()
    (tmp_path / "in").mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "in"), "--out", str(blocker / "sub")])
    assert res.exit_code == 2
    assert "output folder cannot be created" in res.output
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--modality", "PET"])
    assert res.exit_code == 2 and "--modality must be one of CT, MR" in res.output


def test_fatal_error_types(tmp_path: Path) -> None:
    with pytest.raises(FatalIngestError):
        run_ingest([tmp_path / "nope"], tmp_path / "out", key=b"k")
    with pytest.raises(FatalIngestError):
        run_ingest([], tmp_path / "out", key=b"k")


def test_output_write_failure_is_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.ingest.run as run_mod

    write_series(tmp_path / "in")

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_mod, "write_slices", full_disk)
    with pytest.raises(FatalIngestError, match="No space left on device"):
        run_ingest([tmp_path / "in"], tmp_path / "out", key=KEY, workers=1)
