"""bench/gate.py --smoke runs on CPU in a subprocess, prints the full Markdown table, and the gate's
metrics agree with the naive per-row computations (no timings checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gate_bench_smoke() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gate.py"), "--smoke"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "SMOKE" in out and "torch " in out and "command: `python bench/gate.py --smoke`" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| step | space | N | gate s |") and "chunked / naive" in table[0]
    rows = {(cells[0], cells[1]): cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[1:])}
    assert all(len(cells) == 12 for cells in rows.values())
    compared = [cells for cells in rows.values() if cells[5] != "-"]
    steps = {cells[0].split(" (")[0] for cells in compared}
    assert {"FID", "KID", "precision/recall/density/coverage", "MS-SSIM diversity"} <= steps
    assert ("nearest neighbours: syn->real, real->real, syn->syn", "pixels 1024-d") in rows
    for cells in compared:
        assert cells[11].startswith("yes"), f"naive and chunked differ: {cells}"
        assert float(cells[9]) > 0 and float(cells[10]) >= 0  # ratio and max abs diff are numbers
    assert ("extract features (real + synthetic)", "inception 2048-d") in rows
    assert "naive and chunked results agree: yes" in out
