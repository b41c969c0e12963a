"""Retrieve DICOM series from a PACS over DICOMweb (QIDO-RS query, WADO-RS retrieve).

Hospitals keep images in a PACS, not in folders. This module queries studies by filters
(modality, date range, description), lists their series, and retrieves each series into
a private staging folder, one file per instance, named only by counters (never by UIDs or
any other identifier). A series is staged only when every instance that QIDO-RS announced
arrived intact; otherwise it is retried with backoff and then reported as failed, so
nothing half-retrieved is ever ingested. The staged folder then goes through the same
validation and de-identification as a folder ingest (`pipeline.ingest.run_ingest`).

Credentials come from the environment (MEDAUG_DICOMWEB_USER and MEDAUG_DICOMWEB_PASSWORD,
or MEDAUG_DICOMWEB_TOKEN for a bearer token) or from the caller (a Prefect Secret block in
flows/); they are never logged, and user:password parts of a URL are removed from every
message.

References: DICOM PS3.18 (Web Services), sections 10.4 (WADO-RS) and 10.6 (QIDO-RS).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from pipeline.errors import FatalIngestError, MedaugError

log = logging.getLogger(__name__)

STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SERIES_MODALITY = "00080060"
N_SERIES_INSTANCES = "00201209"

# QIDO-RS keys a user may filter studies by (PS3.18 table 10.6.1-5 subset).
QUERY_KEYS = (
    "ModalitiesInStudy",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "AccessionNumber",
    "PatientID",
    "StudyInstanceUID",
    "ReferringPhysicianName",
)

RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DicomWebError(MedaugError):
    """A DICOMweb request failed for good (after retries) or the server answered nonsense."""


@dataclass(frozen=True)
class DicomWebAuth:
    """HTTP credentials: basic (user, password) or a bearer token. repr hides the secrets."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DicomWebAuth:
        """Read MEDAUG_DICOMWEB_TOKEN, or MEDAUG_DICOMWEB_USER and MEDAUG_DICOMWEB_PASSWORD."""
        env = os.environ if env is None else env
        return cls(
            user=env.get("MEDAUG_DICOMWEB_USER") or None,
            password=env.get("MEDAUG_DICOMWEB_PASSWORD") or None,
            token=env.get("MEDAUG_DICOMWEB_TOKEN") or None,
        )

    def httpx_auth(self) -> httpx.Auth | None:
        if self.user is not None:
            return httpx.BasicAuth(self.user, self.password or "")
        return None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def redact_url(url: str) -> str:
    """The URL without a user:password part, for messages.

    >>> redact_url("http://alice:pw@pacs.local:8042/dicom-web")
    'http://pacs.local:8042/dicom-web'
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def parse_query(items: list[str]) -> dict[str, str]:
    """Turn ["ModalitiesInStudy=CT", "StudyDate=20240101-20241231"] into QIDO-RS parameters.

    >>> parse_query(["ModalitiesInStudy=CT"])
    {'ModalitiesInStudy': 'CT'}
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not value:
            raise DicomWebError(f"--query {item!r} must look like KEY=VALUE, e.g. ModalitiesInStudy=CT")
        if key not in QUERY_KEYS:
            raise DicomWebError(f"--query key {key!r} is not supported; use one of: {', '.join(QUERY_KEYS)}")
        out[key] = value.strip()
    return out


@dataclass
class SeriesRef:
    """One series announced by QIDO-RS. `index` is its position in the query result (1-based)."""

    index: int
    study_uid: str
    series_uid: str
    modality: str
    n_instances: int | None


@dataclass
class FetchResult:
    """What a DICOMweb fetch staged and what it could not retrieve (reasons carry no identifiers)."""

    staged: list[Path]
    failed: list[tuple[str, str]]  # (series label "dicomweb series 3 of 7", reason)
    n_series: int


def _value(item: Mapping[str, object], tag: str) -> str | None:
    element = item.get(tag)
    if not isinstance(element, Mapping):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    return str(values[0])


