"""What the bench scripts share: the CPU's name for their device lines, the cell of a setting
that failed, and table rows that survive a time limit (each row printed as soon as it is measured; a SIGTERM, what `timeout`
sends, ends a script cleanly with what was measured)."""

from __future__ import annotations

import platform
import signal
from pathlib import Path
from types import FrameType


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows (e.g. "AMD EPYC")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def failure(exc: BaseException) -> str:
    """A table cell for a setting that raised: "failed: Type: first line of the message" (120 chars).

    >>> failure(RuntimeError("no CUDA graphs here\\nsecond line"))
    'failed: RuntimeError: no CUDA graphs here'
    """
    first = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"failed: {type(exc).__name__}: {first}"


class Stopped(BaseException):
    """SIGTERM arrived (what `timeout` sends). A BaseException, like KeyboardInterrupt, so that no
    `except Exception` in the code being timed swallows it."""


class RowPrinter:
    """Prints (and flushes) table rows as they are measured and turns SIGTERM into Stopped.

    Inside its with block the first SIGTERM raises Stopped in the main thread, except while a row is
    being printed: then it waits until the row is out, so `printed` counts exactly the rows on stdout.
    The previous handler comes back when the block ends."""

    def __init__(self) -> None:
        self.printed = 0
        self._printing = self._pending = self._fired = False

    def __enter__(self) -> RowPrinter:
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._printing:
            self._pending = True
        elif not self._fired:
            self._fired = True
            raise Stopped

    def row(self, line: str) -> None:
        self._printing = True
        try:
            print(line, flush=True)
            self.printed += 1
        finally:
            self._printing = False
        if self._pending:
            self._on_sigterm(signal.SIGTERM, None)
