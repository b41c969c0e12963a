"""Retrieve DICOM series from a PACS over DICOMweb (QIDO-RS query, WADO-RS retrieve).

Hospitals keep images in a PACS, not in folders. This module queries studies by filters
(modality, date range, description), lists their series, and retrieves each series into
a private staging folder, one file per instance, named only by counters (never by UIDs or
any other identifier). A series is staged only when every instance that QIDO-RS announced
arrived intact; otherwise it is retried with backoff and then reported as failed, so
nothing half-retrieved is ever ingested. The staged folder then goes through the same
validation and de-identification as a folder ingest (`pipeline.ingest.run_ingest`);
`ingest_with_pacs` stages several PACS queries and ingests them in one run together with
local folders, so PACS and folder volumes land in one ingest folder and one manifest.

Credentials come from the environment (MEDAUG_DICOMWEB_USER and MEDAUG_DICOMWEB_PASSWORD,
or MEDAUG_DICOMWEB_TOKEN for a bearer token) or from the caller (the value of a Prefect
Secret block, `DicomWebAuth.from_secret_value`, resolved in flows/); they are never logged
nor put in an error message, and user:password parts of a URL are removed from every message.
Study and series UIDs and the QIDO-RS filter values (a PatientID, an AccessionNumber) are
identifiers (DICOM PS3.15 Annex E) that never leave this module: a message names a request by
its kind and position ("WADO-RS retrieve of series 3 of 7"), never by its URL, and httpx's
own request log lines for a PACS show the server root only.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import httpx

from pipeline.errors import ConfigError, DicomWebAuthError, FatalIngestError, MedaugError
from pipeline.types import Modality

if TYPE_CHECKING:
    from pipeline.ingest.run import IngestReport

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


ENV_HINT = "the environment variables MEDAUG_DICOMWEB_USER/MEDAUG_DICOMWEB_PASSWORD or MEDAUG_DICOMWEB_TOKEN"
"""Where credentials come from when the caller gives none (what an auth error tells to check)."""


@dataclass(frozen=True)
class DicomWebAuth:
    """HTTP credentials: basic (user, password) or a bearer token. repr hides the secrets.

    `source` says where they came from ("the Prefect Secret block 'pacs'"), so an error can
    say what to fix without showing a value.
    """

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    source: str = field(default=ENV_HINT, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DicomWebAuth:
        """Read MEDAUG_DICOMWEB_TOKEN, or MEDAUG_DICOMWEB_USER and MEDAUG_DICOMWEB_PASSWORD."""
        env = os.environ if env is None else env
        return cls(
            user=env.get("MEDAUG_DICOMWEB_USER") or None,
            password=env.get("MEDAUG_DICOMWEB_PASSWORD") or None,
            token=env.get("MEDAUG_DICOMWEB_TOKEN") or None,
            source=ENV_HINT,
        )

    @classmethod
    def from_secret_value(cls, value: object, source: str = "the secret") -> DicomWebAuth:
        """Credentials from a secret's value (a Prefect Secret block's `.get()`).

        Accepted: {"user": U, "password": P} (HTTP basic), {"token": T}, or a plain string T
        (a bearer token; a string holding a JSON object is read as that object). Anything
        else raises ConfigError naming the accepted shapes and `source`, never the value.

        >>> DicomWebAuth.from_secret_value({"user": "alice", "password": "pw"})
        DicomWebAuth(user='alice', source='the secret')
        >>> DicomWebAuth.from_secret_value("abc123").headers()
        {'Authorization': 'Bearer abc123'}
        """
        shapes = 'a JSON object {"user": ..., "password": ...} or {"token": ...}, or a plain bearer-token string'
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except ValueError:
                raise ConfigError(f"{source} holds text that starts like JSON but does not parse; it must hold {shapes}") from None
        if isinstance(value, str):
            if not value.strip():
                raise ConfigError(f"{source} is empty; it must hold {shapes}")
            return cls(token=value.strip(), source=source)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source} holds a value of type {type(value).__name__}; it must hold {shapes}")
        keys = sorted(str(k) for k in value)
        if not all(isinstance(v, str) and v for v in value.values()):
            raise ConfigError(f"{source}: every value (keys {', '.join(keys)}) must be a non-empty string; it must hold {shapes}")
        match keys:
            case ["password", "user"]:
                return cls(user=value["user"], password=value["password"], source=source)
            case ["token"]:
                return cls(token=value["token"], source=source)
            case _:
                raise ConfigError(f"{source} has the keys {', '.join(keys) or '(none)'}; it must hold {shapes}")

    @property
    def given(self) -> bool:
        """Whether there is anything to send (a user or a token)."""
        return self.user is not None or self.token is not None

    def httpx_auth(self) -> httpx.Auth | None:
        if self.user is not None:
            return httpx.BasicAuth(self.user, self.password or "")
        return None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def redact_url(url: str) -> str:
    """The URL without a user:password part, query string or fragment, for messages.

    A query string may carry a token (?access_token=...) or a filter value (?PatientID=...).

    >>> redact_url("http://alice:pw@pacs.local:8042/dicom-web?access_token=abc#x")
    'http://pacs.local:8042/dicom-web'
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class _WithholdPacsRequests(logging.Filter):
    """Cuts httpx's "HTTP Request: GET URL ..." lines for a PACS down to the server root.

    httpx logs every request's URL at INFO; a DICOMweb URL holds the StudyInstanceUID and
    SeriesInstanceUID in its path and the QIDO-RS filter values in its query, identifiers
    that must not reach a log (DICOM PS3.15 Annex E). Requests to other hosts are left as
    they are. `servers` holds (scheme, host, port) of every DicomWebClient made.
    """

    def __init__(self) -> None:
        super().__init__()
        self.servers: set[tuple[str, str, int | None]] = set()

    @staticmethod
    def server(url: str) -> tuple[str, str, int | None]:
        """(scheme, host, port) of `url`, the port filled in from the scheme (httpx drops :80 and :443)."""
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:  # not a number: no request goes there anyway
            port = None
        return parts.scheme, parts.hostname or "", port or {"http": 80, "https": 443}.get(parts.scheme)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and len(args) >= 2 and str(record.msg).startswith("HTTP Request:")):
            return True
        if self.server(str(args[1])) in self.servers:
            root = urlsplit(redact_url(str(args[1])))
            record.args = (args[0], f"{root.scheme}://{root.netloc}/<DICOMweb path withheld>", *args[2:])
        return True


