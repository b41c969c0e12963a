"""bench/cyclegan.py --smoke runs on CPU and prints the full Markdown table (no GPU needed, no numbers checked)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cyclegan_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_cyclegan", ROOT / "bench" / "cyclegan.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_cyclegan"] = bench
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| (") or line.startswith("| bf16")]
    assert len(table) == 5
    assert table[0].startswith("| (a) reference") and table[-1].startswith("| (c) fastest")
    assert "GFLOP" in out and "matmul ceiling" in out and "SMOKE" in out
