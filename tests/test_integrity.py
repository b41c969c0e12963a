"""Integrity of the commands after ingest (issue 14; RELIABILITY.md "After ingest"): a gate
verdict bound to the bytes it judged, output folders locked and kept apart from inputs, the
demo's Prefect server dying with its parent, one clear line for bad inputs, and warnings for
silent surprises.

Inputs are tiny NIfTI folders (tests/test_dataset.py builders) or phantoms of 16-32 voxels;
the concurrent-writer and kill -9 cases start real processes for a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import test_dataset as B  # its tiny-dataset builders
from typer.testing import CliRunner

from medaug.cli import app
from pipeline.dataset.inputs import read_gate
from pipeline.errors import ConfigError, GateMismatchError
from pipeline.manifest import read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]


def _invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(res: Any) -> str:
    """The CLI's error output: exit 2, one `error:` line, no traceback."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit)), res.output
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
    with pytest.raises(ConfigError, match="lacks samples"):
        read_gate(inputs["gate"])


def test_a_report_written_by_the_gate_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pipeline/gate/report.py's report_id equals the id read_gate recomputes from the written JSON;
    its signature under MEDAUG_GATE_KEY verifies."""
    from pipeline.gate.report import (
        CheckResult,
        GateReport,
        SampleDecision,
        report_id,
        sign_report,
        write_json,
    )

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
    assert info.report_id == rep.report_id and info.accepted_sha256 == {"ab" * 32} and info.signature == "unsigned"
    monkeypatch.setenv("MEDAUG_GATE_KEY", "the gate's key")
    sign_report(rep, b"the gate's key")
    write_json(rep, tmp_path)
    info = read_gate(tmp_path)
    assert info.signature == "verified" and info.report_id == rep.report_id and info.summary["checks"][0]["name"] == "fid"


def _swap_mask(synthetic: Path, victim: str) -> None:
    """Replace the mask of `victim` (an accepted item) with another one (tumour voxels moved): a swap after gating."""
    path = synthetic / "masks" / victim
    img: Any = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.roll(np.asarray(img.dataobj), 2, axis=0), img.affine), str(path))


def test_synthetic_mask_swapped_after_gating_is_refused(tmp_path: Path) -> None:
    """The gate report binds each synthetic mask (label_sha256) with its image; a mask changed after gating is refused."""
    inputs = B.make_tumor_inputs(tmp_path / "a")
    report = json.loads((inputs["gate"] / "gate_report.json").read_text())
    assert all(len(s["label_sha256"]) == 64 for s in report["samples"])
    _swap_mask(inputs["synthetic"], "sample_0010.nii.gz")
    out = tmp_path / "ds"
    res = _invoke([*_dataset_args(inputs, out, tmp_path), "--synthetic", inputs["synthetic"], "--gate", inputs["gate"]])
    line = _one_line_error(res)
    assert "the mask of sample_0010.nii.gz" in line and "changed after the gate ran" in line
    assert not out.exists()


def test_mask_swapped_behind_its_manifest_claim_is_refused_when_copied(tmp_path: Path) -> None:
    """The manifest still names the judged mask's sha256 (label_sha256) but the file is another: the writer
    checks the bytes it copies."""
    from pipeline.manifest import sha256_file

    inputs = B.make_tumor_inputs(tmp_path / "a")
    rows = read_manifest(inputs["synthetic"])
    for r in rows:
        r["label_sha256"] = sha256_file(inputs["synthetic"] / r["label_path"])
    write_manifest(inputs["synthetic"], rows, list(rows[0].keys()))
    # a mask the dataset ships: build once, then swap the mask of a synthetic item it took
    res = _invoke([*_dataset_args(inputs, tmp_path / "clean", tmp_path), "--synthetic", inputs["synthetic"], "--gate", inputs["gate"]])
    assert res.exit_code == 0, res.output
    shipped = {r["id"][1:] for r in read_manifest(tmp_path / "clean") if r["synthetic"] == "1"}
    victim = next(Path(r["label_path"]).name for r in rows
                  if sha256_file(inputs["synthetic"] / r["path"])[:16] in shipped)
    _swap_mask(inputs["synthetic"], victim)
    out = tmp_path / "ds"
    res = _invoke([*_dataset_args(inputs, out, tmp_path), "--synthetic", inputs["synthetic"], "--gate", inputs["gate"]])
    line = _one_line_error(res)
    assert f"{victim} changed since the gate judged it with its image" in line
    assert not out.exists()


def test_gate_reads_the_synthetic_masks_it_binds(tmp_path: Path) -> None:
    """The gate records each synthetic mask's sha256 and refuses one whose bytes differ from its manifest's claim."""
    from pipeline.errors import DatasetError
    from pipeline.gate.config import GateConfig
    from pipeline.gate.images import load_gate_set
    from pipeline.manifest import sha256_file

    inputs = B.make_tumor_inputs(tmp_path / "a", gate_verdict=None)
    syn = inputs["synthetic"]
    gset = load_gate_set(syn, GateConfig(gate_size=16), "synthetic", cap=False)
    assert all(it.label_sha256 == sha256_file(syn / it.row["label_path"]) for it in gset.items)
    rows = read_manifest(syn)
    rows[0]["label_sha256"] = "ab" * 32
    write_manifest(syn, rows, list(rows[0].keys()))
    with pytest.raises(DatasetError, match="mask masks/sample_0000.nii.gz changed since its manifest was written"):
        load_gate_set(syn, GateConfig(gate_size=16), "synthetic", cap=False)


def _forge(gate: Path, sha256s: list[tuple[str, str]], key: bytes | None = None) -> None:
    """What anyone who can write a file can do: a report accepting any bytes, with a report_id that matches
    its content (and, given a key, signed with it)."""
    from pipeline.dataset.inputs import content_id
    from pipeline.gate.signing import sign

    gate.mkdir(parents=True, exist_ok=True)
    rep: dict[str, Any] = {"verdict": "accept", "checks": [],
                           "samples": [{"sha256": s, "label_sha256": m, "decision": "accept", "path": "x.nii.gz"}
                                       for s, m in sha256s]}
    rep["report_id"] = content_id(rep)
    rep["signature"] = sign(rep, key) if key else None
    (gate / "gate_report.json").write_text(json.dumps(rep))


def _synthetic_sha256s(inputs: dict[str, Path]) -> list[tuple[str, str]]:
    """(image sha256, mask sha256) of every synthetic item."""
    from pipeline.manifest import sha256_file

    syn = inputs["synthetic"]
    return [(sha256_file(syn / r["path"]), sha256_file(syn / r["label_path"])) for r in read_manifest(syn)]


def test_forged_report_is_refused_with_a_gate_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report written by hand (content id recomputed) is refused under MEDAUG_GATE_KEY: one line, exit 2."""
    from pipeline.errors import GateSignatureError

    inputs = B.make_tumor_inputs(tmp_path / "a", gate_verdict=None)
    _forge(tmp_path / "forged", _synthetic_sha256s(inputs))
    monkeypatch.setenv("MEDAUG_GATE_KEY", "the gate's key")
    with pytest.raises(GateSignatureError, match="is not signed and MEDAUG_GATE_KEY is set"):
        read_gate(tmp_path / "forged")
    out = tmp_path / "ds"
    res = _invoke([*_dataset_args(inputs, out, tmp_path), "--synthetic", inputs["synthetic"], "--gate", tmp_path / "forged"])
    line = _one_line_error(res)
    assert "is not signed" in line and "medaug gate" in line and "the gate's key" not in res.output
    assert not out.exists()


