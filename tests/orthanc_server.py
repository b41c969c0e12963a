"""Test helpers: a real Orthanc PACS with its DICOMweb plugin on a loopback port, and a
fault-injecting HTTP proxy in front of it.

Orthanc comes from the Debian packages `orthanc` and `orthanc-dicomweb` (.ci/run installs
them). Each server gets a throwaway config and storage folder and is killed at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

ORTHANC_BIN = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
# The Debian package ships the plugin as a versioned file plus this unversioned name;
# Orthanc's Plugins list must name the unversioned one.
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER, PASSWORD = "medaug-test", "orthanc-test-password"


def orthanc_available() -> bool:
    return Path(ORTHANC_BIN).exists() and Path(DICOMWEB_PLUGIN).exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    url: str  # REST root, e.g. http://127.0.0.1:PORT

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, files: list[Path]) -> None:
        with httpx.Client(auth=(USER, PASSWORD), timeout=30) as client:
            for f in files:
                r = client.post(f"{self.url}/instances", content=f.read_bytes())
                r.raise_for_status()


@contextmanager
def run_orthanc(workdir: Path, cohort: Path | None = None) -> Iterator[Orthanc]:
    """Start Orthanc with authentication on, DICOM port off, loopback only.

    With `cohort` (a phantom cohort folder), its DICOM files are uploaded before it is yielded.
    """
    port = free_port()
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    config = {
        "Name": "medaug-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([ORTHANC_BIN, str(cfg)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/system", auth=(USER, PASSWORD), timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start: {(workdir / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        server = Orthanc(url)
        if cohort is not None:
            server.upload(sorted((cohort / "dicom").rglob("*.dcm")))
        yield server
    finally:
        # a throwaway server whose storage goes with the temp folder: SIGKILL, not SIGTERM and
        # Orthanc's orderly shutdown (~2 s of `make test` per server)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


@dataclass
class FaultyProxy:
    """Forwards HTTP GETs to `upstream`; WADO-RS series retrievals are cut short.

    `drop_first` retrievals send the headers and half the body, then close the connection
    (a PACS that drops connections mid-transfer); later ones pass through whole.
    """

    upstream: str
    drop_first: int
    url: str = ""
    dropped: int = 0


@contextmanager
def run_faulty_proxy(upstream: str, drop_first: int) -> Iterator[FaultyProxy]:
    state = FaultyProxy(upstream=upstream, drop_first=drop_first)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")}
            r = httpx.get(state.upstream + self.path, headers=headers, timeout=30)
            is_retrieve = "/series/" in self.path and not self.path.rstrip("/").endswith("/series")
            with lock:
                drop = is_retrieve and state.dropped < state.drop_first
                if drop:
                    state.dropped += 1
            self.send_response(r.status_code)
            self.send_header("Content-Type", r.headers.get("content-type", "application/octet-stream"))
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content[: len(r.content) // 2] if drop else r.content)
            self.wfile.flush()
            if drop:
                self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