class DicomWebClient:
    """A small QIDO-RS/WADO-RS client with retries and exponential backoff.

    `base_url` is the DICOMweb root, e.g. "http://127.0.0.1:8042/dicom-web".
    Every request is retried on connection errors, truncated bodies and 5xx/429 answers,
    `retries` times, sleeping backoff_s * 2**attempt between tries.
    """

    def __init__(
        self,
        base_url: str,
        auth: DicomWebAuth | None = None,
        retries: int = 3,
        backoff_s: float = 0.5,
        timeout_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.label = redact_url(self.base_url)
        self.retries = retries
        self.backoff_s = backoff_s
        self._sleep = sleep
        auth = auth or DicomWebAuth()
        self._client = httpx.Client(
            auth=auth.httpx_auth(), headers=auth.headers(), timeout=timeout_s, follow_redirects=False
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, params: Mapping[str, str] | None, accept: str) -> httpx.Response:
        url = f"{self.base_url}/{path.lstrip('/')}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning("DICOMweb %s: %s; retry %d of %d in %.1f s", self.label, last, attempt, self.retries, delay)
                self._sleep(delay)
            try:
                response = self._client.get(url, params=params, headers={"Accept": accept})
                response.read()
            except httpx.TransportError as exc:  # refused, reset, timed out, truncated body
                last = f"connection failed ({type(exc).__name__})"
                continue
            if response.status_code in (401, 403):
                raise DicomWebError(
                    f"DICOMweb server {self.label} refused the credentials (HTTP {response.status_code}); "
                    "set MEDAUG_DICOMWEB_USER/MEDAUG_DICOMWEB_PASSWORD or MEDAUG_DICOMWEB_TOKEN"
                )
            if response.status_code in RETRYABLE_STATUS:
                last = f"HTTP {response.status_code}"
                continue
            if response.status_code == 204:
                return response
            if response.status_code >= 400:
                raise DicomWebError(f"DICOMweb server {self.label} answered HTTP {response.status_code} to {path}")
            return response
        raise DicomWebError(f"DICOMweb server {self.label}: {last} after {self.retries + 1} tries")

    def _json(self, path: str, params: Mapping[str, str] | None = None) -> list[dict[str, object]]:
        response = self._get(path, params, "application/dicom+json")
        if response.status_code == 204 or not response.content:
            return []
        try:
            data = response.json()
        except ValueError:
            raise DicomWebError(f"DICOMweb server {self.label} sent invalid JSON for {path}") from None
        if not isinstance(data, list):
            raise DicomWebError(f"DICOMweb server {self.label} sent a {type(data).__name__}, not a list, for {path}")
        return data

    def search_series(self, query: Mapping[str, str]) -> list[SeriesRef]:
        """Studies matching `query`, then their series, in a stable order (by UIDs)."""
        studies = self._json("studies", {**query, "includefield": STUDY_UID})
        refs: list[tuple[str, str, str, int | None]] = []
        for study in studies:
            study_uid = _value(study, STUDY_UID)
            if study_uid is None:
                continue
            for series in self._json(f"studies/{study_uid}/series", {"includefield": N_SERIES_INSTANCES}):
                series_uid = _value(series, SERIES_UID)
                if series_uid is None:
                    continue
                n = _value(series, N_SERIES_INSTANCES)
                refs.append((study_uid, series_uid, _value(series, SERIES_MODALITY) or "", int(n) if n else None))
        refs.sort()
        return [SeriesRef(i + 1, s, r, m, n) for i, (s, r, m, n) in enumerate(refs)]

    def retrieve_series(self, ref: SeriesRef) -> list[bytes]:
        """All instances of a series as DICOM Part 10 bytes (WADO-RS multipart/related)."""
        path = f"studies/{ref.study_uid}/series/{ref.series_uid}"
        for attempt in range(self.retries + 1):
            response = self._get(path, None, 'multipart/related; type="application/dicom"')
            parts = split_multipart(response.headers.get("content-type", ""), response.content)
            complete = all(p[128:132] == b"DICM" for p in parts)
            if parts and complete and (ref.n_instances is None or len(parts) == ref.n_instances):
                return parts
            if attempt < self.retries:
                self._sleep(self.backoff_s * 2**attempt)
        expected = "?" if ref.n_instances is None else str(ref.n_instances)
        raise DicomWebError(
            f"retrieved {len(parts)} of {expected} instances intact after {self.retries + 1} tries"
        )


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def split_multipart(content_type: str, body: bytes) -> list[bytes]:
    """Bodies of a multipart/related message (RFC 2387), without their part headers.

    >>> split_multipart('multipart/related; boundary=XX', b'--XX\\r\\nA: b\\r\\n\\r\\nhello\\r\\n--XX--')
    [b'hello']
    """
    match = _BOUNDARY.search(content_type)
    if not match:
        return []
    delimiter = b"--" + match.group(1).encode()
    parts: list[bytes] = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):  # closing delimiter
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


