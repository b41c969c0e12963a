"""Balanced dataset writer and loader: `build_dataset` (medaug build-dataset) writes real plus
gated synthetic items, split by subject and class-balanced; `BalancedDataset` and
`class_balanced_sampler` read it back for training.

The loader names are imported lazily so the writer (and its CLI command) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.dataset.config import DatasetConfig
from pipeline.dataset.writer import BuildResult, build_dataset, plan_dataset, write_dataset

if TYPE_CHECKING:
    from pipeline.dataset.loader import BalancedDataset, class_balanced_sampler

__all__ = [
    "BalancedDataset",
    "BuildResult",
    "DatasetConfig",
    "build_dataset",
    "class_balanced_sampler",
    "plan_dataset",
    "write_dataset",
]


def __getattr__(name: str) -> Any:
    if name in ("BalancedDataset", "class_balanced_sampler"):
        from pipeline.dataset import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'pipeline.dataset' has no attribute {name!r}")