def test_forged_report_without_a_key_is_taken_with_a_warning_and_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without MEDAUG_GATE_KEY a report is bound to its content only: it ships, and the console and datasheet say so."""
    from pipeline.gate.signing import NOT_VERIFIED_NOTE

    monkeypatch.delenv("MEDAUG_GATE_KEY", raising=False)
    inputs = B.make_tumor_inputs(tmp_path / "a", gate_verdict=None)
    _forge(tmp_path / "forged", _synthetic_sha256s(inputs))
    assert read_gate(tmp_path / "forged").signature == "unsigned"
    out = tmp_path / "ds"
    res = _invoke([*_dataset_args(inputs, out, tmp_path), "--synthetic", inputs["synthetic"], "--gate", tmp_path / "forged"])
    assert res.exit_code == 0, res.output
    assert f"warning: {NOT_VERIFIED_NOTE}" in res.output
    assert NOT_VERIFIED_NOTE in (out / "datasheet.md").read_text(encoding="utf-8")


def test_report_signed_with_another_key_or_edited_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.dataset.inputs import content_id
    from pipeline.errors import GateSignatureError
    from pipeline.gate.signing import key_id

    inputs = B.make_tumor_inputs(tmp_path / "a", gate_verdict=None)
    shas = _synthetic_sha256s(inputs)
    _forge(tmp_path / "other", shas, key=b"another key")
    monkeypatch.setenv("MEDAUG_GATE_KEY", "the gate's key")
    here = key_id(b"the gate's key")
    with pytest.raises(GateSignatureError, match=f"signed with another key .*key id {here}"):
        read_gate(tmp_path / "other")
    # signed with the right key, then a rejected item flipped to accept and the content id recomputed
    gate = tmp_path / "signed"
    _forge(gate, shas, key=b"the gate's key")
    assert read_gate(gate).signature == "verified"
    path = gate / "gate_report.json"
    rep = json.loads(path.read_text())
    rep["samples"].append({"sha256": "cd" * 32, "decision": "accept"})
    rep["report_id"] = content_id(rep)
    path.write_text(json.dumps(rep))
    with pytest.raises(GateSignatureError, match="changed after the gate signed it"):
        read_gate(gate)
    out = tmp_path / "ds"
    res = _invoke([*_dataset_args(inputs, out, tmp_path), "--synthetic", inputs["synthetic"], "--gate", gate])
    assert "changed after the gate signed it" in _one_line_error(res)
    # edited without recomputing the id: the content check says so first
    rep["verdict"] = "accepted"
    path.write_text(json.dumps(rep))
    with pytest.raises(ConfigError, match="changed after the gate wrote it"):
        read_gate(gate)


@pytest.mark.parametrize(("drop", "needle"), [("checks", "lacks checks"), ("verdict", "lacks verdict"),
                                              ("report_id", "lacks report_id"), ("decision", "has no sha256 of its bytes or no decision"),
                                              ("sha256", "has no sha256 of its bytes or no decision")])
def test_report_without_the_fields_read_gate_relies_on_is_refused(tmp_path: Path, drop: str, needle: str) -> None:
    from pipeline.dataset.inputs import content_id

    _forge(tmp_path / "g", [("ab" * 32, "")])
    path = tmp_path / "g" / "gate_report.json"
    rep = json.loads(path.read_text())
    if drop == "decision":
        del rep["samples"][0]["decision"]
    elif drop == "sha256":
        rep["samples"][0]["sha256"] = 12345  # not even a string
    else:
        del rep[drop]
    if "report_id" in rep:
        rep["report_id"] = content_id(rep)
    path.write_text(json.dumps(rep))
    with pytest.raises(ConfigError, match=needle):
        read_gate(tmp_path / "g")


def test_the_demo_signs_with_a_per_run_key_and_leaves_a_users_key_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.demo import demo_gate_key

    monkeypatch.delenv("MEDAUG_GATE_KEY", raising=False)
    with demo_gate_key():
        first = os.environ["MEDAUG_GATE_KEY"]
    assert "MEDAUG_GATE_KEY" not in os.environ
    with demo_gate_key():
        assert os.environ["MEDAUG_GATE_KEY"] != first and len(first) == 64
    monkeypatch.setenv("MEDAUG_GATE_KEY", "mine")
    with demo_gate_key():
        assert os.environ["MEDAUG_GATE_KEY"] == "mine"
    assert os.environ["MEDAUG_GATE_KEY"] == "mine"


def test_gate_mismatch_is_raised_by_the_library_too(tmp_path: Path) -> None:
    """The Prefect flow's dataset stage calls pipeline.dataset.build_dataset: the same rule holds there."""
    from pipeline.dataset.writer import build_dataset

    inputs = B.make_tumor_inputs(tmp_path / "a")
    other = _altered_copy(inputs["synthetic"], tmp_path / "b_synthetic")
    with pytest.raises(GateMismatchError, match="1 of 34 items"):
        build_dataset(inputs["real"], [other], tmp_path / "ds", B.tumor_config(tmp_path),
                      gates=[inputs["gate"]], generator_cards=[inputs["card"]])


