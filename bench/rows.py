"""Table rows that survive a time limit: the bench scripts print each row as soon as it is
measured, and a SIGTERM (what `timeout` sends) ends them cleanly with what was measured."""

from __future__ import annotations

import signal
from types import FrameType


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
