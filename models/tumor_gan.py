"""Class-conditional GAN networks for synthetic tumor patches (generator and projection discriminator).

The generator maps a latent vector and a class index to a two-channel patch: channel 0 is
the image (tanh, in the [-1, 1] units of the real patches), channel 1 is the lesion mask
(sigmoid, in [0, 1]), so one sample can train a classifier and a segmenter. The class enters
every block through conditional batch norm (de Vries et al. 2017, as in SNGAN and BigGAN).
The discriminator is the projection discriminator of Miyato & Koyama (2018) with spectral
normalisation (Miyato et al. 2018) and an optional minibatch standard-deviation layer
(Karras et al. 2018). Patches are 2D (B, C, H, W) by default or 3D (B, C, D, H, W) with
`spatial_dims=3`. MONAI has no conditional norm or projection head, so these are written
here; its layer factories pick the 2D/3D convolutions. The training loop that uses them is
models/train_tumor_gan.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm


def _check_patch_size(patch_size: int) -> int:
    """Number of x2 resamplings between 4 voxels and `patch_size` (a power of two >= 8)."""
    n = int(round(math.log2(patch_size / 4))) if patch_size > 0 else -1
    if n < 1 or 4 * 2**n != patch_size:
        raise ValueError(f"patch_size must be a power of two >= 8 (8, 16, 32, 64, ...), got {patch_size}")
    return n


# --- generator ---------------------------------------------------------------------------


class ConditionalBatchNorm(nn.Module):
    """Batch norm whose per-channel gain and bias are looked up from the class (de Vries 2017).

    `ConditionalBatchNorm(8, num_classes=3)(x, y)` with x (B, 8, H, W) and y (B,) long returns
    (B, 8, H, W). Gains start at 1 and biases at 0, so at initialisation it is plain batch norm.
    """

    def __init__(self, num_features: int, num_classes: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.norm = Norm[Norm.BATCH, spatial_dims](num_features, affine=False)
        self.gain = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], x.shape[1]) + (1,) * self.spatial_dims
        return self.norm(x) * self.gain(y).view(shape) + self.bias(y).view(shape)


class GeneratorBlock(nn.Module):
    """Residual up-sampling block (SNGAN): CBN, ReLU, x2 nearest upsample, conv3, CBN, ReLU, conv3.

    (B, in_ch, *S) -> (B, out_ch, *2S); the shortcut is upsample + conv1.
    """

    def __init__(self, in_ch: int, out_ch: int, num_classes: int, spatial_dims: int = 2) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.norm1 = ConditionalBatchNorm(in_ch, num_classes, spatial_dims)
        self.conv1 = conv(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm2 = ConditionalBatchNorm(out_ch, num_classes, spatial_dims)
        self.conv2 = conv(out_ch, out_ch, kernel_size=3, padding=1)
        self.shortcut = conv(in_ch, out_ch, kernel_size=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(x, y))
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.conv1(h)
        h = self.conv2(F.relu(self.norm2(h, y)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TumorGenerator(nn.Module):
    """Class-conditional generator: (z (B, latent_dim), y (B,) long) -> patch (B, 2, *[patch_size]*dims).

    Channel 0 is the image in [-1, 1] (tanh), channel 1 the lesion mask in [0, 1] (sigmoid).
    A linear layer maps z to a 4-voxel-wide grid of `8 * base_channels` features; each block
    doubles the size and (past the first) halves the channels, down to `base_channels`.

    >>> g = TumorGenerator(num_classes=3, latent_dim=16, base_channels=4, patch_size=16)
    >>> g(torch.randn(2, 16), torch.tensor([0, 2])).shape
    torch.Size([2, 2, 16, 16])
    """

    def __init__(
        self,
        num_classes: int,
        latent_dim: int = 128,
        base_channels: int = 64,
        patch_size: int = 64,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        n_up = _check_patch_size(patch_size)
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.patch_size = patch_size
        self.spatial_dims = spatial_dims
        # Channels per resolution, from 4 voxels up to patch_size: 8b, 8b, ..., 4b, 2b, b.
        chans = [base_channels * min(8, 2 ** (n_up - i)) for i in range(n_up + 1)]
        self.start_channels = chans[0]
        self.linear = nn.Linear(latent_dim, chans[0] * 4**spatial_dims)
        self.blocks = nn.ModuleList(
            GeneratorBlock(chans[i], chans[i + 1], num_classes, spatial_dims) for i in range(n_up)
        )
        self.out_norm = Norm[Norm.BATCH, spatial_dims](chans[-1])
        self.out_conv = Conv[Conv.CONV, spatial_dims](chans[-1], 2, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.linear(z).view(z.shape[0], self.start_channels, *([4] * self.spatial_dims))
        for block in self.blocks:
            h = block(h, y)
        out = self.out_conv(F.relu(self.out_norm(h)))
        return torch.cat([torch.tanh(out[:, :1]), torch.sigmoid(out[:, 1:])], dim=1)


# --- discriminator -----------------------------------------------------------------------


def _sn(module: nn.Module, enabled: bool) -> nn.Module:
    """`module` with spectral normalisation of its weight when `enabled` (Miyato et al. 2018)."""
    return _spectral_norm(module) if enabled else module


class MinibatchStdDev(nn.Module):
    """Minibatch standard deviation layer (Karras et al. 2018, ProGAN section 3).

    Appends one feature map holding the standard deviation of each feature over a group of
    `group_size` samples, averaged over channels and space: (B, C, *S) -> (B, C + 1, *S).
    A collapsed generator gives near-zero std, which the discriminator can then see. The
    group is the largest divisor of B that is <= group_size (a batch of 1 gives zeros).
    """

    def __init__(self, group_size: int = 4) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        g = max(d for d in range(1, min(self.group_size, b) + 1) if b % d == 0)
        grouped = x.float().reshape(g, b // g, *x.shape[1:])
        std = (grouped.var(dim=0, unbiased=False) + 1e-8).sqrt()  # (B/g, C, *S)
        stat = std.mean(dim=tuple(range(1, std.dim())))  # (B/g,)
        stat = stat.repeat(g).view(b, 1, *([1] * (x.dim() - 2))).expand(b, 1, *x.shape[2:])
        return torch.cat([x, stat.to(x.dtype)], dim=1)


class DiscriminatorBlock(nn.Module):
    """Residual down-sampling block (SNGAN): [ReLU], conv3, ReLU, conv3, x2 average pool.

    (B, in_ch, *S) -> (B, out_ch, *S/2), or the same size when `downsample` is False. The first
    block of the network skips the leading ReLU because its input is the image itself.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        spatial_dims: int = 2,
        downsample: bool = True,
        first: bool = False,
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.first = first
        self.downsample = downsample
        self.spatial_dims = spatial_dims
        self.conv1 = _sn(conv(in_ch, out_ch, kernel_size=3, padding=1), spectral_norm)
        self.conv2 = _sn(conv(out_ch, out_ch, kernel_size=3, padding=1), spectral_norm)
        self.shortcut = _sn(conv(in_ch, out_ch, kernel_size=1), spectral_norm)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if not self.downsample:
            return x
        return F.avg_pool2d(x, 2) if self.spatial_dims == 2 else F.avg_pool3d(x, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        return self._pool(h) + self._pool(self.shortcut(x))


class ProjectionDiscriminator(nn.Module):
    """Projection discriminator (Miyato & Koyama 2018): logit = psi(h) + <embed(y), h>.

    Input (B, 2, *[patch_size]*dims): image and mask channels, as the generator gives them.
    Returns (logits (B,), features h (B, C)); h, the sum-pooled last features, is what the
    feature-matching loss compares. Blocks halve the size down to 4 voxels with channels
    b, 2b, 4b, 8b, 8b, ...; a last block keeps the size, and the minibatch std layer (when on)
    sits just before it, as in ProGAN.

    >>> d = ProjectionDiscriminator(num_classes=3, base_channels=4, patch_size=16)
    >>> [t.shape for t in d(torch.randn(2, 2, 16, 16), torch.tensor([0, 1]))]
    [torch.Size([2]), torch.Size([2, 16])]
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 2,
        base_channels: int = 64,
        patch_size: int = 64,
        spatial_dims: int = 2,
        spectral_norm: bool = True,
        minibatch_std: bool = False,
        minibatch_std_group: int = 4,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        n_down = _check_patch_size(patch_size)
        self.num_classes = num_classes
        chans = [base_channels * min(8, 2**i) for i in range(n_down)]
        blocks: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(chans):
            blocks.append(DiscriminatorBlock(prev, ch, spatial_dims, True, first=i == 0, spectral_norm=spectral_norm))
            prev = ch
        self.blocks = nn.Sequential(*blocks)
        self.mbstd: nn.Module = MinibatchStdDev(minibatch_std_group) if minibatch_std else nn.Identity()
        last_ch = base_channels * min(8, 2**n_down)
        self.last = DiscriminatorBlock(
            prev + int(minibatch_std), last_ch, spatial_dims, downsample=False, spectral_norm=spectral_norm
        )
        self.feature_dim = last_ch
        self.linear = _sn(nn.Linear(last_ch, 1), spectral_norm)
        self.embed = _sn(nn.Embedding(num_classes, last_ch), spectral_norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.last(self.mbstd(self.blocks(x)))
        h = F.relu(h).sum(dim=tuple(range(2, h.dim())))  # global sum pooling (SNGAN)
        logits = self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)
        return logits, h
