"""The `augment` flow end to end on the tiny phantom config, under Prefect's test harness.

One trained mri-ct run is shared by the module; the other tests re-use its output (cache,
resume, idempotence) or its checkpoint (Dask runner, gate reject) so the whole module
trains one tiny CycleGAN and one tiny tumor GAN.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

TINY = "configs/tiny.yaml"


def run_flow(out: Path, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """Run `augment` in-process; returns (final state, result). Raises what the flow raises."""
    from flows.augment import augment

    state = augment(config=TINY, out=str(out), return_state=True, **kwargs)
    return state, state.result()


def artifacts_by_key() -> dict[str, Any]:
    """The newest artifact of every key in the harness database."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(sort=ArtifactSort.CREATED_DESC, limit=200)
    newest: dict[str, Any] = {}
    for a in arts:
        if a.key and a.key not in newest:
            newest[a.key] = a
    return newest


def all_log_text() -> str:
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(limit=200, offset=len(messages)):
            messages += [log.message for log in batch]
    return "\n".join(messages)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("augment") / "run"
    state, result = run_flow(out)
    assert state.is_completed()
    return out, result


def test_tiny_mri_ct_pipeline_writes_a_dataset(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    out, result = tiny_run
    assert result["pipeline"] == "mri-ct"
    for key in ("phantoms", "ingest", "ingest_dicom", "run_dir", "synthetic", "dataset"):
        assert Path(result[key]).is_dir(), key
    assert (out / "ingest-dicom" / "manifest.csv").is_file()
    assert (Path(result["run_dir"]) / "checkpoints" / "last.pt").is_file()
    assert (out / "gate" / "gate_report.json").is_file() and Path(result["gate_report"]).is_file()
    with open(out / "dataset" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["synthetic"] for r in rows} >= {"0"}
    assert all(not Path(r["path"]).is_absolute() for r in rows)
    assert (out / "data_manifests" / result["dataset_hash"] / "manifest.csv").is_file()
    # no MEDAUG_GATE_KEY in the tests (conftest): the report is unsigned and the datasheet says so
    from pipeline.gate.signing import NOT_VERIFIED_NOTE

    assert json.loads((out / "gate" / "gate_report.json").read_text())["signature"] is None
    assert NOT_VERIFIED_NOTE in (out / "dataset" / "datasheet.md").read_text(encoding="utf-8")


def test_artifacts_are_published(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    arts = artifacts_by_key()
    for key in ("gate-report", "gate-checks", "dataset", "train-progress", "cyclegan-samples"):
        assert key in arts, f"missing artifact {key}; have {sorted(arts)}"
    assert arts["train-progress"].type == "progress" and float(arts["train-progress"].data) == 100.0
    assert arts["dataset"].type == "markdown"  # Prefect stores a link artifact as Markdown
    assert "file://" in str(arts["dataset"].data) and "/dataset" in str(arts["dataset"].data)
    assert arts["gate-report"].type == "markdown" and "accept" in str(arts["gate-report"].data).lower()
    assert arts["gate-checks"].type == "table"
    # real patients' pixels stay on disk (a link); synthetic samples are inlined
    assert "file://" in str(arts["cyclegan-samples"].data) and "base64" not in str(arts["cyclegan-samples"].data)
    assert arts["gate-accepted-samples"].type == "image"
    assert "file://" in str(arts["dataset-sample-grid"].data)
    assert arts["dataset-datasheet"].type == "markdown"


def test_no_patient_identifier_in_logs_or_artifacts(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    import pydicom

    out, _ = tiny_run
    with open(out / "phantoms" / "cohort.csv", newline="") as f:
        cohort = list(csv.DictReader(f))
    identifiers = {r["patient_id"] for r in cohort}
    for series in (out / "phantoms" / "dicom").glob("*/*"):
        ds = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
        identifiers |= {str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber)}
    # inlined images (data: URLs of synthetic pixels) are base64 noise where any short ID can occur by chance
    texts = [str(a.description) + ("" if str(a.data).startswith("data:") else str(a.data)) for a in artifacts_by_key().values()]
    text = all_log_text() + "\n".join(texts)
    assert text
    leaked = sorted(i for i in identifiers if i and i in text)
    assert not leaked, f"patient identifiers in logs/artifacts: {leaked}"


def task_states(flow_run_id: Any) -> dict[str, list[str]]:
    """State names of the task runs of a flow run and its subflows, by task name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *(c.id for c in children)]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    states: dict[str, list[str]] = {}
    for r in runs:
        states.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name if r.state else "")
    return states


def test_rerun_uses_the_cache_and_resumes(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    out, first = tiny_run
    ingest_manifest = out / "ingest" / "manifest.csv"
    before = ingest_manifest.stat().st_mtime_ns
    ckpt = Path(first["run_dir"]) / "checkpoints" / "last.pt"
    ckpt_before = ckpt.stat().st_mtime_ns
    state, again = run_flow(out)
    assert state.is_completed()
    states = task_states(state.state_details.flow_run_id)
    assert states["ingest"] == ["Cached", "Cached"], states
    assert states["preprocess-slices"] == ["Cached"], states
    assert ingest_manifest.stat().st_mtime_ns == before, "an unchanged cohort was ingested again"
    assert again["run_dir"] == first["run_dir"]
    assert ckpt.stat().st_mtime_ns == ckpt_before, "a finished training run was trained again"
    assert again["dataset_hash"] == first["dataset_hash"]


def test_a_retried_training_task_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import models.train_cyclegan as mtc

    real = mtc.train_cyclegan
    calls: list[bool] = []

    def crashes_once(cfg: Any, data: Any, run_dir: Path, resume: bool = False, **kwargs: Any) -> Any:
        calls.append(resume)
        result = real(cfg, data, run_dir, resume=resume, **kwargs)
        if len(calls) == 1:
            raise RuntimeError("simulated crash after the checkpoint was written")
        return result

    monkeypatch.setattr(mtc, "train_cyclegan", crashes_once)
    state, result = run_flow(tmp_path / "retry", overrides=["runtime.train_retries=1"])
    assert state.is_completed()
    assert calls == [False, True]  # the retry resumed from RUN_DIR/checkpoints/last.pt
    assert (Path(result["dataset"]) / "manifest.csv").is_file()


def test_given_checkpoint_on_a_dask_cluster(tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    _, first = tiny_run
    ckpt = Path(first["run_dir"]) / "checkpoints" / "last.pt"
    state, result = run_flow(tmp_path / "dask", checkpoint=str(ckpt), overrides=["runtime.task_runner=dask"])
    assert state.is_completed()
    assert "run_dir" not in result  # no training: the given checkpoint generated
    assert (tmp_path / "dask" / "ingest" / "manifest.csv").is_file()
    assert (tmp_path / "dask" / "ingest-dicom" / "manifest.csv").is_file()
    assert (Path(result["dataset"]) / "manifest.csv").is_file()


def test_gate_key_from_a_secret_block_signs_and_checks_the_report(tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """runtime.gate_key_secret: the gate task signs with the Secret block's key, the dataset task checks it;
    the key is in no log, parameter or artifact."""
    from prefect.blocks.system import Secret

    from pipeline.gate.signing import key_id

    key = "gate-key-4f1c9e: not a real one"
    Secret(value=key).save("medaug-gate-key-test", overwrite=True)
    _, first = tiny_run
    ckpt = Path(first["run_dir"]) / "checkpoints" / "last.pt"
    out = tmp_path / "signed"
    state, result = run_flow(out, checkpoint=str(ckpt), overrides=["runtime.gate_key_secret=medaug-gate-key-test"])
    assert state.is_completed()
    report = json.loads((out / "gate" / "gate_report.json").read_text())
    assert report["signature"]["key_id"] == key_id(key.encode())
    assert f"verified with the gate key (key id `{key_id(key.encode())}`)" in (out / "dataset" / "datasheet.md").read_text()
    texts = [f"{a.description} {a.data}" for a in artifacts_by_key().values()]
    assert key not in all_log_text() + "\n".join(texts)
    with pytest.raises(ConfigError, match="no-such-gate-key"):
        run_flow(tmp_path / "missing", checkpoint=str(ckpt), overrides=["runtime.gate_key_secret=no-such-gate-key"])


def test_gate_reject_stops_before_the_dataset(tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from pipeline.errors import GateRejected

    _, first = tiny_run
    ckpt = Path(first["run_dir"]) / "checkpoints" / "last.pt"
    out = tmp_path / "reject"
    with pytest.raises(GateRejected, match=r"stage gate: .*fid"):
        run_flow(out, checkpoint=str(ckpt), overrides=["gate.fid_max_ratio=0.000001"])
    assert (out / "gate" / "gate_report.json").is_file()
    assert not (out / "dataset").exists()


def test_a_failing_stage_is_named(tmp_path: Path) -> None:
    from pipeline.errors import MedaugError

    missing = tmp_path / "no-such-folder"
    with pytest.raises(MedaugError, match="stage ingest: "):
        run_flow(tmp_path / "bad", overrides=["phantoms.enabled=false", f"ingest.sources=[{missing}]"])
    assert not (tmp_path / "bad" / "dataset").exists()


def test_tiny_tumor_patches_pipeline(tmp_path: Path) -> None:
    state, result = run_flow(tmp_path / "tumor", pipeline="tumor-patches")
    assert state.is_completed() and result["pipeline"] == "tumor-patches"
    with open(Path(result["synthetic"]) / "manifest.csv", newline="") as f:
        classes = {r["class"] for r in csv.DictReader(f)}
    assert classes == {"round", "necrotic"}
    assert (Path(result["dataset"]) / "manifest.csv").is_file()


def test_tiny_tumor_insertion_pipeline(tmp_path: Path) -> None:
    """dataset.synthesis: insertion: the GAN's lesions go into real training CTs, are gated, and the
    dataset holds the inserted volumes in training only (seam thresholds opened: a 20-step GAN's
    lesions are blobs, which the seam check rejects, as tests/test_insertion.py shows on purpose)."""
    overrides = ["dataset.synthesis=insertion", "phantoms.n_subjects=16", "phantoms.size=64", "tumor_gan.patch_size=32",
                 "gate.seam_max_ratio=1000", "gate.seam_item_ratio=1000"]
    state, result = run_flow(tmp_path / "insertion", pipeline="tumor-patches", overrides=overrides)
    assert state.is_completed() and Path(result["insertion"]).is_dir()
    with open(Path(result["dataset"]) / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    inserted = [r for r in rows if r["synthetic"] == "1"]
    assert inserted and {r["split"] for r in inserted} == {"train"} and {r["class"] for r in inserted} == {"necrotic"}
    report = (Path(result["out"]) / "gate" / "gate_report.json").read_text()
    assert '"seam"' in report
    assert "| seam |" in (Path(result["out"]) / "gate" / "gate_report.md").read_text()
