"""Shared test fixtures: a Prefect test harness for flow tests (session-wide, started on demand).

Prefect reads its settings when it is first imported, so its home, database and result
storage are pointed at a session temp folder here, before any test imports it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
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


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Flows in the tests run against a temporary local Prefect API (SQLite in a temp folder)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


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
