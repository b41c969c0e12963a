"""Feature extractors of the gate: the plug-in point for any encoder.

A FeatureExtractor has a `name`, a `sha256` that pins its exact weights, and maps gate
images (N, 1, H, W) float in [-1, 1] to features (N, D) float64. Three kinds, picked by
`gate.extractor`: "domain" (pipeline/gate/encoder.py, trained on the real images),
"inception" (pipeline/gate/inception.py, FID InceptionV3 from a local weights file) and
"python:module:attr" (any object satisfying the protocol, or a zero-argument factory
returning one, importable from the running environment).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from numpy.typing import NDArray

from pipeline.errors import ConfigError
from pipeline.gate.config import GateConfig
from pipeline.gate.encoder import (
    ENCODER_VERSION,
    DomainEncoder,
    encode,
    load_domain_encoder,
    save_domain_encoder,
    state_dict_sha256,
    train_domain_encoder,
)
from pipeline.gate.inception import FIDInceptionV3, TorchScriptInception, load_fid_inception
from pipeline.manifest import sha256_file

log = logging.getLogger(__name__)

ENCODER_FILE = "domain_encoder.pt"
"""Where a gate run saves the domain encoder it trained (under OUT)."""


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that turns gate images into features, with a name and a weights hash."""

    name: str
    sha256: str

    def __call__(self, images: torch.Tensor) -> NDArray[np.float64]:
        """(N, 1, H, W) float in [-1, 1] -> (N, D) float64."""
        ...


class DomainExtractor:
    """The trained DomainEncoder as a FeatureExtractor (name "domain-simclr-v1")."""

    def __init__(self, model: DomainEncoder, sha256: str, device: str = "cpu") -> None:
        self.model = model.to(torch.device(device)).eval()
        self.sha256 = sha256
        self.name = ENCODER_VERSION
        self.device = device

    def __call__(self, images: torch.Tensor) -> NDArray[np.float64]:
        return encode(self.model, images, self.device)


PYTORCH_FID_SHA256_PREFIX = "6726825d"
"""First hex digits of the sha256 of pytorch-fid's FID Inception weights: torch.hub names the
file by them (FID_INCEPTION_FILE) and checks them when it downloads the file."""


def inception_weights_note(sha256: str, torchscript: bool) -> str:
    """Which Inception weights a gate report's FID used, for its feature-extractor line.

    >>> inception_weights_note("6726825d" + "0" * 56, False)
    "pytorch-fid's FID Inception weights (sha256 6726825d...: the reference network's)"
    """
    if torchscript:
        return f"a TorchScript Inception (clean-fid's inception-2015-12-05.pt or another; sha256 {sha256[:12]}... not checked)"
    if sha256.startswith(PYTORCH_FID_SHA256_PREFIX):
        return f"pytorch-fid's FID Inception weights (sha256 {PYTORCH_FID_SHA256_PREFIX}...: the reference network's)"
    return (f"NOT pytorch-fid's FID Inception weights (sha256 {sha256[:12]}..., expected {PYTORCH_FID_SHA256_PREFIX}...): "
            "FID values are not comparable with published ones")


class InceptionExtractor:
    """FID InceptionV3 pool3 (2048-d) as a FeatureExtractor (name "fid-inception-v3").

    `sha256` is the weights file's; `weights` says in words which weights those are
    (inception_weights_note), and the gate report prints it.
    """

    def __init__(self, model: FIDInceptionV3 | TorchScriptInception, sha256: str, device: str = "cpu", batch: int = 32) -> None:
        self.model = model.to(torch.device(device)).eval()
        self.sha256 = sha256
        self.name = "fid-inception-v3"
        self.weights = inception_weights_note(sha256, isinstance(model, TorchScriptInception))
        self.device = device
        self.batch = batch

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> NDArray[np.float64]:
        dev = torch.device(self.device)
        out = [self.model.features(images[s:s + self.batch].to(dev)).double().cpu() for s in range(0, images.shape[0], self.batch)]
        return np.asarray(torch.cat(out).numpy(), dtype=np.float64)


def _plugin(spec: str) -> FeatureExtractor:
    _, module_name, attr = spec.split(":", 2)
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"gate.extractor {spec!r}: cannot import {module_name}.{attr} ({exc})") from None
    # a class or a factory function is called; an object with the protocol is used as it is
    if inspect.isclass(obj) or (not isinstance(obj, FeatureExtractor) and callable(obj)):
        obj = obj()
    if not isinstance(obj, FeatureExtractor):
        raise ConfigError(
            f"gate.extractor {spec!r} is not a FeatureExtractor (needs name, sha256 and __call__(images) -> (N, D)), "
            "nor a factory returning one"
        )
    return obj


def needs_real_images(cfg: GateConfig) -> bool:
    """Whether building the extractor trains on the real images (a domain encoder not given by path)."""
    return cfg.extractor == "domain" and cfg.encoder_path is None


def build_extractor(cfg: GateConfig, real_images: torch.Tensor | None, out: Path | None) -> FeatureExtractor:
    """The extractor `cfg.extractor` names.

    "domain": loaded from cfg.encoder_path when set, else trained on `real_images`
    (N, 1, H, W; required then) and saved to OUT/domain_encoder.pt (when `out` is given).
    Raises ConfigError for a bad plug-in, WeightsMissingError for missing weights files.
    """
    match cfg.extractor:
        case "domain":
            if cfg.encoder_path is not None:
                model, digest = load_domain_encoder(cfg.encoder_path)
                log.info("domain encoder loaded from %s (sha256 %s)", cfg.encoder_path.name, digest[:12])
                return DomainExtractor(model, digest, cfg.device)
            if real_images is None:
                raise ValueError("training a domain encoder needs the real images")
            model = train_domain_encoder(real_images, steps=cfg.encoder_steps, batch=cfg.encoder_batch, width=cfg.encoder_width,
                                         lr=cfg.encoder_lr, temperature=cfg.encoder_temperature, seed=cfg.seed, device=cfg.device)
            model = model.cpu()
            digest = save_domain_encoder(model, out / ENCODER_FILE) if out is not None else state_dict_sha256(model.state_dict())
            return DomainExtractor(model, digest, cfg.device)
        case "inception":
            model_i = load_fid_inception(cfg.inception_weights)
            # the file's own sha256: pytorch-fid names the file by its prefix (6726825d)
            return InceptionExtractor(model_i, sha256_file(Path(str(cfg.inception_weights))), cfg.device)
        case spec if spec.startswith("python:"):
            return _plugin(spec)
        case other:
            raise ConfigError(f'gate.extractor must be one of "domain", "inception", "python:module:attr"; got {other!r}')
