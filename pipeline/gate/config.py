"""Options of the quality gate (`medaug gate`), as one pydantic model.

The defaults are the recipe; configs/gate.yaml (section `gate:`) only says what differs.
Thresholds were calibrated on phantom cohorts with the domain encoder at demo scale
(64x64 slices, a few hundred per set) against five planted generators (tests/test_gate_planted.py):
a held-out split of real images must pass; a collapsed, a memorizing, a noise and a
wrong-modality generator must each fail for its own reason. Each field's doc says why its
default sits where it does. A threshold set to null switches its check off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.types import HUWindow

CHECKS = ("modality", "intensity", "fid", "kid", "precision", "recall", "coverage", "diversity", "duplicates", "memorization")
"""Names of the batch checks, in the order the report lists them."""


class GateConfig(BaseModel):
    """Options of `medaug gate`; every field is one line of doc on what it does and why its default."""

    model_config = ConfigDict(extra="forbid")

    # --- images -----------------------------------------------------------------------------
    gate_size: int = Field(64, ge=16, le=512, description="Side in pixels that axial slices are resized to before scoring (2-D patches of one common size keep theirs).")
    hu_window: HUWindow = Field((-1000.0, 1000.0), description="CT window (low, high) in HU mapped to [-1, 1]; the CycleGAN's window, so gate and generator see the same values.")
    mr_percentiles: tuple[float, float] = Field((0.5, 99.5), description="Foreground percentiles of each MR volume mapped to -1 and +1 (pipeline.preprocess).")
    modality: Literal["auto", "CT", "MR"] = Field("auto", description="Modality of items whose manifest has no modality column (plain NIfTI folders); auto: CT when the 1st percentile is below -500 HU.")
    real_split: str | None = Field("train", description="Only real manifest rows of this split are the reference (the generator's training data); rows with an empty split count; null: all rows.")
    min_foreground: float = Field(0.1, ge=0.0, le=1.0, description="Axial slices with less body (pipeline.preprocess.body_mask) than this fraction are not scored: near-empty end slices all look alike.")
    max_slices: int = Field(2000, ge=10, description="At most this many slices per set are scored (a seeded random subset); caps runtime and memory.")
    min_samples: int = Field(20, ge=2, description="Fewer scored slices than this in either set is an error: the metrics mean nothing on a handful.")

    # --- features ---------------------------------------------------------------------------
    extractor: str = Field("domain", description='Feature space: "domain" (encoder trained here on the real images), "inception" (FID InceptionV3, needs inception_weights) or "python:module:attr" (a FeatureExtractor or a factory returning one).')
    inception_weights: Path | None = Field(None, description="Local path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (never downloaded); needed by extractor inception.")
    encoder_path: Path | None = Field(None, description="A domain encoder saved by an earlier gate run (OUT/domain_encoder.pt); null: train one on the real images and save it under OUT.")
    encoder_steps: int = Field(300, ge=1, description="SimCLR steps of the domain encoder; 300 x 32 pairs takes ~10 s on one CPU core at 64x64 and separates the planted generators.")
    encoder_batch: int = Field(32, ge=4, description="Images per SimCLR step (each gives two augmented views); 32 is ~4x cheaper per step than 64 on CPU.")
    encoder_width: int = Field(8, ge=4, description="Channels of the encoder's first conv (doubling per block to 8x); features are 8*width-dimensional (64 by default).")
    encoder_lr: float = Field(2e-3, gt=0.0, description="Adam learning rate of the domain encoder.")
    encoder_temperature: float = Field(0.2, gt=0.0, description="NT-Xent temperature (Chen et al. 2020 found 0.1-0.5 best).")
    device: str = Field("cpu", description='Torch device for the encoder and feature extraction ("cpu", "cuda").')
    seed: int = Field(0, description="Seed of subsets, encoder training, KID subsets, MS-SSIM pairs and bootstraps (same seed, same report).")

    # --- metric settings --------------------------------------------------------------------
    nearest_k: int = Field(5, ge=1, description="k of the k-NN balls of precision, recall, density and coverage (Naeem et al. 2020 use 5).")
    kid_subsets: int = Field(50, ge=1, description="KID subsets drawn (Binkowski et al. 2018 use 100 of 1000).")
    kid_subset_size: int = Field(100, ge=2, description="Samples per KID subset (capped at the smaller set's size).")
    max_pairs: int = Field(400, ge=10, description="Random pairs (from different items) per set for mean pairwise MS-SSIM.")
    n_bootstrap: int = Field(50, ge=0, description="Bootstrap resamples for confidence intervals (0: none); each recomputes FID, so cost grows with the feature dimension.")
    ci_level: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence level of the bootstrap intervals (percentile method).")
    min_class_samples: int = Field(10, ge=2, description="Per-class metrics are reported for classes with at least this many slices in both sets.")

    # --- batch thresholds (null switches a check off) ---------------------------------------
    intensity_max: float | None = Field(0.1, ge=0.0, description="Max Wasserstein-1 distance between pooled pixel values in [-1, 1]; held-out real ~0.01, MR given as CT ~0.3: catches a wrong modality or window.")
    fid_max_ratio: float | None = Field(3.0, gt=0.0, description="Max FID / FID between two subject-disjoint halves of the real set; a ratio, so it holds in any feature space. Held-out real ~1-2, noise > 50.")
    fid_max: float | None = Field(None, gt=0.0, description="Max absolute FID; only meaningful for a fixed feature space (e.g. ~50 with inception on 2k+ samples); null: off.")
    kid_max: float | None = Field(None, description="Max KID (unbiased MMD^2, cubic kernel); feature-space dependent like fid_max, so off by default.")
    precision_min: float | None = Field(0.5, ge=0.0, le=1.0, description="Min precision (share of synthetic samples inside a real k-NN ball); held-out real ~0.8, noise 0.")
    recall_min: float | None = Field(0.5, ge=0.0, le=1.0, description="Min recall (share of real samples inside a synthetic k-NN ball); a collapsed generator's balls shrink to 0.")
    coverage_min: float | None = Field(0.5, ge=0.0, le=1.0, description="Min coverage (share of real k-NN balls holding a synthetic sample); held-out real ~0.9, a handful of modes < 0.2.")
    diversity_max_excess: float | None = Field(0.05, description="Max mean pairwise MS-SSIM (same slice level, different items) of synthetic minus real; held-out real ~0, 3 modes in 12 items ~+0.1.")
    max_duplicate_fraction: float | None = Field(0.2, ge=0.0, le=1.0, description="Max share of synthetic slices with a near-copy in another synthetic item (same rule as memorization); held-out real 0, a few modes ~1.")
    max_copy_fraction: float | None = Field(0.05, ge=0.0, le=1.0, description="Max share of synthetic samples that are near-copies of a training image; held-out real 0, a memorizing generator ~1.")

    # --- per-sample filtering ---------------------------------------------------------------
    copy_ratio_pixel: float = Field(0.2, gt=0.0, description="A sample whose pixel-space distance to its nearest training image is below this times the median real-to-real (other subject) nearest-neighbour distance is a near-copy.")
    copy_ratio_feature: float = Field(0.1, ge=0.0, description="The same in feature space (lower: the encoder is invariant to small noise, so held-out subjects sit closer there).")
    outlier_ratio: float = Field(3.0, gt=0.0, description="A sample whose feature distance to its nearest real sample exceeds this times the median real-to-real nearest-neighbour distance is an outlier and dropped.")
    item_share: float = Field(0.5, ge=0.0, le=1.0, description="A volume is dropped when more than this share of its scored slices are near-copies (or outliers); a patch when its one slice is.")

    # --- figures ----------------------------------------------------------------------------
    figure_samples: int = Field(16, ge=0, le=64, description="Images per PNG figure (accepted, rejected, near-copy pairs).")

    @model_validator(mode="after")
    def _check(self) -> GateConfig:
        lo, hi = self.mr_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"mr_percentiles must be (low, high) with 0 <= low < high <= 100, got {self.mr_percentiles}")
        if not self.hu_window[1] > self.hu_window[0]:
            raise ValueError(f"hu_window must be (low, high) with high > low, got {self.hu_window}")
        ext = self.extractor
        if ext not in ("domain", "inception") and not (ext.startswith("python:") and ext.count(":") == 2):
            raise ValueError(f'extractor must be one of "domain", "inception", "python:module:attr"; got {ext!r}')
        return self
