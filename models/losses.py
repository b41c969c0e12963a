"""Adversarial losses shared by the GAN trainers (CycleGAN and the tumor GAN).

One `AdversarialLoss` name selects the discriminator and generator objectives:
"lsgan" (least squares, Mao et al. 2017; CycleGAN's choice), "vanilla" (the non-saturating
logistic loss of Goodfellow et al. 2014), "hinge" (Lim & Ye 2017; Miyato et al. 2018) and
"wgan" (Arjovsky et al. 2017; pair with a gradient penalty). Losses are computed in float32
whatever the autocast dtype of the discriminator outputs, and averaged over every element of
the output (a PatchGAN map or one score per sample).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

AdversarialLoss = Literal["lsgan", "vanilla", "hinge", "wgan"]
ADVERSARIAL_LOSSES: tuple[str, ...] = get_args(AdversarialLoss)


def _unknown(kind: str) -> ValueError:
    return ValueError(f"adversarial loss must be one of {', '.join(ADVERSARIAL_LOSSES)}; got {kind!r}")


def discriminator_loss(kind: AdversarialLoss, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss on raw outputs for real and fake inputs (any shapes); 0-dim float32.

    lsgan: (D(x) - 1)^2 + D(G(z))^2, each averaged; vanilla: softplus(-D(x)) + softplus(D(G(z)));
    hinge: relu(1 - D(x)) + relu(1 + D(G(z))); wgan: D(G(z)) - D(x).
    E.g. lsgan with d_real = 1, d_fake = 0 gives 0; with d_real = d_fake = 0 gives 1.
    """
    real, fake = d_real.float(), d_fake.float()
    match kind:
        case "lsgan":
            return F.mse_loss(real, torch.ones_like(real)) + F.mse_loss(fake, torch.zeros_like(fake))
        case "vanilla":
            return F.softplus(-real).mean() + F.softplus(fake).mean()
        case "hinge":
            return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
        case "wgan":
            return fake.mean() - real.mean()
        case _:
            raise _unknown(kind)


def generator_loss(kind: AdversarialLoss, d_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss on the discriminator's raw output for generated inputs; 0-dim float32.

    lsgan: (D(G(z)) - 1)^2; vanilla (non-saturating): softplus(-D(G(z))); hinge and wgan: -D(G(z)).
    """
    fake = d_fake.float()
    match kind:
        case "lsgan":
            return F.mse_loss(fake, torch.ones_like(fake))
        case "vanilla":
            return F.softplus(-fake).mean()
        case "hinge" | "wgan":
            return -fake.mean()
        case _:
            raise _unknown(kind)


def real_fake_midpoint(kind: AdversarialLoss) -> float:
    """The D output halfway between "real" and "fake": 0.5 for lsgan (targets 1/0), 0 otherwise.

    Used by adaptive augmentation (sign of D(real) - midpoint) and health checks.
    """
    match kind:
        case "lsgan":
            return 0.5
        case "vanilla" | "hinge" | "wgan":
            return 0.0
        case _:
            raise _unknown(kind)


def health_gap_max(kind: AdversarialLoss) -> float | None:
    """Mean D(real) - D(fake) above which the discriminator counts as too strong (HealthMonitor).

    lsgan 0.8 (targets 1 and 0); vanilla 5 logits (sigmoid 0.92 vs 0.08); hinge 2 (both
    margins met); wgan None (its scores have no scale).
    """
    match kind:
        case "lsgan":
            return 0.8
        case "vanilla":
            return 5.0
        case "hinge":
            return 2.0
        case "wgan":
            return None
        case _:
            raise _unknown(kind)
