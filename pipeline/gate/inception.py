"""The FID InceptionV3 (pool3, 2048-d), written in plain torch so no torchvision is needed.

clean-fid's TorchScript file (inception-2015-12-05.pt) is accepted too and wrapped as
TorchScriptInception. The network is the TensorFlow FID Inception of Heusel et al. 2017 as ported to PyTorch by
pytorch-fid: torchvision's Inception3 layout with 1008 classes, no auxiliary head, BN eps
1e-3, average pools that exclude padding, and a max pool in the last block's pool branch.
Module and parameter names match torchvision's, so the state dict file
pt_inception-2015-12-05-6726825d.pth loads with strict key checking. The weights are read
from a local path set in config (gate.inception_weights), never downloaded.

Inputs are gate images (N, 1, H, W) in [-1, 1]: the channel is replicated to RGB and the
image resized to 299x299 (bilinear), which is what pytorch-fid feeds the network after its
own [0, 1] -> [-1, 1] scaling. Output: the 2048-d average-pooled features (pool3).
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import WeightsMissingError

FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
"""File name of pytorch-fid's FID Inception weights (the gate never downloads it)."""


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, **kwargs: int | tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **kwargs)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # the TF graph's pools do not count padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: strided 3x3, strided double 3x3 and max pool."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, c_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches; `max_pool` selects the last block's pool branch."""

    def __init__(self, c_in: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        # the TF graph's last block (pytorch-fid's FIDInceptionE_2) pools with max, the other with avg
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 for FID: (N, 3, 299, 299) in [-1, 1] -> pool3 features (N, 2048).

    Holds `fc` (2048 -> 1008) only so that the FID weights file loads with strict keys.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return torch.flatten(self.avgpool(x), 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Gate images (N, 1, H, W) in [-1, 1] -> (N, 2048): grey to RGB, bilinear resize to 299."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1, H, W) or (N, 3, H, W), got {tuple(images.shape)}")
        x = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self(x)


class TorchScriptInception(nn.Module):
    """clean-fid's TorchScript FID Inception (inception-2015-12-05.pt) behind the same `features` call.

    clean-fid feeds the scripted network RGB in [0, 255] at 299x299 and asks for pool3 with
    `return_features=True`; gate images (N, 1, H, W) in [-1, 1] are mapped accordingly.
    """

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.base = scripted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Gate images (N, 1, H, W) in [-1, 1] -> (N, 2048)."""
        x = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
        x = (x.clamp(-1.0, 1.0) + 1.0) * 127.5
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.base(x, return_features=True).reshape(x.shape[0], -1)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def load_fid_inception(path: Path | None, setting: str = "gate.inception_weights") -> FIDInceptionV3 | TorchScriptInception:
    """The FID InceptionV3 from local weights at `path` (eval mode).

    A state dict file (pytorch-fid's pt_inception-2015-12-05-6726825d.pth) loads into
    FIDInceptionV3 with strict keys; a TorchScript archive (clean-fid's
    inception-2015-12-05.pt) is wrapped as TorchScriptInception. Raises WeightsMissingError
    naming `setting` when the path is unset or missing, or when the file is neither.
    """
    if path is None or not Path(path).is_file():
        where = "is not set" if path is None else f"points to {path}, which does not exist"
        raise WeightsMissingError(
            f"{setting} {where}: the inception extractor needs pytorch-fid's {FID_INCEPTION_FILE} (or clean-fid's "
            f"inception-2015-12-05.pt) on local disk (it is never downloaded); set {setting} to its path, or use extractor: domain"
        )
    path = Path(path)
    if _is_torchscript(path):
        with warnings.catch_warnings():
            # torch.jit is deprecated, but clean-fid's file is TorchScript and loads no other way
            warnings.simplefilter("ignore", DeprecationWarning)
            return TorchScriptInception(torch.jit.load(str(path), map_location="cpu")).eval()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise WeightsMissingError(f"{setting} = {path} is not a torch state dict: {str(exc)[:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise WeightsMissingError(f"{setting} = {path} is not an FID InceptionV3 state dict: {str(exc)[:300]}") from None
    return model.eval()
