"""Building blocks shared by the two GAN trainers (models/train_cyclegan.py, models/train_tumor_gan.py).

The parts a GAN training loop needs besides its networks and its step functions: the
device and autocast dtype (decided once, at the top of a run), seeding and RNG state
capture for exact resume (as plain tensors and lists, so checkpoints load weights-only),
DDP primitives, an exponential moving average of a network,
the image history pool of Shrivastava et al. (2017) as used by CycleGAN, gradient
penalties (R1, WGAN-GP), a guard against non-finite losses, a training-health monitor,
metric logging (JSON lines + TensorBoard), PNG sample grids and the model card JSON. It
imports torch only (no pipeline, no Prefect), and knows nothing of files beyond checkpoints,
metrics, sample images and cards inside a run folder. The loop-level helpers built on these
(start a run, resume, save, gathers, evaluation) are models/training.py; the checkpoint file
format is models/checkpoint.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

DeviceName = Literal["auto", "cpu", "cuda"]


class TrainingDivergedError(RuntimeError):
    """Repeated non-finite losses stopped training; the last good checkpoint is kept.

    Defined here (not in pipeline/errors.py) because models/ does not import pipeline/;
    the CLI maps it to pipeline.errors.TrainingDivergedError's one-line message.
    """


# --- device, dtype, seeding ------------------------------------------------------------------


def select_device(name: str = "auto") -> torch.device:
    """The torch device for `name`: "auto" (CUDA when available, else CPU), "cpu" or "cuda".

    Under torchrun each rank takes the GPU of its LOCAL_RANK. Raises ValueError for another
    name and RuntimeError for "cuda" on a machine without a GPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    match name:
        case "auto":
            return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        case "cpu":
            return torch.device("cpu")
        case "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available; use 'cpu' or 'auto'")
            return torch.device("cuda", local_rank)
        case _:
            raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda', got {name!r}")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA (the autocast dtype of nanoGPT's train.py), None (plain fp32) on CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device, enabled: bool = True) -> AbstractContextManager[Any]:
    """Autocast context for `device`: bf16 on CUDA when `enabled`, a no-op (fp32) on CPU."""
    dtype = autocast_dtype(device)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=enabled and dtype is not None)


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy's global generator and torch (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch CPU, each CUDA device) as tensors and plain lists.

    Plain data only, so a checkpoint holding it loads with torch.load(weights_only=True):
    python's Mersenne Twister as {"version", "state": 625 ints, "gauss"}, numpy's as
    {"keys": (624,) int64 tensor, "pos", "has_gauss", "cached_gaussian"}, torch's as uint8 tensors.
    """
    py_version, py_state, py_gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(py_version), "state": list(py_state), "gauss": py_gauss},
        "numpy": {"keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state()` captured (CUDA states only when a GPU is present)."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = np.asarray(torch.as_tensor(npy["keys"]).cpu().numpy(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --- distributed -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job: rank, world size, local rank (1 process: 0, 1, 0)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes checkpoints, metrics and samples."""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on GPU, gloo on CPU).

    Reads RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT) from the environment as
    torchrun sets them; a single process (no WORLD_SIZE) gets DistInfo() and no group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives use the current device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank (no-op for one process)."""
    if info.world_size <= 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(params: Iterable[nn.Parameter], info: DistInfo) -> None:
    """All-reduce and average the gradients of `params` across ranks (one flat buffer).

    This is what DistributedDataParallel does after backward, done explicitly: a GAN step
    calls the same network several times per backward (CycleGAN's G in the cycle and identity
    terms) and freezes D during the G step, which DDP's bucketed hooks handle poorly (they need
    find_unused_parameters and forbid re-entrant use). A no-op for one process.
    """
    if info.world_size <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


# --- checkpoints, cards ----------------------------------------------------------------------


def _atomic_write_bytes(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under a torch.compile (`_orig_mod`) or DDP (`module`) wrapper."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod  # type: ignore[assignment]
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def package_versions() -> dict[str, str]:
    """Versions of the packages a checkpoint depends on (python, torch, monai, numpy)."""
    import platform

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import monai

        versions["monai"] = monai.__version__
    except ImportError:  # pragma: no cover - monai is a dependency
        pass
    return versions


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 (hex, first 16 chars) of the config as canonical JSON: same options, same hash."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def write_model_card(path: Path, card: Mapping[str, Any]) -> None:
    """Write a checkpoint's metadata card as indented JSON, atomically (like a MONAI bundle's metadata.json).

    Adds `versions` (package_versions()) when the card has none.
    """
    data = dict(card)
    data.setdefault("versions", package_versions())
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write_bytes(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --- EMA -------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a network's weights (Karras et al. 2018; Yazici et al. 2019).

    `ema = EMA(G, decay=0.999)`; after each optimiser step `ema.update(G)`; sample with
    `ema.module` (an eval-mode deep copy that never needs gradients). Buffers (e.g. spectral-norm
    power-iteration vectors, batch-norm statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averaged weights towards `model`'s: ema = decay * ema + (1 - decay) * live."""
        live = unwrap(model)
        ema_params: list[torch.Tensor] = list(self.module.parameters())
        live_params = [p.detach().to(e.dtype) for p, e in zip(live.parameters(), ema_params, strict=True)]
        torch._foreach_lerp_(ema_params, live_params, 1.0 - self.decay)
        for e, b in zip(self.module.buffers(), live.buffers(), strict=True):
            e.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])