# --- output folders: one writer at a time, never an input ----------------------------------------------------------

_HOLDER = """
import sys, time
from pathlib import Path
from pipeline.errors import OutputLockedError
from pipeline.outputs import output_lock
if len(sys.argv) > 3:  # a racer: wait at the start line until every racer has started
    print("ready", flush=True)
    while not Path(sys.argv[3]).exists():
        time.sleep(0.005)
try:
    with output_lock(Path(sys.argv[1]), "holder"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
except OutputLockedError as exc:
    print("refused:", exc, flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _holder(out: Path, seconds: float) -> subprocess.Popen[str]:
    """A real process holding the lock of `out` for `seconds` (a stand-in for a long command)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out), str(seconds)], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_racing_writers_one_wins_the_others_get_one_line(tmp_path: Path) -> None:
    out, go = tmp_path / "out", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _HOLDER, str(out), "3", str(go)], stdout=subprocess.PIPE, text=True,
                              env=_env()) for _ in range(4)]
    assert all(p.stdout is not None and p.stdout.readline().strip() == "ready" for p in procs)
    go.touch()
    lines = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sum(ln == "locked" for ln in lines) == 1, lines
    refused = [ln for ln in lines if ln != "locked"]
    assert all(ln.startswith("refused:") and "is being written by pid" in ln and "choose another --out" in ln for ln in refused)
    assert not (tmp_path / ".out.medaug-lock").exists()  # the winner removed its lock file


