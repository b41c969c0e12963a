"""Output folders of the commands after ingest: one writer at a time, never an input.

`output_lock(out, command)` holds an exclusive lock on an output folder while a command
writes it, so two runs into one `--out` cannot interleave their files: the second gets one
clear line naming the pid and host of the first. The lock is an `fcntl.flock` on a lock
file beside the folder (`.<name>.medaug-lock`; beside, because the dataset writer replaces
the folder by a rename): the kernel drops it when its process dies, even by SIGKILL, so a
stale lock is taken over without guessing whether a pid is still alive. The file holds
only the pid, host name, command name and start time (no path, no patient identifier).

`atomic_file(path)` gives a temporary name beside `path` to write to and renames it into
place only when the block succeeds, so a full disk or a kill leaves the old file or none,
never a truncated one.

`check_apart(out, inputs)` refuses an output folder that is, contains, or lies inside one
of the command's inputs (compared after resolving symbolic links), so no command writes its
results over the files it reads.

The CLI (medaug/cli.py) and the Prefect flow (flows/augment.py) call both.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pipeline.errors import OutputLockedError, OutputOverlapError, OutputWriteError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".medaug-lock"
_HELD: dict[Path, int] = {}
"""Lock files this process holds, with their nesting depth (flock conflicts with itself across file descriptors)."""


def lock_path(out: Path) -> Path:
    """The lock file of output folder `out`: `.<name>.medaug-lock` beside it (resolved path)."""
    out = out.expanduser().resolve()
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def _holder(path: Path, tries: int = 1) -> str:
    """'pid N on host H (command C, since T)' from a lock file, or a plain phrase when unreadable.

    A holder writes its file just after taking the lock: `tries` reads 50 ms apart wait for it.
    """
    for k in range(tries):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(data["started"])))
            return f"pid {int(data['pid'])} on host {data['host']} ({data['command']}, since {since})"
        except (OSError, ValueError, KeyError, TypeError):
            if k + 1 < tries:
                time.sleep(0.05)
    return "another process"


def _open_locked(path: Path, out: Path) -> IO[str]:
    """Open and exclusively lock `path`; retry when a releasing holder removed the file under us."""
    while True:
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise OutputLockedError(
                f"{out} is being written by {_holder(path, tries=20)}; wait for it to finish or choose another --out"
            ) from None
        # the holder we waited on may have unlinked the file after we opened it: lock the file at the path
        try:
            same = os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fh
        fh.close()


@contextmanager
def output_lock(out: Path, command: str) -> Iterator[Path]:
    """Hold the write lock of output folder `out` for the duration of the block.

    Raises OutputLockedError at once (no waiting) when a live process holds it. A lock file
    left by a process that died (SIGKILL, power loss on a local disk) is taken over. Nested
    calls for the same folder in one process share the lock. Yields the lock file's path;
    the lock file is removed on exit.
    """
    path = lock_path(out)
    if path in _HELD:  # this process holds it already (`medaug demo` locks, then its flow locks again)
        _HELD[path] += 1
        try:
            yield path
        finally:
            _HELD[path] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = _open_locked(path, out)
    except OutputLockedError:
        raise
    except OSError as exc:  # a parent is a file, a read-only or full disk: one line, not a traceback
        raise OutputWriteError(f"the output folder cannot be created or written ({exc.strerror or exc}); "
                               "check the --out path and its permissions") from None
    _HELD[path] = 1
    try:
        fh.seek(0)
        if fh.read().strip():  # a holder that exited cleanly removed its file: this one was killed
            log.warning("%s: taking over the lock left by %s, which is no longer running", out.name, _holder(path))
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time()}))
        fh.flush()
        yield path
    finally:
        # unlinked while still locked: a waiter that opened it re-checks the path (_open_locked)
        path.unlink(missing_ok=True)
        fh.close()
        del _HELD[path]


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffixes, so nibabel picks the same format);
    on success rename it to `path`, on any error remove it.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with atomic_file(Path(d) / "a.json") as tmp:
    ...         _ = tmp.write_text("{}")
    ...     sorted(p.name for p in Path(d).iterdir())
    ['a.json']
    """
    tmp = path.parent / f".tmp-{os.getpid()}-{path.name}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _relation(out: Path, inp: Path) -> str | None:
    """How `out` and `inp` (both resolved) overlap: 'is', 'lies inside', 'contains', or None."""
    if out == inp:
        return "is"
    if out.is_relative_to(inp):
        return "lies inside"
    if inp.is_relative_to(out):
        return "contains"
    return None


def check_apart(out: Path, inputs: Sequence[tuple[str, Path]]) -> None:
    """Refuse an output folder that is, contains, or lies inside an input.

    `inputs` are (option name, path) pairs, e.g. ("--real", Path("ingest")). A manifest.csv
    stands for the folder it lies in (its data files are beside it). Any other file input
    (a checkpoint, a report) is refused only when `out` is its folder or contains it: writing
    into a subfolder beside a checkpoint (`--checkpoint best.pt --out synthetic`) overwrites
    nothing. Raises OutputOverlapError naming both options.
    """
    o = out.expanduser().resolve()
    for name, path in inputs:
        p = path.expanduser().resolve()
        plain_file = p.is_file() and p.name != "manifest.csv"
        folder = p.parent if p.is_file() else p
        rel = _relation(o, folder)
        if rel is None or (plain_file and rel == "lies inside"):
            continue
        what = "the folder of the input" if folder != p else "the input"
        raise OutputOverlapError(
            f"--out {out} {rel} {what} {name} {path}; a command never writes into its inputs: choose an output "
            "folder apart from them"
        )
