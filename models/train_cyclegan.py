"""Train a CycleGAN that translates MRI slices to CT and back (Zhu et al. 2017), and load its generators.

`train_cyclegan(cfg, data, run_dir)` reads top to bottom: setup (device, seeds, process
group), data (seeded per-rank samplers over the two unpaired slice sets), models, optimisers,
resume, then the loop: generator step, discriminator step, log, sample, evaluate, checkpoint.
The defaults of `CycleGANConfig` are the published recipe (LSGAN, lambda_cycle 10,
lambda_identity 0.5, image pool 50, Adam 2e-4 with betas (0.5, 0.999), constant then linear
decay); every stabiliser (spectral norm, R1 / WGAN-GP, TTUR, EMA, DiffAugment / ADA) is a
named option, off by default. Domain A is MRI, domain B is CT. The data come from
pipeline/slices.py through `UnpairedData`; this module reads and writes nothing but the run
folder:

    RUN_DIR/checkpoints/last.pt   one dict with all state (see `checkpoint_state`)
    RUN_DIR/checkpoints/last.json its model card (modality pair, HU window, spacing, subjects)
    RUN_DIR/checkpoints/best.pt   (+ best.json) the best by `best_key`, when `evaluate` is given
    RUN_DIR/metrics.jsonl, metrics.json, tb/ (TensorBoard), samples/step_XXXXXX.png

Under torchrun (WORLD_SIZE > 1) each rank samples its own shard, gradients are averaged
across ranks after every backward, and only rank 0 writes. What this loop shares with the
tumor GAN's (run set-up, resume, saving, gathers, evaluation without RNG side effects) is
models/training.py; the checkpoint schema is models/checkpoint.py.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

from models.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
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
    ImagePool,
    MetricsWriter,
    NonFiniteGuard,
    autocast,
    average_gradients,
    broadcast_module,
    config_hash,
    grad_norm,
    gradient_penalty,
    r1_penalty,
    rng_state,
    save_image_grid,
    seed_everything,
    select_device,
    set_rng_state,
    unwrap,
)
from models.cyclegan import PatchGANDiscriminator, ResnetGenerator
from models.diffaug import AdaptiveAugment, Augmentation, diff_augment
from models.losses import (
    AdversarialLoss,
    StructureLoss,
    discriminator_loss,
    generator_loss,
    health_gap_max,
    real_fake_midpoint,
    shape_loss,
    structure_loss,
)
from models.training import (
    Run,
    all_ranks_finite,
    due,
    end_run,
    evaluate_untouched,
    gather_objects,
    improves,
    mark_cuda_graph_step,
    parse_best_key,
    record,
    restore_training,
    save_with_card,
    start_run,
    write_summary_safely,
)

logger = logging.getLogger(__name__)

Direction = Literal["mri2ct", "ct2mri"]
# Options that shape the networks: a resumed run must use the same values.
ARCHITECTURE_KEYS = ("in_channels", "ngf", "ndf", "n_res_blocks", "n_layers_d", "spectral_norm")


class CycleGANConfig(BaseModel):
    """CycleGAN options; defaults are the published recipe (Zhu et al. 2017, 256x256 ResNet-9)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    # --- networks
    image_size: int = 256
    """Height and width of the training slices in pixels (multiple of 4, >= 32); checked against the data."""
    in_channels: int = 1
    """Slices per input: 1 for 2D, k (odd) for a 2.5D stack of k neighbouring slices (centre slice is the target)."""
    ngf: int = 64
    """Generator width (filters of the first layer); 64 in the paper, 8 for tests."""
    ndf: int = 64
    """Discriminator width (filters of the first layer); 64 in the paper."""
    n_res_blocks: int = 9
    """Residual blocks in the generator: 9 at 256x256, 6 at 128x128, 2 for tiny test models."""
    n_layers_d: int = 3
    """Strided layers of the PatchGAN; 3 gives the 70x70 receptive field."""

    # --- objective
    loss: AdversarialLoss = "lsgan"
    """Adversarial loss: lsgan (paper), vanilla (non-saturating), hinge, or wgan (use with gp_weight)."""
    lambda_cycle: float = 10.0
    """Weight of each cycle-consistency L1 term."""
    lambda_identity: float = 0.5
    """Identity L1 weight relative to lambda_cycle (paper 0.5); keeps intensities when a slice is already in the target domain; 0 disables."""
    structure_loss: StructureLoss = "none"
    """Structure term between each input and its translation, both directions: mind (MIND descriptors, Yang et al.
    2018) or gradcorr (gradient correlation, Hiasa et al. 2018); none = the paper. Against broken bone in MR->CT."""
    lambda_structure: float = 5.0
    """Weight of each structure term when structure_loss is not none."""
    lambda_shape: float = 0.0
    """Weight of each shape term (models.losses.shape_loss): the translation's body outline against its input's,
    both directions, thresholds below; against a generator that shrinks or shifts the head. 0 = the paper."""
    body_threshold_ct: float = -0.5
    """CT body threshold in [-1, 1] units for the shape term: -0.5 is -500 HU (preprocess.CT_BODY_THRESHOLD_HU) in the
    default -1000..1000 HU window."""
    body_threshold_mr: float = -0.95
    """MR body threshold in [-1, 1] units for the shape term: air sits at -1 after the percentile normalisation."""
    cycle_noise: float = 0.0
    """Std of Gaussian noise added to each translation before the reverse generator reconstructs it (Bashkirova et
    al. 2019): stops a generator from hiding its input's noise in low-amplitude texture to pass the cycle; 0 = paper."""
    pool_size: int = 50
    """Generated images kept in each image pool for the discriminator (Shrivastava et al. 2017); 0 disables."""

    # --- optimisation
    lr: float = 2e-4
    """Adam learning rate of the generators (and of the discriminators unless lr_d is set)."""
    lr_d: float | None = None
    """Discriminator learning rate for a two time-scale update rule (TTUR, Heusel et al. 2017), e.g. 4e-4; None = lr."""
    beta1: float = 0.5
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    batch_size: int = 1
    """Slices per domain per step and per rank (paper 1)."""
    n_steps_constant: int = 100_000
    """Steps at the initial learning rate (paper: 100 epochs of ~1000 images at batch 1)."""
    n_steps_decay: int = 100_000
    """Steps of linear decay to zero after the constant phase (paper: 100 epochs)."""
    steps: int | None = None
    """Steps to train in total; None = n_steps_constant + n_steps_decay (the full schedule)."""

    # --- stabilisers (deviations from the recipe; all off by default)
    spectral_norm: bool = False
    """Spectral normalisation of every discriminator convolution (Miyato et al. 2018); against a too-strong D."""
    r1_gamma: float = 0.0
    """R1 penalty weight gamma on real images (Mescheder et al. 2018; loss + gamma/2 * R1); 0 disables."""
    gp_weight: float = 0.0
    """WGAN-GP gradient penalty weight (Gulrajani et al. 2017; 10 with loss wgan); 0 disables."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the generators (e.g. 0.999) and use it for samples, evaluation and inference."""
    diffaug: list[Augmentation] = []
    """DiffAugment policy applied to every discriminator input (Zhao et al. 2020), e.g. [translation, cutout]; for small datasets."""
    ada_target: float | None = None
    """Adapt the diffaug probability to hold the sign of D(real) at this target (ADA, Karras et al. 2020: 0.6); None = always apply."""
    ada_interval: int = 4
    """Steps between ADA probability updates."""
    ada_speed_images: int = 500_000
    """Images over which ADA's probability can move from 0 to 1 (paper 500k)."""

    # --- performance (GPU only; ignored on CPU)
    bf16: bool = True
    """bf16 autocast on CUDA (fp32 master weights); CPU always runs fp32."""
    channels_last: bool = True
    """channels_last memory format on CUDA (faster convolutions with tensor cores)."""
    compile: bool = False
    """torch.compile the networks (discriminators stay eager when r1_gamma or gp_weight needs double backward)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode when `compile` is on: reduce-overhead replays CUDA graphs (fewer launches at small batch;
    experimental, not yet run on a GPU: bench/cyclegan.py's last row measures it)."""
    fused_adam: bool = True
    """Fused Adam kernels on CUDA."""

    # --- run
    seed: int = 0
    """Seed of weights, sampling, pools and augmentation: same seed and data, same run."""
    log_every: int = 100
    """Steps between metric rows (metrics.jsonl, TensorBoard) and health checks."""
    sample_every: int = 1000
    """Steps between sample grids in RUN_DIR/samples."""
    checkpoint_every: int = 5000
    """Steps between checkpoints (RUN_DIR/checkpoints/last.pt); one is always written at the end."""
    eval_every: int = 5000
    """Steps between calls of the `evaluate` callback (when given)."""
    n_samples: int = 4
    """Slices per domain in each sample grid."""
    max_nonfinite: int = 5
    """Consecutive steps with a NaN/Inf loss (each skipped) after which training stops with TrainingDivergedError."""
    health_window: int = 50
    """Steps in the rolling window of the health monitor."""

    @model_validator(mode="after")
    def _check(self) -> CycleGANConfig:
        if self.image_size < 32 or self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 and >= 32, got {self.image_size}")
        for name in ("in_channels", "ngf", "ndf", "batch_size", "log_every", "sample_every",
                     "checkpoint_every", "eval_every", "max_nonfinite", "health_window", "n_layers_d"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_steps_constant < 0 or self.n_steps_decay < 0 or (self.steps is not None and self.steps < 0):
            raise ValueError("n_steps_constant, n_steps_decay and steps must be >= 0")
        if min(self.lambda_cycle, self.lambda_identity, self.lambda_structure, self.lambda_shape, self.cycle_noise) < 0:
            raise ValueError("lambda_cycle, lambda_identity, lambda_structure, lambda_shape and cycle_noise must be >= 0")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay}")
        if self.ada_target is not None and not self.diffaug:
            raise ValueError("ada_target adapts the diffaug probability: also set a diffaug policy, e.g. [translation, cutout]")
        return self

    @property
    def total_steps(self) -> int:
        """Steps this run trains to: `steps`, or the whole constant + decay schedule."""
        return self.steps if self.steps is not None else self.n_steps_constant + self.n_steps_decay


