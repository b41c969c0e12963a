"""Options of the quality gate (`medaug gate`), as one pydantic model.

The defaults are the recipe; configs/gate.yaml (section `gate:`) only says what differs.
Thresholds were calibrated with the domain encoder at demo scale against five planted
generators (tests/test_gate_planted.py): 24 training CT volumes of pipeline.phantoms
(64x64x32, ~630 scored slices) as the reference; 10-12 synthetic volumes that are a
held-out split (must pass), 3 distinct outputs repeated (collapse), training volumes plus
10 HU noise (memorization), smoothed noise, and MR volumes labelled CT. The ranges quoted
in the field docs span phantom cohort seeds 0 and 1, encoder seeds 0-3 and 150 or 300
encoder steps; every default sits with margin between the held-out split and the planted
failure it is meant to catch. Absolute FID/KID thresholds depend on the feature space and
are off by default (fid_max_excess compares against a real-vs-real baseline instead).
A threshold set to null switches its check off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.types import HUWindow

CHECKS = ("modality", "intensity", "fid", "kid", "precision", "recall", "coverage", "diversity", "duplicates", "memorization", "seam",
          "lesion", "class")
"""Names of the batch checks, in the order the report lists them."""


SEAM_MAX_RATIO = 1.5
"""The seam check's threshold for inserted lesions (bench/RESULTS.md, Lesion insertion: feathered
insertions score ~0.8 x the real lesions' median, a lesion box pasted with a 22 HU background
offset ~2.1 x, the real lesions themselves 0.6-1.9 x)."""


class GateConfig(BaseModel):
    """Options of `medaug gate`; every field is one line of doc on what it does and why its default."""

    model_config = ConfigDict(extra="forbid")

    # --- images -----------------------------------------------------------------------------
    gate_size: int = Field(default=64, ge=16, le=512, description="Side in pixels that axial slices are fitted into before scoring (items already in [-1, 1], i.e. patches, of one common square size keep theirs).")
    hu_window: HUWindow = Field(default=(-1000.0, 1000.0), description="CT window (low, high) in HU mapped to [-1, 1]; the CycleGAN's window, so gate and generator see the same values.")
    mr_percentiles: tuple[float, float] = Field(default=(0.5, 99.5), description="Foreground percentiles of each MR volume mapped to -1 and +1 (pipeline.preprocess).")
    modality: Literal["auto", "CT", "MR"] = Field(default="auto", description="Modality of items whose manifest has no modality column (plain NIfTI folders); auto: CT when the 1st percentile is below -500 HU.")
    real_split: str | None = Field(default="train", description="Only real manifest rows of this split are the reference (the generator's training data); rows with an empty split count; null: all rows.")
    min_foreground: float = Field(default=0.1, ge=0.0, le=1.0, description="Axial slices with less body (pipeline.preprocess.body_mask) than this fraction are not scored: near-empty end slices all look alike.")
    max_slices: int = Field(default=2000, ge=10, description="Batch metrics and encoder training use at most this many slices per set (seeded subsets); memorization and outlier decisions still compare every synthetic slice with every real one.")
    min_samples: int = Field(default=20, ge=2, description="Fewer scored slices than this in either set is an error: the metrics mean nothing on a handful.")

    # --- features ---------------------------------------------------------------------------
    extractor: str = Field(default="domain", description='Feature space: "domain" (encoder trained here on the real images), "inception" (FID InceptionV3, needs inception_weights) or "python:module:attr" (a FeatureExtractor or a factory returning one).')
    inception_weights: Path | None = Field(default=None, description="Local path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth or clean-fid's inception-2015-12-05.pt (never downloaded); needed by extractor inception.")
    encoder_path: Path | None = Field(default=None, description="A domain encoder saved by an earlier gate run (OUT/domain_encoder.pt); null: train one on the real images and save it under OUT.")
    encoder_steps: int = Field(default=300, ge=1, description="SimCLR steps of the domain encoder; 300 x 32 pairs takes ~10 s on one CPU core at 64x64 and separates the planted generators.")
    encoder_batch: int = Field(default=32, ge=4, description="Images per SimCLR step (each gives two augmented views); 32 is ~4x cheaper per step than 64 on CPU.")
    encoder_width: int = Field(default=8, ge=4, description="Channels of the encoder's first conv (doubling per block to 8x); features are 8*width-dimensional (64 by default).")
    encoder_lr: float = Field(default=2e-3, gt=0.0, description="Adam learning rate of the domain encoder.")
    encoder_temperature: float = Field(default=0.2, gt=0.0, description="NT-Xent temperature (Chen et al. 2020 found 0.1-0.5 best).")
    device: str = Field(default="cpu", description='Torch device for the encoder, feature extraction and the metrics (float64 distances, k-NN, PRDC, FID, KID; MS-SSIM in float32 without TF32): "cpu", "cuda" or "cuda:N"; checked when the gate starts.')
    seed: int = Field(default=0, description="Seed of subsets, encoder training, KID subsets, MS-SSIM pairs and bootstraps (same seed, same report).")

    # --- metric settings --------------------------------------------------------------------
    nearest_k: int = Field(default=5, ge=1, description="k of the k-NN balls of precision, recall, density and coverage (Naeem et al. 2020 use 5).")
    kid_subsets: int = Field(default=50, ge=1, description="KID subsets drawn (Binkowski et al. 2018 use 100 of 1000).")
    kid_subset_size: int = Field(default=100, ge=2, description="Samples per KID subset (capped at the smaller set's size).")
    max_pairs: int = Field(default=500, ge=10, description="Random pairs (different items, same slice level) per set for mean pairwise MS-SSIM; ~0.5 s per 500 pairs at 64x64 on CPU.")
    n_bootstrap: int = Field(default=50, ge=0, description="Bootstrap resamples for confidence intervals (0: none); each recomputes FID, so cost grows with the feature dimension.")
    ci_level: float = Field(default=0.95, gt=0.0, lt=1.0, description="Confidence level of the bootstrap intervals (percentile method; FID's shifted by the bootstrap bias, since resampling inflates FID).")
    fid_baseline_splits: int = Field(default=10, ge=1, description="Random item-disjoint half splits of the real set the fid check averages its real-vs-real baseline (and equal-size synthetic FID) over; one split moved the baseline 3x between cohorts and flipped the verdict (bench/RESULTS.md, Gate stability).")
    min_class_samples: int = Field(default=10, ge=2, description="Per-class metrics are reported for classes with at least this many slices in both sets.")
    class_checks: bool = Field(default=False, description="Also gate each synthetic class alone (check `class`): against the real items of its class, with a domain encoder fitted to them, every check above; the batch fails when a judged class fails. For class-conditional generators: pooled features fit what the classes share (for tumor patches skull, brain and air), and a batch whose lesions were wrong passed them (bench/RESULTS.md, 'The accepted CPU tumor GAN downstream'). Costs one encoder training per class.")
    class_min_items: int = Field(default=10, ge=2, description="A class with fewer real or synthetic items (subjects' volumes or patches) than this is not judged by the class check (noted in its detail; the pooled checks still apply): with 4 real and 2 synthetic volumes a held-out real split failed the excess FID (0.2).")

    # --- batch thresholds (null switches a check off) ---------------------------------------
    intensity_max: float | None = Field(default=0.1, ge=0.0, description="Max Wasserstein-1 distance between pooled pixel values in [-1, 1]; calibration: held-out real 0.008-0.013, noise 0.48-0.65, MR given as CT 0.69-0.77.")
    fid_max_excess: float | None = Field(default=0.1, description="Max excess FID: mean over fid_baseline_splits item-disjoint half splits of FID(synthetic, real half) minus FID(other real half, real half) at equal sample sizes (the difference takes off FID's small-sample bias), over the total variance of the real features (so it holds in any feature space); 0.1: the generator's Frechet distance^2 is at most a tenth of the real features' spread. Unlike the ratio it tends to a fixed value as the cohort grows. Calibration (cohort seeds 0-1, encoder seeds 0-3, 150/300 steps): held-out real -0.018..0.003, collapsed 0.010-0.040, memorizing -0.031..-0.002, noise 1.75-10.0, wrong modality 2.47-5.18; the CPU CycleGAN of bench/RESULTS.md 0.03 (60 subjects) to 0.07-0.1 (120-160).")
    fid_max_ratio: float | None = Field(default=None, gt=0.0, description="Max FID of synthetic vs a real half over FID of the other real half vs it, at equal sample sizes, averaged over the splits: answers whether this many samples can tell synthetic from real, so for one generator it grows with the cohort (1.6-2.2 at 60 subjects, 4.6-10.5 at 160); null: off. Held-out real 0.64-1.11, collapsed 1.3-2.6, noise and wrong modality 43-290.")
    fid_max: float | None = Field(default=None, gt=0.0, description="Max absolute FID; only meaningful for a fixed feature space (e.g. ~50 with inception on 2k+ samples); null: off.")
    kid_max: float | None = Field(default=None, description="Max KID (unbiased MMD^2, cubic kernel); feature-space dependent like fid_max, so off by default.")
    precision_min: float | None = Field(default=0.5, ge=0.0, le=1.0, description="Min precision (share of synthetic samples inside a real k-NN ball); held-out real 0.94-0.98, noise and wrong modality 0.")
    recall_min: float | None = Field(default=0.5, ge=0.0, le=1.0, description="Min recall (share of real samples inside a synthetic k-NN ball); held-out real 0.92-0.97, 3 modes in 12 items 0.21-0.54.")
    coverage_min: float | None = Field(default=0.5, ge=0.0, le=1.0, description="Min coverage (share of real k-NN balls holding a synthetic sample); held-out real 0.81-0.98, 3 modes 0.57-0.69, noise 0.")
    diversity_max_excess: float | None = Field(default=0.1, description="Max mean pairwise MS-SSIM (same slice level, different items) of synthetic minus real; held-out real -0.08..+0.04 over cohorts (10 volumes are few), 3 modes +0.03..+0.14: duplicates is the reliable collapse check at demo scale.")
    max_duplicate_fraction: float | None = Field(default=0.2, ge=0.0, le=1.0, description="Max share of synthetic slices whose nearest other synthetic item is a near-copy (same ratios as memorization); held-out real 0, wrong modality 0.12, 3 modes 1.0.")
    seam_max_ratio: float | None = Field(default=None, gt=0.0, description="Max median seam score (gradient energy 1-4 px outside the lesion mask, pipeline/gate/seam.py) of the synthetic items over the real items'. For inserted lesions (pipeline/insertion.py switches it on at SEAM_MAX_RATIO); null: off, since a wholly generated item has no paste border. Phantom CT: feathered insertions ~0.8, a pasted box with a 22 HU background offset ~2.1.")
    seam_item_ratio: float = Field(default=3.0, gt=0.0, description="With the seam check on, an item whose seam score is above this times the real median is dropped; real lesions spread 0.6-1.9 x their median (5th-95th percentile).")
    lesion_hu_max: float | None = Field(default=None, gt=0.0, description="Max Wasserstein-1 distance (HU) between the values inside the lesion masks of the synthetic and the real CT items of a class, worst class (pipeline/gate/lesion.py); null: off. Lesion attenuation is what tells CT tumor classes apart, and whole-image features miss it. Phantom CT: held-out real lesions 0.4-2.1 HU, inserted GAN lesions 3.9, GAN patches 7.6-12.2, MRI->CT translations 18.7-35.1.")
    max_copy_fraction: float | None = Field(default=0.05, ge=0.0, le=1.0, description="Max share of synthetic slices that are near-copies of a training slice; held-out real 0, training volumes + 10 HU noise 1.0.")

    # --- per-sample filtering ---------------------------------------------------------------
    copy_ratio_pixel: float = Field(default=0.2, gt=0.0, description="Near-copy when the pixel (L2) distance to the nearest training slice is below this times the median real-to-real (other item) nearest-neighbour distance; training slices + 10 HU noise give 0.04-0.05, held-out subjects >= 0.57.")
    copy_ratio_feature: float = Field(default=0.1, ge=0.0, description="The same rule in feature space (either rule flags a near-copy); +10 HU noise gives 0.02-0.10 (the encoder learned to ignore noise), held-out subjects >= 0.5.")
    outlier_ratio: float = Field(default=3.0, gt=0.0, description="A slice whose feature distance to the nearest real slice exceeds this times the median real-to-real distance is an outlier; held-out real <= 1.8, noise and wrong modality >= 4.5.")
    item_share: float = Field(default=0.5, ge=0.0, le=1.0, description="An item is dropped when more than this share of its scored slices are near-copies (or outliers); a single-slice item when its slice is.")

    # --- figures ----------------------------------------------------------------------------
    figure_samples: int = Field(default=16, ge=0, le=64, description="Images per PNG figure (accepted, rejected, near-copy pairs).")

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
