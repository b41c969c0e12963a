"""What a user does: `prefect server start`, `medaug serve`, `prefect deployment run augment/mri-ct`.

The server is the session's `prefect server start` on a free loopback port (tests/conftest.py
`prefect_harness`, the one the in-process flow tests use: a second one cost ~20 s of
`make test`). Both deployments are served by `medaug serve` in a subprocess with its own
Prefect home (result storage: the cache the second run reads is the one the served process
wrote); one flow run of the mri-ct deployment on the tiny phantom config, waited on through
the REST API until it is COMPLETED; then the dataset and the run's artifacts must exist.
Every process started here runs in its own process group, killed in the fixture's teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows.params import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a process group started here; kill it when it does not stop within 10 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_for(what: str, check: Any, timeout: float, procs: list[subprocess.Popen[bytes]], logs: list[Path],
             every_s: float = 0.5) -> Any:
    """Poll `check()` every `every_s` seconds until it returns something truthy; fail with the
    processes' logs when it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{what}: {p.args!r} exited with {p.returncode}\n" + tails(logs))
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(every_s)
    pytest.fail(f"{what}: not within {timeout:.0f} s\n" + tails(logs))


def tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.is_file())


@pytest.fixture
def server(prefect_harness: None, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A `medaug serve` against the session's Prefect server; yields the env and API URL."""
    from prefect.settings import PREFECT_API_URL

    api = str(PREFECT_API_URL.value())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline,models",
        # the runner asks for scheduled runs every 10 s by default: each run here waited ~5 s for it
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "OMP_NUM_THREADS": "1",
    }
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / "serve.log"]
    try:
        assert httpx.get(f"{api}/health", timeout=10).status_code == 200
        with open(logs[0], "wb") as log:
            procs.append(subprocess.Popen(
                [str(BIN / "medaug"), "serve", "--no-schedules"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT,
            ))

        def deployments_registered() -> bool:
            names = {d["name"] for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()}
            return {"mri-ct", "tumor-patches"} <= names

        wait_for("deployments served", deployments_registered, 120, procs, logs)
        yield {"env": env, "api": api, "procs": procs, "logs": logs}
    finally:
        for p in reversed(procs):
            stop(p)


RUN_PARAMS = {"config": "configs/tiny.yaml", "overrides": ["phantoms.n_subjects=8"]}


def run_deployment(server: dict[str, Any], out: Path, cli: bool = True) -> str:
    """A run of augment/mri-ct on the tiny config; waits for a final state; returns the run id.

    `cli`: started with `prefect deployment run` (what a user types), else through the REST
    API (the same request, without the ~3 s start-up of a second Prefect CLI process).
    """
    api = server["api"]
    if cli:
        done = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "augment/mri-ct",
             "--param", f"config={RUN_PARAMS['config']}", "--param", f"out={out}",
             "--params", json.dumps({"overrides": RUN_PARAMS["overrides"]})],
            env=server["env"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout)
        assert match, done.stdout
        run_id = match.group(1)
    else:
        deployment = httpx.get(f"{api}/deployments/name/augment/mri-ct", timeout=10).json()
        created = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", timeout=10,
                             json={"parameters": {**RUN_PARAMS, "out": str(out)}})
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]

    def final_state() -> str | None:
        state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]
        return state["type"] if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    state = wait_for("flow run", final_state, 420, server["procs"], server["logs"])
    assert state == "COMPLETED", tails(server["logs"])
    return run_id


def task_states(api: str, run_id: str) -> dict[str, list[str]]:
    """State names of the task runs of a flow run and its subflows, by task name (REST API)."""
    children = httpx.post(f"{api}/flow_runs/filter", timeout=10,
                          json={"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}).json()
    ids = [run_id, *(c["id"] for c in children)]
    runs = httpx.post(f"{api}/task_runs/filter", timeout=10, json={"flow_runs": {"id": {"any_": ids}}}).json()
    states: dict[str, list[str]] = {}
    for r in runs:
        states.setdefault(r["name"].rsplit("-", 1)[0], []).append((r.get("state") or {}).get("name", ""))
    return states


def test_deployment_run_completes_the_pipeline(server: dict[str, Any], tmp_path: Path) -> None:
    api = server["api"]
    out = tmp_path / "mri-ct-run"
    run_id = run_deployment(server, out)
    assert (out / "dataset" / "manifest.csv").is_file()
    assert (out / "gate" / "gate_report.json").is_file()
    arts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}, timeout=10).json()
    keys = {a["key"] for a in arts}
    assert {"gate-report", "gate-checks", "dataset", "train-progress", "cyclegan-samples"} <= keys, keys

    # a second run on the unchanged cohort: ingest and preprocessing come from the persisted cache
    again = run_deployment(server, out, cli=False)
    states = task_states(api, again)
    assert states.get("ingest") == ["Cached", "Cached"] and states.get("preprocess-slices") == ["Cached"], states


def test_medaug_demo_on_a_fresh_machine(tmp_path: Path) -> None:
    """`make demo`'s command with no Prefect state anywhere (an empty HOME, no PREFECT_ variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    out = tmp_path / "demo-output"
    done = subprocess.run([str(BIN / "medaug"), "demo", "--out", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{out / 'dataset'}" in done.stdout and f"{out / 'gate' / 'gate_report.md'}" in done.stdout
    assert (out / "dataset" / "manifest.csv").is_file()
    assert (out / ".prefect" / "prefect.db").is_file()  # Prefect's state went under the output folder
    assert not (tmp_path / "home" / ".prefect").exists()

