"""PACS sources of the `augment` flow: config validation, and the ingest stage against a real
Orthanc whose credentials sit in a Prefect Secret block.

The flow runs (Prefect test harness) stop right after the ingest stage (the mri-ct stages
are replaced by a stub), so no model is trained: what is checked is that PACS series land
in OUT/ingest next to the local sources, that the secret's value and the query's filter
values (a PatientID) appear in no output file, log, flow or task parameter or error message,
and that a wrong secret fails at once (no retry) with a clear error.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from orthanc_server import PASSWORD, USER, orthanc_available, run_orthanc

from flows.params import (
    REPO_ROOT,
    AugmentParams,
    DicomWebSource,
    IngestSection,
    PhantomsConfig,
    load_pipeline_config,
)
from pipeline.errors import ConfigError

KEY = "flows-pacs-test-key"
SECRET = "medaug-test-pacs"
WRONG_PASSWORD = "not-the-orthanc-password-42"

needs_orthanc = pytest.mark.skipif(
    not orthanc_available() and not os.environ.get("CI"),
    reason="Orthanc with the DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)",
)


def write_config(path: Path, ingest: dict[str, Any]) -> Path:
    """A pipeline config on top of configs/tiny.yaml, phantoms off, with this ingest section."""
    import yaml

    config = {"include": [str(REPO_ROOT / "configs" / "tiny.yaml")], "phantoms": {"enabled": False}, "ingest": ingest}
    path.write_text(yaml.safe_dump(config))
    return path


# --- config -------------------------------------------------------------------------------


def test_url_with_credentials_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", {"dicomweb": [{"url": "http://alice:pw-in-url-77@pacs.local:8042/dicom-web"}]})
    with pytest.raises(ConfigError, match=r"\[ingest\] is invalid: dicomweb.0.url: .*must not carry user:password") as info:
        load_pipeline_config(AugmentParams(config=str(config)))
    message = str(info.value)
    assert "pw-in-url-77" not in message and "http://pacs.local:8042/dicom-web" in message
    assert "\n" not in message
    # pydantic's own message (were it printed) hides the input too
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as raw:
        DicomWebSource(url="http://alice:pw-in-url-77@pacs.local/dicom-web")
    assert "pw-in-url-77" not in str(raw.value)


def test_url_with_a_query_string_is_a_config_error(tmp_path: Path) -> None:
    url = "http://pacs.local:8042/dicom-web?access_token=tok-in-url-88"
    config = write_config(tmp_path / "c.yaml", {"dicomweb": [{"url": url}]})
    with pytest.raises(ConfigError, match=r"dicomweb.0.url: .*must not carry a query string") as info:
        load_pipeline_config(AugmentParams(config=str(config)))
    assert "tok-in-url-88" not in str(info.value) and "http://pacs.local:8042/dicom-web" in str(info.value)
    # a raw validation error of the ingest section hides its inputs too (here a URL where a list belongs)
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as raw:
        IngestSection.model_validate({"dicomweb": url})
    assert "tok-in-url-88" not in str(raw.value)


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ({"url": "pacs.local/dicom-web"}, r"dicomweb.0.url: .*http\(s\) URL"),
        ({"url": "http://pacs.local/dicom-web", "query": {"Colour": "blue"}}, r"dicomweb.0.query: .*'Colour' is not supported; use one of: ModalitiesInStudy"),
        ({"url": "http://pacs.local/dicom-web", "query": {"StudyDate": ""}}, r"dicomweb.0.query: .*StudyDate is empty"),
        ({"url": "http://pacs.local/dicom-web", "password": "x"}, r"dicomweb.0.password: Extra inputs"),
    ],
)
def test_bad_pacs_sources_name_the_key(tmp_path: Path, source: dict[str, Any], needle: str) -> None:
    config = write_config(tmp_path / "c.yaml", {"dicomweb": [source]})
    with pytest.raises(ConfigError, match=needle):
        load_pipeline_config(AugmentParams(config=str(config)))


def test_pacs_source_from_yaml(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", {"dicomweb": [
        {"url": "https://pacs.local/dicom-web", "query": {"ModalitiesInStudy": "CT", "StudyDate": 20240101},
         "credentials_secret": "pacs-reader"},
    ]})
    (source,) = load_pipeline_config(AugmentParams(config=str(config))).ingest.dicomweb
    assert source.query == {"ModalitiesInStudy": "CT", "StudyDate": "20240101"}  # a YAML number is a date here
    assert source.credentials_secret == "pacs-reader"


def test_pacs_sources_count_as_sources_for_phantoms_auto() -> None:
    from flows.params import use_phantoms

    pacs = IngestSection(dicomweb=[DicomWebSource(url="http://pacs.local/dicom-web")])
    assert use_phantoms(PhantomsConfig(enabled="auto"), IngestSection())
    assert not use_phantoms(PhantomsConfig(enabled="auto"), pacs)


def test_pacs_ingest_is_never_cached() -> None:
    from flows.tasks import ingest_cache_key, pacs_ref

    local = {"sources": [], "out": "/tmp/x", "modality": None, "key_source": "demo"}
    assert ingest_cache_key(None, local) is not None  # type: ignore[arg-type]
    pacs = {**local, "pacs": [pacs_ref({"config": "/tmp/c.yaml"}, 0, "http://pacs.local/dicom-web")]}
    assert ingest_cache_key(None, pacs) is None  # type: ignore[arg-type]


def test_the_ingest_task_reads_a_pacs_query_from_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PACS reaches the ingest task as a reference (config and position), never with its
    filter values; the task reads url, query and credentials from the config, and refuses a
    config that no longer names that PACS."""
    from flows.tasks import pacs_ref, resolve_pacs_source

    for var in ("MEDAUG_DICOMWEB_USER", "MEDAUG_DICOMWEB_PASSWORD", "MEDAUG_DICOMWEB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    config = write_config(tmp_path / "c.yaml", {"dicomweb": [
        {"url": "http://a.local/dicom-web", "query": {"ModalitiesInStudy": "MR"}},
        {"url": "http://b.local/dicom-web", "query": {"PatientID": "PH-SECRET-1"}},
    ]})
    ref = pacs_ref({"config": str(config), "overrides": ["ingest.modality=CT"], "pipeline": None}, 1, "http://b.local/dicom-web")
    assert "PH-SECRET-1" not in json.dumps(ref)
    source = resolve_pacs_source(ref)
    assert (source.url, dict(source.query)) == ("http://b.local/dicom-web", {"PatientID": "PH-SECRET-1"})
    assert source.auth is not None and "MEDAUG_DICOMWEB_USER" in source.auth.source

    write_config(config, {"dicomweb": [{"url": "http://a.local/dicom-web"}]})  # edited while the run was going
    with pytest.raises(ConfigError, match="ingest.dicomweb entry 2 is no longer the PACS http://b.local/dicom-web"):
        resolve_pacs_source(ref)


