"""bench/dataset.py --smoke runs end to end (a 4-subject cohort, one build each way) and prints its table;
the script itself checks that both ways write the same NIfTI content. No timing is checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dataset_bench_smoke(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "dataset.py"), "--smoke", "--cache", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert out.startswith("## Dataset stage: copy ingest's bytes, hash once (SMOKE, ")
    rows = [line for line in out.splitlines() if line.startswith("| before") or line.startswith("| after")]
    assert len(rows) == 2 and all(len(r.strip("|").split("|")) == 4 for r in rows)
    assert "identical NIfTI content both ways" in out and "after / before wall time" in out
