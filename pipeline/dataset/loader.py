"""Researchers' loader of a medaug dataset folder: a torch Dataset of MONAI-style dicts and
a class-balanced sampler.

Items come back already loaded (no LoadImaged needed) as channel-first MetaTensors with
their affine, so MONAI dictionary transforms (RandAffined, ScaleIntensityd, ...) apply
directly and torch/MONAI DataLoaders collate them:

    {"image": MetaTensor (1, X, Y, Z) float32, "label": MetaTensor (1, X, Y, Z) (when the item has a mask),
     "class": int class index, "class_name": str, "synthetic": bool, "id": str,
     "meta": {"synthetic": bool, "source": str, "split": str, "gate_report_id": str}}
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.transforms import LoadImage
from torch.utils.data import Dataset, WeightedRandomSampler

from pipeline.errors import ConfigError
from pipeline.manifest import read_manifest

log = logging.getLogger(__name__)

_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test"}


class BalancedDataset(Dataset[dict[str, Any]]):
    """Items of one split of a dataset written by `medaug build-dataset`.

    Args:
        root: the dataset folder (holds manifest.csv and dataset.json).
        split: "train", "val" or "test".
        synthetic: None for all items, True for synthetic only, False for real only.
        classes: keep only these class names (class indices stay those of the dataset).
        transform: a callable on the item dict, e.g. a MONAI Compose of dictionary transforms.

    >>> ds = BalancedDataset("my_dataset", split="train")  # doctest: +SKIP
    >>> ds[0]["image"].shape, ds[0]["class"]  # doctest: +SKIP
    (torch.Size([1, 64, 64, 32]), 1)
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        synthetic: bool | None = None,
        classes: Sequence[str] | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.root = Path(root)
        if split not in _SPLIT_ALIASES:
            raise ConfigError(f"split {split!r} is not one of train, val, test")
        self.split = _SPLIT_ALIASES[split]
        datalist = self.root / "dataset.json"
        if not datalist.is_file() or not (self.root / "manifest.csv").is_file():
            raise ConfigError(f"{self.root} is not a medaug dataset (no dataset.json/manifest.csv); write one with `medaug build-dataset`")
        self.class_names: list[str] = list(json.loads(datalist.read_text(encoding="utf-8"))["classes"])
        if classes is not None:
            unknown = sorted(set(classes) - set(self.class_names))
            if unknown:
                raise ConfigError(f"classes {unknown} are not in this dataset; it has {self.class_names}")
        rows = [r for r in read_manifest(self.root) if r["split"] == self.split]
        if synthetic is not None:
            rows = [r for r in rows if (r["synthetic"] == "1") == synthetic]
        if classes is not None:
            rows = [r for r in rows if r["class"] in set(classes)]
        self.rows = rows
        self.transform = transform
        self._load = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=None)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def targets(self) -> list[int]:
        """Class index of every item, in order (what a sampler weights by)."""
        return [int(r["class_index"]) for r in self.rows]

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.rows[index]
        synthetic = r["synthetic"] == "1"
        item: dict[str, Any] = {"image": self._load(str(self.root / r["path"])).float()}
        if r["label_path"]:
            item["label"] = self._load(str(self.root / r["label_path"]))
        item.update(
            {
                "class": int(r["class_index"]),
                "class_name": r["class"],
                "synthetic": synthetic,
                "id": r["id"],
                "meta": {"synthetic": synthetic, "source": r["source"], "split": r["split"], "gate_report_id": r["gate_report_id"]},
            }
        )
        return self.transform(item) if self.transform is not None else item


def class_balanced_sampler(
    ds: BalancedDataset, num_samples: int | None = None, generator: torch.Generator | None = None
) -> WeightedRandomSampler:
    """A sampler that draws every class equally often (weight 1 / items of its class), with
    replacement; `num_samples` defaults to len(ds).

    Known answer: 3 items of class 0 and 1 of class 1 give weights [1/3, 1/3, 1/3, 1].
    """
    targets = ds.targets
    if not targets:
        raise ConfigError("class_balanced_sampler: the dataset split is empty")
    counts = Counter(targets)
    weights = [1.0 / counts[t] for t in targets]
    return WeightedRandomSampler(weights, num_samples=num_samples or len(targets), replacement=True, generator=generator)
