"""Tests of the researchers' loader (pipeline/dataset/loader.py): BalancedDataset with MONAI
dictionary transforms and DataLoaders, the class-balanced sampler, and the README example.

The dataset is written by the builders of tests/test_dataset.py (tiny NIfTI inputs).
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import test_dataset as builders  # its tiny-dataset builders
import torch

from pipeline.errors import ConfigError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    out, _ = builders.build_tumor_dataset(root, max_synthetic_share=0.9)
    return out


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The README's ```python block that loads a dataset with BalancedDataset (the one users copy)."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
              if "BalancedDataset(" in b]
    assert len(blocks) == 1, f"README.md should hold one python block using BalancedDataset, found {len(blocks)}"
    assert '"my_dataset"' in blocks[0], "the README example should load the dataset folder \"my_dataset\""
    return blocks[0]


def test_readme_example_runs(dataset: Path) -> None:
    scope: dict[str, object] = {}
    exec(textwrap.dedent(readme_example()).replace('"my_dataset"', repr(str(dataset))), scope)
    images, classes = scope["images"], scope["classes"]
    assert isinstance(images, torch.Tensor) and images.shape[1:] == (1, 8, 8, 4)
    assert isinstance(classes, torch.Tensor) and classes.dtype == torch.int64


def test_item_format(dataset: Path) -> None:
    from monai.data import MetaTensor

    from pipeline.dataset import BalancedDataset

    ds = BalancedDataset(dataset, split="train")
    item = ds[0]
    assert isinstance(item["image"], MetaTensor) and item["image"].shape == (1, 8, 8, 4) and item["image"].dtype == torch.float32
    assert isinstance(item["label"], MetaTensor) and set(torch.unique(item["label"]).tolist()) == {0, 1}
    assert item["image"].affine[0, 0] == 2.0  # the affine travels with the voxels
    assert item["class_name"] == ds.class_names[item["class"]]
    assert item["meta"]["synthetic"] == item["synthetic"] and item["meta"]["split"] == "train"


def test_filters(dataset: Path) -> None:
    from pipeline.dataset import BalancedDataset

    train = BalancedDataset(dataset, split="train")
    real = BalancedDataset(dataset, split="train", synthetic=False)
    syn = BalancedDataset(dataset, split="train", synthetic=True)
    assert len(real) + len(syn) == len(train) and len(syn) > 0
    assert all(not r["synthetic"] for r in (real[i] for i in range(len(real))))
    assert len(BalancedDataset(dataset, split="val", synthetic=True)) == 0  # val/test are real-only
    assert len(BalancedDataset(dataset, split="test", synthetic=True)) == 0
    nec = BalancedDataset(dataset, split="train", classes=["necrotic"])
    assert {nec[i]["class"] for i in range(len(nec))} == {train.class_names.index("necrotic")}
    with pytest.raises(ConfigError, match="not in this dataset"):
        BalancedDataset(dataset, classes=["cystic"])
    with pytest.raises(ConfigError, match="not one of train, val, test"):
        BalancedDataset(dataset, split="holdout")
    with pytest.raises(ConfigError, match="not a medaug dataset"):
        BalancedDataset(dataset / "images")


def test_torch_dataloader_with_monai_transforms(dataset: Path) -> None:
    from monai.transforms import Compose, RandAffined, RandGaussianNoised, ScaleIntensityd
    from torch.utils.data import DataLoader

    from pipeline.dataset import BalancedDataset

    t = Compose([
        ScaleIntensityd(keys="image"),
        RandAffined(keys=["image", "label"], prob=1.0, rotate_range=0.3, mode=("bilinear", "nearest")),
        RandGaussianNoised(keys="image", prob=1.0, std=0.1),
    ])
    t.set_random_state(0)
    ds = BalancedDataset(dataset, split="val", transform=t)
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 1, 8, 8, 4) and batch["label"].shape == (3, 1, 8, 8, 4)
    assert set(torch.unique(batch["label"]).tolist()) <= {0, 1}  # nearest keeps the mask binary
    assert batch["meta"]["synthetic"].tolist() == [False, False, False]


def test_class_balanced_sampler_known_weights(dataset: Path) -> None:
    from pipeline.dataset import BalancedDataset, class_balanced_sampler

    ds = BalancedDataset(dataset, split="train")
    counts = Counter(ds.targets)
    sampler = class_balanced_sampler(ds, num_samples=4000, generator=torch.Generator().manual_seed(0))
    assert sorted(set(sampler.weights.tolist())) == sorted({1.0 / n for n in counts.values()})
    drawn = Counter(ds.targets[i] for i in sampler)
    assert abs(drawn[0] / 4000 - 0.5) < 0.05  # each class about half of the draws
    with pytest.raises(ConfigError, match="empty"):
        class_balanced_sampler(BalancedDataset(dataset, split="test", synthetic=True))