_HTTPX_FILTER = _WithholdPacsRequests()


def parse_query(items: list[str]) -> dict[str, str]:
    """Turn ["ModalitiesInStudy=CT", "StudyDate=20240101-20241231"] into QIDO-RS parameters.

    >>> parse_query(["ModalitiesInStudy=CT"])
    {'ModalitiesInStudy': 'CT'}
    """
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:  # the item is not echoed: it may be a value (PatientID:PH123, a typo)
            raise DicomWebError(f"--query {i + 1} of {len(items)} has no '='; it must look like KEY=VALUE, "
                                "e.g. ModalitiesInStudy=CT")
        if not value:
            raise DicomWebError(f"--query {key}= has no value; it must look like KEY=VALUE, e.g. ModalitiesInStudy=CT")
        if key not in QUERY_KEYS:
            raise DicomWebError(f"--query key {key!r} is not supported; use one of: {', '.join(QUERY_KEYS)}")
        out[key] = value.strip()
    return out


@dataclass
class SeriesRef:
    """One series announced by QIDO-RS: `index` of `total`, its position in the query result (1-based)."""

    index: int
    total: int
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


def _value(item: object, tag: str) -> str | None:
    """The first value of `tag` in a DICOM JSON dataset (PS3.18 F.2), None when absent or malformed."""
    if not isinstance(item, Mapping):
        return None
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
        _HTTPX_FILTER.servers.add(_HTTPX_FILTER.server(self.base_url))
        logging.getLogger("httpx").addFilter(_HTTPX_FILTER)  # adds it once
        self.retries = retries
        self.backoff_s = backoff_s
        self._sleep = sleep
        auth = auth or DicomWebAuth()
        self._auth_source = auth.source
        self._auth_given = auth.given
        self._client = httpx.Client(
            auth=auth.httpx_auth(), headers=auth.headers(), timeout=timeout_s, follow_redirects=False
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, params: Mapping[str, str] | None, accept: str, what: str) -> httpx.Response:
        """GET `path` under the root. `what` names the request in messages ("QIDO-RS study search"):
        the path holds UIDs and `params` filter values, so neither ever appears in one."""
        url = f"{self.base_url}/{path.lstrip('/')}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning("DICOMweb %s, %s: %s; retry %d of %d in %.1f s", self.label, what, last, attempt,
                            self.retries, delay)
                self._sleep(delay)
            try:
                response = self._client.get(url, params=params, headers={"Accept": accept})
                response.read()
            except httpx.TransportError as exc:  # refused, reset, timed out, truncated body
                last = f"connection failed ({type(exc).__name__})"
                continue
            if response.status_code in (401, 403):
                given = "refused the credentials" if self._auth_given else "asks for credentials and none were given"
                # not retried here nor by a caller: repeated refused logins can lock the account
                raise DicomWebAuthError(
                    f"DICOMweb server {self.label} {given} (HTTP {response.status_code}); "
                    f"check {self._auth_source} (not retried, so as not to lock the account)"
                )
            if response.status_code in RETRYABLE_STATUS:
                last = f"HTTP {response.status_code}"
                continue
            if response.status_code == 204:
                return response
            if response.status_code >= 400:
                raise DicomWebError(f"DICOMweb server {self.label} answered HTTP {response.status_code} to the {what}")
            return response
        raise DicomWebError(f"DICOMweb server {self.label}, {what}: {last} after {self.retries + 1} tries")

    def _json(self, path: str, params: Mapping[str, str] | None, what: str) -> list[dict[str, object]]:
        response = self._get(path, params, "application/dicom+json", what)
        if response.status_code == 204 or not response.content:
            return []
        try:
            data = response.json()
        except ValueError:
            raise DicomWebError(f"DICOMweb server {self.label} sent invalid JSON for the {what}") from None
        if not isinstance(data, list):
            raise DicomWebError(f"DICOMweb server {self.label} sent a {type(data).__name__}, not a list, for the {what}")
        return data

    def search_series(self, query: Mapping[str, str]) -> list[SeriesRef]:
        """Studies matching `query`, then their series, in a stable order (by UIDs)."""
        studies = self._json("studies", {**query, "includefield": STUDY_UID}, "QIDO-RS study search")
        refs: list[tuple[str, str, str, int | None]] = []
        for k, study in enumerate(studies):
            study_uid = _value(study, STUDY_UID)
            if study_uid is None:
                continue
            what = f"QIDO-RS series search of study {k + 1} of {len(studies)}"
            for series in self._json(f"studies/{study_uid}/series", {"includefield": N_SERIES_INSTANCES}, what):
                series_uid = _value(series, SERIES_UID)
                if series_uid is None:
                    continue
                n = _value(series, N_SERIES_INSTANCES)
                refs.append((study_uid, series_uid, _value(series, SERIES_MODALITY) or "", int(n) if n and n.isdigit() else None))
        refs.sort()
        return [SeriesRef(i + 1, len(refs), s, r, m, n) for i, (s, r, m, n) in enumerate(refs)]

    def retrieve_series(self, ref: SeriesRef) -> list[bytes]:
        """All instances of a series as DICOM Part 10 bytes (WADO-RS multipart/related)."""
        path = f"studies/{ref.study_uid}/series/{ref.series_uid}"
        what = f"WADO-RS retrieve of series {ref.index} of {ref.total}"
        for attempt in range(self.retries + 1):
            response = self._get(path, None, 'multipart/related; type="application/dicom"', what)
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


