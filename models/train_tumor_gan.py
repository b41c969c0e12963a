"""Training loop of the class-conditional tumor-patch GAN, with the mode-collapse toolkit as switches.

`train_tumor_gan(cfg, data, run_dir)` trains models/tumor_gan.py's generator and projection
discriminator on in-memory patches (`TumorPatchData`, built by pipeline/patches.py) and writes
RUN_DIR/checkpoints/last.pt (one dict with all state: networks, EMA, optimisers, RNG states,
augmentation probability, step, config) with its model card last.json beside it, metrics
(metrics.jsonl, TensorBoard), and per-class sample grids (samples/*.png). Hinge loss with
spectral norm and two time-scale learning rates is the default (the SAGAN recipe, Zhang et al.
2019); every remedy against mode collapse and instability is one config switch: minibatch
standard deviation (Karras et al. 2018), feature matching (Salimans et al. 2016), mode seeking
(Mao et al. 2019), unrolled discriminator (Metz et al. 2017), DiffAugment / adaptive
augmentation (Zhao et al. 2020; Karras et al. 2020), R1 (Mescheder et al. 2018), two time-scale
learning rates (Heusel et al. 2017) and the EMA generator (Yazici et al. 2019); the last two are
part of the default recipe, the others are off until a config turns them on. bf16 autocast on GPU, fp32 on CPU; resume continues exactly as
an uninterrupted run; under torchrun each rank draws its own batches, gradients are averaged
and only rank 0 writes. The loop reads top to bottom: setup, data, models, optimisers, resume,
loop (step, log, sample, checkpoint); what it shares with the CycleGAN's (run set-up, resume,
saving, gathers) is models/training.py, the checkpoint schema models/checkpoint.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.checkpoint import (
    CheckpointError,
    check_resume_config,
    checkpoint_card,
    load_checkpoint,
    load_state_dict_checked,
    make_checkpoint,
)
from models.common import (
    EMA,
    DistInfo,
    HealthMonitor,
    MetricsWriter,
    NonFiniteGuard,
    autocast,
    average_gradients,
    batch_diversity,
    broadcast_module,
    config_hash,
    grad_norm,
    gradient_penalty,
    package_versions,
    r1_penalty,
    rng_state,
    save_image_grid,
    seed_everything,
    select_device,
    set_rng_state,
    unwrap,
)
from models.diffaug import AdaptiveAugment, Augmentation, diff_augment
from models.losses import (
    AdversarialLoss,
    discriminator_loss,
    generator_loss,
    health_gap_max,
    real_fake_midpoint,
)
from models.training import (
    all_ranks_finite,
    due,
    end_run,
    gather_objects,
    gather_tensor,
    record,
    restore_training,
    save_with_card,
    start_run,
    write_summary_safely,
)
from models.tumor_gan import ProjectionDiscriminator, TumorGenerator

log = logging.getLogger(__name__)

class TumorGANConfig(BaseModel):
    """Options of the tumor GAN; defaults are the SAGAN recipe (hinge, SN, TTUR 1e-4/4e-4, Adam(0, 0.9)).

    The mode-collapse toolkit (minibatch_std .. ema_decay) is off by default except EMA; turn on
    what a run needs in the YAML (configs/tumor_gan.yaml).
    """

    model_config = ConfigDict(extra="forbid")

    # data
    patch_size: int = Field(64, description="Patch side in voxels (power of two >= 8); must match the data.")
    spatial_dims: Literal[2, 3] = Field(2, description="2 for axial patches, 3 for cubes.")
    balanced_classes: bool = Field(True, description="Draw each class equally often (rare tumor classes are not drowned).")
    # networks
    latent_dim: int = Field(128, description="Length of the latent vector z.")
    g_channels: int = Field(64, description="Generator width at full resolution (8x this at 4 voxels).")
    d_channels: int = Field(64, description="Discriminator width at full resolution.")
    spectral_norm: bool = Field(True, description="Spectral normalisation in D (Miyato et al. 2018); keep on.")
    # loss
    loss: AdversarialLoss = Field("hinge", description="Adversarial loss: hinge, vanilla (non-saturating), lsgan, or wgan (WGAN-GP).")
    gp_weight: float = Field(10.0, description="WGAN-GP gradient penalty weight (used only with loss=wgan; Gulrajani 2017).")
    # optimisers: two time-scale update rule (Heusel et al. 2017) -- TTUR is lr_g != lr_d
    lr_g: float = Field(1e-4, description="Generator Adam learning rate.")
    lr_d: float = Field(4e-4, description="Discriminator Adam learning rate (4x G's: TTUR).")
    betas: tuple[float, float] = Field((0.0, 0.9), description="Adam betas of both networks.")
    batch_size: int = Field(64, description="Real patches (and fakes) per step.")
    steps: int = Field(20000, description="Training steps (one D and one G update each).")
    seed: int = Field(0, description="Seeds weights, data order, noise and augmentation.")
    # mode-collapse and stability toolkit
    minibatch_std: bool = Field(False, description="Minibatch std-dev layer in D: lets D see a collapsed batch (Karras 2018).")
    minibatch_std_group: int = Field(4, description="Group size of the minibatch std-dev layer.")
    feature_matching_weight: float = Field(0.0, description="Weight of the feature-matching loss on D's last features (Salimans 2016); 0 = off.")
    mode_seeking_weight: float = Field(0.0, description="Weight of the mode-seeking (diversity-sensitive) loss (Mao 2019); 0 = off.")
    unrolled_steps: int = Field(0, description="Unrolled D: update a copy of D this many times and take G's loss from it (Metz 2017); 0 = off.")
    diffaug: list[Augmentation] = Field([], description="DiffAugment policy for every D input, e.g. [translation, cutout] (Zhao 2020); [] = off.")
    ada_target: float | None = Field(None, description="Adaptive augmentation: tune the DiffAugment probability so E[sign D(real)] tracks this (0.6 in Karras 2020); None = fixed p=1.")
    ada_interval: int = Field(4, description="Steps between adaptive-augmentation updates.")
    ada_speed_images: int = Field(500_000, description="Images over which ADA's p may go from 0 to 1 (Karras 2020); smaller reacts faster.")
    r1_gamma: float = Field(0.0, description="R1 penalty weight gamma on real data (Mescheder 2018); 0 = off.")
    ema_decay: float | None = Field(0.999, description="EMA of G's weights used for samples and the checkpoint's sampler, warmed up as min(decay, (1+t)/(10+t)); None = off.")
    # engineering
    amp: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU, which runs fp32).")
    compile: bool = Field(False, description="torch.compile the networks (GPU runs; slow to start; D stays eager with R1 or WGAN-GP).")
    max_nonfinite: int = Field(5, description="Consecutive non-finite steps before training stops.")
    log_every: int = Field(50, description="Steps between metric lines (and health checks).")
    sample_every: int = Field(1000, description="Steps between per-class sample grids; 0 = only at the end.")
    checkpoint_every: int = Field(1000, description="Steps between checkpoints (always one at the end).")
    diversity_samples: int = Field(8, description="Samples per class for the logged per-class diversity.")
    health_window: int = Field(50, description="Steps the training-health monitor averages over before it warns.")

    @model_validator(mode="after")
    def _check(self) -> TumorGANConfig:
        n = math.log2(self.patch_size / 4) if self.patch_size > 0 else -1
        if n < 1 or 4 * 2 ** int(n) != self.patch_size:
            raise ValueError(f"patch_size must be a power of two >= 8 (8, 16, 32, 64), got {self.patch_size}")
        if self.mode_seeking_weight > 0 and self.batch_size % 2:
            raise ValueError("mode_seeking_weight > 0 needs an even batch_size (fakes come in pairs)")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.unrolled_steps < 0:
            raise ValueError(f"unrolled_steps must be >= 0, got {self.unrolled_steps}")
        if self.ada_target is not None and not self.diffaug:
            raise ValueError("ada_target needs a diffaug policy to adapt (e.g. diffaug: [translation, cutout])")
        return self


@dataclass
class TumorPatchData:
    """Training patches in memory (built from files by pipeline/patches.py:to_train_data).

    images, masks: (N, 1, *S) float32; images in [-1, 1], masks in {0, 1}. labels: (N,) int64
    indices into `classes`. spacing in mm (x, y, z); train_subjects: subject pseudonyms.
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    modality: str
    spacing: tuple[float, float, float]
    train_subjects: list[str]
    normalisation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if n == 0:
            raise ValueError("TumorPatchData holds no patches")
        if self.images.shape != self.masks.shape or self.images.shape[1] != 1:
            raise ValueError(f"images {tuple(self.images.shape)} and masks {tuple(self.masks.shape)} must both be (N, 1, *S)")
        if self.labels.shape != (n,):
            raise ValueError(f"labels must be ({n},), got {tuple(self.labels.shape)}")
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes):
            raise ValueError(f"labels must index classes {self.classes}")