class SliceSet(Protocol):
    """A map-style dataset of slices: a torch Dataset with __len__ (e.g. pipeline.slices.SliceStack) or a list."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> torch.Tensor: ...


@dataclass
class UnpairedData:
    """The two unpaired training sets: items are float tensors (C, H, W) in [-1, 1].

    a: MRI slices; b: CT slices (HU windowed and scaled); meta: what a user of the generator
    must know (hu_window, mr_scaling, spacing, train_subjects, ...), stored in the checkpoint
    and in the model card.
    """

    a: SliceSet
    b: SliceSet
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class CycleGANNets:
    """The four networks. D_ct judges CT images (real vs G_mri2ct output), D_mri judges MRI."""

    g_mri2ct: nn.Module
    g_ct2mri: nn.Module
    d_mri: nn.Module
    d_ct: nn.Module

    def generator_params(self) -> list[nn.Parameter]:
        return list(self.g_mri2ct.parameters()) + list(self.g_ct2mri.parameters())

    def discriminator_params(self) -> list[nn.Parameter]:
        return list(self.d_mri.parameters()) + list(self.d_ct.parameters())

    def items(self) -> list[tuple[str, nn.Module]]:
        return [("g_mri2ct", self.g_mri2ct), ("g_ct2mri", self.g_ct2mri), ("d_mri", self.d_mri), ("d_ct", self.d_ct)]


@dataclass
class TrainResult:
    """What a finished run left: the final step, checkpoint paths, logged rows, warnings, the (unwrapped) nets."""

    run_dir: Path
    step: int
    last_checkpoint: Path
    best_checkpoint: Path | None
    history: list[dict[str, float]]
    warnings: list[str]
    final_metrics: dict[str, float]
    nets: CycleGANNets
    ema: dict[str, nn.Module] | None = None


# --- data --------------------------------------------------------------------------------------


class ShardSampler:
    """Endless seeded stream of dataset indices, disjoint across ranks (like DistributedSampler).

    Each epoch draws a permutation of range(n) from its own generator (the same on every
    rank), pads it to a multiple of world_size and gives rank r the items r, r + world, ...
    `take(k)` returns the next k indices, starting new epochs as needed; the state (generator,
    epoch order, position) round-trips through state_dict, so a resumed run draws the same batches.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = -1
        self.order: list[int] = []
        self.pos = 0

    def _new_epoch(self) -> None:
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        total = math.ceil(self.n / self.world_size) * self.world_size
        perm = (perm * math.ceil(total / self.n))[:total]
        self.order = perm[self.rank::self.world_size]
        self.pos = 0
        self.epoch += 1

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self._new_epoch()
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "epoch": self.epoch, "order": list(self.order), "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.epoch, self.order, self.pos = int(state["epoch"]), list(state["order"]), int(state["pos"])


