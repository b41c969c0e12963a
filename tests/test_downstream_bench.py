"""bench/downstream.py runs end to end on a tiny cohort (mri-ct deployment: phantoms, ingest,
CycleGAN, translation, gate, dataset, patches, the classifier arms) and prints its report.

The numbers of such a tiny run mean nothing; the test guards the script against bit rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.bench
def test_downstream_bench_mri_ct_smoke(tmp_path: Path) -> None:
    args = ["--deployment", "mri-ct", "--subjects", "16", "--size", "32", "--patch-size", "16", "--cyclegan-steps", "4",
            "--seeds", "2", "--steps", "4", "--crop", "8", "--work", str(tmp_path / "work")]
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "downstream.py"), *args], capture_output=True, text=True,
                         timeout=400, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert out.startswith("## Downstream classifier, mri-ct deployment")
    assert "- Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/downstream.py --deployment mri-ct" in out
    arms = [line for line in out.splitlines() if line.startswith("| (")]
    assert [a.split("|")[1].strip()[:3] for a in arms[:3]] == ["(a)", "(b)", "(c)"]
    assert "**Verdict:**" in out and "gate" in out and "verdict **" in out
    # 6 CT and 6 MR training subjects: one of each held out of the CycleGAN's training to pick best.pt
    assert "best.pt was picked" in out and "on 2 training-split subjects held out of its training" in out
    assert not (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8").count(str(tmp_path))  # --record not given


def test_downstream_bench_refuses_a_work_folder_of_another_cohort(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "cohort_options.json").write_text('{"subjects": 16, "size": 32, "seed": 0}\n', encoding="utf-8")
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "downstream.py"), "--deployment", "tumor-patches",
                          "--subjects", "20", "--size", "32", "--work", str(work)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "holds a cohort made with" in run.stderr and "--fresh" in run.stderr