@dataclass
class TrainResult:
    """What a run left: checkpoint, card, steps done, the metric rows logged by this call (each with
    "step"), health warnings, and the networks (sampler = the EMA generator when EMA is on)."""

    run_dir: Path
    checkpoint: Path
    card: Path
    steps: int
    history: list[dict[str, float]]
    warnings: list[str]
    generator: nn.Module
    discriminator: nn.Module
    sampler: nn.Module

    @property
    def metrics(self) -> dict[str, float]:
        """The last logged metric row (empty when nothing was logged)."""
        return self.history[-1] if self.history else {}


RESUME_FREE_OPTIONS = frozenset({"steps", "log_every", "sample_every", "checkpoint_every", "compile", "max_nonfinite", "diversity_samples"})
"""Options that may change between a run and its resume: they do not change the training maths."""


def data_fingerprint(data: TumorPatchData) -> str:
    """sha256 (first 16 hex) of the patches, masks, labels and classes: a resume must see the same data."""
    h = hashlib.sha256(json.dumps(data.classes).encode())
    for t in (data.images, data.masks, data.labels):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --- pieces of a step -----------------------------------------------------------------------


def build_networks(cfg: TumorGANConfig, num_classes: int) -> tuple[TumorGenerator, ProjectionDiscriminator]:
    """Generator and projection discriminator for `cfg` (on CPU, fp32)."""
    g = TumorGenerator(num_classes, cfg.latent_dim, cfg.g_channels, cfg.patch_size, cfg.spatial_dims)
    d = ProjectionDiscriminator(
        num_classes,
        in_channels=2,
        base_channels=cfg.d_channels,
        patch_size=cfg.patch_size,
        spatial_dims=cfg.spatial_dims,
        spectral_norm=cfg.spectral_norm,
        minibatch_std=cfg.minibatch_std,
        minibatch_std_group=cfg.minibatch_std_group,
    )
    return g, d


