"""CycleGAN under torchrun: 2 CPU processes with the gloo backend (tests/ddp_cyclegan_worker.py).

Both ranks must end with identical weights (gradients are averaged), see different data
(per-rank shards), share one ADA probability, and resume exactly from a 2-rank checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.common import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_two_gloo_ranks_hold_identical_weights_and_resume_exactly(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "ddp_cyclegan_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["moved"] and r1["moved"]
    assert r0["weights_full"] == r1["weights_full"]  # gradients averaged: one model on both ranks
    assert [x[2] for x in r0["losses_full"]] == [x[2] for x in r1["losses_full"]]  # one ADA p for both ranks
    assert any(x[2] > 0 for x in r0["losses_full"])
    assert r0["losses_full"][0][0] != r1["losses_full"][0][0]  # each rank saw its own shard
    for r in (r0, r1):  # resume after 2 of 4 steps continues exactly, rank by rank
        flat_resumed = [x for row in r["losses_resumed"] for x in row]
        assert flat_resumed == pytest.approx([x for row in r["losses_full"][2:] for x in row], rel=1e-6)
        assert r["weights_resumed"] == r["weights_full"]
    assert (tmp_path / "full" / "checkpoints" / "last.pt").exists()
    assert len(read_metrics(tmp_path / "full")) == 4  # only rank 0 wrote
    ckpt = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
