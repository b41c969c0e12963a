"""Known answers of models/training.py, the helpers both GAN loops share, and of the one checkpoint schema."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn

from models.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, make_checkpoint
from models.common import EMA, DistInfo, HealthMonitor, NonFiniteGuard, rng_state
from models.training import (
    all_ranks_finite,
    due,
    evaluate_untouched,
    gather_objects,
    gather_tensor,
    improves,
    parse_best_key,
    restore_training,
)


def test_due_runs_every_k_steps_and_at_the_end() -> None:
    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if due(s, 0, 10)] == [10]  # 0: only at the end


def test_one_finite_check_and_single_process_gathers() -> None:
    assert all_ranks_finite(torch.tensor(1.5), None) and all_ranks_finite(torch.tensor(1.5), DistInfo())
    assert not all_ranks_finite(torch.tensor(float("nan")), DistInfo())
    assert not all_ranks_finite(torch.tensor(float("inf")), None)
    t = torch.arange(6.0).reshape(3, 2)
    assert gather_tensor(t, DistInfo()) is t
    assert gather_objects({"a": 1}, DistInfo()) == [{"a": 1}]


def test_best_key_and_record() -> None:
    assert parse_best_key("ssim") == ("ssim", True) and parse_best_key("mae:min") == ("mae", False)
    with pytest.raises(ValueError, match="NAME:min"):
        parse_best_key("ssim:up")
    assert improves(0.5, {}, True) and improves(0.6, {"value": 0.5}, True) and not improves(0.4, {"value": 0.5}, True)
    assert improves(0.4, {"value": 0.5}, False) and not improves(float("nan"), {}, True)


def test_evaluation_leaves_modes_and_random_streams_as_they_were() -> None:
    a, b = nn.Linear(2, 2).train(), nn.Linear(2, 2).eval()
    seen: list[tuple[bool, bool, bool]] = []

    def fn(x: nn.Module, y: nn.Module) -> dict[str, torch.Tensor]:
        seen.append((x.training, y.training, torch.is_grad_enabled()))
        torch.rand(5)
        random.random()  # the callback draws from the global streams
        return {"score": torch.tensor(0.25)}

    before = rng_state()
    expected = (torch.rand(3), random.random())
    torch.set_rng_state(before["torch"])
    random.setstate((before["python"]["version"], tuple(before["python"]["state"]), before["python"]["gauss"]))
    assert evaluate_untouched(fn, a, b) == {"score": 0.25}
    assert seen == [(False, False, False)] and a.training and not b.training
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def _checkpoint(net: nn.Module, ranks: int = 2) -> dict[str, object]:
    opt = torch.optim.Adam(net.parameters())
    return make_checkpoint(
        kind="tumor_gan", step=3, config={"a": 1}, card={"kind": "tumor_gan"}, nets={"g": net.state_dict()},
        ema={"g": EMA(net, 0.9).state_dict()}, optimizers={"g": opt.state_dict()}, schedulers={},
        guards={"g": NonFiniteGuard(3).state_dict()}, monitor=HealthMonitor().state_dict(),
        ranks=[{"rank": r} for r in range(ranks)], extra={},
    )


def test_one_schema_and_one_way_to_resume(tmp_path: Path) -> None:
    net = nn.Linear(2, 3)
    state = _checkpoint(net)
    assert (state["format"], state["version"], state["world_size"]) == (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, 2)
    fresh = nn.Linear(2, 3)
    parts = dict(nets={"g": fresh}, ema={"g": EMA(fresh, 0.5)}, optimizers={"g": torch.optim.Adam(fresh.parameters())},
                 schedulers={}, guards={"g": NonFiniteGuard(3)}, monitor=HealthMonitor())
    mine = restore_training(state, tmp_path / "last.pt", DistInfo(rank=1, world_size=2), **parts)  # type: ignore[arg-type]
    assert mine == {"rank": 1} and torch.equal(fresh.weight, net.weight) and parts["ema"]["g"].decay == 0.9
    # another world size: every rank continues from rank 0's entry
    assert restore_training(state, tmp_path / "last.pt", DistInfo(), **parts) == {"rank": 0}  # type: ignore[arg-type]
    wide = nn.Linear(2, 5)
    with pytest.raises(CheckpointError, match=r"last.pt: the g weights do not fit this network"):
        restore_training(state, tmp_path / "last.pt", DistInfo(), **{**parts, "nets": {"g": wide}})  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="last.pt: its training state is incomplete.*KeyError"):
        restore_training({**state, "monitor": {}}, tmp_path / "last.pt", DistInfo(), **parts)  # type: ignore[arg-type]
