"""The gate's domain encoder: a small CNN trained here, SimCLR-style, on the real images.

FID is only as good as its feature space, and no pretrained weights can be downloaded,
so the gate learns one from the real training slices it scores against: two random
augmentations of each image (crop-rescale, small rotation, flip, contrast/brightness
jitter, a little noise) are pulled together and pushed away from the other images with
the NT-Xent loss (Chen et al. 2020; MONAI's ContrastiveLoss). At 64x64 and the default
300 steps of 32 pairs this takes ~10 s on one CPU core. Features are the 8*width-dimensional
global-average-pooled output of the last conv block (before the projection head, as in
SimCLR). The saved file's sha256 (over the canonical tensor bytes, so it does not depend
on the serialiser) names the exact feature space in every gate report.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss
from numpy.typing import NDArray
from torch import nn

from pipeline.errors import WeightsMissingError

log = logging.getLogger(__name__)

ENCODER_VERSION = "domain-simclr-v1"
"""Name of the architecture and recipe; changes when either does."""


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class DomainEncoder(nn.Module):
    """Four stride-2 conv blocks (width, 2w, 4w, 8w channels), global average pool, projection head.

    `features(x)` maps (N, 1, H, W) in [-1, 1] to (N, 8*width); `forward` adds the MLP
    projection head used only by the contrastive loss. One conv per block keeps a SimCLR
    step at batch 32 near 15 ms on one CPU core.
    """

    def __init__(self, width: int = 8, proj_dim: int = 32) -> None:
        super().__init__()
        self.width = width
        self.proj_dim = proj_dim
        self.backbone = nn.Sequential(_block(1, width), _block(width, 2 * width), _block(2 * width, 4 * width),
                                      _block(4 * width, 8 * width))
        self.head = nn.Sequential(nn.Linear(8 * width, 8 * width), nn.ReLU(inplace=True), nn.Linear(8 * width, proj_dim))

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return 8 * self.width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> (N, 8*width) pooled backbone features."""
        return self.backbone(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> (N, proj_dim) projections for the contrastive loss."""
        return self.head(self.features(x))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view of each image (N, 1, H, W) in [-1, 1], for contrastive training.

    Scale 0.75-1 (zoom in), rotation +-15 degrees, shift +-10%, horizontal flip (p 0.5),
    contrast x0.8-1.2 and brightness +-0.1, Gaussian noise sigma 0-0.03; outside fills with -1 (air).
    Mild on purpose: intensity and texture are what separate real from synthetic.
    """
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    scale = u(0.75, 1.0)
    angle = u(-math.pi / 12, math.pi / 12)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos * flip, -sin, u(-0.1, 0.1)
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * flip, cos, u(-0.1, 0.1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # sample (x + 1) with zero padding so outside is -1 after the shift back
    y = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    y = y * u(0.8, 1.2).view(n, 1, 1, 1) + u(-0.1, 0.1).view(n, 1, 1, 1)
    y = y + torch.randn(y.shape, generator=gen) * u(0.0, 0.03).view(n, 1, 1, 1)
    return y.clamp(-1.0, 1.0)


def train_domain_encoder(images: torch.Tensor, steps: int = 300, batch: int = 32, width: int = 8, lr: float = 2e-3,
                         temperature: float = 0.2, seed: int = 0, device: str = "cpu") -> DomainEncoder:
    """Train a DomainEncoder on real images (N, 1, H, W) in [-1, 1] with SimCLR (seeded; eval mode on return).

    Same images, seed and settings give the same weights on the same hardware.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W), got {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError("the domain encoder needs at least 2 real images")
    # setup
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    model = DomainEncoder(width).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = ContrastiveLoss(temperature=temperature)
    data = images.float().cpu()
    b = min(batch, data.shape[0])
    # loop: step, log
    model.train()
    for step in range(steps):
        idx = torch.randperm(data.shape[0], generator=gen)[:b]
        x = data[idx]
        v1, v2 = augment(x, gen).to(dev), augment(x, gen).to(dev)
        loss = loss_fn(model(v1), model(v2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.debug("domain encoder step %d/%d: NT-Xent %.4f", step + 1, steps, loss.item())
    log.info("domain encoder trained: %d steps on %d images, final NT-Xent %.3f", steps, data.shape[0], loss.item())
    return model.eval()


def state_dict_sha256(state: dict[str, Any]) -> str:
    """sha256 over a state dict's sorted keys, dtypes, shapes and raw tensor bytes (serialiser-independent)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_domain_encoder(model: DomainEncoder, path: Path) -> str:
    """Write the encoder to `path` (torch.save of a dict) and return its sha256."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    digest = state_dict_sha256(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": ENCODER_VERSION, "width": model.width, "proj_dim": model.proj_dim, "state_dict": state,
                "sha256": digest}, path)
    return digest


def load_domain_encoder(path: Path, setting: str = "gate.encoder_path") -> tuple[DomainEncoder, str]:
    """A saved DomainEncoder (eval mode) and its sha256; WeightsMissingError naming `setting` when absent."""
    if not path.is_file():
        raise WeightsMissingError(f"domain encoder {path} does not exist; fix {setting} or leave it empty to train one")
    not_ours = f"{path} is not a {ENCODER_VERSION} encoder saved by `medaug gate`"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError) for a foreign file
        raise WeightsMissingError(f"{not_ours} ({type(exc).__name__}); fix {setting} or leave it empty to train one") from None
    if not isinstance(blob, dict) or blob.get("version") != ENCODER_VERSION:
        raise WeightsMissingError(f"{not_ours}; fix {setting} or leave it empty to train one")
    try:
        model = DomainEncoder(int(blob["width"]), int(blob["proj_dim"]))
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise WeightsMissingError(f"{not_ours} (its weights do not fit: {type(exc).__name__}); fix {setting}") from None
    return model.eval(), state_dict_sha256(blob["state_dict"])


@torch.no_grad()
def encode(model: nn.Module, images: torch.Tensor, device: str = "cpu", batch: int = 256) -> NDArray[np.float64]:
    """Features (N, D) float64 of images (N, 1, H, W) through `model.features` in eval mode."""
    model.eval()
    dev = torch.device(device)
    out = [model.features(images[s:s + batch].float().to(dev)).double().cpu() for s in range(0, images.shape[0], batch)]  # type: ignore[operator]
    return np.asarray(torch.cat(out).numpy(), dtype=np.float64)
