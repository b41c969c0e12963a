"""Children that die with their parent: a watchdog for `medaug demo`'s ephemeral Prefect server.

Prefect's ephemeral mode starts its API server (uvicorn) as a child process and stops it from
an `atexit` hook, which never runs when the parent is killed with SIGKILL: the server stays
behind, orphaned and listening. `watch_children()` starts a small watchdog process that holds
the read end of a pipe whose write end only the parent has. While the parent lives the
watchdog notes the parent's child processes (pid and start time, from /proc, every
`poll_s` seconds); when the parent dies, by any means, the kernel closes the write end, the
watchdog reads end-of-file and terminates the children it noted that still run (SIGTERM,
then SIGKILL after `grace_s`). The start time guards against a recycled pid.

Linux only (/proc); elsewhere `watch_children` does nothing. Run as
`python -m flows.orphans PARENT_PID FD` by `watch_children`, never by hand.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks) of a process from /proc/PID/stat, or None when gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid ... starttime is field 22
    return int(fields[1]), fields[19]


def children_of(parent: int) -> dict[int, str]:
    """The running children of `parent`: pid -> start time."""
    found: dict[int, str] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[0] == parent:
                found[int(entry.name)] = st[1]
    return found


def _terminate(noted: dict[int, str], grace_s: float) -> None:
    """SIGTERM the noted processes that still run (same start time), then SIGKILL after `grace_s`."""
    alive = {pid for pid, start in noted.items() if (_stat(pid) or (0, ""))[1] == start}
    for pid in alive:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = {pid for pid in alive if (_stat(pid) or (0, ""))[1] == noted[pid]}
    for pid in alive:
        os.kill(pid, signal.SIGKILL)


def watch(parent: int, fd: int, poll_s: float = 0.5, grace_s: float = 5.0) -> None:
    """The watchdog's loop: note `parent`'s children until `fd` reaches end-of-file, then end them."""
    noted: dict[int, str] = {}
    while True:
        readable, _, _ = select.select([fd], [], [], poll_s)
        if readable and not os.read(fd, 1):
            break  # the parent is gone: the pipe's only write end closed
        noted.update(children_of(parent))
        me = os.getpid()
        noted.pop(me, None)
    _terminate(noted, grace_s)


def watch_children() -> subprocess.Popen[bytes] | None:
    """Start the watchdog for this process's children (see the module docstring); returns it, or
    None where /proc is missing. The watchdog exits by itself once this process is gone."""
    if not (PROC / "self" / "stat").is_file():
        return None
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.orphans", str(os.getpid()), str(read_end)],
        pass_fds=(read_end,),
        start_new_session=True,  # a Ctrl-C to the terminal's group must not end it before it cleans up
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    os.close(read_end)
    # keep the write end open (and uninherited) for this process's lifetime: its close is the signal
    os.set_inheritable(write_end, False)
    _WRITE_ENDS.append(write_end)
    return proc


_WRITE_ENDS: list[int] = []


def main() -> None:  # pragma: no cover - runs in the watchdog process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    watch(int(sys.argv[1]), int(sys.argv[2]))


if __name__ == "__main__":  # pragma: no cover
    main()
