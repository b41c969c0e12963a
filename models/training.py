"""The small training toolkit both GAN loops share (models/train_cyclegan.py, models/train_tumor_gan.py).

Each trainer is its own readable loop; what they have in common lives here as plain functions,
so that the two solve the same problem the same way: where a run lives and which process this
is (`start_run` / `end_run`), when a periodic action is due (`due`), the one check that a loss is
finite on every rank (`all_ranks_finite`), the distributed gathers (`gather_tensor`,
`gather_objects`), an evaluation that leaves the training's random streams untouched
(`evaluate_untouched`), the best-checkpoint record (`parse_best_key`, `improves`), the one way to
resume (`restore_training`: networks, EMA, optimisers, schedulers, guards, monitor, and this
rank's entry), the one way to save (`save_with_card`), CUDA-graph step marks, and metric rows.
The checkpoint file format itself is models/checkpoint.py; RNG capture, EMA, the image pool,
penalties, the non-finite guard and the health monitor are models/common.py. torch only.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.checkpoint import CheckpointError, load_state_dict_checked, save_checkpoint
from models.common import (
    EMA,
    DistInfo,
    HealthMonitor,
    MetricsWriter,
    NonFiniteGuard,
    init_distributed,
    rng_state,
    select_device,
    set_rng_state,
    unwrap,
    write_model_card,
)

logger = logging.getLogger(__name__)


# --- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Where a training run writes (RUN_DIR) and which process this is (device, rank)."""

    dir: Path
    device: torch.device
    info: DistInfo
    owns_group: bool  # this call started the torchrun process group, so it also ends it

    @property
    def last_checkpoint(self) -> Path:
        return self.dir / "checkpoints" / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.dir / "checkpoints" / "best.pt"


def start_run(run_dir: Path, device: str) -> Run:
    """Pick the device ("auto", "cpu", "cuda") and join the torchrun process group when WORLD_SIZE > 1."""
    dev = select_device(device)
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    return Run(dir=Path(run_dir), device=dev, info=init_distributed(dev), owns_group=owns_group)


def end_run(run: Run) -> None:
    """Leave the process group if `start_run` joined it."""
    if run.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (log, sample, checkpoint, evaluate) runs at `step`: every `every`
    steps (never when 0) and always at the last step."""
    return (every > 0 and step % every == 0) or step == last


# --- distributed ------------------------------------------------------------------------------------


def all_ranks_finite(loss: torch.Tensor, info: DistInfo | None) -> bool:
    """Whether `loss` is finite on every rank: all ranks must agree to skip a step together."""
    flag = torch.isfinite(loss.detach()).to(torch.float32)
    if info is not None and info.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_tensor(t: torch.Tensor, info: DistInfo | None) -> torch.Tensor:
    """`t` (B, ...) from every rank concatenated along the batch (just `t` for one process)."""
    if info is None or info.world_size <= 1:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_objects(obj: dict[str, Any], info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's `obj` in rank order (a collective: every rank calls it together)."""
    if info.world_size <= 1:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def mark_cuda_graph_step(enabled: bool) -> None:
    """With CUDA graphs (torch.compile mode reduce-overhead), tell torch a new step begins: the graphs'
    output buffers of the last step may then be reused (torch.compiler.cudagraph_mark_step_begin)."""
    if enabled:
        torch.compiler.cudagraph_mark_step_begin()


# --- evaluation and the best checkpoint ---------------------------------------------------------------


def evaluate_untouched(fn: Callable[..., Mapping[str, Any]], *modules: nn.Module) -> dict[str, float]:
    """`fn(*modules)` with the modules in eval mode under no_grad, as floats.

    Afterwards each module's train/eval mode and the global RNG states are what they were, so an
    evaluation callback never changes the training's random stream (a run with evaluation
    trains exactly like one without).
    """
    saved_rng = rng_state()
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    with torch.no_grad():
        scores = {k: float(v) for k, v in fn(*modules).items()}
    for m, mode in zip(modules, modes, strict=True):
        m.train(mode)
    set_rng_state(saved_rng)
    return scores


