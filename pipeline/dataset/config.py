"""Options of the balanced dataset writer (`medaug build-dataset`), as one pydantic model.

The defaults are the recipe; configs/dataset.yaml (section `dataset:`) only says what
differs. The writer (pipeline/dataset/writer.py) reads this and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.types import Modality

Deployment = Literal["mri-ct", "tumor-patches"]
"""What a class and a synthetic item are: translated volumes that inherit their source's
class and mask ("mri-ct"), or sampled tumor patches that carry their own class ("tumor-patches")."""

Strategy = Literal["equalise", "fixed", "none"]
"""How synthetic items fill the training split: up to the largest class, to a fixed count, or not at all."""


class SplitFractions(BaseModel):
    """Subject fractions of the splits drawn by the writer (they must sum to 1)."""

    model_config = ConfigDict(extra="forbid")

    train: float = Field(default=0.7, ge=0.0, le=1.0, description="Share of subjects in the training split.")
    val: float = Field(default=0.15, ge=0.0, le=1.0, description="Share of subjects in the validation split.")
    test: float = Field(default=0.15, ge=0.0, le=1.0, description="Share of subjects in the test split (when the real manifest names no test subjects).")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:.4f} (train {self.train}, val {self.val}, test {self.test})")
        if self.train <= 0.0:
            raise ValueError("the train fraction must be above 0")
        return self


class DatasetConfig(BaseModel):
    """Options of `medaug build-dataset`; every field is one line of doc on what it does."""

    model_config = ConfigDict(extra="forbid")

    deployment: Deployment = Field(default="tumor-patches", description="mri-ct: translated volumes inherit source class and mask; tumor-patches: sampled patches carry their class.")
    synthesis: Literal["patches", "insertion"] = Field(default="patches", description="tumor-patches: the GAN's patches are the synthetic items (patches), or they are inserted into real training CT volumes first (insertion: pipeline/insertion.py); mri-ct ignores it.")
    target_modality: Modality = Field(default="CT", description="Only items of this modality enter the dataset; balancing is over its classes.")
    strategy: Strategy = Field(default="equalise", description="equalise: fill every class up to the largest; fixed: every class to fixed_count; none: real items only.")
    fixed_count: int | None = Field(default=None, ge=1, description="Training items per class for strategy 'fixed' (real items above it are subsampled, seeded).")
    max_synthetic_share: float = Field(default=0.75, ge=0.0, le=1.0, description="Cap on synthetic / (real + synthetic) per class in the training split; 0.75 allows 3 synthetic per real item.")
    fractions: SplitFractions = Field(default_factory=SplitFractions, description="Subject fractions of train/val/test drawn where the real manifest names no split.")
    seed: int = Field(default=0, description="Seed of the split draw and of the choice of synthetic items (same seed, same dataset).")
    classes: list[str] | None = Field(default=None, description="Class names in class-index order; default: the sorted class names of the real items.")
    grid_per_class: int = Field(default=4, ge=0, le=16, description="Real and synthetic examples per class in the datasheet's sample grid.")
    manifests_dir: Path = Field(default=Path("data_manifests"), description="Where a copy of manifest.csv and dataset.json goes, under <content-hash>/ (not part of the hash).")

    @model_validator(mode="after")
    def _fixed_needs_count(self) -> DatasetConfig:
        if self.strategy == "fixed" and self.fixed_count is None:
            raise ValueError("strategy 'fixed' needs fixed_count (training items per class)")
        return self
