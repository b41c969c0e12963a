"""PACS ingest over DICOMweb, against a real Orthanc with its DICOMweb plugin.

The phantom cohort's DICOM tree is uploaded to a throwaway Orthanc on a loopback port;
`ingest_dicomweb` must give the same volumes as a folder ingest of the same files, keep
credentials out of every output and log, retry a connection dropped mid-transfer, and
never ingest a half-retrieved series.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from orthanc_server import PASSWORD, USER, orthanc_available, run_faulty_proxy, run_orthanc

from pipeline.errors import ConfigError, DicomWebAuthError, FatalIngestError
from pipeline.ingest import run_ingest
from pipeline.ingest.dicomweb import (
    DicomWebAuth,
    DicomWebError,
    PacsSource,
    ingest_dicomweb,
    ingest_with_pacs,
    parse_query,
    redact_url,
    split_multipart,
)
from pipeline.manifest import read_manifest
from pipeline.phantoms import write_cohort

KEY = b"dicomweb-test-key"

needs_orthanc = pytest.mark.skipif(
    not orthanc_available() and not os.environ.get("CI"),
    reason="Orthanc with the DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)",
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, n_subjects=8, size=32, seed=3)
    return out


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, cohort: Path):  # type: ignore[no-untyped-def]
    with run_orthanc(tmp_path_factory.mktemp("orthanc"), cohort) as server:
        yield server


def test_parse_query_rejects_unknown_keys_and_bad_syntax() -> None:
    assert parse_query(["ModalitiesInStudy=CT", "StudyDate=20240101-20241231"]) == {
        "ModalitiesInStudy": "CT",
        "StudyDate": "20240101-20241231",
    }
    with pytest.raises(DicomWebError, match="not supported; use one of"):
        parse_query(["Colour=blue"])
    with pytest.raises(DicomWebError, match="KEY=VALUE"):
        parse_query(["ModalitiesInStudy"])
    with pytest.raises(DicomWebError, match="StudyDate= has no value"):
        parse_query(["StudyDate="])
    # a malformed item may be a value typed with the wrong separator: it is not echoed
    with pytest.raises(DicomWebError, match="--query 2 of 2 has no '='") as info:
        parse_query(["ModalitiesInStudy=CT", "PatientID:PH123456"])
    assert "PH123456" not in str(info.value)


def test_split_multipart_known_answer() -> None:
    body = b"--b1\r\nContent-Type: application/dicom\r\n\r\nAAA\r\n--b1\r\n\r\nBB\r\n--b1--\r\n"
    assert split_multipart('multipart/related; type="application/dicom"; boundary=b1', body) == [b"AAA", b"BB"]
    assert split_multipart("application/json", body) == []


@needs_orthanc
def test_pacs_ingest_equals_folder_ingest(tmp_path: Path, cohort: Path, pacs, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    auth = DicomWebAuth(USER, PASSWORD)
    ingest_dicomweb(pacs.dicomweb, {"ModalitiesInStudy": "CT"}, tmp_path / "pacs", auth=auth, key=KEY)
    run_ingest([cohort / "dicom"], tmp_path / "folder", key=KEY)

    pacs_rows = read_manifest(tmp_path / "pacs")
    folder_ct = [r for r in read_manifest(tmp_path / "folder") if r["modality"] == "CT"]
    assert pacs_rows and all(r["modality"] == "CT" for r in pacs_rows)
    # Same pseudonyms, same voxels, same bytes as the folder route.
    assert sorted((r["path"], r["sha256"]) for r in pacs_rows) == sorted((r["path"], r["sha256"]) for r in folder_ct)

    # Credentials never reach outputs or logs.
    for f in (tmp_path / "pacs").rglob("*"):
        if f.is_file():
            assert PASSWORD.encode() not in f.read_bytes()
    assert PASSWORD not in caplog.text


@needs_orthanc
def test_wrong_credentials_fail_clearly(tmp_path: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    # its own type (a FatalIngestError, so the CLI still exits 2), which callers must not retry
    with pytest.raises(DicomWebAuthError, match="refused the credentials"):
        ingest_dicomweb(pacs.dicomweb, {}, tmp_path / "out", auth=DicomWebAuth(USER, "wrong"), key=KEY)
    assert issubclass(DicomWebAuthError, FatalIngestError) and not issubclass(DicomWebAuthError, DicomWebError)


def test_server_down_retries_then_clear_error(tmp_path: Path) -> None:
    # Nothing listens on port 9 (discard) of the loopback interface.
    with pytest.raises(FatalIngestError, match=r"connection failed .* after 3 tries"):
        ingest_dicomweb("http://127.0.0.1:9/dicom-web", {}, tmp_path / "out", key=KEY, retries=2, backoff_s=0.01)
    assert not (tmp_path / "out" / "volumes").exists()


@needs_orthanc
def test_dropped_transfer_is_retried(tmp_path: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    with run_faulty_proxy(pacs.url, drop_first=1) as proxy:
        report = ingest_dicomweb(
            f"{proxy.url}/dicom-web", {"ModalitiesInStudy": "MR"}, tmp_path / "out",
            auth=DicomWebAuth(USER, PASSWORD), key=KEY, backoff_s=0.01,
        )
    assert proxy.dropped == 1
    assert report.volumes_written == len([r for r in read_manifest(tmp_path / "out")])
    assert report.volumes_written > 0
    assert not [r for r in read_manifest(tmp_path / "out" / "quarantine.csv") if r["kind"] == "dicomweb"]


@needs_orthanc
def test_always_dropping_server_ingests_nothing_half_retrieved(tmp_path: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    with run_faulty_proxy(pacs.url, drop_first=10_000) as proxy:
        report = ingest_dicomweb(
            f"{proxy.url}/dicom-web", {"ModalitiesInStudy": "CT"}, tmp_path / "out",
            auth=DicomWebAuth(USER, PASSWORD), key=KEY, retries=1, backoff_s=0.01,
        )
    assert report.volumes_written == 0
    assert not list((tmp_path / "out" / "volumes").glob("*.nii.gz"))
    failed = [r for r in read_manifest(tmp_path / "out" / "quarantine.csv") if r["kind"] == "dicomweb"]
    assert failed and all("not ingested" in r["reason"] for r in failed)
    assert all(r["source"].startswith("dicomweb series ") for r in failed)


def test_auth_from_secret_value_accepted_shapes() -> None:
    basic = DicomWebAuth.from_secret_value({"user": "alice", "password": "s3cret-pw"}, source="block 'pacs'")
    assert (basic.user, basic.password, basic.token, basic.source) == ("alice", "s3cret-pw", None, "block 'pacs'")
    assert basic.headers() == {} and basic.httpx_auth() is not None
    assert "s3cret-pw" not in repr(basic)
    token = DicomWebAuth.from_secret_value({"token": "tok-123"})
    assert token.headers() == {"Authorization": "Bearer tok-123"} and token.httpx_auth() is None
    assert "tok-123" not in repr(token)
    # a plain string is a bearer token (surrounding whitespace from a paste dropped)
    assert DicomWebAuth.from_secret_value(" tok-456\n").headers() == {"Authorization": "Bearer tok-456"}
    # a string holding a JSON object is that object
    assert DicomWebAuth.from_secret_value('{"user": "bob", "password": "pw-2"}').password == "pw-2"


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ({"username": "alice", "password": "s3cret-pw"}, "has the keys password, username"),
        ({"user": "alice"}, "has the keys user;"),
        ({"user": "alice", "password": "s3cret-pw", "token": "tok-123"}, "has the keys password, token, user"),
        ({"user": "alice", "password": ""}, "must be a non-empty string"),
        ({"token": 12345678}, "must be a non-empty string"),
        ("   ", "is empty"),
        ('{"user": "alice", "password": "s3cret-pw"', "starts like JSON but does not parse"),
        (["alice", "s3cret-pw"], "holds a value of type list"),
        (12345678, "holds a value of type int"),
    ],
)
def test_auth_from_malformed_secret_says_what_is_wrong_without_the_value(value: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        DicomWebAuth.from_secret_value(value, source="the Prefect Secret block 'pacs'")
    message = str(info.value)
    assert "the Prefect Secret block 'pacs'" in message and '{"user": ..., "password": ...}' in message
    for secret in ("s3cret-pw", "tok-123", "12345678"):
        assert secret not in message


@needs_orthanc
def test_several_pacs_and_local_sources_in_one_ingest(tmp_path: Path, cohort: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    """CT from one PACS query and MR NIfTI from a local folder land in one manifest, each as its own
    route would write it; a second query of the same PACS adds its series to the PACS counts."""
    auth = DicomWebAuth(USER, PASSWORD)
    servers = [
        PacsSource(pacs.dicomweb, {"ModalitiesInStudy": "CT"}, auth),
        PacsSource(pacs.dicomweb, {"ModalitiesInStudy": "MR", "StudyDate": "19000101-19000102"}, auth),  # matches none
    ]
    ingest_with_pacs(servers, tmp_path / "mixed", sources=[cohort / "nifti" / "MR"], key=KEY)
    run_ingest([cohort / "dicom"], tmp_path / "dicom", key=KEY)
    run_ingest([cohort / "nifti" / "MR"], tmp_path / "nifti", key=KEY)

    def rows(folder: Path, modality: str) -> list[tuple[str, str]]:
        return sorted((r["path"], r["sha256"]) for r in read_manifest(folder) if r["modality"] == modality)

    assert rows(tmp_path / "mixed", "CT") == rows(tmp_path / "dicom", "CT") != []
    assert rows(tmp_path / "mixed", "MR") == rows(tmp_path / "nifti", "MR") != []
    import json

    report = json.loads((tmp_path / "mixed" / "ingest_report.json").read_text())
    assert report["pacs_series_found"] == len(rows(tmp_path / "dicom", "CT")) and report["pacs_series_failed"] == 0


@needs_orthanc
def test_auth_errors_name_where_the_credentials_come_from(tmp_path: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    wrong = DicomWebAuth.from_secret_value({"user": USER, "password": "wrong-pw-987"}, source="the Prefect Secret block 'pacs'")
    with pytest.raises(FatalIngestError, match="refused the credentials.*check the Prefect Secret block 'pacs'") as info:
        ingest_with_pacs([PacsSource(pacs.dicomweb, {}, wrong)], tmp_path / "out", key=KEY)
    assert "wrong-pw-987" not in str(info.value)
    with pytest.raises(FatalIngestError, match="asks for credentials and none were given.*MEDAUG_DICOMWEB_USER"):
        ingest_with_pacs([PacsSource(pacs.dicomweb, {}, DicomWebAuth.from_env({}))], tmp_path / "out", key=KEY)


def _medaug(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDAUG_DICOMWEB_")}
    env |= {"MEDAUG_DEID_KEY": KEY.decode(), "COLUMNS": "200", **env_extra}
    medaug = Path(sys.executable).with_name("medaug")
    return subprocess.run([str(medaug), *args], env=env, capture_output=True, text=True, timeout=300)


@needs_orthanc
def test_cli_ingest_from_a_pacs_with_credentials_from_the_environment(tmp_path: Path, cohort: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    creds = {"MEDAUG_DICOMWEB_USER": USER, "MEDAUG_DICOMWEB_PASSWORD": PASSWORD}
    done = _medaug(["ingest", "--dicomweb", pacs.dicomweb, "--query", "ModalitiesInStudy=MR", "--out", str(tmp_path / "out")], creds)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = read_manifest(tmp_path / "out")
    assert rows and all(r["modality"] == "MR" for r in rows)
    assert PASSWORD not in done.stdout + done.stderr

    # without credentials: one clear line naming what to set, exit 2, no traceback
    done = _medaug(["ingest", "--dicomweb", pacs.dicomweb, "--out", str(tmp_path / "anon")], {})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "MEDAUG_DICOMWEB_USER" in done.stderr


def test_cli_refuses_a_url_that_carries_a_password(tmp_path: Path) -> None:
    done = _medaug(["ingest", "--dicomweb", "http://alice:s3cret-pw@127.0.0.1:9/dicom-web", "--out", str(tmp_path / "out")], {})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "must not carry user:password" in done.stderr and "s3cret-pw" not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()


def test_redact_url_drops_credentials_query_and_fragment() -> None:
    assert redact_url("https://alice:pw-1@pacs.local:8042/dicom-web?access_token=tok-123#frag") == (
        "https://pacs.local:8042/dicom-web"
    )


def test_cli_refuses_a_url_with_a_query_string(tmp_path: Path) -> None:
    done = _medaug(["ingest", "--dicomweb", "http://127.0.0.1:9/dicom-web?access_token=tok-123", "--out", str(tmp_path / "out")], {})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "must not carry a query string" in done.stderr and "tok-123" not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()


# --- no UID or filter value leaves ingest (DICOM PS3.15 Annex E) ----------------------------


def cohort_uids(cohort: Path) -> dict[str, set[str]]:
    """StudyInstanceUID, SeriesInstanceUID and PatientID values of the cohort's DICOM files."""
    import pydicom

    found: dict[str, set[str]] = {"StudyInstanceUID": set(), "SeriesInstanceUID": set(), "PatientID": set()}
    for f in (cohort / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for name, values in found.items():
            values.add(str(ds.data_element(name).value))
    return found


def leaks(text: str, values: set[str]) -> list[str]:
    return sorted(v for v in values if v in text)


def files_holding_any(root: Path, values: set[str]) -> list[str]:
    if not root.exists():
        return []
    return [f"{f.name}: {v}" for f in root.rglob("*") if f.is_file() for v in values if v.encode() in f.read_bytes()]


@contextmanager
def run_answering_proxy(upstream: str, answer: Callable[[str], tuple[int, bytes] | None]) -> Iterator[str]:
    """An HTTP proxy to `upstream`; `answer(path)` (path without query) may replace its answer by
    (status, body) sent as application/dicom+json. Yields the proxy's root URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            override = answer(self.path.split("?", 1)[0])
            if override is None:
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")}
                r = httpx.get(upstream + self.path, headers=headers, timeout=30)
                status, body, ctype = r.status_code, r.content, r.headers.get("content-type", "application/octet-stream")
            else:
                (status, body), ctype = override, "application/dicom+json"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@needs_orthanc
def test_a_refused_retrieve_is_reported_without_uids(tmp_path: Path, cohort: Path, pacs, caplog) -> None:  # type: ignore[no-untyped-def]
    """A 404 on one WADO-RS retrieve: that series is quarantined, named by its position, and no
    StudyInstanceUID or SeriesInstanceUID reaches the log, quarantine.csv or ingest_report.json."""
    import pydicom

    caplog.set_level(logging.DEBUG)
    uids = cohort_uids(cohort)
    first_ct = pydicom.dcmread(sorted((cohort / "dicom").rglob("CT/*.dcm"))[0], stop_before_pixels=True)
    gone = f"/series/{first_ct.SeriesInstanceUID}"
    with run_answering_proxy(pacs.url, lambda path: (404, b"") if path.endswith(gone) else None) as proxy:
        report = ingest_dicomweb(f"{proxy}/dicom-web", {"ModalitiesInStudy": "CT"}, tmp_path / "out",
                                 auth=DicomWebAuth(USER, PASSWORD), key=KEY, backoff_s=0.01)

    n_ct = len({f.parent for f in (cohort / "dicom").rglob("CT/*.dcm")})
    assert report.volumes_written == n_ct - 1 > 0
    (failed,) = [r for r in read_manifest(tmp_path / "out" / "quarantine.csv") if r["kind"] == "dicomweb"]
    assert failed["source"].startswith("dicomweb series ")
    # series are numbered in UID order, which the test does not know
    assert re.search(rf"answered HTTP 404 to the WADO-RS retrieve of series \d of {n_ct}; not ingested", failed["reason"])
    assert re.search(rf"WADO-RS retrieve of series \d of {n_ct}", caplog.text)
    everything = uids["StudyInstanceUID"] | uids["SeriesInstanceUID"]
    assert leaks(caplog.text, everything) == []
    assert files_holding_any(tmp_path / "out", everything) == []


@needs_orthanc
@pytest.mark.parametrize("garbage", [b"<html>proxy error</html>", b'{"error": "not a list"}'])
def test_a_garbled_series_listing_fails_without_uids(tmp_path: Path, cohort: Path, pacs, caplog, garbage: bytes) -> None:  # type: ignore[no-untyped-def]
    """Nonsense for a study's QIDO-RS series search stops the ingest; the error (which becomes a
    Prefect state message) names the request by position, not by the StudyInstanceUID."""
    caplog.set_level(logging.DEBUG)
    uids = cohort_uids(cohort)
    garbled = run_answering_proxy(pacs.url, lambda path: (200, garbage) if path.endswith("/series") else None)
    with garbled as proxy, pytest.raises(FatalIngestError, match=r"for the QIDO-RS series search of study 1 of \d+") as info:
        ingest_dicomweb(f"{proxy}/dicom-web", {}, tmp_path / "out", auth=DicomWebAuth(USER, PASSWORD), key=KEY,
                        backoff_s=0.01)
    everything = uids["StudyInstanceUID"] | uids["SeriesInstanceUID"]
    assert leaks(str(info.value), everything) == []
    assert leaks(caplog.text, everything) == []
    assert files_holding_any(tmp_path / "out", everything) == []


@needs_orthanc
def test_a_patient_query_keeps_its_value_and_uids_out_of_the_log(tmp_path: Path, cohort: Path, pacs, caplog) -> None:  # type: ignore[no-untyped-def]
    """httpx logs every request URL at INFO; for a PACS those lines show the server root only,
    never the path (UIDs) or the query (a PatientID)."""
    import pydicom

    caplog.set_level(logging.DEBUG)
    uids = cohort_uids(cohort)
    patient = pydicom.dcmread(sorted((cohort / "dicom").rglob("*.dcm"))[0], stop_before_pixels=True).PatientID
    report = ingest_dicomweb(pacs.dicomweb, {"PatientID": patient}, tmp_path / "out", auth=DicomWebAuth(USER, PASSWORD),
                             key=KEY)
    assert report.volumes_written == len({f.parent for f in (cohort / "dicom").rglob("*.dcm")
                                          if pydicom.dcmread(f, stop_before_pixels=True).PatientID == patient}) > 0
    assert "HTTP Request: GET " in caplog.text and "<DICOMweb path withheld>" in caplog.text
    assert leaks(caplog.text, uids["StudyInstanceUID"] | uids["SeriesInstanceUID"] | {patient}) == []
