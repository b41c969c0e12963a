"""CycleGAN networks for unpaired MRI <-> CT slice translation (Zhu et al. 2017).

The generator is the ResNet encoder-decoder of Johnson et al. (2016) as CycleGAN uses it:
reflection padding, a 7x7 stem, two stride-2 downsamplings, `n_res_blocks` residual blocks
(9 for 256x256 images, 6 for 128x128 in the paper; fewer for tiny test images), two
transposed-convolution upsamplings and a 7x7 head with tanh, instance norm throughout. With
`in_channels = k > 1` it reads a 2.5D stack of k neighbouring slices and writes k slices
(out = in channels, so the cycle G_ct2mri(G_mri2ct(x)) and the identity term type-check);
inference keeps the centre one. The discriminator is the 70x70 PatchGAN, built from MONAI's
PatchDiscriminator. The training loop is models/train_cyclegan.py.
"""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator as MonaiPatchDiscriminator
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """CycleGAN's "normal" init: conv weights N(0, 0.02), biases 0 (norms are affine-free here)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --- generator -------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """x + [reflect-pad 1, conv3x3, IN, ReLU, reflect-pad 1, conv3x3, IN](x); (B, C, H, W) -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's ResNet generator: (B, C, H, W) in [-1, 1] -> (B, C, H, W) in [-1, 1] (tanh).

    `ResnetGenerator(in_channels=1, ngf=64, n_res_blocks=9)` is the published 256x256 network
    (11.4 M parameters). H and W must be multiples of 4 (two stride-2 stages). Bias terms are
    kept because instance norm here has no affine parameters (as in the reference).
    """

    def __init__(self, in_channels: int = 1, ngf: int = 64, n_res_blocks: int = 9) -> None:
        super().__init__()
        if in_channels < 1 or ngf < 1 or n_res_blocks < 0:
            raise ValueError(f"need in_channels >= 1, ngf >= 1, n_res_blocks >= 0; got {in_channels}, {ngf}, {n_res_blocks}")
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, kernel_size=7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(inplace=True),
        ]
        ch = ngf
        for _ in range(2):  # downsample: ngf -> 2 ngf -> 4 ngf
            layers += [nn.Conv2d(ch, ch * 2, kernel_size=3, stride=2, padding=1), nn.InstanceNorm2d(ch * 2), nn.ReLU(inplace=True)]
            ch *= 2
        layers += [ResidualBlock(ch) for _ in range(n_res_blocks)]
        for _ in range(2):  # upsample: 4 ngf -> 2 ngf -> ngf
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, kernel_size=3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(ch // 2),
                nn.ReLU(inplace=True),
            ]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, in_channels, kernel_size=7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.in_channels = in_channels
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(
                f"generator wants (B, {self.in_channels}, H, W) with H, W multiples of 4; got {tuple(x.shape)}"
            )
        return self.net(x)


# --- discriminator -----------------------------------------------------------------------------


class PatchGANDiscriminator(nn.Module):
    """70x70 PatchGAN (Isola et al. 2017): (B, C, H, W) -> (B, 1, H/8 - 2, W/8 - 2) raw scores.

    Layers C64(s2)-C128(s2)-C256(s2)-C512(s1)-conv4x4 to 1 channel, LeakyReLU 0.2, instance
    norm on all but the first, N(0, 0.02) init: exactly what MONAI's PatchDiscriminator builds
    with num_layers_d=3, kernel 4, padding 1, norm "INSTANCE", bias=True, so it is used as is.
    This wrapper exists because MONAI's returns the list of every intermediate feature map (for
    feature-matching losses) while the trainer wants the score map, and because MONAI has no
    spectral-norm option: `spectral_norm=True` wraps every convolution in
    torch.nn.utils.parametrizations.spectral_norm (Miyato et al. 2018). `features(x)` gives
    MONAI's list.
    """

    def __init__(self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3, spectral_norm: bool = False) -> None:
        super().__init__()
        self.net = MonaiPatchDiscriminator(
            spatial_dims=2,
            channels=ndf,
            in_channels=in_channels,
            out_channels=1,
            num_layers_d=n_layers,
            kernel_size=4,
            norm="INSTANCE",
            bias=True,
            padding=1,
        )
        if spectral_norm:
            for m in list(self.net.modules()):
                if isinstance(m, nn.Conv2d):
                    _spectral_norm(m)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every intermediate feature map, the last being the score map."""
        return list(self.net(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]
