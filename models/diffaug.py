"""Differentiable augmentation of discriminator inputs (DiffAugment, Zhao et al. 2020) and ADA's adaptive probability.

A GAN trained on a few hundred medical slices overfits its discriminator; augmenting every
image the discriminator sees (real and generated alike, with gradients flowing through the
augmentation to the generator) keeps it honest without leaking the augmentation into the
generated images. The four operations suit single-channel scans: brightness and contrast
jitter, translation and cutout (colour saturation from the paper has no meaning on grayscale).
Each is applied per sample with probability `p` (1 = DiffAugment; ADA, Karras et al. 2020,
tunes `p` from the discriminator's overfitting signal, see `AdaptiveAugment`). Images are
(B, C, H, W) or (B, C, D, H, W) in [-1, 1]; uncovered pixels get `fill` (-1, the background).
Random draws come from torch's global RNG on the images' device, so checkpoints that save
`models.common.rng_state()` resume them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F

Augmentation = Literal["brightness", "contrast", "translation", "cutout"]
AUGMENTATIONS: tuple[str, ...] = get_args(Augmentation)


def _per_sample(x: torch.Tensor, shape_tail: int = 0) -> torch.Tensor:
    """U(0, 1) of shape (B, 1, 1, ...) broadcastable over x (or (B, shape_tail) when given)."""
    if shape_tail:
        return torch.rand(x.shape[0], shape_tail, device=x.device, dtype=torch.float32)
    return torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)


def brightness(x: torch.Tensor) -> torch.Tensor:
    """Add U(-0.5, 0.5) per sample (Zhao et al. 2020)."""
    return x + (_per_sample(x) - 0.5)


def contrast(x: torch.Tensor) -> torch.Tensor:
    """Scale deviations from each sample's mean by U(0.5, 1.5) (Zhao et al. 2020)."""
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return (x - mean) * (_per_sample(x) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125, fill: float = -1.0) -> torch.Tensor:
    """Shift each sample by a whole number of pixels up to `ratio` of each side, padding with `fill`.

    Done as a grid_sample at integer offsets (so pixel values are copied exactly and gradients
    flow to the input), for 2D and 3D images alike.
    """
    spatial = x.shape[2:]
    nd = len(spatial)
    u = _per_sample(x, nd)  # (B, nd) in the order of `spatial`
    shifts = torch.stack([((u[:, i] * 2 - 1) * int(s * ratio + 0.5)).round() for i, s in enumerate(spatial)], dim=1)
    # affine_grid works in (x, y[, z]) = reversed spatial order, in normalised units (2 / size per pixel)
    theta = torch.zeros(x.shape[0], nd, nd + 1, device=x.device, dtype=torch.float32)
    for i in range(nd):
        theta[:, i, i] = 1.0
        axis = nd - 1 - i
        theta[:, i, nd] = -shifts[:, axis] * 2.0 / spatial[axis]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # one extra all-ones channel marks which output pixels came from inside the image
    ones = torch.ones_like(x[:, :1])
    moved = F.grid_sample(torch.cat([x, ones], dim=1).float(), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False).to(x.dtype)
    return torch.where(moved[:, -1:] > 0.5, moved[:, :-1], torch.full_like(x, fill))


def cutout(x: torch.Tensor, ratio: float = 0.5, fill: float = -1.0) -> torch.Tensor:
    """Set one random box per sample, `ratio` of each side, to `fill` (Zhao et al. 2020: ratio 0.5)."""
    spatial = x.shape[2:]
    centres = _per_sample(x, len(spatial))
    keep = torch.ones((x.shape[0], 1, *spatial), device=x.device, dtype=x.dtype)
    box = torch.ones_like(keep, dtype=torch.bool)
    for i, s in enumerate(spatial):
        half = int(s * ratio + 0.5) / 2
        c = centres[:, i] * s  # (B,)
        pos = torch.arange(s, device=x.device, dtype=torch.float32) + 0.5
        inside = (pos[None, :] >= (c - half)[:, None]) & (pos[None, :] < (c + half)[:, None])  # (B, s)
        view = [x.shape[0], 1] + [1] * len(spatial)
        view[2 + i] = s
        box = box & inside.view(view)
    keep = keep.masked_fill(box, 0.0)
    return x * keep + fill * (1 - keep)


def diff_augment(
    x: torch.Tensor, policy: Sequence[Augmentation], p: float = 1.0, fill: float = -1.0
) -> torch.Tensor:
    """Apply each augmentation in `policy`, in order, to each sample with probability `p`.

    `diff_augment(x, ["translation", "cutout"])` returns a tensor of x's shape, differentiable
    in x. An empty policy or p = 0 returns x itself (no random numbers drawn).
    """
    if not policy or p <= 0.0:
        return x
    for name in policy:
        match name:
            case "brightness":
                y = brightness(x)
            case "contrast":
                y = contrast(x)
            case "translation":
                y = translation(x, fill=fill)
            case "cutout":
                y = cutout(x, fill=fill)
            case _:
                raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}; got {name!r}")
        if p < 1.0:
            apply = _per_sample(x) < p
            y = torch.where(apply, y, x)
        x = y
    return x


class AdaptiveAugment:
    """ADA's augmentation probability controller (Karras et al. 2020).

    Every `interval` discriminator steps, r_t = mean of sign(D(real) - midpoint) over those
    steps is compared with `target` (0.6 in the paper): p rises when r_t > target (D is
    over-confident on reals, i.e. overfitting) and falls otherwise, by interval * batch /
    `speed_images` each time (the paper lets p go 0 -> 1 in 500k images). `update` accumulates
    on the device and syncs once per interval; under torch.distributed the statistic is summed
    over ranks, so every rank holds the same p.
    """

    def __init__(self, target: float = 0.6, interval: int = 4, speed_images: int = 500_000,
                 midpoint: float = 0.0, p: float = 0.0) -> None:
        if not 0.0 < target < 1.0:
            raise ValueError(f"ADA target must be in (0, 1), got {target}")
        self.target = target
        self.interval = interval
        self.speed_images = speed_images
        self.midpoint = midpoint
        self.p = p
        self._sum: torch.Tensor | None = None
        self._n = 0
        self._steps = 0

    def update(self, d_real: torch.Tensor) -> float:
        """Feed one step's D(real) outputs (any shape, batch first); returns the current p."""
        signs = torch.sign(d_real.detach().float() - self.midpoint)
        self._sum = signs.sum() if self._sum is None else self._sum + signs.sum()
        self._n += signs.numel()
        self._steps += 1
        if self._steps >= self.interval:
            stats = torch.stack([self._sum, torch.tensor(float(self._n), device=self._sum.device)])
            if dist.is_available() and dist.is_initialized():  # one p for all ranks
                dist.all_reduce(stats)
            r_t = float(stats[0]) / max(float(stats[1]), 1.0)
            step = self._steps * d_real.shape[0] / self.speed_images
            self.p = min(1.0, max(0.0, self.p + math.copysign(step, r_t - self.target)))
            self._sum, self._n, self._steps = None, 0, 0
        return self.p

    def state_dict(self) -> dict[str, Any]:
        return {"p": self.p, "sum": None if self._sum is None else float(self._sum), "n": self._n, "steps": self._steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.p = float(state["p"])
        self._sum = None if state["sum"] is None else torch.tensor(float(state["sum"]))
        self._n = int(state["n"])
        self._steps = int(state["steps"])
