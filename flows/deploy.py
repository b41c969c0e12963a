"""Serve the `mri-ct` and `tumor-patches` deployments of the `augment` flow (`medaug serve`).

The deployments are defined once, in prefect.yaml at the repository root; `deployments`
turns its entries into RunnerDeployments (flow.to_deployment) and `serve_all` serves them
in one process (prefect.serve), so that with a server running,
`prefect deployment run augment/mri-ct` runs the whole pipeline in a subprocess of this one.

`medaug serve` runs `serve_all` in a child process under `supervise`: on SIGTERM, Prefect
pauses every deployment through its API before it exits, and when that server is already
gone its client retries for minutes; the supervisor gives the child `SHUTDOWN_GRACE_S`
seconds after forwarding the signal, then kills it and says so in one line. Prefect is
imported only where a deployment is built or served, and the config modules (torch) only where
prefect.yaml is read: the supervisor needs neither.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pipeline.errors import ConfigError, StageFailed

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule

SHUTDOWN_GRACE_S = 15.0
"""Seconds `medaug serve` waits for the served flows to shut down after SIGTERM or Ctrl-C."""
CHILD_ENV = "MEDAUG_SERVE_CHILD"
"""Set in the supervised child: the `serve` command then serves instead of supervising."""

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"  # flows.params.REPO_ROOT, without its imports
DEPLOYMENT_NAMES = ("mri-ct", "tumor-patches")


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The `deployments:` entries of prefect.yaml; ConfigError when one of ours is missing."""
    from medaug.config import read_yaml

    specs = read_yaml(path).get("deployments") or []
    names = {s.get("name") for s in specs}
    missing = [n for n in DEPLOYMENT_NAMES if n not in names]
    if missing:
        raise ConfigError(f"{path} defines no deployment named {', '.join(missing)}; expected {', '.join(DEPLOYMENT_NAMES)}")
    return [s for s in specs if s.get("name") in DEPLOYMENT_NAMES]


def schedules_of(spec: dict[str, Any], activate: bool | None = None) -> list[Schedule]:
    """Cron schedules of a prefect.yaml deployment entry; `activate` overrides their `active` flag."""
    from prefect.schedules import Cron

    out = []
    for s in spec.get("schedules") or []:
        if "cron" not in s:
            raise ConfigError(f"deployment {spec.get('name')}: only cron schedules are supported, got {sorted(s)}")
        active = bool(s.get("active", True)) if activate is None else activate
        out.append(Cron(s["cron"], timezone=s.get("timezone", "UTC"), active=active))
    return out


def deployments(activate_schedules: bool | None = None, path: Path = PREFECT_YAML) -> list[RunnerDeployment]:
    """One RunnerDeployment per prefect.yaml entry, with its parameters, schedules and tags."""
    from prefect.deployments.runner import EntrypointType, RunnerDeployment

    from flows.augment import augment

    return [
        cast(RunnerDeployment, augment.to_deployment(
            name=spec["name"],
            description=spec.get("description"),
            tags=list(spec.get("tags") or []),
            parameters=dict(spec.get("parameters") or {}),
            schedules=schedules_of(spec, activate_schedules),
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
        for spec in deployment_specs(path)
    ]


def serve_all(activate_schedules: bool | None = None, limit: int | None = None) -> None:
    """Serve both deployments in this process until interrupted (needs PREFECT_API_URL of a server).

    Raises ConfigError when no API URL is configured: served deployments on Prefect's
    temporary in-process API would vanish with this process.
    """
    from prefect import serve
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise ConfigError(
            "medaug serve needs a Prefect server: start one with `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set PREFECT_API_URL=...`)"
        )

    serve(*deployments(activate_schedules), limit=limit)


def supervise(argv: Sequence[str], grace_s: float = SHUTDOWN_GRACE_S) -> int:
    """Run `argv` as a child (with CHILD_ENV set) until it exits; returns its exit code.

    SIGTERM and SIGINT are forwarded to the child, which then has `grace_s` seconds to exit;
    after that it is killed and StageFailed says so. The child carries the orphan watchdog's
    token (flows/orphans.py), so it also ends when this process is killed with SIGKILL.
    """
    from flows.orphans import watch_children

    watch_children()
    child = subprocess.Popen(list(argv), env={**os.environ, CHILD_ENV: "1"})
    stopping = threading.Event()

    def forward(signum: int, frame: Any) -> None:
        if child.poll() is None:
            child.send_signal(signum)
        stopping.set()

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while child.poll() is None and not stopping.wait(0.5):
            pass
        try:
            return child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise StageFailed(
                f"serve: the served flows did not shut down within {grace_s:.0f} s of the stop signal (is the Prefect "
                "server gone? their deployments may still be unpaused there); stopped them"
            ) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