def test_nothing_to_ingest(tmp_path: Path) -> None:
    from prefect.logging import disable_run_logger

    from flows.augment import run_augment

    config = write_config(tmp_path / "c.yaml", {})
    with disable_run_logger(), pytest.raises(ConfigError, match="names no ingest.sources and no ingest.dicomweb"):
        run_augment(AugmentParams(config=str(config), out=str(tmp_path / "out")))


# --- the flow against Orthanc -------------------------------------------------------------


class StopAfterIngest(Exception):
    """Raised by the stub that replaces the training stages: the run ends after ingest."""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.phantoms import write_cohort

    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, n_subjects=4, size=32, seed=5)
    return out


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, cohort: Path):  # type: ignore[no-untyped-def]
    with run_orthanc(tmp_path_factory.mktemp("orthanc"), cohort) as server:
        yield server


@pytest.fixture
def ingest_only(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Stop `augment` after its ingest stage; the list gets the flow's result so far."""
    import flows.augment

    seen: list[dict[str, Any]] = []

    def stop(cfg: Any, params: Any, out: Path, result: dict[str, Any]) -> Any:
        seen.append(dict(result))
        raise StopAfterIngest

    monkeypatch.setattr(flows.augment, "mri_ct_stages", stop)
    monkeypatch.setenv("MEDAUG_DEID_KEY", KEY)
    for var in ("MEDAUG_DICOMWEB_USER", "MEDAUG_DICOMWEB_PASSWORD", "MEDAUG_DICOMWEB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return seen


def save_secret(name: str, value: Any) -> None:
    from prefect.blocks.system import Secret

    Secret(value=value).save(name, overwrite=True)


def run_augment_flow(config: Path, out: Path) -> Any:
    """Run `augment` in-process; returns its final state."""
    from flows.augment import augment

    return augment(config=str(config), out=str(out), return_state=True)


def prefect_text() -> str:
    """Everything the Prefect API holds about runs: logs, flow parameters, state messages, artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    parts: list[str] = []
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(limit=200, offset=len(parts)):
            parts += [log.message for log in batch]
        for run in client.read_flow_runs(limit=200):
            parts.append(json.dumps(run.parameters, default=str))
            parts.append(str(run.state.message if run.state else ""))
        for task_run in client.read_task_runs(limit=200):
            parts.append(str(task_run.state.message if task_run.state else ""))
            parts.append(json.dumps(task_run.task_inputs, default=str))
        parts += [f"{a.description} {a.data}" for a in client.read_artifacts(limit=200)]
    return "\n".join(parts)


def prefect_database_folder() -> Path:
    """The folder of the Prefect test harness's SQLite database (with its -wal and -shm files)."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    assert url and url.startswith("sqlite+aiosqlite:///"), "the test harness runs on SQLite"
    return Path(url.removeprefix("sqlite+aiosqlite:///")).parent


def ingest_run_counts(flow_run_id: Any) -> list[int]:
    """run_count of every ingest task run under a flow run (1: not retried)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *(c.id for c in children)]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    return [r.run_count for r in runs if r.name.rsplit("-", 1)[0] == "ingest"]  # not the subflow's "ingest-sources"


def files_holding(root: Path, needle: str) -> list[str]:
    return [str(f) for f in root.rglob("*") if f.is_file() and needle.encode() in f.read_bytes()]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
@needs_orthanc
def test_augment_ingests_a_pacs_with_a_secret_block(
    tmp_path: Path, cohort: Path, pacs, ingest_only: list[dict[str, Any]],  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    import pydicom

    from pipeline.ingest import run_ingest
    from pipeline.manifest import read_manifest

    caplog.set_level(logging.DEBUG)
    save_secret(SECRET, {"user": USER, "password": PASSWORD})
    # one patient's CT study: the PatientID is an identifier, and Prefect stores and shows
    # every flow and task parameter, so it must not become one
    ct_folder = sorted((cohort / "dicom").rglob("CT/*.dcm"))[0].parent
    patient = str(pydicom.dcmread(next(ct_folder.glob("*.dcm")), stop_before_pixels=True).PatientID)
    config = write_config(tmp_path / "pacs.yaml", {
        "sources": [str(cohort / "nifti" / "MR")],
        "dicomweb": [{"url": pacs.dicomweb, "query": {"ModalitiesInStudy": "CT", "PatientID": patient},
                      "credentials_secret": SECRET}],
    })
    out = tmp_path / "out"
    state = run_augment_flow(config, out)
    assert state.is_failed() and isinstance(state.result(raise_on_failure=False), StopAfterIngest)
    (result,) = ingest_only
    assert result["ingest"] == str(out / "ingest")

    # CT (that patient's only) came from the PACS, MR from the local folder, both into the one
    # training ingest folder, each exactly as a folder ingest of the same files writes it.
    run_ingest([ct_folder], tmp_path / "ref-dicom", key=KEY.encode())
    run_ingest([cohort / "nifti" / "MR"], tmp_path / "ref-nifti", key=KEY.encode())

    def rows(folder: Path, modality: str) -> list[tuple[str, str]]:
        return sorted((r["path"], r["sha256"]) for r in read_manifest(folder) if r["modality"] == modality)

    assert rows(out / "ingest", "CT") == rows(tmp_path / "ref-dicom", "CT") != []
    assert rows(out / "ingest", "MR") == rows(tmp_path / "ref-nifti", "MR") != []
    report = json.loads((out / "ingest" / "ingest_report.json").read_text())
    assert report["pacs_series_found"] == len(rows(out / "ingest", "CT")) == 1 and report["pacs_series_failed"] == 0
    assert not (out / "ingest-dicom").exists()  # a PACS feeds training, not the DICOM-only route

    # Neither the secret's value nor the PatientID is anywhere: output files, Prefect's database
    # (flow and task parameters, logs, states, events) and storage, artifacts, console.
    text = prefect_text()
    for value in (PASSWORD, patient):
        assert value not in text
        assert files_holding(out, value) == []
        assert files_holding(Path(os.environ["PREFECT_HOME"]), value) == []
        assert files_holding(prefect_database_folder(), value) == []
    assert f"Prefect Secret block '{SECRET}'" in text  # the ingest logged where the credentials are ...
    assert "PACS 1 of 1" in text and "studies filtered by ModalitiesInStudy, PatientID" in text  # ... and the keys
    captured = capfd.readouterr()
    for value in (PASSWORD, patient):
        assert value not in caplog.text + captured.out + captured.err


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
@needs_orthanc
def test_augment_with_a_wrong_secret_fails_clearly(
    tmp_path: Path, pacs, ingest_only: list[dict[str, Any]], capfd: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.errors import DicomWebAuthError, FatalIngestError

    def run(secret: str | None) -> tuple[Exception, list[int]]:
        """A PACS-only run (no local source) with credentials from the Secret block `secret` (None: the environment)."""
        source = {"url": pacs.dicomweb, "query": {"ModalitiesInStudy": "CT"}}
        if secret is not None:
            source["credentials_secret"] = secret
        name = secret or "env"
        config = write_config(tmp_path / f"{name}.yaml", {"dicomweb": [source]})
        state = run_augment_flow(config, tmp_path / name)
        assert state.is_failed()
        error = state.result(raise_on_failure=False)
        assert isinstance(error, Exception)
        assert not ingest_only, "the run went past the ingest stage"
        return error, ingest_run_counts(state.state_details.flow_run_id)

    # Refused credentials: one login attempt only (tiny.yaml has runtime.retries 1, for a PACS
    # that is briefly down; repeating a refused login can lock the account).
    save_secret("medaug-test-pacs-wrong", {"user": USER, "password": WRONG_PASSWORD})
    error, counts = run("medaug-test-pacs-wrong")
    assert isinstance(error, DicomWebAuthError) and isinstance(error, FatalIngestError)  # the CLI's exit 2 and one line
    assert "stage ingest: cannot query the PACS: DICOMweb server" in str(error)
    assert "refused the credentials (HTTP 401); check the Prefect Secret block 'medaug-test-pacs-wrong'" in str(error)
    assert "not retried" in str(error) and WRONG_PASSWORD not in str(error)
    assert counts == [1]

    monkeypatch.setenv("MEDAUG_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDAUG_DICOMWEB_PASSWORD", WRONG_PASSWORD)
    error, counts = run(None)
    assert isinstance(error, DicomWebAuthError)
    assert "refused the credentials (HTTP 401); check the environment variables MEDAUG_DICOMWEB_USER/MEDAUG_DICOMWEB_PASSWORD" in str(error)
    assert WRONG_PASSWORD not in str(error)
    assert counts == [1]
    monkeypatch.delenv("MEDAUG_DICOMWEB_USER")
    monkeypatch.delenv("MEDAUG_DICOMWEB_PASSWORD")

    error, counts = run("medaug-test-no-such-block")
    assert isinstance(error, ConfigError)
    assert "stage ingest: the Prefect Secret block 'medaug-test-no-such-block'" in str(error) and "does not exist" in str(error)
    assert counts == [1]  # a ConfigError is not retried

    save_secret("medaug-test-pacs-malformed", {"username": USER, "password": WRONG_PASSWORD})
    error, counts = run("medaug-test-pacs-malformed")
    assert isinstance(error, ConfigError)
    assert "the Prefect Secret block 'medaug-test-pacs-malformed'" in str(error)
    assert "has the keys password, username" in str(error)
    assert counts == [1]

    captured = capfd.readouterr()
    assert WRONG_PASSWORD not in prefect_text() + captured.out + captured.err