def fetch_series(client: DicomWebClient, query: Mapping[str, str], staging: Path, where: str = "") -> FetchResult:
    """Stage every series matching `query` under `staging`/sNNNN/iNNNNN.dcm.

    A series folder appears (by an atomic rename) only once all its instances arrived;
    failed series are listed with a reason and leave nothing behind. `where` is appended
    to series labels when several PACS are fetched ("dicomweb series 3 of 7 (PACS 2 of 2)").
    """
    try:
        refs = client.search_series(query)
    except DicomWebAuthError as exc:
        raise DicomWebAuthError(f"cannot query the PACS{where}: {exc}") from None
    except DicomWebError as exc:
        raise FatalIngestError(f"cannot query the PACS{where}: {exc}") from None
    staging.mkdir(parents=True, exist_ok=True)
    staged: list[Path] = []
    failed: list[tuple[str, str]] = []
    for ref in refs:
        label = f"dicomweb series {ref.index} of {len(refs)}{where}"
        target = staging / f"s{ref.index:04d}"
        partial = staging / f".s{ref.index:04d}.partial"
        try:
            instances = client.retrieve_series(ref)
        except DicomWebAuthError as exc:  # the login stopped working mid-run: stop, do not try every series
            raise DicomWebAuthError(f"cannot retrieve {label}: {exc}") from None
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


