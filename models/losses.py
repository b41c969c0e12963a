"""Adversarial losses shared by the GAN trainers (CycleGAN and the tumor GAN).

One `AdversarialLoss` name selects the discriminator and generator objectives:
"lsgan" (least squares, Mao et al. 2017; CycleGAN's choice), "vanilla" (the non-saturating
logistic loss of Goodfellow et al. 2014), "hinge" (Lim & Ye 2017; Miyato et al. 2018) and
"wgan" (Arjovsky et al. 2017; pair with a gradient penalty). Losses are computed in float32
whatever the autocast dtype of the discriminator outputs, and averaged over every element of
the output (a PatchGAN map or one score per sample).

The structure losses at the end compare an input with its translation across modalities,
so they must not care that bone is dark in MR and bright in CT: "mind" (L1 between MIND
self-similarity descriptors, Heinrich et al. 2012; the structure-constrained MR->CT CycleGAN
of Yang et al. 2018) and "gradcorr" (1 - gradient correlation, Penney et al. 1998; used as a
CycleGAN term by Hiasa et al. 2018).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

AdversarialLoss = Literal["lsgan", "vanilla", "hinge", "wgan"]
ADVERSARIAL_LOSSES: tuple[str, ...] = get_args(AdversarialLoss)
StructureLoss = Literal["none", "mind", "gradcorr"]
STRUCTURE_LOSSES: tuple[str, ...] = get_args(StructureLoss)


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


# --- structure losses (input vs translation, across modalities) ------------------------------

MIND_OFFSETS = ((0, 1), (0, -1), (1, 0), (-1, 0))
"""The 2-D four-neighbourhood of MIND's search region (in units of `dilation` pixels)."""


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved so that out[..., i, j] = x[..., i + dy, j + dx], edges replicated; (N, 1, H, W) -> same."""
    p = max(abs(dy), abs(dx))
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., p + dy : p + dy + h, p + dx : p + dx + w]


def mind_descriptor(x: torch.Tensor, patch_radius: int = 1, dilation: int = 2, eps: float = 1e-6) -> torch.Tensor:
    """MIND (modality independent neighbourhood descriptor, Heinrich et al. 2012) of each channel.

    x: (B, C, H, W). For each offset r of `MIND_OFFSETS` (times `dilation` pixels) the patch
    distance D_r = box mean over a (2 patch_radius + 1)^2 patch of (x - x shifted by r)^2; the
    local variance V = mean_r D_r, clamped to [0.001, 1000] x its image mean (Heinrich's guard
    against flat regions); MIND_r = exp(-D_r / V), divided by its maximum over r. Returns
    (B, 4 C, H, W) in (0, 1]. Unchanged by x -> a x + b for any a != 0 (up to eps): a contrast
    inversion, as bone between MR and CT, leaves it as it is.

    >>> x = torch.rand(1, 1, 16, 16)
    >>> torch.allclose(mind_descriptor(x), mind_descriptor(3 - 2 * x), atol=1e-4)
    True
    """
    b, c, h, w = x.shape
    flat = x.float().reshape(b * c, 1, h, w)
    k = 2 * patch_radius + 1
    dists = []
    for dy, dx in MIND_OFFSETS:
        sq = (flat - _shift(flat, dy * dilation, dx * dilation)) ** 2
        dists.append(F.avg_pool2d(F.pad(sq, (patch_radius,) * 4, mode="replicate"), k, stride=1))
    d = torch.cat(dists, dim=1)  # (B C, 4, H, W)
    v = d.mean(dim=1, keepdim=True)
    v_mean = v.mean(dim=(2, 3), keepdim=True)
    v = torch.minimum(torch.maximum(v, 0.001 * v_mean), 1000.0 * v_mean) + eps
    mind = torch.exp(-d / v)
    mind = mind / mind.amax(dim=1, keepdim=True)
    return mind.reshape(b, c * len(MIND_OFFSETS), h, w)


def gradient_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Gradient correlation (Penney et al. 1998) per sample: (B,) in [-1, 1].

    The mean of the normalised cross-correlations of the horizontal and of the vertical
    finite differences of a and b, (B, C, H, W) each. 1 for b = s a + t with s > 0, -1 with
    s < 0; invariant to brightness and contrast, not to polarity.

    >>> a = torch.rand(2, 1, 8, 8)
    >>> gradient_correlation(a, 2 * a + 1).round(decimals=4).tolist()
    [1.0, 1.0]
    """

    def ncc(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        u = u.flatten(1) - u.flatten(1).mean(dim=1, keepdim=True)
        v = v.flatten(1) - v.flatten(1).mean(dim=1, keepdim=True)
        return (u * v).sum(dim=1) / torch.sqrt((u * u).sum(dim=1) * (v * v).sum(dim=1) + eps)

    a, b = a.float(), b.float()
    gx = ncc(a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1])
    gy = ncc(a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :])
    return 0.5 * (gx + gy)


