"""Fault injection: SIGKILL during `medaug train cyclegan` then `--resume`, a full disk and a
read-only or impossible output folder under `medaug ingest`, and re-ingest of an unchanged
cohort and of one with a series added.

SIGKILL during dataset writing is tests/test_dataset.py::test_sigkill_mid_write_leaves_no_half_dataset;
a retried Prefect training task resuming from RUN_DIR/checkpoints/last.pt is
tests/test_flows_run.py::test_a_retried_training_task_resumes (both referenced in RELIABILITY.md).
Tests run as root, where chmod 0o555 does not stop writes, so the read-only folder is a
read-only tmpfs mount and the full disk a 1 MiB tmpfs (skipped where mounting is refused).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ingest_corpus import write_series
from typer.testing import CliRunner

from medaug.cli import app
from pipeline.ingest import run_ingest
from pipeline.manifest import read_manifest
from pipeline.phantoms import write_cohort

REPO = Path(__file__).resolve().parents[1]
KEY = b"fault-test-key"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MEDAUG_DEID_KEY": "fault-test-key"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root, n_subjects=8, size=32, seed=3)
    return root


@pytest.fixture(scope="module")
def ingested(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ingested")
    run_ingest([cohort / "nifti"], out, key=KEY, workers=1)
    return out


# --- SIGKILL during training, then --resume ------------------------------------------------


STEPS = 24


def _train_argv(data: Path, out: Path, resume: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "medaug.cli", "train", "cyclegan", "--data", str(data), "--out", str(out),
            "--config", str(REPO / "configs/cyclegan-tiny.yaml"), "--steps", str(STEPS), "--device", "cpu",
            "--set", "cyclegan.checkpoint_every=2", "--set", "cyclegan.eval_every=1000",
            "--set", "cyclegan.sample_every=1000"]
    return argv + (["--resume"] if resume else [])


def _nets(run: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ckpt = torch.load(run / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    flat = {f"{n}.{k}": v for n, sd in ckpt["nets"].items() for k, v in sd.items()}
    return int(ckpt["step"]), flat


@pytest.mark.slow
def test_sigkill_during_training_then_resume_equals_an_uninterrupted_run(ingested: Path, tmp_path: Path) -> None:
    # the uninterrupted reference run goes alongside the killed one and its resume (one thread
    # each, separate folders): the test takes the time of one of them, not of both
    ref_log = tmp_path / "ref.log"
    with open(ref_log, "wb") as log:
        ref = subprocess.Popen(_train_argv(ingested, tmp_path / "ref"), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=log)
    try:
        run = tmp_path / "run"
        proc = subprocess.Popen(_train_argv(ingested, run), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        killed = False
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if (run / "checkpoints/last.pt").is_file():
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
        assert killed, "training finished before a checkpoint could be caught"
        step_at_kill, _ = _nets(run)  # the checkpoint left behind is whole (written by rename)
        assert 0 < step_at_kill < STEPS

        resumed = subprocess.run(_train_argv(ingested, run, resume=True), env=ENV, cwd=REPO, capture_output=True,
                                 text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert ref.wait(timeout=300) == 0, ref_log.read_text(errors="replace")[-2000:]
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()
    ref_step, ref_w = _nets(tmp_path / "ref")
    got_step, got_w = _nets(run)
    assert ref_step == got_step == STEPS
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        assert torch.allclose(got_w[k].float(), ref_w[k].float(), rtol=1e-5, atol=1e-6), k


# --- full disk, read-only and impossible output folders -------------------------------------


def _cli_ingest(src: Path, out: Path) -> tuple[int, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out)], env={"MEDAUG_DEID_KEY": "k"})
    return result.exit_code, result.output


def _nothing_half_written(out: Path) -> None:
    """Every volume in the folder loads in full; a manifest, when present, names only such volumes."""
    for f in out.rglob("*.nii.gz"):
        np.asarray(nib.load(f).dataobj)  # type: ignore[attr-defined]
    assert not [f for f in out.rglob("*") if f.is_file() and ".tmp" in f.name], "temporary files left behind"
    if (out / "manifest.csv").is_file():
        for row in read_manifest(out):
            assert (out / row["path"]).is_file()


def test_full_disk_gives_one_clear_line_and_no_half_written_volume(cohort: Path, ingested: Path, tmpfs: Path) -> None:
    filler = tmpfs / "filler"
    with open(filler, "wb") as f:  # leave about 24 KiB: the first volumes fit, later ones do not
        f.write(b"\0" * (1024 * 1024 - 24 * 1024))
    code, output = _cli_ingest(cohort / "nifti", tmpfs / "out")
    assert code != 0
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert lines and "Traceback" not in output, output
    assert "space" in output.lower() or "ENOSPC" in output or "No space" in output, output
    _nothing_half_written(tmpfs / "out")
    filler.unlink()  # space again: the next run completes
    code, output = _cli_ingest(cohort / "nifti", tmpfs / "out")
    assert code == 0, output
    _nothing_half_written(tmpfs / "out")
    assert len(read_manifest(tmpfs / "out")) == len(read_manifest(ingested))


def test_read_only_output_folder_gives_one_clear_line(cohort: Path, tmpfs: Path) -> None:
    (tmpfs / "out").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    code, output = _cli_ingest(cohort / "nifti", tmpfs / "out")
    assert code != 0 and "Traceback" not in output, output
    assert "read-only" in output.lower() or "permission" in output.lower(), output
    assert list((tmpfs / "out").iterdir()) == []


def test_output_path_under_a_file_gives_one_clear_line(cohort: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, output = _cli_ingest(cohort / "nifti", tmp_path / "file" / "out")
    assert code != 0 and "Traceback" not in output, output
    assert len([line for line in output.strip().splitlines() if line.strip()]) <= 2, output
    assert (tmp_path / "file").read_text() == "x"


# --- re-ingest: unchanged cohort, one series added -------------------------------------------


def test_reingest_processes_only_what_changed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(3):
        write_series(src / f"s{i}", n=4, patient_id=f"P{i}", series_uid=f"1.2.826.0.1.3680043.9.7777.{i + 10}")
    out = tmp_path / "out"
    first = run_ingest([src], out, key=KEY, workers=1)
    assert first.volumes_written == 3
    mtimes = {f: f.stat().st_mtime_ns for f in (out / "volumes").iterdir()}

    again = run_ingest([src], out, key=KEY, workers=1)
    assert again.volumes_reused == 3 and again.volumes_written == 3
    assert {f: f.stat().st_mtime_ns for f in (out / "volumes").iterdir()} == mtimes  # nothing rewritten

    write_series(src / "s3", n=4, patient_id="P3", series_uid="1.2.826.0.1.3680043.9.7777.99")
    added = run_ingest([src], out, key=KEY, workers=1)
    assert added.volumes_written == 4 and added.volumes_reused == 3
    now = {f: f.stat().st_mtime_ns for f in (out / "volumes").iterdir()}
    assert {f: now[f] for f in mtimes} == mtimes and len(now) == 4
    shutil.rmtree(src / "s3")