# --- image pool ------------------------------------------------------------------------------


class ImagePool:
    """History of generated images shown to the discriminator (Shrivastava et al. 2017; CycleGAN).

    `query(fakes)` returns a batch of the same shape: while the pool holds fewer than
    `pool_size` images each fake is stored and returned; afterwards each fake is, with
    probability 1/2, swapped for a random stored one (which it replaces), else returned as is.
    The draws come from the pool's own seeded CPU generator, so a query needs no host-device
    sync and the pool resumes exactly from its state_dict. `pool_size=0` disables it.
    """

    def __init__(self, pool_size: int, seed: int = 0) -> None:
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {pool_size}")
        self.pool_size = pool_size
        self.images: torch.Tensor | None = None  # (pool_size, C, H, W) on the fakes' device
        self.count = 0
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def query(self, fakes: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W): the fakes (detached), some swapped for older ones."""
        fakes = fakes.detach()
        if self.pool_size == 0:
            return fakes
        if self.images is None:
            self.images = torch.empty((self.pool_size, *fakes.shape[1:]), dtype=fakes.dtype, device=fakes.device)
        out = fakes.clone()
        coins = torch.rand(fakes.shape[0], generator=self.generator).tolist()
        picks = torch.randint(0, self.pool_size, (fakes.shape[0],), generator=self.generator).tolist()
        for i in range(fakes.shape[0]):
            if self.count < self.pool_size:
                self.images[self.count] = fakes[i]
                self.count += 1
            elif coins[i] > 0.5:
                j = picks[i]
                out[i] = self.images[j]
                self.images[j] = fakes[i]
        return out

    def state_dict(self) -> dict[str, Any]:
        images = None if self.images is None else self.images[: self.count].cpu().clone()
        return {"pool_size": self.pool_size, "count": self.count, "images": images,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | None = None) -> None:
        self.pool_size = int(state["pool_size"])
        self.count = int(state["count"])
        self.generator.set_state(state["generator"])
        stored = state["images"]
        if stored is None:
            self.images = None
            return
        self.images = torch.empty((self.pool_size, *stored.shape[1:]), dtype=stored.dtype,
                                  device=device or stored.device)
        self.images[: self.count] = stored.to(self.images.device)


# --- penalties, norms --------------------------------------------------------------------------


def r1_penalty(d_out_real: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 penalty (Mescheder et al. 2018): mean over the batch of ||d D(real) / d real||^2.

    `real` must have requires_grad=True before D is called on it. Multiply by gamma/2 in the
    loss. Returns a 0-dim tensor with a graph (create_graph=True), so it can be backpropagated.
    """
    (grad,) = torch.autograd.grad(d_out_real.float().sum(), real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def gradient_penalty(
    discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, target_norm: float = 1.0
) -> torch.Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017): mean (||grad D(x_hat)|| - 1)^2 on random interpolates.

    real, fake: (B, ...) same shape; x_hat = a * real + (1 - a) * fake with a ~ U(0, 1) per
    sample (drawn from torch's global RNG, captured by rng_state()). Multiply by the weight
    (10 in the paper). `discriminator` may return a tensor or a list whose last item is the output.
    """
    alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device, dtype=real.dtype)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    out = discriminator(x_hat)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    (grad,) = torch.autograd.grad(out.float().sum(), x_hat, create_graph=True)
    return (grad.float().flatten(1).norm(dim=1) - target_norm).pow(2).mean()


def grad_norm(params: Iterable[nn.Parameter] | nn.Module) -> torch.Tensor:
    """Global L2 norm of the gradients (0-dim float32 tensor; 0 when none has a gradient)."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


@torch.no_grad()
def batch_diversity(images: torch.Tensor) -> float:
    """Mean over pixels of the standard deviation across the batch of (B, ...) images.

    0 when every image in the batch is identical (mode collapse); NaN for a batch of one.
    """
    if images.shape[0] < 2:
        return float("nan")
    return float(images.float().std(dim=0).mean())


# --- non-finite guard ----------------------------------------------------------------------------


class NonFiniteGuard:
    """Skip optimiser steps whose loss is NaN/Inf; raise after `max_consecutive` in a row.

    `if guard.check(losses, step): opt.step()` -- returns True when every value is finite
    (and resets the count), False to skip the step. The `max_consecutive`-th consecutive
    failure raises TrainingDivergedError naming the step and the non-finite terms.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def check(self, losses: Mapping[str, float | torch.Tensor], step: int) -> bool:
        bad = sorted(k for k, v in losses.items() if not math.isfinite(float(v)))
        if not bad:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        logger.warning("step %d: non-finite %s; step skipped (%d in a row)", step, ", ".join(bad), self.consecutive)
        if self.consecutive >= self.max_consecutive:
            raise TrainingDivergedError(
                f"training diverged at step {step}: {self.consecutive} consecutive steps with non-finite "
                f"losses ({', '.join(bad)}); the last good checkpoint is kept. Lower the learning rate, "
                f"enable spectral_norm or r1_gamma, or check the input data for NaN/Inf."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total_skipped = int(state["total_skipped"])


# --- health monitor ------------------------------------------------------------------------------


class HealthMonitor:
    """Rolling statistics of a GAN run and plain-language warnings when it goes wrong.

    Feed it every step with `update(d_real=..., d_fake=..., grad_g=..., grad_d=..., loss_g=...,
    loss_d=..., diversity=...)` (missing keys are skipped) and call `check(step)` at log time;
    it returns (and logs) warning strings for:
      * a too-strong discriminator: mean D(real) - mean D(fake) over the window above `d_gap_max`
        (in the units of the D output: about 0.8 for LSGAN targets 1/0, a few logits for
        vanilla/hinge; None disables it);
      * a vanishing generator gradient: mean G grad norm below `g_grad_min`;
      * oscillation: the D gap's mean over `oscillation_chunks` consecutive sub-windows swings
        up and down by more than `oscillation_amplitude`;
      * collapsing diversity: the rolling batch diversity below `diversity_min_ratio` times the
        first full window's (mode collapse);
      * a loss trend of D winning: over the window, the D loss fell by a factor `trend_ratio`
        while the G loss rose by that factor (positive losses only, e.g. LSGAN);
      * a falling evaluation score, from `observe_eval`: worse than the best by more than
        `eval_drop` (relative).
    The thresholds are heuristics; a warning is a prompt to look at the samples, not a verdict.
    """

    KEYS = ("d_real", "d_fake", "grad_g", "grad_d", "loss_g", "loss_d", "diversity")

    def __init__(
        self,
        window: int = 50,
        d_gap_max: float | None = 0.8,
        g_grad_min: float = 1e-4,
        oscillation_chunks: int = 4,
        oscillation_amplitude: float = 0.4,
        diversity_min_ratio: float = 0.3,
        eval_drop: float = 0.05,
        trend_ratio: float = 2.0,
    ) -> None:
        self.window = window
        self.d_gap_max = d_gap_max
        self.g_grad_min = g_grad_min
        self.oscillation_chunks = oscillation_chunks
        self.oscillation_amplitude = oscillation_amplitude
        self.diversity_min_ratio = diversity_min_ratio
        self.eval_drop = eval_drop
        self.trend_ratio = trend_ratio
        self.history: dict[str, deque[float]] = {k: deque(maxlen=window) for k in self.KEYS}
        self.gap_history: deque[float] = deque(maxlen=window * oscillation_chunks)
        self.diversity_baseline: float | None = None
        self.best_eval: float | None = None
        self.warnings: list[str] = []

    def update(self, **metrics: float) -> None:
        """Record one step's values (non-finite values are ignored)."""
        for k, v in metrics.items():
            if k in self.history and v is not None and math.isfinite(float(v)):
                self.history[k].append(float(v))
        if "d_real" in metrics and "d_fake" in metrics:
            gap = float(metrics["d_real"]) - float(metrics["d_fake"])
            if math.isfinite(gap):
                self.gap_history.append(gap)
        div = self.history["diversity"]
        if self.diversity_baseline is None and len(div) == self.window:
            self.diversity_baseline = statistics.fmean(div)

    def _mean(self, key: str) -> float | None:
        values = self.history[key]
        return statistics.fmean(values) if len(values) >= max(1, self.window // 2) else None

    def check(self, step: int) -> list[str]:
        """Warnings for the current window (logged at WARNING level and kept in `self.warnings`)."""
        found: list[str] = []
        d_real, d_fake = self._mean("d_real"), self._mean("d_fake")
        if self.d_gap_max is not None and d_real is not None and d_fake is not None and d_real - d_fake > self.d_gap_max:
            found.append(
                f"step {step}: discriminator too strong: mean D(real) {d_real:.3f} vs D(fake) {d_fake:.3f} "
                f"(gap > {self.d_gap_max}); try a lower D learning rate (lr_d), spectral_norm, r1_gamma or diffaug"
            )
        g = self._mean("grad_g")
        if g is not None and g < self.g_grad_min:
            found.append(
                f"step {step}: generator gradient vanishing (mean norm {g:.2e} < {self.g_grad_min:.0e}); "
                "the discriminator may be saturated or the G learning rate zero"
            )
        n = self.oscillation_chunks
        if n >= 3 and len(self.gap_history) == self.gap_history.maxlen:
            gaps = list(self.gap_history)
            size = len(gaps) // n
            means = [statistics.fmean(gaps[i * size:(i + 1) * size]) for i in range(n)]
            diffs = [b - a for a, b in zip(means, means[1:], strict=False)]
            alternating = all(x * y < 0 for x, y in zip(diffs, diffs[1:], strict=False))
            if alternating and max(means) - min(means) > self.oscillation_amplitude:
                found.append(
                    f"step {step}: D/G oscillation: the D(real)-D(fake) gap swings between "
                    f"{min(means):.3f} and {max(means):.3f}; try a lower learning rate or TTUR (lr_d)"
                )
        div = self._mean("diversity")
        if self.diversity_baseline and div is not None and div < self.diversity_min_ratio * self.diversity_baseline:
            found.append(
                f"step {step}: batch diversity collapsing ({div:.4f}, was {self.diversity_baseline:.4f}); "
                "possible mode collapse"
            )
        g_halves, d_halves = self._halves("loss_g"), self._halves("loss_d")
        if g_halves is not None and d_halves is not None:
            (g0, g1), (d0, d1) = g_halves, d_halves
            if min(g0, g1, d0, d1) > 0 and g1 > self.trend_ratio * g0 and d1 * self.trend_ratio < d0:
                found.append(
                    f"step {step}: the discriminator is winning: G loss rose {g0:.3f} -> {g1:.3f} while "
                    f"D loss fell {d0:.3f} -> {d1:.3f} over the last {self.window} steps"
                )
        for w in found:
            logger.warning(w)
        self.warnings.extend(found)
        return found

    def _halves(self, key: str) -> tuple[float, float] | None:
        """Means of the older and the newer half of a full window (None before the window fills)."""
        values = list(self.history[key])
        if len(values) < self.window or self.window < 4:
            return None
        half = len(values) // 2
        return statistics.fmean(values[:half]), statistics.fmean(values[half:])

    def observe_eval(self, step: int, name: str, value: float, higher_is_better: bool = True) -> list[str]:
        """Record an evaluation score; a warning when it fell more than `eval_drop` below the best."""
        found: list[str] = []
        if not math.isfinite(value):
            found.append(f"step {step}: evaluation {name} is not finite ({value})")
        else:
            score = value if higher_is_better else -value
            if self.best_eval is not None and score < self.best_eval - self.eval_drop * abs(self.best_eval):
                best = self.best_eval if higher_is_better else -self.best_eval
                found.append(f"step {step}: evaluation {name} got worse: {value:.4f} (best so far {best:.4f})")
            self.best_eval = score if self.best_eval is None else max(self.best_eval, score)
        for w in found:
            logger.warning(w)
        self.warnings.extend(found)
        return found

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}, "gaps": list(self.gap_history),
                "diversity_baseline": self.diversity_baseline, "best_eval": self.best_eval,
                "warnings": list(self.warnings)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in state["history"].items():
            if k in self.history:
                self.history[k].clear()
                self.history[k].extend(v)
        self.gap_history.clear()
        self.gap_history.extend(state["gaps"])
        self.diversity_baseline = state["diversity_baseline"]
        self.best_eval = state["best_eval"]
        self.warnings = list(state["warnings"])


# --- metrics, images -----------------------------------------------------------------------------


class MetricsWriter:
    """Metrics of a run: one JSON line per logged step in RUN_DIR/metrics.jsonl, TensorBoard in RUN_DIR/tb.

    `w.log(step, {"loss_g": 0.7})`; `w.write_summary({...})` writes RUN_DIR/metrics.json.
    With `enabled=False` (every rank but 0 under torchrun) it writes nothing. On resume
    (`resume_step` given) lines after that step are dropped, since they will be logged again.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.jsonl = self.run_dir / "metrics.jsonl"
        self._tb: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.jsonl.write_text("", encoding="utf-8")
        elif self.jsonl.exists():
            kept = [line for line in self.jsonl.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.jsonl.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=resume_step)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        text = json.dumps(dict(summary), indent=2, sort_keys=True, default=str) + "\n"
        _atomic_write_bytes(self.run_dir / "metrics.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The rows of RUN_DIR/metrics.jsonl, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def save_image_grid(rows: torch.Tensor | Sequence[torch.Tensor], path: Path, value_range: tuple[float, float] = (-1.0, 1.0)) -> None:
    """Write a grayscale PNG grid: one row per tensor in `rows`, one column per batch item.

    rows: a (N, C, H, W) tensor (one row) or a sequence of them (e.g. real A, fake B,
    reconstructed A), all with the same H, W. The middle channel is shown (the centre slice of
    a 2.5D stack); values are mapped from `value_range` to 0..255 and clipped.
    """
    from PIL import Image

    if isinstance(rows, torch.Tensor):
        rows = [rows]
    lo, hi = value_range
    tiles = []
    for r in rows:
        if r.dim() != 4:
            raise ValueError(f"save_image_grid wants (N, C, H, W) tensors, got shape {tuple(r.shape)}")
        img = r.detach().float().cpu()[:, r.shape[1] // 2]  # (N, H, W)
        tiles.append(torch.cat(list(img), dim=1))  # (H, N*W)
    width = max(t.shape[1] for t in tiles)
    grid = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=lo) for t in tiles], dim=0)
    u8 = ((grid - lo) / (hi - lo) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(u8).save(path)