def fetch_series(client: DicomWebClient, query: Mapping[str, str], staging: Path) -> FetchResult:
    """Stage every series matching `query` under `staging`/sNNNN/iNNNNN.dcm.

    A series folder appears (by an atomic rename) only once all its instances arrived;
    failed series are listed with a reason and leave nothing behind.
    """
    try:
        refs = client.search_series(query)
    except DicomWebError as exc:
        raise FatalIngestError(f"cannot query the PACS: {exc}") from None
    staging.mkdir(parents=True, exist_ok=True)
    staged: list[Path] = []
    failed: list[tuple[str, str]] = []
    for ref in refs:
        label = f"dicomweb series {ref.index} of {len(refs)}"
        target = staging / f"s{ref.index:04d}"
        partial = staging / f".s{ref.index:04d}.partial"
        try:
            instances = client.retrieve_series(ref)
        except DicomWebError as exc:
            log.warning("%s (%s): %s; not ingested", label, ref.modality or "?", exc)
            failed.append((label, f"{ref.modality or 'unknown modality'}: {exc}; not ingested"))
            continue
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for k, data in enumerate(instances):
            (partial / f"i{k:05d}.dcm").write_bytes(data)
        os.replace(partial, target)
        staged.append(target)
        log.info("%s (%s): %d instances retrieved", label, ref.modality or "?", len(instances))
    return FetchResult(staged=staged, failed=failed, n_series=len(refs))


def ingest_dicomweb(
    url: str,
    query: Mapping[str, str],
    out: Path,
    auth: DicomWebAuth | None = None,
    key: bytes | None = None,
    workers: int = 2,
    retries: int = 3,
    backoff_s: float = 0.5,
) -> Any:
    """Query a DICOMweb server, stage the matching series, and ingest them like a folder.

    Args:
        url: DICOMweb root, e.g. "http://127.0.0.1:8042/dicom-web".
        query: QIDO-RS study filters (see QUERY_KEYS), e.g. {"ModalitiesInStudy": "CT"}.
        out: ingest output folder (same layout as a folder ingest).
        auth: credentials; default from the environment (DicomWebAuth.from_env).
        key: de-identification key (see pipeline.ingest.deid).

    Series that could not be retrieved intact are added to out/quarantine.csv (kind
    "dicomweb") and counted in ingest_report.json as `pacs_series_failed`; the staging
    folder is deleted afterwards. Returns the IngestReport.
    """
    from pipeline.ingest.run import QUARANTINE_COLUMNS, REPORT_NAME, run_ingest
    from pipeline.ingest.writer import write_atomic
    from pipeline.manifest import read_manifest, write_manifest

    with (
        DicomWebClient(url, auth or DicomWebAuth.from_env(), retries=retries, backoff_s=backoff_s) as client,
        tempfile.TemporaryDirectory(prefix="medaug-pacs-") as tmp,
    ):
        fetched = fetch_series(client, query, Path(tmp))
        if fetched.n_series == 0:
            log.warning("DICOMweb %s: no series match the query", client.label)
        report = run_ingest([Path(tmp)], out, key=key, workers=workers)

    if fetched.failed:
        rows = read_manifest(out / "quarantine.csv")
        rows += [{"source": label, "kind": "dicomweb", "reason": reason} for label, reason in fetched.failed]
        write_manifest(out, rows, QUARANTINE_COLUMNS, name="quarantine.csv")
    summary = json.loads((out / REPORT_NAME).read_text())
    summary["pacs_series_found"] = fetched.n_series
    summary["pacs_series_failed"] = len(fetched.failed)
    write_atomic(out / REPORT_NAME, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return report