def parse_best_key(best_key: str) -> tuple[str, bool]:
    """"ssim" or "ssim:max" -> ("ssim", higher is better); "mae:min" -> ("mae", lower is better)."""
    name, _, direction = best_key.partition(":")
    match direction:
        case "" | "max":
            return name, True
        case "min":
            return name, False
        case _:
            raise ValueError(f"best_key must be 'NAME', 'NAME:max' or 'NAME:min', got {best_key!r}")


def improves(value: float, best: Mapping[str, Any], higher_is_better: bool) -> bool:
    """Whether a finite `value` beats the record `best` ({"value": ...}, empty before the first)."""
    prev = best.get("value")
    if not math.isfinite(value):
        return False
    return prev is None or (value > prev if higher_is_better else value < prev)


# --- saving and resuming ------------------------------------------------------------------------------


def save_with_card(path: Path, state: Mapping[str, Any]) -> None:
    """Write a checkpoint (atomically) and its model card (the state's "card", as indented JSON) beside it."""
    save_checkpoint(path, state)
    card_path = path.with_suffix(".json")
    try:
        write_model_card(card_path, json.loads(state["card"]))
    except OSError as exc:
        raise CheckpointError(f"cannot write model card {card_path}: {exc.strerror or exc}; the checkpoint "
                              f"{path.name} is whole. Free disk space and resume") from None


def restore_training(
    state: Mapping[str, Any],
    path: Path,
    info: DistInfo,
    *,
    nets: Mapping[str, nn.Module],
    ema: Mapping[str, EMA] | None,
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    guards: Mapping[str, NonFiniteGuard],
    monitor: HealthMonitor,
) -> dict[str, Any]:
    """Load the shared parts of a checkpoint (models/checkpoint.py schema) into a freshly built run;
    returns this rank's entry of state["ranks"] (RNG states, samplers, ...) for the trainer's own parts.

    Each rank takes its own entry when the world size is the checkpoint's (an exact resume);
    otherwise every rank takes rank 0's, a valid but not identical continuation (logged).
    EMA states are restored when both the run and the checkpoint keep them. Raises
    CheckpointError (naming `path`) for weights that do not fit or a missing part.
    """
    try:
        for name, net in nets.items():
            load_state_dict_checked(unwrap(net), state["nets"][name], path, name)
        if ema is not None and state["ema"] is not None:
            for name, e in ema.items():
                e.load_state_dict(state["ema"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sched in schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        for name, guard in guards.items():
            guard.load_state_dict(state["guards"][name])
        monitor.load_state_dict(state["monitor"])
        ranks = state["ranks"]
        if len(ranks) != info.world_size:
            logger.warning("resuming a %d-process checkpoint with %d processes: per-rank state restarts from rank 0's",
                           len(ranks), info.world_size)
            return dict(ranks[0])
        return dict(ranks[info.rank])
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume from {path}: its training state is incomplete or does not fit "
                              f"this run ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None


# --- metrics ----------------------------------------------------------------------------------------------


def record(writer: MetricsWriter, history: list[dict[str, float]], step: int,
           metrics: Mapping[str, float]) -> dict[str, float]:
    """Log one metric row (metrics.jsonl, TensorBoard), keep it with its step in `history`, and return it."""
    writer.log(step, metrics)
    row = {"step": float(step), **metrics}
    history.append(row)
    return row


def write_summary_safely(writer: MetricsWriter, summary: Mapping[str, Any]) -> None:
    """RUN_DIR/metrics.json at the end of a run, even one that is failing: a write error (a full
    disk) is logged, not raised, so it never hides the error that ended the run."""
    try:
        writer.write_summary(summary)
    except OSError as exc:
        logger.warning("could not write %s: %s", writer.run_dir / "metrics.json", exc.strerror or exc)