def fetch_batch(dataset: SliceSet, indices: list[int], cfg: CycleGANConfig, name: str) -> torch.Tensor:
    """Stack dataset[i] for i in indices into (B, C, H, W) float32, checking shape against cfg."""
    items = [torch.as_tensor(dataset[i], dtype=torch.float32) for i in indices]
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    for i, item in zip(indices, items, strict=True):
        if tuple(item.shape) != want:
            raise ValueError(
                f"{name} slice {i} has shape {tuple(item.shape)}, but the config wants (C, H, W) = {want}; "
                "set image_size / in_channels to match the data"
            )
    return torch.stack(items)


# --- models and optimisers ---------------------------------------------------------------------


def build_nets(cfg: CycleGANConfig) -> CycleGANNets:
    """The two ResNet generators and two PatchGAN discriminators of `cfg`, on CPU in fp32."""
    return CycleGANNets(
        g_mri2ct=ResnetGenerator(cfg.in_channels, cfg.ngf, cfg.n_res_blocks),
        g_ct2mri=ResnetGenerator(cfg.in_channels, cfg.ngf, cfg.n_res_blocks),
        d_mri=PatchGANDiscriminator(cfg.in_channels, cfg.ndf, cfg.n_layers_d, cfg.spectral_norm),
        d_ct=PatchGANDiscriminator(cfg.in_channels, cfg.ndf, cfg.n_layers_d, cfg.spectral_norm),
    )


def lr_factor(step: int, cfg: CycleGANConfig) -> float:
    """CycleGAN's schedule: 1 for n_steps_constant steps, then linear decay to 0 over n_steps_decay."""
    return 1.0 - max(0, step - cfg.n_steps_constant) / float(cfg.n_steps_decay + 1)