def test_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path: Path) -> None:
    inputs = B.make_tumor_inputs(tmp_path / "a")
    out = tmp_path / "ds"
    args = [*_dataset_args(inputs, out, tmp_path), "--synthetic", inputs["synthetic"], "--gate", inputs["gate"]]
    holder = _holder(out, 60)
    try:
        line = _one_line_error(_invoke(args))
        assert f"is being written by pid {holder.pid} on host" in line and "(holder, since" in line
        assert not out.exists()
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, the kernel drops the lock
        holder.wait()
    lock = tmp_path / ".ds.medaug-lock"
    assert str(holder.pid) in lock.read_text()
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    assert (out / "dataset.json").is_file() and not lock.exists()
    # the lock file names no path and no subject: pid, host, command, time
    holder = _holder(out, 60)
    try:
        assert set(json.loads(lock.read_text())) == {"pid", "host", "command", "started"}
    finally:
        holder.kill()
        holder.wait()


def test_ingest_and_training_into_a_locked_folder_get_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ingest and the trainers hold the output lock too (around converting and training): a second
    writer stops with one line and writes nothing."""
    monkeypatch.setenv("MEDAUG_DEID_KEY", "test-key")
    src = _ingest_like(tmp_path / "src")
    for out, args in ((tmp_path / "ingest", ["ingest", src / "volumes"]),
                      (tmp_path / "tg", ["train", "tumor-gan", "--data", src, "--config", "configs/tiny.yaml",
                                         "--patch-size", "8"])):
        holder = _holder(out, 60)
        try:
            line = _one_line_error(_invoke([*args, "--out", out]))
            assert "is being written by pid" in line, (args, line)
            assert not out.exists() or not any(out.iterdir()), (args, sorted(out.iterdir()))
        finally:
            holder.kill()
            holder.wait()


def test_two_demos_into_one_folder_the_second_stops_at_once(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    holder = _holder(out, 60)
    try:
        start = time.monotonic()
        line = _one_line_error(_invoke(["demo", "--out", out, "--config", REPO / "configs" / "tiny.yaml"]))
        assert "is being written by pid" in line and time.monotonic() - start < 30
        assert not (out / ".prefect").exists() and list(out.iterdir()) == []  # nothing of the second run written
    finally:
        holder.kill()
        holder.wait()


def _ingest_like(root: Path) -> Path:
    """A tiny ingest-format folder: two labelled CT volumes (16 x 16 x 4)."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(2):
        for sub, arr in (("volumes", rng.normal(0, 50, (16, 16, 4)).astype(np.float32)),
                         ("labels", (rng.random((16, 16, 4)) > 0.8).astype(np.uint8))):
            (root / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, np.eye(4)), str(root / sub / f"s{k}_CT_0.nii.gz"))
        rows.append({"path": f"volumes/s{k}_CT_0.nii.gz", "label_path": f"labels/s{k}_CT_0.nii.gz", "subject_id": f"s{k}",
                     "modality": "CT", "class": "round", "split": "train", "sha256": f"{k:064d}"})
    write_manifest(root, rows, ("path", "label_path", "subject_id", "modality", "class", "split", "sha256"))
    return root


def test_out_equal_to_or_inside_an_input_is_refused(tmp_path: Path) -> None:
    ingest = _ingest_like(tmp_path / "ingest")
    before = (ingest / "manifest.csv").read_bytes()
    ckpt = tmp_path / "run" / "last.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    cases = [
        ["translate", ingest, "--checkpoint", ckpt, "--direction", "mri2ct", "--out", ingest],
        ["extract-patches", "--data", ingest, "--out", ingest],
        ["extract-patches", "--data", ingest, "--out", ingest / "patches"],
        ["build-dataset", "--real", ingest, "--out", ingest, "--overwrite"],
        ["build-dataset", "--real", ingest / "manifest.csv", "--out", tmp_path, "--overwrite"],
        ["gate", "--real", ingest, "--synthetic", tmp_path / "run", "--out", tmp_path / "run"],
    ]
    for args in cases:
        line = _one_line_error(_invoke(args))
        assert "a command never writes into its inputs" in line, (args, line)
        assert (ingest / "manifest.csv").read_bytes() == before and (ingest / "volumes" / "s0_CT_0.nii.gz").is_file()
    assert not (ingest / "patches").exists()


