"""Children that die with their parent: a watchdog for `medaug demo`'s ephemeral Prefect server.

Prefect's ephemeral mode starts its API server (uvicorn) as a child process and stops it from
an `atexit` hook, which never runs when the parent is killed with SIGKILL: the server stays
behind, orphaned and listening. `watch_children()` marks this process's environment with a
token (`MEDAUG_PARENT=<pid>:<start time>`, inherited by every process it starts later, the
server included) and starts a small watchdog process that blocks on the read end of a pipe
whose write end only the parent holds. When the parent dies, by any means, the kernel closes
the write end, the watchdog reads end-of-file and terminates every process that still carries
the token (SIGTERM, then SIGKILL after `grace_s`). A token, not a list of child pids, because
the parent may start a child and die before any poll could see it, and an orphan's parent
pid changes when it is re-parented.

Linux only (/proc); elsewhere `watch_children` does nothing. Run as
`python -m flows.orphans TOKEN FD` by `watch_children`, never by hand.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROC = Path("/proc")


ENV_KEY = "MEDAUG_PARENT"


def _start_time(pid: int) -> str | None:
    """Start time (clock ticks since boot) of a process from /proc/PID/stat, or None when gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()[19]  # field 22 of stat, counted after "pid (comm) "


def carrying(token: str) -> list[int]:
    """Pids of running processes (other than this one) whose environment holds MEDAUG_PARENT=token."""
    marker = f"{ENV_KEY}={token}".encode()
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in env:
            found.append(int(entry.name))
    return found


def terminate(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM `pids`, then SIGKILL those still running (same start time) after `grace_s` seconds."""
    started = {pid: _start_time(pid) for pid in pids}
    alive = {pid for pid, st in started.items() if st is not None}
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = {pid for pid in alive if _start_time(pid) == started[pid]}
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def watch(token: str, fd: int, grace_s: float = 5.0) -> None:
    """The watchdog: wait until `fd` reaches end-of-file (the parent is gone), then end the token's carriers."""
    while os.read(fd, 4096):
        pass
    terminate(carrying(token), grace_s)


def watch_children() -> subprocess.Popen[bytes] | None:
    """Start the watchdog for the processes this one starts from now on (see the module docstring);
    returns it, or None where /proc is missing. The watchdog exits by itself once this process is gone."""
    start = _start_time(os.getpid())
    if start is None:
        return None
    token = f"{os.getpid()}:{start}"
    if os.environ.get(ENV_KEY) == token:
        return None  # watched already (a second demo run in one process)
    read_end, write_end = os.pipe()  # both not inheritable (PEP 446): no child but the watchdog gets one
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.orphans", token, str(read_end)],
        pass_fds=(read_end,),
        start_new_session=True,  # a Ctrl-C to the terminal's group must not end it before it cleans up
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    os.close(read_end)
    _WRITE_ENDS.append(write_end)  # open for this process's lifetime: its close is the signal
    os.environ[ENV_KEY] = token  # set after the watchdog started, so it does not carry the token itself
    return proc


_WRITE_ENDS: list[int] = []


def main() -> None:  # pragma: no cover - runs in the watchdog process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    watch(sys.argv[1], int(sys.argv[2]))


if __name__ == "__main__":  # pragma: no cover
    main()