@dataclass
class RunState:
    """Everything a training step reads or changes; `checkpoint_state` turns it into one dict.

    `nets` are the plain modules (their state dicts go into checkpoints); `fwd` the ones the
    steps call (the same, or torch.compile'd).
    """

    cfg: CycleGANConfig
    device: torch.device
    info: DistInfo
    nets: CycleGANNets
    fwd: CycleGANNets
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LambdaLR
    sched_d: torch.optim.lr_scheduler.LambdaLR
    pool_mri: ImagePool
    pool_ct: ImagePool
    ema: dict[str, EMA] | None
    ada: AdaptiveAugment | None
    guard: NonFiniteGuard
    monitor: HealthMonitor
    sampler_mri: ShardSampler | None = None
    sampler_ct: ShardSampler | None = None
    step: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def use_autocast(self) -> bool:
        return self.cfg.bf16 and self.device.type == "cuda"

    @property
    def memory_format(self) -> torch.memory_format:
        cl = self.cfg.channels_last and self.device.type == "cuda"
        return torch.channels_last if cl else torch.contiguous_format

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled networks replay CUDA graphs (compile_mode reduce-overhead)."""
        return self.cfg.compile and self.cfg.compile_mode == "reduce-overhead"


def build_training(cfg: CycleGANConfig, device: torch.device, info: DistInfo | None = None) -> RunState:
    """Networks (seeded by cfg.seed, identical on every rank), optimisers, schedules, pools, EMA, guards."""
    info = info or DistInfo()
    seed_everything(cfg.seed)
    nets = build_nets(cfg)
    fmt = torch.channels_last if cfg.channels_last and device.type == "cuda" else torch.contiguous_format
    for _, net in nets.items():
        net.to(device)
        net.to(memory_format=fmt)  # type: ignore[call-overload]  # Module.to accepts memory_format at runtime
        broadcast_module(net, info)
    fwd = nets
    if cfg.compile:
        needs_double_backward = cfg.r1_gamma > 0 or cfg.gp_weight > 0  # torch.compile has no double backward
        fwd = CycleGANNets(
            g_mri2ct=torch.compile(nets.g_mri2ct, mode=cfg.compile_mode),  # type: ignore[arg-type]
            g_ct2mri=torch.compile(nets.g_ct2mri, mode=cfg.compile_mode),  # type: ignore[arg-type]
            d_mri=nets.d_mri if needs_double_backward else torch.compile(nets.d_mri, mode=cfg.compile_mode),  # type: ignore[arg-type]
            d_ct=nets.d_ct if needs_double_backward else torch.compile(nets.d_ct, mode=cfg.compile_mode),  # type: ignore[arg-type]
        )
    fused = cfg.fused_adam and device.type == "cuda"
    opt_g = torch.optim.Adam(nets.generator_params(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)
    opt_d = torch.optim.Adam(nets.discriminator_params(), lr=cfg.lr_d if cfg.lr_d is not None else cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), fused=fused or None)
    schedule = lambda step: lr_factor(step, cfg)  # noqa: E731 - a one-line schedule
    ema = None
    if cfg.ema_decay is not None:
        ema = {"g_mri2ct": EMA(nets.g_mri2ct, cfg.ema_decay), "g_ct2mri": EMA(nets.g_ct2mri, cfg.ema_decay)}
    ada = None
    if cfg.ada_target is not None:
        ada = AdaptiveAugment(cfg.ada_target, cfg.ada_interval, cfg.ada_speed_images, real_fake_midpoint(cfg.loss))
    # The run's own randomness (pools, augmentation, penalties) differs per rank.
    seed_everything(cfg.seed + 1_000_003 * info.rank)
    return RunState(
        cfg=cfg, device=device, info=info, nets=nets, fwd=fwd, opt_g=opt_g, opt_d=opt_d,
        sched_g=torch.optim.lr_scheduler.LambdaLR(opt_g, schedule),
        sched_d=torch.optim.lr_scheduler.LambdaLR(opt_d, schedule),
        pool_mri=ImagePool(cfg.pool_size, seed=cfg.seed * 2 + 1 + 7919 * info.rank),
        pool_ct=ImagePool(cfg.pool_size, seed=cfg.seed * 2 + 2 + 7919 * info.rank),
        ema=ema, ada=ada, guard=NonFiniteGuard(cfg.max_nonfinite),
        monitor=HealthMonitor(window=cfg.health_window, d_gap_max=health_gap_max(cfg.loss)),
    )


# --- steps ---------------------------------------------------------------------------------------


def _floats(values: Mapping[str, torch.Tensor | float], device: torch.device) -> dict[str, float]:
    """0-dim tensors (and floats) to floats with a single device-to-host copy."""
    stacked = torch.stack([
        v.detach().float().reshape(()).to(device) if isinstance(v, torch.Tensor)
        else torch.tensor(float(v), device=device)
        for v in values.values()
    ])
    return dict(zip(values, stacked.tolist(), strict=True))


def d_view(x: torch.Tensor, s: RunState) -> torch.Tensor:
    """What a discriminator sees of x: x itself, or its DiffAugment (with ADA's probability when adaptive)."""
    if not s.cfg.diffaug:
        return x
    return diff_augment(x, s.cfg.diffaug, p=s.ada.p if s.ada is not None else 1.0)


def cycle_view(fake: torch.Tensor, cfg: CycleGANConfig) -> torch.Tensor:
    """What the reverse generator reconstructs from: the translation, plus N(0, cycle_noise^2) when set."""
    if cfg.cycle_noise <= 0:
        return fake
    return fake + cfg.cycle_noise * torch.randn_like(fake)


def generator_objective(cfg: CycleGANConfig, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The generators' loss from generator_step's terms: adversarial + lambda_cycle * (cycle
    + lambda_identity * identity) + lambda_structure * structure + lambda_shape * shape, each over both directions."""
    loss = terms["g_adv_ct"] + terms["g_adv_mri"] + cfg.lambda_cycle * (terms["cycle_mri"] + terms["cycle_ct"])
    if "identity_ct" in terms:
        loss = loss + cfg.lambda_cycle * cfg.lambda_identity * (terms["identity_ct"] + terms["identity_mri"])
    if "structure_mri2ct" in terms:
        loss = loss + cfg.lambda_structure * (terms["structure_mri2ct"] + terms["structure_ct2mri"])
    if "shape_mri2ct" in terms:
        loss = loss + cfg.lambda_shape * (terms["shape_mri2ct"] + terms["shape_ct2mri"])
    return loss


def generator_step(
    s: RunState, real_mri: torch.Tensor, real_ct: torch.Tensor
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, bool]:
    """One Adam step of both generators on the adversarial, cycle, identity (and structure) losses.

    real_mri, real_ct: (B, C, H, W) in [-1, 1] on the device. Returns (metrics, fake_mri,
    fake_ct, stepped): the loss terms as floats, the detached translations for the
    discriminator step, and False when the loss was not finite (the step is skipped).
    """
    cfg, f = s.cfg, s.fwd
    mark_cuda_graph_step(s.cuda_graphs)
    s.nets.d_mri.requires_grad_(False)
    s.nets.d_ct.requires_grad_(False)
    s.opt_g.zero_grad(set_to_none=True)
    with autocast(s.device, s.use_autocast):
        fake_ct = f.g_mri2ct(real_mri)
        rec_mri = f.g_ct2mri(cycle_view(fake_ct, cfg))
        fake_mri = f.g_ct2mri(real_ct)
        rec_ct = f.g_mri2ct(cycle_view(fake_mri, cfg))
        adv_ct = generator_loss(cfg.loss, f.d_ct(d_view(fake_ct, s)))
        adv_mri = generator_loss(cfg.loss, f.d_mri(d_view(fake_mri, s)))
        terms: dict[str, torch.Tensor] = {
            "g_adv_ct": adv_ct,
            "g_adv_mri": adv_mri,
            "cycle_mri": F.l1_loss(rec_mri.float(), real_mri.float()),
            "cycle_ct": F.l1_loss(rec_ct.float(), real_ct.float()),
        }
        if cfg.lambda_identity > 0:
            terms["identity_ct"] = F.l1_loss(f.g_mri2ct(real_ct).float(), real_ct.float())
            terms["identity_mri"] = F.l1_loss(f.g_ct2mri(real_mri).float(), real_mri.float())
        if cfg.structure_loss != "none":
            terms["structure_mri2ct"] = structure_loss(cfg.structure_loss, real_mri, fake_ct)
            terms["structure_ct2mri"] = structure_loss(cfg.structure_loss, real_ct, fake_mri)
        if cfg.lambda_shape > 0:
            terms["shape_mri2ct"] = shape_loss(real_mri, fake_ct, cfg.body_threshold_mr, cfg.body_threshold_ct)
            terms["shape_ct2mri"] = shape_loss(real_ct, fake_mri, cfg.body_threshold_ct, cfg.body_threshold_mr)
    loss = generator_objective(cfg, terms)
    stepped = all_ranks_finite(loss, s.info)
    if stepped:
        loss.backward()
        params = s.nets.generator_params()
        average_gradients(params, s.info)
        gnorm = grad_norm(params)
        s.opt_g.step()
    else:
        s.opt_g.zero_grad(set_to_none=True)
        gnorm = torch.tensor(float("nan"))
    s.nets.d_mri.requires_grad_(True)
    s.nets.d_ct.requires_grad_(True)
    diversity = fake_ct.detach().float().std(dim=0).mean() if fake_ct.shape[0] > 1 else torch.tensor(float("nan"))
    metrics = _floats({"loss_g": loss, **terms, "grad_norm_g": gnorm, "diversity": diversity}, s.device)
    return metrics, fake_mri.detach(), fake_ct.detach(), stepped


def discriminator_step(
    s: RunState, real_mri: torch.Tensor, real_ct: torch.Tensor, fake_mri: torch.Tensor, fake_ct: torch.Tensor
) -> tuple[dict[str, float], bool]:
    """One Adam step of both discriminators: real slices vs generated ones drawn through the image pools.

    Each D's adversarial loss is halved (as in the paper, so D learns slower than G), plus
    gamma/2 * R1 and gp_weight * WGAN-GP when enabled. Returns (metrics, stepped): the loss
    terms and the mean raw outputs D(real), D(fake) of each D, and False for a skipped step.
    """
    cfg, f = s.cfg, s.fwd
    mark_cuda_graph_step(s.cuda_graphs)
    s.opt_d.zero_grad(set_to_none=True)
    pooled = {"ct": s.pool_ct.query(fake_ct), "mri": s.pool_mri.query(fake_mri)}
    reals = {"ct": real_ct, "mri": real_mri}
    terms: dict[str, torch.Tensor] = {}
    loss = torch.zeros((), device=s.device)
    outs_real = []
    for name, d in (("ct", f.d_ct), ("mri", f.d_mri)):
        real = reals[name].detach().requires_grad_(cfg.r1_gamma > 0)
        with autocast(s.device, s.use_autocast):
            out_real = d(d_view(real, s))
            out_fake = d(d_view(pooled[name], s))
        adv = 0.5 * discriminator_loss(cfg.loss, out_real, out_fake)
        terms[f"d_adv_{name}"] = adv
        terms[f"d_real_{name}"] = out_real.detach().float().mean()
        terms[f"d_fake_{name}"] = out_fake.detach().float().mean()
        loss = loss + adv
        if cfg.r1_gamma > 0:
            r1 = r1_penalty(out_real, real)
            terms[f"r1_{name}"] = r1
            loss = loss + 0.5 * cfg.r1_gamma * r1
        if cfg.gp_weight > 0:
            with autocast(s.device, s.use_autocast):
                gp = gradient_penalty(d, reals[name], pooled[name])
            terms[f"gp_{name}"] = gp
            loss = loss + cfg.gp_weight * gp
        outs_real.append(out_real.detach().flatten(1))
    stepped = all_ranks_finite(loss, s.info)
    if stepped:
        loss.backward()
        params = s.nets.discriminator_params()
        average_gradients(params, s.info)
        gnorm = grad_norm(params)
        s.opt_d.step()
        if s.ada is not None:
            s.ada.update(torch.cat(outs_real, dim=1))
    else:
        s.opt_d.zero_grad(set_to_none=True)
        gnorm = torch.tensor(float("nan"))
    return _floats({"loss_d": loss, **terms, "grad_norm_d": gnorm}, s.device), stepped


# --- checkpoints, cards, samples ---------------------------------------------------------------


def model_card(cfg: CycleGANConfig, meta: Mapping[str, Any], step: int, checkpoint: str) -> dict[str, Any]:
    """The direction-agnostic metadata card written beside a checkpoint (like a MONAI bundle's metadata.json)."""
    config = cfg.model_dump(mode="json")
    return {
        "kind": "cyclegan",
        "checkpoint": checkpoint,
        "checkpoint_format": f"{CHECKPOINT_FORMAT}/{CHECKPOINT_VERSION}",
        "modalities": {"a": "MR", "b": "CT"},
        "directions": {"mri2ct": {"input": "MR", "output": "CT"}, "ct2mri": {"input": "CT", "output": "MR"}},
        "step": step,
        "weights_for_inference": "ema" if cfg.ema_decay is not None else "live",
        "in_channels": cfg.in_channels,
        "image_size": cfg.image_size,
        "value_range": [-1.0, 1.0],
        "hu_window": meta.get("hu_window"),
        "mr_scaling": meta.get("mr_scaling"),
        "spacing": meta.get("spacing"),
        "train_subjects": list(meta.get("train_subjects", [])),
        "monitor_subjects": list(meta.get("monitor_subjects", [])),  # held out of training; picked best.pt
        "meta": dict(meta),
        "config": config,
        "config_hash": config_hash(config),
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def rank_state(s: RunState) -> dict[str, Any]:
    """The state that differs between ranks: image pools, samplers, RNG states, ADA."""
    return {
        "pools": {"mri": s.pool_mri.state_dict(), "ct": s.pool_ct.state_dict()},
        "samplers": {"mri": s.sampler_mri.state_dict() if s.sampler_mri else None,
                     "ct": s.sampler_ct.state_dict() if s.sampler_ct else None},
        "rng": rng_state(),
        "ada": None if s.ada is None else s.ada.state_dict(),
    }


def gather_rank_states(s: RunState) -> list[dict[str, Any]]:
    """Every rank's `rank_state`, in rank order (a collective: call it on all ranks together)."""
    return gather_objects(rank_state(s), s.info)


def checkpoint_state(s: RunState, meta: Mapping[str, Any], ranks: list[dict[str, Any]] | None = None,
                     checkpoint_name: str = "last.pt") -> dict[str, Any]:
    """One dict with all training state in the schema of models/checkpoint.py: unwrapped state
    dicts of the 4 nets, EMA, optimisers, schedulers, guard, monitor, step, config, model card,
    and per rank (from gather_rank_states) the image pools, samplers, RNG states and ADA.

    Plain data and tensors only: it loads with torch.load(weights_only=True).
    """
    ranks = ranks if ranks is not None else [rank_state(s)]
    return make_checkpoint(
        kind="cyclegan",
        step=s.step,
        config=s.cfg.model_dump(mode="json"),
        card=model_card(s.cfg, meta, s.step, checkpoint_name),
        nets={name: unwrap(net).state_dict() for name, net in s.nets.items()},
        ema=None if s.ema is None else {k: e.state_dict() for k, e in s.ema.items()},
        optimizers={"g": s.opt_g.state_dict(), "d": s.opt_d.state_dict()},
        schedulers={"g": s.sched_g.state_dict(), "d": s.sched_d.state_dict()},
        guards={"gan": s.guard.state_dict()},
        monitor=s.monitor.state_dict(),
        ranks=ranks,
        extra={"meta": json.dumps(dict(meta), default=str), "best": dict(s.best), "last_metrics": dict(s.last_metrics)},
    )


# Options a resume must keep: they shape the networks, or (image_size) the image pools' contents.
RESUME_FIXED_KEYS = (*ARCHITECTURE_KEYS, "image_size")


def restore_state(s: RunState, ckpt: Mapping[str, Any], path: Path = Path("last.pt")) -> None:
    """Load `checkpoint_state`'s dict (read from `path`) into a freshly built RunState.

    Exact when the world size is the one the checkpoint was written with (each rank takes its
    own pools, samplers and RNG states); with another world size every rank starts from rank
    0's pools and RNG and new samplers, which is a valid but not identical continuation.
    Raises CheckpointError (naming `path`) when the networks or image size differ from the config
    or the file lacks a part of the state.
    """
    saved = ckpt["config"]
    check_resume_config(path, {k: saved.get(k) for k in RESUME_FIXED_KEYS},
                        {k: getattr(s.cfg, k) for k in RESUME_FIXED_KEYS})
    other = [k for k, v in s.cfg.model_dump(mode="json").items() if k not in RESUME_FIXED_KEYS and saved.get(k) != v]
    if other:
        logger.info("resuming with changed options: %s", ", ".join(sorted(other)))
    mine = restore_training(
        ckpt, path, s.info, nets=dict(s.nets.items()), ema=s.ema,
        optimizers={"g": s.opt_g, "d": s.opt_d}, schedulers={"g": s.sched_g, "d": s.sched_d},
        guards={"gan": s.guard}, monitor=s.monitor,
    )
    same_world = len(ckpt["ranks"]) == s.info.world_size
    try:
        s.pool_mri.load_state_dict(mine["pools"]["mri"], s.device)
        s.pool_ct.load_state_dict(mine["pools"]["ct"], s.device)
        if same_world and s.sampler_mri is not None and s.sampler_ct is not None and mine["samplers"]["mri"] is not None:
            s.sampler_mri.load_state_dict(mine["samplers"]["mri"])
            s.sampler_ct.load_state_dict(mine["samplers"]["ct"])
        if s.ada is not None and mine["ada"] is not None:
            s.ada.load_state_dict(mine["ada"])
        s.best = dict(ckpt["extra"]["best"])
        s.last_metrics = dict(ckpt["extra"]["last_metrics"])
        set_rng_state(mine["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume from {path}: its per-rank state is incomplete "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    s.step = int(ckpt["step"])


def inference_generators(s: RunState) -> tuple[nn.Module, nn.Module]:
    """(G_mri2ct, G_ct2mri) used for samples and evaluation: the EMA copies when enabled, else the live nets."""
    if s.ema is not None:
        return s.ema["g_mri2ct"].module, s.ema["g_ct2mri"].module
    return unwrap(s.nets.g_mri2ct), unwrap(s.nets.g_ct2mri)


@torch.no_grad()
def write_samples(s: RunState, fixed_mri: torch.Tensor, fixed_ct: torch.Tensor, path: Path) -> None:
    """PNG grid, rows: MRI, its CT translation, its reconstruction, CT, its MRI translation, its reconstruction."""
    g_ab, g_ba = inference_generators(s)
    modes = [g_ab.training, g_ba.training]
    g_ab.eval()
    g_ba.eval()
    fake_ct, fake_mri = g_ab(fixed_mri), g_ba(fixed_ct)
    rows = [fixed_mri, fake_ct, g_ba(fake_ct), fixed_ct, fake_mri, g_ab(fake_mri)]
    g_ab.train(modes[0])
    g_ba.train(modes[1])
    save_image_grid(rows, path)


# --- the pieces of one loop iteration ------------------------------------------------------------


def next_batches(s: RunState, data: UnpairedData) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's next (MRI, CT) batches, (B, C, H, W) on the device in the run's memory format."""
    assert s.sampler_mri is not None and s.sampler_ct is not None
    real_mri = fetch_batch(data.a, s.sampler_mri.take(s.cfg.batch_size), s.cfg, "MRI")
    real_ct = fetch_batch(data.b, s.sampler_ct.take(s.cfg.batch_size), s.cfg, "CT")
    real_mri = real_mri.to(s.device, non_blocking=True).contiguous(memory_format=s.memory_format)
    real_ct = real_ct.to(s.device, non_blocking=True).contiguous(memory_format=s.memory_format)
    return real_mri, real_ct


def d_means(metrics: Mapping[str, float]) -> tuple[float, float]:
    """Mean raw D(real) and D(fake) over the two discriminators (NaN for a skipped D step)."""
    d_real = (metrics.get("d_real_ct", math.nan) + metrics.get("d_real_mri", math.nan)) / 2
    d_fake = (metrics.get("d_fake_ct", math.nan) + metrics.get("d_fake_mri", math.nan)) / 2
    return d_real, d_fake


def train_step(s: RunState, real_mri: torch.Tensor, real_ct: torch.Tensor, step: int) -> dict[str, float]:
    """One training step: G, then D on the same fakes (as the reference implementation), the
    non-finite guard, the learning-rate schedules, EMA and the health monitor. Returns the step's metrics."""
    g_metrics, fake_mri, fake_ct, g_ok = generator_step(s, real_mri, real_ct)
    if g_ok:
        d_metrics, d_ok = discriminator_step(s, real_mri, real_ct, fake_mri, fake_ct)
    else:  # non-finite generator loss: keep NaN fakes out of the pools, skip D too
        d_metrics, d_ok = {"loss_d": float("nan")}, False
    s.guard.check({"loss_g": g_metrics["loss_g"] if g_ok else float("nan"),
                   "loss_d": d_metrics["loss_d"] if d_ok else float("nan")}, step)
    lrs = {"lr_g": s.opt_g.param_groups[0]["lr"], "lr_d": s.opt_d.param_groups[0]["lr"]}  # this step's rates
    s.sched_g.step()
    s.sched_d.step()
    if s.ema is not None and g_ok:
        s.ema["g_mri2ct"].update(s.nets.g_mri2ct)
        s.ema["g_ct2mri"].update(s.nets.g_ct2mri)
    s.step = step
    metrics = {**g_metrics, **d_metrics, **lrs, "skipped": float(not (g_ok and d_ok))}
    if s.ada is not None:
        metrics["aug_p"] = s.ada.p
    d_real, d_fake = d_means(metrics)
    s.monitor.update(d_real=d_real, d_fake=d_fake, grad_g=metrics["grad_norm_g"],
                     grad_d=metrics.get("grad_norm_d", math.nan), loss_g=metrics["loss_g"],
                     loss_d=metrics["loss_d"], diversity=metrics["diversity"])
    return metrics


def log_step(s: RunState, writer: MetricsWriter, history: list[dict[str, float]], step: int,
             metrics: dict[str, float]) -> None:
    """Health check, one metric row (metrics.jsonl, TensorBoard, history) and a console line (rank 0)."""
    s.monitor.check(step)
    s.last_metrics = record(writer, history, step, metrics)
    if s.info.is_main:
        d_real, d_fake = d_means(metrics)
        logger.info("step %d/%d  loss_g %.4f  loss_d %.4f  D(real) %.3f  D(fake) %.3f",
                    step, s.cfg.total_steps, metrics["loss_g"], metrics["loss_d"], d_real, d_fake)


def evaluate_step(s: RunState, evaluate: Callable[[nn.Module, nn.Module], Mapping[str, float]], best_key: str | None,
                  writer: MetricsWriter, history: list[dict[str, float]], step: int) -> bool:
    """Run `evaluate` on the inference generators (RNG untouched), log eval/<name>, and with
    best_key update the best record; returns whether this step is the new best."""
    scores = evaluate_untouched(evaluate, *inference_generators(s))
    record(writer, history, step, {f"eval/{k}": v for k, v in scores.items()})
    if best_key is None:
        return False
    name, higher_is_better = parse_best_key(best_key)
    if name not in scores:
        raise ValueError(f"best_key {name!r} is not among the evaluation results {sorted(scores)}")
    s.monitor.observe_eval(step, name, scores[name], higher_is_better)
    if not improves(scores[name], s.best, higher_is_better):
        return False
    s.best = {"key": name, "value": scores[name], "step": step}
    return True


def save_checkpoints(s: RunState, run: Run, meta: Mapping[str, Any], save_last: bool, save_best: bool) -> None:
    """Gather every rank's state (a collective: all ranks call it), then rank 0 writes last.pt
    and/or best.pt with their model cards."""
    ranks = gather_rank_states(s)
    if s.info.is_main and save_last:
        save_with_card(run.last_checkpoint, checkpoint_state(s, meta, ranks, run.last_checkpoint.name))
    if s.info.is_main and save_best:
        save_with_card(run.best_checkpoint, checkpoint_state(s, meta, ranks, run.best_checkpoint.name))


def check_run_options(run: Run, resume: bool, evaluate: Callable[..., Any] | None, best_key: str | None) -> None:
    """Refuse a fresh run over an existing checkpoint, a bad best_key, or a best_key without evaluate."""
    if run.last_checkpoint.exists() and not resume:
        raise FileExistsError(f"{run.dir} already holds a checkpoint ({run.last_checkpoint}); "
                              "resume it or choose a new run folder")
    if best_key:
        parse_best_key(best_key)  # a bad key fails now, not at the first evaluation
        if evaluate is None:
            raise ValueError("best_key needs an evaluate callback")


# --- training ------------------------------------------------------------------------------------


def train_cyclegan(
    cfg: CycleGANConfig,
    data: UnpairedData,
    run_dir: Path,
    resume: bool = False,
    device: str = "auto",
    evaluate: Callable[[nn.Module, nn.Module], dict[str, float]] | None = None,
    best_key: str | None = None,
) -> TrainResult:
    """Train CycleGAN on `data` to cfg.total_steps, writing checkpoints, metrics and samples in run_dir.

    resume: continue from RUN_DIR/checkpoints/last.pt (exactly: same losses as an uninterrupted
    run); without it, a run_dir that already holds a checkpoint is refused. evaluate: called
    every cfg.eval_every steps (and at the end) with the inference generators (G_mri2ct,
    G_ct2mri) in eval mode under no_grad; its dict is logged as eval/<name>, and with
    best_key ("ssim", "ssim:max" or "mae:min") the best step is kept at checkpoints/best.pt.
    Raises TrainingDivergedError after cfg.max_nonfinite consecutive non-finite steps (the last
    checkpoint is kept), CheckpointError for a checkpoint that cannot be resumed or written,
    ValueError for data that do not match the config.
    """
    # --- setup
    run = start_run(run_dir, device)
    dev, info, total = run.device, run.info, cfg.total_steps
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    check_run_options(run, resume, evaluate, best_key)

    # --- data
    n_mri, n_ct = len(data.a), len(data.b)
    if n_mri == 0 or n_ct == 0:
        raise ValueError(f"CycleGAN needs slices of both domains; got {n_mri} MRI and {n_ct} CT slices")
    n_fixed = min(cfg.n_samples, n_mri, n_ct)
    fixed_mri = fetch_batch(data.a, list(range(n_fixed)), cfg, "MRI").to(dev)
    fixed_ct = fetch_batch(data.b, list(range(n_fixed)), cfg, "CT").to(dev)

    # --- models, optimisers
    s = build_training(cfg, dev, info)
    s.sampler_mri = ShardSampler(n_mri, seed=cfg.seed * 2 + 11, rank=info.rank, world_size=info.world_size)
    s.sampler_ct = ShardSampler(n_ct, seed=cfg.seed * 2 + 12, rank=info.rank, world_size=info.world_size)

    # --- resume
    if resume and run.last_checkpoint.exists():
        restore_state(s, load_checkpoint(run.last_checkpoint, "cyclegan", map_location=dev), run.last_checkpoint)
        logger.info("resumed from %s at step %d", run.last_checkpoint, s.step)
    elif resume:
        logger.info("no checkpoint in %s: starting a new run", run.last_checkpoint.parent)
    start = s.step
    writer = MetricsWriter(run.dir, enabled=info.is_main, resume_step=start if start > 0 else None)
    history: list[dict[str, float]] = []
    if info.is_main:
        logger.info("CycleGAN: %d MRI and %d CT slices, %d steps from %d on %s (world %d)",
                    n_mri, n_ct, total, start, dev, info.world_size)

    # --- loop
    try:
        while s.step < total:
            step = s.step + 1
            # step
            real_mri, real_ct = next_batches(s, data)
            metrics = train_step(s, real_mri, real_ct, step)
            # log, sample
            if due(step, cfg.log_every, total):
                log_step(s, writer, history, step, metrics)
            if info.is_main and due(step, cfg.sample_every, total):
                write_samples(s, fixed_mri, fixed_ct, run.dir / "samples" / f"step_{step:06d}.png")
            # evaluate (before the checkpoint, so last.pt holds the best-so-far record)
            eval_due = evaluate is not None and due(step, cfg.eval_every, total)
            is_best = False
            if eval_due and info.is_main and evaluate is not None:
                is_best = evaluate_step(s, evaluate, best_key, writer, history, step)
            # checkpoint (every rank takes part in gathering the per-rank state; rank 0 writes)
            save_last = due(step, cfg.checkpoint_every, total)
            if save_last or eval_due:
                save_checkpoints(s, run, data.meta, save_last, is_best)
        if info.world_size > 1:
            dist.barrier()  # no rank returns (and maybe resumes) before rank 0 has written the checkpoint
    finally:
        if info.is_main:
            write_summary_safely(writer, {
                "step": s.step, "last": s.last_metrics, "best": s.best, "warnings": s.monitor.warnings,
                "skipped_steps": s.guard.total_skipped, "config_hash": config_hash(cfg.model_dump(mode="json")),
            })
        writer.close()
        end_run(run)

    ema_modules = None if s.ema is None else {k: e.module for k, e in s.ema.items()}
    return TrainResult(
        run_dir=run.dir, step=s.step, last_checkpoint=run.last_checkpoint,
        best_checkpoint=run.best_checkpoint if run.best_checkpoint.exists() else None, history=history,
        warnings=list(s.monitor.warnings), final_metrics=dict(s.last_metrics),
        nets=CycleGANNets(*(unwrap(n) for _, n in s.nets.items())), ema=ema_modules,
    )


# --- inference -------------------------------------------------------------------------------------


def load_generator(
    checkpoint: Path, direction: Direction, use_ema: bool = True, device: str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The generator for `direction` from a CycleGAN checkpoint, in eval mode on `device`, and its card.

    use_ema: take the EMA weights when the run kept them (else the live weights; the card's
    "weights" says which were loaded). The card is the checkpoint's model card (modality pair,
    hu_window, mr_scaling, spacing, train_subjects, config, meta, step). Input and output are
    (B, in_channels, H, W) in [-1, 1].
    """
    match direction:
        case "mri2ct" | "ct2mri":
            key = f"g_{direction}"
        case _:
            raise ValueError(f"direction must be 'mri2ct' or 'ct2mri', got {direction!r}")
    ckpt = load_checkpoint(Path(checkpoint), "cyclegan", map_location="cpu")
    try:
        cfg = CycleGANConfig.model_validate(ckpt["config"])
        state = ckpt["ema"][key]["module"] if use_ema and ckpt["ema"] else ckpt["nets"][key]
        card = checkpoint_card(ckpt)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete or invalid ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160]})") from None
    weights = "ema" if use_ema and ckpt["ema"] else "live"
    gen = ResnetGenerator(cfg.in_channels, cfg.ngf, cfg.n_res_blocks)
    load_state_dict_checked(gen, state, Path(checkpoint), key)
    card_path = Path(checkpoint).with_suffix(".json")
    if card_path.is_file():
        try:
            card = {**card, **json.loads(card_path.read_text(encoding="utf-8"))}
        except ValueError as exc:
            raise CheckpointError(f"model card {card_path} is not valid JSON ({exc}); delete or restore it") from None
    card.update({"direction": direction, "weights": weights})
    return gen.to(select_device(device)).eval(), card


# Used by tests and bench/cyclegan.py to iterate the two parameter groups.
def parameter_count(nets: CycleGANNets) -> dict[str, int]:
    """Trainable parameters per network."""
    return {name: sum(p.numel() for p in net.parameters() if p.requires_grad) for name, net in nets.items()}