def test_out_beside_a_checkpoint_is_allowed_but_not_its_folder(tmp_path: Path) -> None:
    """A checkpoint file stands for itself: a sibling folder of it is a fine --out (nothing is
    overwritten), its own folder or a folder holding it is not; a manifest stands for its folder."""
    from pipeline.errors import OutputOverlapError
    from pipeline.outputs import check_apart

    ckpt = tmp_path / "run" / "best.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    check_apart(tmp_path / "run" / "synthetic", [("--checkpoint", ckpt)])
    for out in (tmp_path / "run", tmp_path):
        with pytest.raises(OutputOverlapError, match="never writes into its inputs"):
            check_apart(out, [("--checkpoint", ckpt)])
    manifest = tmp_path / "ingest" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text("path\n")
    with pytest.raises(OutputOverlapError, match="lies inside the folder of the input"):
        check_apart(tmp_path / "ingest" / "synthetic", [("--real", manifest)])


def test_sample_tumors_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    real = tmp_path / "real"
    write_manifest(real, [{"path": "patches/a.nii.gz", "subject_id": "s0", "class": "round"}], ("path", "subject_id", "class"))
    before = (real / "manifest.csv").read_bytes()
    ckpt = tmp_path / "run" / "last.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    line = _one_line_error(_invoke(["sample-tumors", "--checkpoint", ckpt, "--class", "round", "--n", "2", "--out", real]))
    assert "sample-tumors did not write" in line
    assert (real / "manifest.csv").read_bytes() == before and not (real / "provenance.json").exists()


# --- one line for bad input, nothing half-written -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cyclegan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A phantom ingest-like folder (32 px) and a 2-step tiny CycleGAN checkpoint trained on it."""
    from test_slices import make_ingest_like
    from test_translate import train_tiny

    ingest = make_ingest_like(tmp_path_factory.mktemp("ingest"), n_subjects=4)
    return ingest, train_tiny(ingest, tmp_path_factory.mktemp("run"), steps=2)


def _copy_ingest(ingest: Path, dst: Path) -> Path:
    shutil.copytree(ingest, dst)
    return dst


