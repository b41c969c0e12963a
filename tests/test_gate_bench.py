"""bench/gate.py --smoke runs on CPU in a subprocess, prints the full Markdown table, and the gate's
metrics agree with the naive per-row computations (no timings checked); rows come out as they are
measured, and a SIGTERM (what `timeout` sends) keeps them and says where the run stopped."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE_ROWS = 12


@pytest.mark.bench
def test_gate_bench_smoke() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gate.py"), "--smoke"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "SMOKE" in out and "torch " in out and "command: `python bench/gate.py --smoke`" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| step | space | N | gate s |") and "chunked / naive" in table[0]
    assert len(table) == 1 + SMOKE_ROWS
    rows = {(cells[0], cells[1]): cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[1:])}
    assert all(len(cells) == 12 for cells in rows.values())
    compared = [cells for cells in rows.values() if cells[5] != "-"]
    steps = {cells[0].split(" (")[0] for cells in compared}
    assert {"FID", "KID", "precision/recall/density/coverage", "MS-SSIM diversity"} <= steps
    assert ("nearest neighbours: syn->real, real->real, syn->syn", "pixels 1024-d") in rows
    for cells in compared:
        assert cells[11].startswith("yes"), f"naive and chunked differ: {cells}"
        assert float(cells[9]) > 0 and math.isfinite(float(cells[10]))  # ratio and max abs diff are numbers
    assert ("extract features (real + synthetic)", "inception 2048-d") in rows
    assert "naive and chunked results agree: yes" in out
    assert "load average at start" in out and "load average at end" in out and "stopped" not in out


@pytest.mark.bench
def test_gate_bench_sigterm_keeps_measured_rows(tmp_path: Path) -> None:
    log = (tmp_path / "stderr.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "gate.py"), "--smoke"], stdout=subprocess.PIPE,
                            stderr=log, text=True, cwd=ROOT)
    watchdog = threading.Timer(300, proc.kill)  # a hung script fails the test instead of hanging it
    watchdog.start()
    try:
        assert proc.stdout is not None
        before = []
        for line in proc.stdout:  # the header and the table's first row arrive while the rest is measured
            before.append(line)
            if line.startswith("| make images on the device |"):
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stdout.read()
        code = proc.wait()
    finally:
        watchdog.cancel()
        log.close()
    out = "".join(before) + rest
    assert code == 128 + signal.SIGTERM, (tmp_path / "stderr.log").read_text()[-2000:]
    assert before[0].startswith("## Quality gate at scale") and any(line.startswith("| step | space |") for line in before)
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith(("| step", "|---"))]
    assert rows[0].startswith("| make images on the device |") and all(len(row.strip("|").split("|")) == 12 for row in rows)
    stopped = re.search(r"^- stopped by SIGTERM after (\d+) of (\d+) rows$", out, re.MULTILINE)
    assert stopped is not None, out
    assert int(stopped[1]) == len(rows) < SMOKE_ROWS and int(stopped[2]) == SMOKE_ROWS
    assert out.rstrip().endswith(stopped[0]) and "naive and chunked results agree" not in out