def build_optimisers(cfg: TumorGANConfig, g: nn.Module, d: nn.Module) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G (lr_g) and D (lr_d) with the same betas: the two time-scale update rule."""
    return (
        torch.optim.Adam(g.parameters(), lr=cfg.lr_g, betas=cfg.betas),
        torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=cfg.betas),
    )


def sample_batch(
    data: TumorPatchData, batch_size: int, generator: torch.Generator, balanced: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A real batch (B, 2, *S) (image, mask) and its labels (B,), drawn with replacement.

    With `balanced`, each class is drawn equally often (weights 1 / class count).
    """
    labels = data.labels.cpu()  # the index draw runs on the CPU generator, whatever the data's device
    if balanced:
        counts = torch.bincount(labels, minlength=len(data.classes)).float()
        weights = (1.0 / counts.clamp(min=1.0))[labels]
    else:
        weights = torch.ones(labels.shape[0])
    idx = torch.multinomial(weights, batch_size, replacement=True, generator=generator).to(data.images.device)
    return torch.cat([data.images[idx], data.masks[idx]], dim=1), data.labels[idx]


def make_latents(
    cfg: TumorGANConfig, labels: torch.Tensor, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (B, latent_dim) and fake labels (B,). With mode seeking, fakes 2k and 2k + 1 form a
    pair: both take real label 2k, so they share a class but not a z.

    Adjacent pairs, not halves: MinibatchStdDev groups samples i, i + B/g, i + 2B/g, ..., so the
    halves-pairs (i, i + B/2) always sat in one group, a same-class pair that no real group
    holds (a batch whose label pattern alone lets D tell it apart). Pair members 2k and 2k + 1
    never share a group when B/g >= 2; each group then holds independently drawn classes, as
    in the real batch."""
    b = labels.shape[0]
    z = torch.randn(b, cfg.latent_dim, generator=generator).to(device)
    if cfg.mode_seeking_weight > 0:
        return z, labels[0::2].repeat_interleave(2)
    return z, labels


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mode-seeking loss (Mao et al. 2019) over the pairs of `make_latents`, fakes 2k and 2k + 1:
    1 / (mean|G(z1) - G(z2)| / mean|z1 - z2| + 1e-5), a 0-dim float32; lower when different z give
    more different patches. fake (B, 2, *S), z (B, latent_dim), B even.

    Only the image channel counts: the mask is a label of the image, not a mode of its own (the
    healthy class's real mask is identically empty), and with it in the distance the term pushed
    every mask pixel of a pair apart as hard as an image pixel; at initialisation the flat
    sigmoid mask, whose pairs differ ~4x less than the images, also inflated the term itself.
    """
    img = fake[:, :1].float()
    lz = (img[0::2] - img[1::2]).abs().mean() / (z[0::2] - z[1::2]).abs().mean()
    return 1.0 / (lz + 1e-5)


def d_view(x: torch.Tensor, cfg: TumorGANConfig, p: float) -> torch.Tensor:
    """What D sees of a (B, 2, *S) patch: the mask channel mapped from [0, 1] to [-1, 1] (so both
    channels have background -1, the augmentation fill), then DiffAugment with probability `p`
    when a policy is set. Applied to real and fake alike; differentiable in x."""
    x = torch.cat([x[:, :1], x[:, 1:] * 2.0 - 1.0], dim=1)
    if not cfg.diffaug or p <= 0.0:
        return x
    return diff_augment(x, cfg.diffaug, p)


def discriminator_step(
    d: nn.Module,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    y_real: torch.Tensor,
    fake: torch.Tensor,
    y_fake: torch.Tensor,
    cfg: TumorGANConfig,
    device: torch.device,
    aug_p: float = 1.0,
    guard: NonFiniteGuard | None = None,
    step: int = 0,
    ada: AdaptiveAugment | None = None,
    info: DistInfo | None = None,
) -> dict[str, float]:
    """One D update on a real batch and a detached fake batch; returns losses, D(x), D(G(z)), grad norm.

    Adds R1 on real data (gamma/2 * ||grad D(real)||^2) when r1_gamma > 0 and the WGAN-GP
    penalty when loss is wgan. G is untouched (fakes are detached). A non-finite loss skips
    the update (guard). D(real) feeds the adaptive augmentation controller `ada` when given.
    Under torchrun (`info`), gradients are averaged over ranks, a step is skipped on every rank
    when the loss is non-finite on any, and ADA sees every rank's D(real).
    Keys: loss_d, d_adv, d_r1, d_gp, d_real, d_fake, grad_d.
    """
    fake = fake.detach()
    real = real.detach().requires_grad_(cfg.r1_gamma > 0)
    opt_d.zero_grad(set_to_none=True)
    with autocast(device, cfg.amp):
        logits_real, _ = d(d_view(real, cfg, aug_p), y_real)
        logits_fake, _ = d(d_view(fake, cfg, aug_p), y_fake)
        adv = discriminator_loss(cfg.loss, logits_real.float(), logits_fake.float())
    loss = adv
    r1 = torch.zeros((), device=device)
    if cfg.r1_gamma > 0:
        r1 = r1_penalty(logits_real, real)
        loss = loss + 0.5 * cfg.r1_gamma * r1
    gp = torch.zeros((), device=device)
    if cfg.loss == "wgan":
        gp = gradient_penalty(_LogitsOf(d, y_real, cfg, aug_p), real, fake)
        loss = loss + cfg.gp_weight * gp
    loss.backward()
    average_gradients(d.parameters(), info or DistInfo())
    finite = all_ranks_finite(loss, info)
    out = {
        "loss_d": float(loss.detach()),
        "d_adv": float(adv.detach()),
        "d_r1": float(r1.detach()),
        "d_gp": float(gp.detach()),
        "d_real": float(logits_real.detach().float().mean()),
        "d_fake": float(logits_fake.detach().float().mean()),
        "grad_d": float(grad_norm(d)),
    }
    if guard is None or guard.check({"loss_d": out["loss_d"] if finite else math.nan}, step):
        opt_d.step()
    if ada is not None:
        out["aug_p"] = ada.update(gather_tensor(logits_real.detach().float(), info))
    return out


class _LogitsOf(nn.Module):
    """D's logits for fixed labels as a one-argument module (what gradient_penalty calls)."""

    def __init__(self, d: nn.Module, y: torch.Tensor, cfg: TumorGANConfig, aug_p: float) -> None:
        super().__init__()
        self.d, self.y, self.cfg, self.aug_p = d, y, cfg, aug_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.d(d_view(x, self.cfg, self.aug_p), self.y)[0]
        return logits


def unrolled_discriminator(
    d: nn.Module,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    y_real: torch.Tensor,
    fake: torch.Tensor,
    y_fake: torch.Tensor,
    cfg: TumorGANConfig,
    device: torch.device,
    aug_p: float,
) -> nn.Module:
    """A copy of D (and of its optimiser state) updated `cfg.unrolled_steps` times (Metz et al. 2017).

    G takes its loss from this look-ahead D, so it is penalised for moves D would answer in k
    steps; the copy is then discarded. First-order version: G's gradient flows through the
    copy's weights but not through its k updates. The k updates reuse this step's batch.
    """
    d_copy = copy.deepcopy(unwrap(d))
    opt_copy = torch.optim.Adam(d_copy.parameters(), lr=cfg.lr_d, betas=cfg.betas)
    opt_copy.load_state_dict(opt_d.state_dict())
    for _ in range(cfg.unrolled_steps):
        discriminator_step(d_copy, opt_copy, real, y_real, fake, y_fake, cfg, device, aug_p)
    return d_copy.requires_grad_(False)


def generator_step(
    g: nn.Module,
    d: nn.Module,
    opt_g: torch.optim.Optimizer,
    fake: torch.Tensor,
    y_fake: torch.Tensor,
    z: torch.Tensor,
    real: torch.Tensor,
    y_real: torch.Tensor,
    cfg: TumorGANConfig,
    device: torch.device,
    aug_p: float = 1.0,
    guard: NonFiniteGuard | None = None,
    step: int = 0,
    info: DistInfo | None = None,
) -> dict[str, float]:
    """One G update from the fakes `fake = G(z, y_fake)` (with graph) judged by `d`.

    Loss = adversarial + feature matching (||mean f(real) - mean f(fake)||^2 on D's last
    features) + mode seeking (`mode_seeking_loss`: image channel, pairs 2k and 2k + 1).
    Only G's optimiser steps (D's weights get no gradient); under torchrun (`info`) G's
    gradients are averaged over ranks. Keys: loss_g, g_adv, g_fm, g_ms, grad_g.
    """
    opt_g.zero_grad(set_to_none=True)
    d_trainable = [p.requires_grad for p in d.parameters()]
    d.requires_grad_(False)  # G's backward needs no gradients of D's weights
    with autocast(device, cfg.amp):
        logits_fake, feat_fake = d(d_view(fake, cfg, aug_p), y_fake)
        adv = generator_loss(cfg.loss, logits_fake.float())
        fm = torch.zeros((), device=device)
        if cfg.feature_matching_weight > 0:
            with torch.no_grad():
                _, feat_real = d(d_view(real, cfg, aug_p), y_real)
            fm = F.mse_loss(feat_fake.float().mean(0), feat_real.float().mean(0))
    ms = mode_seeking_loss(fake, z) if cfg.mode_seeking_weight > 0 else torch.zeros((), device=device)
    loss = adv + cfg.feature_matching_weight * fm + cfg.mode_seeking_weight * ms
    loss.backward()
    for p, flag in zip(d.parameters(), d_trainable, strict=True):
        p.requires_grad_(flag)
    average_gradients(g.parameters(), info or DistInfo())
    finite = all_ranks_finite(loss, info)
    out = {
        "loss_g": float(loss.detach()),
        "g_adv": float(adv.detach()),
        "g_fm": float(fm.detach()),
        "g_ms": float(ms.detach()),
        "grad_g": float(grad_norm(g)),
    }
    if guard is None or guard.check({"loss_g": out["loss_g"] if finite else math.nan}, step):
        opt_g.step()
    return out


@torch.no_grad()
def generate(
    g: nn.Module,
    class_index: int,
    n: int,
    seed: int,
    latent_dim: int,
    device: torch.device,
    batch_size: int = 64,
    amp: bool = False,
) -> torch.Tensor:
    """`n` patches (n, 2, *S) float32 on CPU of one class from G in eval mode.

    z comes from a CPU generator seeded with `seed`, so the same seed gives the same patches
    (bit-identical on CPU, where `amp` is ignored; bf16 autocast on GPU when `amp`)."""
    was_training = g.training
    g.eval()
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
    outs = []
    for i in range(0, n, batch_size):
        zb = z[i : i + batch_size].to(device)
        y = torch.full((zb.shape[0],), class_index, dtype=torch.long, device=device)
        with autocast(device, amp):
            outs.append(g(zb, y).float().cpu())
    g.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def class_diversity(g: nn.Module, classes: list[str], n: int, latent_dim: int, device: torch.device) -> dict[str, float]:
    """Per-class diversity: batch_diversity of `n` fixed-seed samples' image channel, one per class."""
    return {
        f"diversity/{name}": batch_diversity(generate(g, k, n, 1000 + k, latent_dim, device)[:, :1])
        for k, name in enumerate(classes)
    }


def save_class_grids(g: nn.Module, classes: list[str], n: int, latent_dim: int, device: torch.device, folder: Path, step: int) -> None:
    """One PNG per class, folder/step_<step>_<class>.png: `n` fixed-seed samples, images above masks."""
    for k, name in enumerate(classes):
        x = generate(g, k, n, 2000 + k, latent_dim, device)
        if x.dim() == 5:  # 3D: show the centre axial slice
            x = x[..., x.shape[-1] // 2]
        save_image_grid([x[:, :1], x[:, 1:] * 2.0 - 1.0], folder / f"step_{step:06d}_{name}.png")


def model_card(cfg: TumorGANConfig, data: TumorPatchData, step: int) -> dict[str, Any]:
    """The metadata card written beside each checkpoint (RUN_DIR/checkpoints/last.json)."""
    cfg_dict = cfg.model_dump(mode="json")
    return {
        "kind": "tumor_gan",
        "classes": list(data.classes),
        "patch_size": cfg.patch_size,
        "spatial_dims": cfg.spatial_dims,
        "latent_dim": cfg.latent_dim,
        "modality": data.modality,
        "normalisation": data.normalisation,
        "hu_window": data.normalisation.get("hu_window"),
        "spacing": list(data.spacing),
        "config": cfg_dict,
        "config_hash": config_hash(cfg_dict),
        "versions": package_versions(),
        "train_subjects": sorted(set(data.train_subjects)),
        "n_train_patches": int(data.images.shape[0]),
        "step": step,
        "outputs": {"channel_0": "image in [-1, 1] (normalised units)", "channel_1": "lesion mask in [0, 1]"},
    }


# --- run state, checkpoints ------------------------------------------------------------------


@dataclass
class RunState:
    """Everything a training step reads or changes; `checkpoint_state` turns it into one dict.

    `g`, `d` are the plain modules (their state dicts go into checkpoints); `g_run`, `d_run`
    the ones the steps call (the same, or torch.compile'd). `data_gen` draws batches,
    `noise_gen` latents (each rank its own).
    """

    cfg: TumorGANConfig
    device: torch.device
    info: DistInfo
    g: TumorGenerator
    d: ProjectionDiscriminator
    g_run: nn.Module
    d_run: nn.Module
    ema: EMA | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ada: AdaptiveAugment | None
    guard_d: NonFiniteGuard
    guard_g: NonFiniteGuard
    health: HealthMonitor
    data_gen: torch.Generator
    noise_gen: torch.Generator
    step: int = 0

    @property
    def sampler(self) -> nn.Module:
        """The generator used for samples and inference: the EMA copy when enabled."""
        return self.ema.module if self.ema is not None else self.g


def build_training(cfg: TumorGANConfig, num_classes: int, device: torch.device, info: DistInfo) -> RunState:
    """Networks (seeded by cfg.seed, the same on every rank), EMA, optimisers, ADA, guards, monitor,
    and this rank's data and noise generators."""
    seed_everything(cfg.seed)
    g, d = build_networks(cfg, num_classes)
    g, d = g.to(device), d.to(device)
    broadcast_module(g, info)
    broadcast_module(d, info)
    ema = EMA(g, cfg.ema_decay) if cfg.ema_decay is not None else None
    # R1 and WGAN-GP differentiate D's gradient again, which torch.compile cannot: D stays eager then
    needs_double_backward = cfg.r1_gamma > 0 or cfg.loss == "wgan"
    g_run: nn.Module = torch.compile(g) if cfg.compile else g  # type: ignore[assignment]
    d_run: nn.Module = torch.compile(d) if cfg.compile and not needs_double_backward else d  # type: ignore[assignment]
    # the run's own randomness (batches, latents, augmentation, penalties) differs per rank
    seed_everything(cfg.seed + 1_000_003 * info.rank)
    data_gen = torch.Generator().manual_seed(cfg.seed + 7919 * info.rank)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1 + 7919 * info.rank)
    opt_g, opt_d = build_optimisers(cfg, g, d)
    ada = None
    if cfg.ada_target is not None:
        ada = AdaptiveAugment(cfg.ada_target, cfg.ada_interval, cfg.ada_speed_images, real_fake_midpoint(cfg.loss))
    return RunState(
        cfg=cfg, device=device, info=info, g=g, d=d, g_run=g_run, d_run=d_run, ema=ema, opt_g=opt_g, opt_d=opt_d,
        ada=ada, guard_d=NonFiniteGuard(cfg.max_nonfinite), guard_g=NonFiniteGuard(cfg.max_nonfinite),
        health=HealthMonitor(window=max(2, cfg.health_window), d_gap_max=health_gap_max(cfg.loss)),
        data_gen=data_gen, noise_gen=noise_gen,
    )


def rank_state(s: RunState) -> dict[str, Any]:
    """The state that differs between ranks: batch and noise generators, global RNG states, ADA."""
    return {"data_rng": s.data_gen.get_state(), "noise_rng": s.noise_gen.get_state(), "rng": rng_state(),
            "ada": s.ada.state_dict() if s.ada is not None else None}


def checkpoint_state(s: RunState, data: TumorPatchData, fingerprint: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One dict with all training state in the schema of models/checkpoint.py (plain data and tensors)."""
    return make_checkpoint(
        kind="tumor_gan",
        step=s.step,
        config=s.cfg.model_dump(mode="json"),
        card=model_card(s.cfg, data, s.step),
        nets={"generator": unwrap(s.g).state_dict(), "discriminator": unwrap(s.d).state_dict()},
        ema={"generator": s.ema.state_dict()} if s.ema is not None else None,
        optimizers={"g": s.opt_g.state_dict(), "d": s.opt_d.state_dict()},
        schedulers={},
        guards={"g": s.guard_g.state_dict(), "d": s.guard_d.state_dict()},
        monitor=s.health.state_dict(),
        ranks=ranks,
        extra={"classes": list(data.classes), "data_fingerprint": fingerprint},
    )


def restore_state(s: RunState, state: dict[str, Any], path: Path, classes: list[str], fingerprint: str) -> None:
    """Load a checkpoint of the same config and data into a freshly built RunState (exact with the
    same number of ranks). Raises CheckpointError naming `path` for another config, other classes,
    other patches, or a state that does not fit."""
    check_resume_config(path, state["config"], s.cfg.model_dump(mode="json"), RESUME_FREE_OPTIONS)
    extra = state["extra"]
    if extra["classes"] != classes:
        raise CheckpointError(f"cannot resume {path}: classes {extra['classes']} differ from the data's {classes}")
    if extra["data_fingerprint"] != fingerprint:
        raise CheckpointError(
            f"cannot resume {path}: the training patches differ from the run's (fingerprint "
            f"{fingerprint} vs {extra['data_fingerprint']}); pass the same --data and seed, or start a new run"
        )
    mine = restore_training(
        state, path, s.info, nets={"generator": s.g, "discriminator": s.d},
        ema={"generator": s.ema} if s.ema is not None else None,
        optimizers={"g": s.opt_g, "d": s.opt_d}, schedulers={},
        guards={"g": s.guard_g, "d": s.guard_d}, monitor=s.health,
    )
    try:
        s.data_gen.set_state(mine["data_rng"])
        s.noise_gen.set_state(mine["noise_rng"])
        if s.ada is not None:
            s.ada.load_state_dict(mine["ada"])
        set_rng_state(mine["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume from {path}: its per-rank state is incomplete "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    s.step = int(state["step"])


# --- the pieces of one loop iteration ------------------------------------------------------------


def train_step(s: RunState, data: TumorPatchData) -> dict[str, float]:
    """One training step at s.step: one fake batch; D learns on it detached, then G on it with its
    graph (judged by a look-ahead copy of D when unrolled), then EMA and the health monitor.
    Returns the step's losses, D(x), D(G(z)), gradient norms and batch diversity."""
    cfg, dev, step = s.cfg, s.device, s.step
    aug_p = s.ada.p if s.ada is not None else 1.0
    real, y_real = sample_batch(data, cfg.batch_size, s.data_gen, cfg.balanced_classes)
    z, y_fake = make_latents(cfg, y_real, s.noise_gen, dev)
    with autocast(dev, cfg.amp):
        fake = s.g_run(z, y_fake)
    out = discriminator_step(s.d_run, s.opt_d, real, y_real, fake, y_fake, cfg, dev, aug_p, s.guard_d, step, s.ada, s.info)
    d_for_g = s.d_run
    if cfg.unrolled_steps > 0:  # each rank looks ahead on its own batch
        d_for_g = unrolled_discriminator(s.d, s.opt_d, real, y_real, fake, y_fake, cfg, dev, aug_p)
    out |= generator_step(s.g_run, d_for_g, s.opt_g, fake, y_fake, z, real, y_real, cfg, dev, aug_p, s.guard_g, step, s.info)
    if s.ema is not None:
        # warm-up (TensorFlow's num_updates rule): early samples are not the random initial weights
        s.ema.decay = min(cfg.ema_decay or 0.0, (1.0 + step) / (10.0 + step))
        s.ema.update(s.g)
    out["batch_diversity"] = batch_diversity(fake[:, :1].detach())
    s.health.update(diversity=out["batch_diversity"],
                    **{k: out[k] for k in ("d_real", "d_fake", "grad_g", "grad_d", "loss_g", "loss_d")})
    return out


def log_step(s: RunState, classes: list[str], writer: MetricsWriter, history: list[dict[str, float]],
             out: dict[str, float]) -> None:
    """Rank 0: per-class diversity (an eval-mode forward of the sampler, no collective), health
    check, one metric row and a console line."""
    out |= class_diversity(s.sampler, classes, s.cfg.diversity_samples, s.cfg.latent_dim, s.device)
    s.health.check(s.step)
    record(writer, history, s.step, out)
    log.info("step %d  loss_d %.3f  loss_g %.3f  D(x) %.3f  D(G(z)) %.3f", s.step, out["loss_d"], out["loss_g"],
             out["d_real"], out["d_fake"])


# --- the loop ------------------------------------------------------------------------------


def train_tumor_gan(
    cfg: TumorGANConfig,
    data: TumorPatchData,
    run_dir: Path,
    resume: bool = False,
    device: str = "auto",
) -> TrainResult:
    """Train the tumor GAN for `cfg.steps` steps; newest checkpoint at RUN_DIR/checkpoints/last.pt.

    With `resume`, continue from that checkpoint (same config and data) exactly as if the run had
    not stopped. Under torchrun (WORLD_SIZE > 1) each rank draws its own batches, gradients are
    averaged after every backward, and only rank 0 writes; the checkpoint keeps every rank's
    RNG states, so a resume with the same number of ranks is exact too. Raises
    TrainingDivergedError after `max_nonfinite` non-finite steps in a row, ValueError when the
    data does not fit the config (patch size, dims), and CheckpointError when a checkpoint cannot
    be resumed (another config or data, a damaged file) or written.
    """
    # setup
    run = start_run(run_dir, device)
    dev, info = run.device, run.info
    expected = (1,) + (cfg.patch_size,) * cfg.spatial_dims
    if tuple(data.images.shape[1:]) != expected:
        raise ValueError(
            f"patches are {tuple(data.images.shape[1:])} but the config wants {expected} "
            f"(patch_size={cfg.patch_size}, spatial_dims={cfg.spatial_dims}); re-extract or change the config"
        )

    # data: the whole patch set lives on the device (a few MB); batches are drawn by index
    fingerprint = data_fingerprint(data)
    data = TumorPatchData(
        data.images.float().to(dev), data.masks.float().to(dev), data.labels.long().to(dev),
        list(data.classes), data.modality, (data.spacing[0], data.spacing[1], data.spacing[2]),
        list(data.train_subjects), dict(data.normalisation),
    )

    # models, optimisers: the same seeded weights on every rank
    s = build_training(cfg, len(data.classes), dev, info)

    # resume
    if resume and run.last_checkpoint.is_file():
        state = load_checkpoint(run.last_checkpoint, "tumor_gan", map_location=dev)
        restore_state(s, state, run.last_checkpoint, data.classes, fingerprint)
        log.info("resumed %s at step %d", run.last_checkpoint, s.step)
    elif resume:
        log.info("no checkpoint at %s; starting from scratch", run.last_checkpoint)
    writer = MetricsWriter(run.dir, enabled=info.is_main, resume_step=s.step if resume else None)
    if info.is_main:
        log.info("tumor GAN: %d %s patches of %s, steps %d -> %d on %s (world %d)", data.images.shape[0],
                 data.modality, ", ".join(data.classes), s.step, cfg.steps, dev, info.world_size)

    def save() -> None:
        """Gather every rank's state (a collective), then rank 0 writes last.pt and last.json."""
        ranks = gather_objects(rank_state(s), info)
        if info.is_main:
            save_with_card(run.last_checkpoint, checkpoint_state(s, data, fingerprint, ranks))

    history: list[dict[str, float]] = []
    saved_at = -1
    # loop
    s.g_run.train()
    s.d_run.train()
    while s.step < cfg.steps:
        s.step += 1
        # step
        out = train_step(s, data)
        # log, sample (rank 0)
        if info.is_main and due(s.step, cfg.log_every, cfg.steps):
            log_step(s, data.classes, writer, history, out)
        if info.is_main and due(s.step, cfg.sample_every, cfg.steps):
            save_class_grids(s.sampler, data.classes, 8, cfg.latent_dim, dev, run.dir / "samples", s.step)
        # checkpoint (a collective; rank 0 writes)
        if due(s.step, cfg.checkpoint_every, cfg.steps):
            save()
            saved_at = s.step

    if saved_at != s.step:  # resumed with nothing left to do: still leave a fresh checkpoint and card
        save()
    write_summary_safely(writer, {"steps": s.step, "last": history[-1] if history else {}, "warnings": s.health.warnings})
    writer.close()
    end_run(run)
    return TrainResult(run.dir, run.last_checkpoint, run.last_checkpoint.with_suffix(".json"), s.step, history,
                       list(s.health.warnings), s.g, s.d, s.sampler)


def load_tumor_generator(path: Path, device: str = "cpu") -> tuple[TumorGenerator, dict[str, Any]]:
    """The sampling generator (EMA weights when the run kept them) in eval mode, and its card.

    `path` is a checkpoint written by `train_tumor_gan` (e.g. RUN_DIR/checkpoints/last.pt).
    Raises CheckpointError when it is not a readable tumor GAN checkpoint or its weights do not fit.
    """
    state = load_checkpoint(Path(path), "tumor_gan", map_location="cpu")
    try:
        cfg = TumorGANConfig.model_validate(state["config"])
        classes = list(state["extra"]["classes"])
        weights = state["ema"]["generator"]["module"] if state["ema"] else state["nets"]["generator"]
        card = checkpoint_card(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete or invalid ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160]})") from None
    g, _ = build_networks(cfg, len(classes))
    load_state_dict_checked(g, weights, Path(path), "generator")
    return g.to(select_device(device)).eval(), card