def test_translate_manifest_naming_a_missing_file(tmp_path: Path, cyclegan: tuple[Path, Path]) -> None:
    ingest = _copy_ingest(cyclegan[0], tmp_path / "ingest")
    row = next(r for r in read_manifest(ingest) if r["modality"] == "MR")
    (ingest / row["path"]).unlink()
    line = _one_line_error(_invoke(["translate", ingest, "--checkpoint", cyclegan[1], "--direction", "mri2ct",
                                    "--out", tmp_path / "out", "--device", "cpu"]))
    assert f"lists {row['path']} but the file is missing" in line
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_translate_nan_volume_is_named(tmp_path: Path, cyclegan: tuple[Path, Path]) -> None:
    ingest = _copy_ingest(cyclegan[0], tmp_path / "ingest")
    rows = [r for r in read_manifest(ingest) if r["modality"] == "MR"]
    victim = ingest / rows[1]["path"]
    img: Any = nib.load(str(victim))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    arr[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), str(victim))
    line = _one_line_error(_invoke(["translate", ingest, "--checkpoint", cyclegan[1], "--direction", "mri2ct",
                                    "--out", tmp_path / "out", "--device", "cpu"]))
    assert "source volume" in line and f"of {len(rows)}" in line and "1 NaN or infinite voxels" in line
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_translate_full_disk_one_line_and_no_half_written_file(tmp_path: Path, tmpfs: Path, cyclegan: tuple[Path, Path]) -> None:
    args = ["translate", cyclegan[0], "--checkpoint", cyclegan[1], "--direction", "mri2ct", "--device", "cpu"]
    full = tmp_path / "full"
    assert _invoke([*args, "--out", full]).exit_code == 0
    need = sum(f.stat().st_size for f in full.rglob("*") if f.is_file())
    # leave room for about half the output: the disk fills in the middle of the run
    free = shutil.disk_usage(tmpfs).free
    (tmpfs / "filler").write_bytes(b"\0" * max(0, free - need // 2))
    out = tmpfs / "out"
    line = _one_line_error(_invoke([*args, "--out", out]))
    assert "No space left on device" in line and "no half-written file is left" in line
    files = [f for f in out.rglob("*") if f.is_file()]
    assert not [f for f in files if f.stat().st_size == 0], "0-byte files left behind"
    assert not [f for f in files if f.name.startswith(".tmp")], "temporary files left behind"
    for f in files:
        if f.name.endswith(".nii.gz"):
            np.asarray(nib.load(str(f)).dataobj)  # loads in full
        elif f.suffix == ".json":
            json.loads(f.read_text())
    (tmpfs / "filler").unlink()
    assert _invoke([*args, "--out", out]).exit_code == 0  # after freeing space the same command completes


def test_extract_patches_bad_inputs_are_one_line(tmp_path: Path) -> None:
    ingest = _ingest_like(tmp_path / "ingest")
    line = _one_line_error(_invoke(["extract-patches", "--data", ingest, "--out", tmp_path / "p", "--hu-low", "200",
                                    "--hu-high", "-100"]))
    assert "--hu-low below --hu-high" in line and "200 to -100" in line
    victim = ingest / "volumes" / "s1_CT_0.nii.gz"
    arr = np.asarray(nib.load(str(victim)).dataobj, dtype=np.float32)  # type: ignore[attr-defined]
    arr[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(victim))
    line = _one_line_error(_invoke(["extract-patches", "--data", ingest, "--out", tmp_path / "p", "--patch-size", "8"]))
    assert "ingest/volumes/s1_CT_0.nii.gz holds 1 NaN or infinite voxels" in line
    victim.unlink()
    line = _one_line_error(_invoke(["extract-patches", "--data", ingest, "--out", tmp_path / "p", "--patch-size", "8"]))
    assert "lists volumes/s1_CT_0.nii.gz but the file is missing" in line
    assert not (tmp_path / "p" / "manifest.csv").exists()


def test_patches_larger_than_the_volumes_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.patches import extract_patches

    ingest = _ingest_like(tmp_path / "ingest")  # 16 x 16 x 4 volumes
    with caplog.at_level("WARNING", logger="pipeline.patches"):
        extract_patches([ingest], patch_size=8, healthy_per_volume=0)
    assert "padding" not in caplog.text
    with caplog.at_level("WARNING", logger="pipeline.patches"):
        extract_patches([ingest], patch_size=32, healthy_per_volume=0)
    assert "at least 75% of a patch is padding" in caplog.text


def test_foreign_file_as_gate_encoder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for name, data in (("random.pt", os.urandom(4096)), ("empty.pt", b"")):
        bad = tmp_path / name
        bad.write_bytes(data)
        line = _one_line_error(_invoke(["gate", "--real", tmp_path / "in", "--synthetic", tmp_path / "in", "--out",
                                        tmp_path / f"g_{name}", "--set", f"gate.encoder_path={bad}"]))
        assert f"{bad} is not a" in line and "encoder saved by `medaug gate`" in line and "gate.encoder_path" in line, line
    import torch

    torch.save({"version": "x"}, tmp_path / "other.pt")
    from pipeline.errors import WeightsMissingError
    from pipeline.gate.encoder import load_domain_encoder

    with pytest.raises(WeightsMissingError, match="is not a"):
        load_domain_encoder(tmp_path / "other.pt")


@pytest.fixture(scope="module")
def tumor_gan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step tiny tumor GAN checkpoint (16 px patches of a 32 px ingest-format folder)."""
    from test_tumor_gan_data import make_ingest_folder

    root = tmp_path_factory.mktemp("tumor")
    ingest = make_ingest_folder(root / "ingest", n_subjects=4, size=32, depth=8, seed=3)
    res = _invoke(["train", "tumor-gan", "--data", ingest, "--out", root / "run", "--config",
                   REPO / "configs" / "tumor_gan-tiny.yaml", "--patch-size", "16", "--steps", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return root / "run" / "checkpoints" / "last.pt"


def test_sample_tumors_huge_n_is_refused_before_allocating(tmp_path: Path, tumor_gan: Path) -> None:
    import tracemalloc

    tracemalloc.start()
    line = _one_line_error(_invoke(["sample-tumors", "--checkpoint", tumor_gan, "--class", "round", "--n", "100000000000",
                                    "--out", tmp_path / "s"]))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "--n 100000000000 patches of 16^2 need about 137.6 TB" in line and "ask for fewer" in line
    assert peak < 256 << 20
    assert not (tmp_path / "s" / "manifest.csv").exists()


def test_sample_tumors_streams_in_blocks(tmp_path: Path, tumor_gan: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.sample_tumors as st

    st.sample_tumors(tumor_gan, "round", 4, 0, tmp_path / "one", device="cpu")
    sizes: list[int] = []
    real_generate = __import__("models.train_tumor_gan", fromlist=["generate"]).generate

    def counting(g: Any, c: int, n: int, *args: Any, **kwargs: Any) -> Any:
        sizes.append(n)
        return real_generate(g, c, n, *args, **kwargs)

    monkeypatch.setattr(st, "STREAM_BLOCK", 4)
    monkeypatch.setattr("models.train_tumor_gan.generate", counting)
    st.sample_tumors(tumor_gan, "round", 10, 0, tmp_path / "ten", device="cpu")
    assert sizes == [4, 4, 2]  # never more than one block in memory
    rows = read_manifest(tmp_path / "ten")
    assert [r["index"] for r in rows] == [str(i) for i in range(10)]
    # the first block is what a call of one block gives, byte for byte
    for r in read_manifest(tmp_path / "one"):
        assert (tmp_path / "one" / r["path"]).read_bytes() == (tmp_path / "ten" / r["path"]).read_bytes()
    assert len({(tmp_path / "ten" / r["path"]).read_bytes() for r in rows}) == 10  # blocks draw different latents


def test_one_class_gan_data_warns(caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.patches import PatchSet, to_train_data

    rows = [{"class": "round", "modality": "CT", "split": "train", "subject_id": f"s{k}", "spacing": "1x1x1"} for k in range(4)]
    ps = PatchSet(np.zeros((4, 8, 8), np.float32), np.zeros((4, 8, 8), np.uint8), rows, [np.eye(4)] * 4, {}, [])
    with caplog.at_level("WARNING", logger="pipeline.patches"):
        data = to_train_data(ps)
    assert data.classes == ["round"] and "only one class (round)" in caplog.text


# --- the demo's Prefect server dies with it ----------------------------------------------------------------------


def _children_with(parent: int, word: str) -> list[int]:
    """Pids of the children of `parent` whose command line contains `word`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") if stat else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == parent and word in cmd:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow
def test_kill_9_of_demo_takes_its_prefect_server_along(tmp_path: Path) -> None:
    env = {k: v for k, v in _env().items() if not k.startswith("PREFECT_")}
    demo = subprocess.Popen([sys.executable, "-m", "medaug.cli", "demo", "--out", str(tmp_path / "demo"), "--config",
                             str(REPO / "configs" / "tiny.yaml")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    server: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not server and time.monotonic() < deadline and demo.poll() is None:
            time.sleep(0.2)
            server = _children_with(demo.pid, "uvicorn")
        assert server, "the demo never started its ephemeral Prefect server"
        demo.kill()
        demo.wait()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in server), "the ephemeral Prefect server outlived the demo"
    finally:
        if demo.poll() is None:
            demo.kill()
        for p in server:
            if _alive(p):
                os.kill(p, 9)


def test_gate_warns_when_synthetic_and_real_sizes_differ(tmp_path: Path, cyclegan: tuple[Path, Path],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.gate.config import GateConfig
    from pipeline.gate.run import run_gate

    rng = np.random.default_rng(0)
    syn = tmp_path / "syn"
    rows = []
    for k in range(12):
        (syn / "patches").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(rng.uniform(-1, 1, (16, 16, 1)).astype(np.float32), np.eye(4)), str(syn / "patches" / f"p{k}.nii.gz"))
        rows.append({"path": f"patches/p{k}.nii.gz", "modality": "CT", "synthetic": 1, "class": "round"})
    write_manifest(syn, rows, ("path", "modality", "synthetic", "class"))
    cfg = GateConfig(gate_size=32, min_samples=8, encoder_steps=2, encoder_batch=8, encoder_width=4, kid_subsets=2,
                     kid_subset_size=8, max_pairs=10, n_bootstrap=0, min_class_samples=4, figure_samples=2)
    with caplog.at_level("WARNING", logger="pipeline.gate.run"):
        report = run_gate(cyclegan[0], syn, tmp_path / "gate", cfg)
    assert "synthetic images are 16x16 and real ones 32x32" in caplog.text
    assert report.samples and all(len(s.sha256) == 64 for s in report.samples)
    # the written report verifies: build-dataset recomputes its id from the bytes on disk
    from pipeline.dataset.inputs import content_id
    from pipeline.manifest import sha256_file

    written = json.loads((tmp_path / "gate" / "gate_report.json").read_text())
    assert content_id(written) == written["report_id"] == report.report_id
    assert {s["sha256"] for s in written["samples"]} == {sha256_file(syn / r["path"]) for r in rows}


# --- medaug serve stops on SIGTERM even when Prefect's shutdown hangs --------------------------------------------

_STUCK_CHILD = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: time.sleep(600))  # what Prefect's shutdown does when its server is gone
print("ready", flush=True)
time.sleep(600)
"""

_SUPERVISOR = """
import sys
from flows.deploy import supervise
from pipeline.errors import MedaugError
try:
    sys.exit(supervise([sys.executable, "-c", sys.argv[1]], grace_s=2.0))
except MedaugError as exc:
    print("error:", exc, flush=True)
    sys.exit(2)
"""


def test_serve_supervisor_stops_a_child_stuck_in_shutdown(tmp_path: Path) -> None:
    sup = subprocess.Popen([sys.executable, "-c", _SUPERVISOR, _STUCK_CHILD], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert sup.stdout is not None and sup.stdout.readline().strip() == "ready"
        child = _children_with(sup.pid, "time.sleep(600)")
        assert child
        start = time.monotonic()
        sup.terminate()
        out = sup.communicate(timeout=30)[0]
        assert sup.returncode == 2 and time.monotonic() - start < 10
        assert "did not shut down within 2 s" in out and "Traceback" not in out
        time.sleep(0.5)
        assert not any(_alive(p) for p in child)
    finally:
        if sup.poll() is None:
            sup.kill()


def test_extract_patches_full_disk_one_line(tmp_path: Path, tmpfs: Path) -> None:
    ingest = _ingest_like(tmp_path / "ingest")
    free = shutil.disk_usage(tmpfs).free
    (tmpfs / "filler").write_bytes(b"\0" * max(0, free - 6000))
    out = tmpfs / "p"
    line = _one_line_error(_invoke(["extract-patches", "--data", ingest, "--out", out, "--patch-size", "8"]))
    assert "No space left on device" in line and "check free space" in line
    files = [f for f in out.rglob("*") if f.is_file()]
    assert not [f for f in files if f.stat().st_size == 0 or f.name.startswith(".tmp")], files
    for f in files:
        np.asarray(nib.load(str(f)).dataobj)  # every patch left loads in full


def test_two_reports_on_the_same_bytes_a_reject_wins(tmp_path: Path) -> None:
    from pipeline.dataset.inputs import apply_gates, read_synthetic

    inputs = B.make_tumor_inputs(tmp_path / "a", gate_drop=0)  # the first report accepts all 34
    srows = read_manifest(inputs["synthetic"])
    strict = B.write_gate_report(tmp_path / "strict", inputs["synthetic"], srows, "accept", 5)  # rejects the first 5
    items = read_synthetic(inputs["synthetic"], "tumor-patches", {})
    kept, n_out = apply_gates(items, [read_gate(inputs["gate"]), read_gate(strict)], inputs["synthetic"])
    assert n_out == 5 and len(kept) == len(items) - 5


# --- the gate hashes the bytes it judges (one read) --------------------------------------------------------------


def test_gate_hashes_and_judges_the_bytes_of_one_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file replaced between two reads would be judged on one content and bound to another: the gate
    reads each file once. Here any second open of a file first swaps in other bytes."""
    import builtins
    import hashlib
    import io

    from pipeline.gate.config import GateConfig
    from pipeline.gate.images import load_gate_set

    rng = np.random.default_rng(0)
    syn = tmp_path / "syn"
    syn.mkdir()
    first = rng.uniform(-1, 1, (16, 16)).astype(np.float32)
    np.save(syn / "a.npy", first)
    nib.save(nib.Nifti1Image(rng.uniform(-1, 1, (16, 16, 1)).astype(np.float32), np.eye(4)), str(syn / "b.nii.gz"))
    originals = {p.name: p.read_bytes() for p in syn.iterdir()}
    swapped = io.BytesIO()
    np.save(swapped, np.zeros((16, 16), np.float32))
    real_open = builtins.open
    opens: dict[str, int] = {}

    def swapping_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        name = Path(str(file)).name if isinstance(file, str | os.PathLike) else ""
        if name in originals:
            opens[name] = opens.get(name, 0) + 1
            if opens[name] == 2 and name == "a.npy":
                with real_open(syn / name, "wb") as f:
                    f.write(swapped.getvalue())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", swapping_open)
    monkeypatch.setattr(io, "open", swapping_open)
    gset = load_gate_set(syn, GateConfig(gate_size=16), "synthetic", cap=False)
    monkeypatch.undo()
    by_name = {it.path: k for k, it in enumerate(gset.items)}
    assert opens == {"a.npy": 1, "b.nii.gz": 1}
    for name, data in originals.items():
        assert gset.items[by_name[name]].sha256 == hashlib.sha256(data).hexdigest()
    judged = gset.images[np.flatnonzero(gset.item_of == by_name["a.npy"])][0, 0].numpy()
    assert np.allclose(judged, first)


def test_gate_refuses_an_undecodable_file_with_one_line(tmp_path: Path) -> None:
    from pipeline.errors import DatasetError
    from pipeline.gate.config import GateConfig
    from pipeline.gate.images import load_gate_set

    syn = tmp_path / "syn"
    syn.mkdir()
    (syn / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip at all")
    with pytest.raises(DatasetError, match="broken.nii.gz: not a readable NIfTI"):
        load_gate_set(syn, GateConfig(gate_size=16), "synthetic", cap=False)