@dataclass(frozen=True)
class PacsSource:
    """One PACS query to ingest: DICOMweb root, QIDO-RS study filters, credentials.

    `auth` None reads the environment (DicomWebAuth.from_env) when the ingest runs.
    """

    url: str
    query: Mapping[str, str] = field(default_factory=dict)
    auth: DicomWebAuth | None = field(default=None, repr=False)


def ingest_with_pacs(
    pacs: Sequence[PacsSource],
    out: Path,
    sources: Sequence[Path] = (),
    modality: Modality | None = None,
    key: bytes | None = None,
    workers: int = 2,
    retries: int = 3,
    backoff_s: float = 0.5,
) -> IngestReport:
    """Stage the series of every PACS query and ingest them in one run with local `sources`.

    Args:
        pacs: PACS queries; each is staged into its own temporary folder (fetch_series).
        out: ingest output folder (the layout of pipeline.ingest.run_ingest).
        sources: local folders or files ingested in the same run (DICOM trees, NIfTI, Decathlon).
        modality: modality of NIfTI inputs without dataset.json or sidecar.
        key: de-identification key (see pipeline.ingest.deid).
        workers, retries, backoff_s: conversion processes; HTTP retries and first backoff (s).

    One `run_ingest` over [sources..., staged folders...] means PACS series get the same
    validation, de-identification, manifest and quarantine as local files. Series that
    could not be retrieved intact are added to out/quarantine.csv (kind "dicomweb") and
    ingest_report.json gets `pacs_series_found` and `pacs_series_failed` (summed over the
    PACS). The staging folders are deleted afterwards. Returns the IngestReport.
    Raises FatalIngestError when a PACS cannot be queried at all (down, answers nonsense), and
    its subclass DicomWebAuthError when it refuses the credentials (a caller must not retry that).
    """
    from pipeline.ingest.run import QUARANTINE_COLUMNS, REPORT_NAME, run_ingest
    from pipeline.ingest.writer import write_atomic
    from pipeline.manifest import read_manifest, write_manifest

    found = 0
    failed: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="medaug-pacs-") as tmp:
        staged: list[Path] = []
        for i, source in enumerate(pacs):
            where = f" (PACS {i + 1} of {len(pacs)})" if len(pacs) > 1 else ""
            auth = source.auth or DicomWebAuth.from_env()
            with DicomWebClient(source.url, auth, retries=retries, backoff_s=backoff_s) as client:
                fetched = fetch_series(client, source.query, Path(tmp) / f"pacs{i + 1}", where=where)
                if fetched.n_series == 0:
                    log.warning("DICOMweb %s%s: no series match the query", client.label, where)
            staged.append(Path(tmp) / f"pacs{i + 1}")
            found += fetched.n_series
            failed += fetched.failed
        report = run_ingest([*[Path(s) for s in sources], *staged], out, modality=modality, key=key, workers=workers)

    if failed:
        rows = read_manifest(out / "quarantine.csv")
        rows += [{"source": label, "kind": "dicomweb", "reason": reason} for label, reason in failed]
        write_manifest(out, rows, QUARANTINE_COLUMNS, name="quarantine.csv")
    summary = json.loads((out / REPORT_NAME).read_text())
    summary["pacs_series_found"] = found
    summary["pacs_series_failed"] = len(failed)
    write_atomic(out / REPORT_NAME, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return report


def ingest_dicomweb(
    url: str,
    query: Mapping[str, str],
    out: Path,
    auth: DicomWebAuth | None = None,
    key: bytes | None = None,
    workers: int = 2,
    retries: int = 3,
    backoff_s: float = 0.5,
) -> IngestReport:
    """Query one DICOMweb server, stage the matching series, and ingest them like a folder.

    Args:
        url: DICOMweb root, e.g. "http://127.0.0.1:8042/dicom-web".
        query: QIDO-RS study filters (see QUERY_KEYS), e.g. {"ModalitiesInStudy": "CT"}.
        out: ingest output folder (same layout as a folder ingest).
        auth: credentials; default from the environment (DicomWebAuth.from_env).
        key: de-identification key (see pipeline.ingest.deid).

    `ingest_with_pacs` with one PACS and no local sources (see there). Returns the IngestReport.
    """
    return ingest_with_pacs([PacsSource(url, query, auth)], out, key=key, workers=workers, retries=retries,
                            backoff_s=backoff_s)