def structure_loss(kind: StructureLoss, source: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """How much a translation (B, C, H, W) lost of its source's structure; 0-dim float32, 0 for a copy.

    mind: mean |MIND(source) - MIND(translation)| (in [0, 1]; 0 for any affine intensity map,
    inversions included); gradcorr: mean over the batch of 1 - gradient correlation (in [0, 2]);
    none: 0.
    """
    match kind:
        case "none":
            return torch.zeros((), device=source.device)
        case "mind":
            return (mind_descriptor(source) - mind_descriptor(translation)).abs().mean()
        case "gradcorr":
            return (1.0 - gradient_correlation(source, translation)).mean()
        case _:
            raise ValueError(f"structure loss must be one of {', '.join(STRUCTURE_LOSSES)}; got {kind!r}")


# --- shape consistency (the body outline, the same in every modality) -------------------------

BODY_SOFTNESS = 0.05
"""Width (in [-1, 1] units) of the sigmoid that turns a translation into a soft body mask."""


def _cross_dilate(x: torch.Tensor) -> torch.Tensor:
    """Grey dilation of (B, 1, H, W) with the 4-neighbourhood cross (scipy's fill_holes connectivity)."""
    rows = F.max_pool2d(x, kernel_size=(3, 1), stride=1, padding=(1, 0))
    cols = F.max_pool2d(x, kernel_size=(1, 3), stride=1, padding=(0, 1))
    return torch.maximum(rows, cols)


def filled_body(foreground: torch.Tensor) -> torch.Tensor:
    """Body = every pixel that the image border cannot reach through background; (B, 1, H, W) -> same.

    `foreground` holds values in [0, 1] (1 = tissue), hard or soft. The outside is grown from
    the border by geodesic reconstruction (dilate, then cap by the background 1 - foreground)
    until it stops changing (at most H + W steps), so dark tissue enclosed by tissue (bone in
    MR, air in a sinus) counts as body, as pipeline.preprocess.body_mask's hole filling has
    it. The growth runs without autograd; one last differentiable step from its fixed point
    passes gradients to the pixels the outside reaches (the outline), none to enclosed ones.

    >>> ring = torch.zeros(1, 1, 7, 7); ring[..., 1:6, 1:6] = 1.0; ring[..., 2:5, 2:5] = 0.0
    >>> filled_body(ring)[0, 0, 3, 3].item(), filled_body(ring)[0, 0, 0, 0].item()
    (1.0, 0.0)
    """
    background = 1.0 - foreground
    with torch.no_grad():
        bg = background.detach()
        outside = torch.zeros_like(bg)
        for edge in ((..., 0, slice(None)), (..., -1, slice(None)), (..., slice(None), 0), (..., slice(None), -1)):
            outside[edge] = bg[edge]
        for step in range(sum(bg.shape[-2:])):
            grown = torch.minimum(_cross_dilate(outside), bg)
            if step % 8 == 7 and torch.equal(grown, outside):  # a fixed point; checked every 8 steps (a GPU sync)
                break
            outside = grown
    return 1.0 - torch.minimum(_cross_dilate(outside), background)


def shape_loss(source: torch.Tensor, translation: torch.Tensor, source_threshold: float,
               translation_threshold: float) -> torch.Tensor:
    """How far a translation's body outline is from its source's: 0-dim float32, >= 0, ~0 when they agree.

    source: (B, C, H, W), its centre channel is the slice (2.5D inputs carry neighbours);
    translation: (B, 1, H, W); both in [-1, 1]. The source's body (tissue above
    `source_threshold`, holes filled) is a fixed target; the translation's is soft (a sigmoid
    of width BODY_SOFTNESS around `translation_threshold`, holes filled the same way, so only
    the pixels the outside reaches, the outline, get gradients and the interior's intensities
    are left alone). The loss is their binary cross-entropy, which pulls as hard on a pixel
    translated to deep background as on one near the threshold. A shape-consistency term that
    needs no truth (Zhang et al. 2018 use segmenters; the body outline needs a threshold only):
    against a CycleGAN that shrinks or shifts the head, which the cycle loss allows because the
    reverse generator can undo it.
    """
    c = source.shape[1] // 2
    target = filled_body((source[:, c : c + 1].float() > source_threshold).float())
    soft = torch.sigmoid((translation.float() - translation_threshold) / BODY_SOFTNESS)
    body = filled_body(soft).clamp(1e-6, 1.0 - 1e-6)
    return F.binary_cross_entropy(body, target)
