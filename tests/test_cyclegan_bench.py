"""bench/cyclegan.py --smoke runs on CPU and prints the full Markdown table (no GPU needed, no numbers checked);
a SIGTERM part way keeps the rows already printed and says where it stopped."""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cyclegan", ROOT / "bench" / "cyclegan.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_cyclegan"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def _rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("| (") or line.startswith("| bf16")]


@pytest.mark.bench
def test_cyclegan_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    assert bench.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    table = _rows(out)
    assert len(table) == 6
    assert table[0].startswith("| (a) reference") and table[4].startswith("| (c) fastest")
    assert "CUDA graphs" in table[5]
    assert all(len(row.strip("|").split("|")) == 7 for row in table)
    assert "GFLOP" in out and "matmul ceiling" in out and "SMOKE" in out
    assert out.index("| setting | batch |") < out.index(table[0]) and "stopped" not in out


@pytest.mark.bench
def test_cyclegan_bench_sigterm_keeps_measured_rows(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    time_setting = bench.time_setting
    calls = 0

    def third_row_gets_sigterm(*args: Any) -> float:
        nonlocal calls
        calls += 1
        if calls == 3:
            signal.raise_signal(signal.SIGTERM)  # as `timeout` would, while row 3 is being measured
        return float(time_setting(*args))

    monkeypatch.setattr(bench, "time_setting", third_row_gets_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    assert bench.main(["--smoke"]) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the bench's handler is gone again
    out = capsys.readouterr().out
    table = _rows(out)
    assert [row.split(" | ")[0] for row in table] == ["| (a) reference: fp32, batch 1", "| (b) bf16 autocast, batch 1"]
    assert "| setting | batch |" in out and "matmul ceiling" in out
    assert out.rstrip().endswith("- stopped by SIGTERM after 2 of 6 rows")


@pytest.mark.bench
def test_cyclegan_bench_a_failing_setting_is_a_row_not_the_end(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    time_setting = bench.time_setting

    def cuda_graphs_fail(s: Any, *args: Any) -> float:
        if s.compile_mode == "reduce-overhead":
            raise RuntimeError("CUDA graphs: planted failure\nsecond line")
        return float(time_setting(s, *args))

    monkeypatch.setattr(bench, "time_setting", cuda_graphs_fail)
    assert bench.main(["--smoke"]) == 0
    table = _rows(capsys.readouterr().out)
    assert len(table) == 6 and "failed: RuntimeError: CUDA graphs: planted failure |" in table[5]
    assert "second line" not in table[5] and all(len(row.strip("|").split("|")) == 7 for row in table)


def test_compile_mode_reaches_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    from models.train_cyclegan import CycleGANConfig, build_training

    modes: list[str] = []
    monkeypatch.setattr("torch.compile", lambda net, mode="default": modes.append(mode) or net)
    cfg = CycleGANConfig.model_validate(dict(image_size=32, ngf=8, ndf=8, n_res_blocks=2, compile=True,
                                             compile_mode="reduce-overhead"))
    build_training(cfg, __import__("torch").device("cpu"))
    assert modes == ["reduce-overhead"] * 4
    with pytest.raises(ValueError, match="compile_mode"):
        CycleGANConfig.model_validate(dict(compile_mode="fastest"))
