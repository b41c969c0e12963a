"""`medaug demo`: the `augment` flow in-process on a phantom cohort, with a rich progress view.

Prefect runs in its ephemeral mode (a temporary local API, no server to start): its home
and database go under OUT/.prefect so a fresh machine needs nothing else, and Prefect's
own console lines are kept to warnings so the stage view stays readable (the run's logs
still reach the ephemeral API). Prefect is imported only after `prefect_environment` has
set its variables, because Prefect reads them at import.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from flows.orphans import watch_children
from pipeline.outputs import output_lock

STAGE_TITLES = {
    "phantoms": "Generate the phantom cohort",
    "ingest": "Ingest (NIfTI for training, DICOM de-identified)",
    "preprocess": "Preprocess (normalise; slices or patches)",
    "train": "Train the generator",
    "generate": "Generate synthetic data",
    "gate": "Quality gate",
    "dataset": "Write the balanced dataset",
}


def prefect_environment(home: Path, verbose: bool = False) -> dict[str, str]:
    """Environment for an in-process (ephemeral) Prefect run with its state under `home`.

    Leaves a configured PREFECT_API_URL (a server the user runs) alone. Sets the variables
    in os.environ (a value already there wins, except PREFECT_HOME) and returns them.
    """
    env: dict[str, str] = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline,models",
        # pipeline/models lines from worker threads outside a task run stay on the console
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
    if not os.environ.get("PREFECT_API_URL"):
        env["PREFECT_HOME"] = str(home)
        env["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "true"
    if not verbose:
        env["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
    for key, value in env.items():
        if key == "PREFECT_HOME" or key not in os.environ:
            os.environ[key] = value
    return env


class StageView(logging.Handler):
    """Draws the flow's stage events (flows.tasks.emit) as rows of a rich Progress."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(level=logging.INFO)
        self.progress = progress
        self.rows: dict[str, TaskID] = {}
        self.started: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "medaug_stage", None)
        event = getattr(record, "medaug_event", None)
        if name is None or event is None:
            return
        title = STAGE_TITLES.get(name, name)
        fields: dict[str, Any] = getattr(record, "medaug_fields", {}) or {}
        if event == "start":
            self.started[name] = time.monotonic()
            self.rows[name] = self.progress.add_task(title, total=None, counter="")
            return
        row = self.rows.get(name)
        if row is None:
            return
        match event:
            case "progress":
                total = fields.get("total")
                completed = fields.get("completed", 0)
                self.progress.update(row, completed=completed, total=total, counter=f"{completed}/{total}" if total else "")
            case "done":
                took = time.monotonic() - self.started.get(name, time.monotonic())
                self.progress.update(row, total=1, completed=1, description=f"[green]✓[/] {title} [dim]({took:.0f} s)[/]")
                self.progress.stop_task(row)
            case "failed":
                self.progress.update(row, total=1, completed=1, description=f"[red]✗ {title}[/]")
                self.progress.stop_task(row)


@contextmanager
def stage_progress(console: Console) -> Iterator[Progress]:
    """A rich Progress that shows the stages of a flow run in this process while it runs."""
    progress = Progress(
        SpinnerColumn(finished_text=" "),
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        TextColumn("{task.fields[counter]}", style="dim"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    handler = StageView(progress)
    logger = logging.getLogger("medaug.flow")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with progress:
            yield progress
    finally:
        logger.removeHandler(handler)


@contextmanager
def demo_gate_key() -> Iterator[None]:
    """A random MEDAUG_GATE_KEY for this demo run when none is set, removed afterwards.

    The demo's gate report is then signed and build-dataset checks it, as in a deployment
    with a key. The key lives only in this process (and its children) for the run: the report
    stays readable later, without the key, with the "not verified" warning.
    """
    import secrets

    from pipeline.gate.signing import GATE_KEY_ENV

    if os.environ.get(GATE_KEY_ENV):
        yield
        return
    os.environ[GATE_KEY_ENV] = secrets.token_hex(32)
    try:
        yield
    finally:
        os.environ.pop(GATE_KEY_ENV, None)


def run_demo(out: Path, config: Path, overrides: list[str], verbose: bool = False) -> dict[str, Any]:
    """Run the `augment` flow in this process on `config` with its output under `out`.

    Returns the flow's result (output folders by stage). Raises what the flow raises
    (GateRejected when the gate rejects, naming the stage).
    """
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    # locked before Prefect starts: its ephemeral server's database lives under OUT/.prefect
    with output_lock(out, "demo"), demo_gate_key():
        return _run_locked(out, config, overrides, verbose)


def _run_locked(out: Path, config: Path, overrides: list[str], verbose: bool) -> dict[str, Any]:
    """`run_demo` with the output folder locked."""
    # the ephemeral Prefect server (a child process) must not outlive this one, even after SIGKILL
    watch_children()
    prefect_environment(out / ".prefect", verbose)

    from flows.augment import augment  # Prefect reads its settings (and sets up logging) at import

    if not verbose:  # the stage view replaces Prefect's engine lines and the HTTP client's
        logging.getLogger("prefect").propagate = False
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)

    console = Console(stderr=True)
    with stage_progress(console):
        result: dict[str, Any] = augment(config=str(config), overrides=overrides, out=str(out))
    return result
