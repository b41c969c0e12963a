"""Shared test fixtures: one Prefect server for the session's flow tests, a tmpfs that fills up.

Prefect reads its settings when it is first imported, so its home and result storage are
pointed at a session temp folder here, before any test imports it.

`prefect_harness`: every test that runs a flow (in-process, or served by `medaug serve` in
tests/test_flows_server.py) talks to one `prefect server start` on a free loopback port,
its SQLite database in the session temp folder. The server is started as soon as collection
shows a test that needs it, so it boots (~10-15 s of imports and database migrations) while
the tests before the first flow test run, instead of holding up that test.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="medaug-prefect-"))
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
for _key, _value in {
    "PREFECT_HOME": str(_PREFECT_HOME),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline,models",
    # pipeline/ and models/ are also called outside flow runs here: their log lines then
    # have no run to go to, which is expected, not worth a warning per line
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}.items():
    os.environ[_key] = _value
os.environ.pop("PREFECT_API_URL", None)
# tests that sign gate reports set their own key; one from the developer's shell would change what they check
os.environ.pop("MEDAUG_GATE_KEY", None)


class _PrefectServer:
    """`prefect server start` in its own process group, its database under the session's Prefect home."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        self.api = f"http://127.0.0.1:{port}/api"
        self.db = f"sqlite+aiosqlite:///{_PREFECT_HOME / 'server' / 'prefect.db'}"
        self.log = _PREFECT_HOME / "server" / "server.log"
        self.log.parent.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= {"PREFECT_HOME": str(self.log.parent), "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.db,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "OMP_NUM_THREADS": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.log.parent,
            )
        atexit.register(self.stop)

    def wait_healthy(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.api}/health", timeout=5) as response:
                if response.status == 200:
                    return
            time.sleep(0.25)
        pytest.fail(f"the tests' Prefect server did not start (exit {self.proc.poll()}):\n"
                    + self.log.read_text(errors="replace")[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


_SERVER: list[_PrefectServer] = []


def _server() -> _PrefectServer:
    if not _SERVER:
        _SERVER.append(_PrefectServer())
    return _SERVER[0]


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: `make test-quick` starts no server
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the Prefect server now when a selected test will need it (it boots while others run)."""
    if not config.option.collectonly and any("prefect_harness" in getattr(item, "fixturenames", ()) for item in items):
        _server()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Flows in the tests run against the session's Prefect server (SQLite in a temp folder).

    Set up as prefect.testing.utilities.prefect_test_harness does once its server is up: the
    API URL and database in the settings context (and as the process-wide settings, for
    Prefect's background workers), their queued logs and events drained before the server stops.
    """
    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings
    from prefect.utilities.asyncutils import run_coro_as_sync

    server = _server()
    server.wait_healthy()

    async def drain() -> None:
        with contextlib.suppress(RuntimeError):  # a worker that never started
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    try:
        with (
            temporary_settings(updates={PREFECT_API_URL: server.api, PREFECT_SERVER_DATABASE_CONNECTION_URL: server.db}),
            prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()),
        ):
            yield
            run_coro_as_sync(drain())
    finally:
        server.stop()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted under tmp_path: a disk that fills up (skipped where mounting is refused)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
