"""Class balancing arithmetic of the dataset writer: how many real and synthetic items each
class of the training split gets, and which ones (seeded, order-independent).

Pure functions on counts and keys; the writer (pipeline/dataset/writer.py) applies them to
manifest rows. Only the training split is balanced: validation and test stay real-only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeVar

from pipeline.dataset.config import Strategy
from pipeline.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class ClassPlan:
    """Training items of one class: `real` real items and `synthetic` synthetic items.

    `target` is the count the strategy aimed at; `total` can fall short of it when the
    synthetic cap or the synthetic items available stop the fill (`short` says by how much).
    """

    real: int
    synthetic: int
    target: int

    @property
    def total(self) -> int:
        return self.real + self.synthetic

    @property
    def short(self) -> int:
        return max(0, self.target - self.total)


def synthetic_cap(n_real: int, max_share: float) -> int | None:
    """Most synthetic items a class with `n_real` real items may get so that
    synthetic / (real + synthetic) <= `max_share`; None when unbounded (share 1).

    Exact rational arithmetic, so 0.75 of a class with 15 real items allows exactly 45:

    >>> synthetic_cap(15, 0.75), synthetic_cap(15, 0.5), synthetic_cap(0, 0.5), synthetic_cap(3, 1.0)
    (45, 15, 0, None)
    """
    if not 0.0 <= max_share <= 1.0:
        raise ConfigError(f"max_synthetic_share must be within [0, 1], got {max_share}")
    share = Fraction(str(max_share))
    if share == 1:
        return None
    return int(share * n_real / (1 - share))  # floor: never above the cap


def plan_balance(
    real_counts: Mapping[str, int],
    synthetic_available: Mapping[str, int],
    strategy: Strategy,
    fixed_count: int | None = None,
    max_synthetic_share: float = 0.75,
) -> dict[str, ClassPlan]:
    """Per-class plan for the training split.

    - "equalise": target = the largest real class; real items are all kept and synthetic
      items fill the gap.
    - "fixed": target = `fixed_count` for every class; real items above it are subsampled,
      synthetic items fill the rest.
    - "none": real items only.

    The fill is limited by the synthetic share cap and by the items available.

    >>> p = plan_balance({"round": 85, "necrotic": 15}, {"necrotic": 200}, "equalise", max_synthetic_share=0.75)
    >>> p["round"], p["necrotic"]
    (ClassPlan(real=85, synthetic=0, target=85), ClassPlan(real=15, synthetic=45, target=85))
    """
    classes = sorted(set(real_counts) | set(synthetic_available))
    match strategy:
        case "equalise":
            target_all = max((real_counts.get(c, 0) for c in classes), default=0)
        case "fixed":
            if fixed_count is None or fixed_count < 1:
                raise ConfigError("strategy 'fixed' needs fixed_count >= 1")
            target_all = fixed_count
        case "none":
            target_all = 0
        case _:
            raise ConfigError(f"unknown balancing strategy {strategy!r}; allowed: equalise, fixed, none")
    plans: dict[str, ClassPlan] = {}
    for c in classes:
        n_real = real_counts.get(c, 0)
        if strategy == "none":
            plans[c] = ClassPlan(real=n_real, synthetic=0, target=n_real)
            continue
        if strategy == "fixed":
            n_real = min(n_real, target_all)
        need = max(0, target_all - n_real)
        cap = synthetic_cap(n_real, max_synthetic_share)
        n_syn = min(need, synthetic_available.get(c, 0), need if cap is None else cap)
        plans[c] = ClassPlan(real=n_real, synthetic=n_syn, target=target_all)
    return plans


def seeded_order(keys: Sequence[str], seed: int) -> list[int]:
    """Indices of `keys` in a seeded pseudo-random order that does not depend on the input
    order (each key is ranked by sha256(seed:key)); ties cannot occur for distinct keys.

    >>> seeded_order(["a", "b", "c"], 0) == seeded_order(["a", "b", "c"], 0)
    True
    >>> [["a", "b", "c"][i] for i in seeded_order(["a", "b", "c"], 0)] == [["c", "a", "b"][i] for i in seeded_order(["c", "a", "b"], 0)]
    True
    """
    ranks = [hashlib.sha256(f"{seed}:{k}".encode()).hexdigest() for k in keys]
    return sorted(range(len(keys)), key=lambda i: (ranks[i], keys[i]))


def choose(items: Sequence[T], keys: Sequence[str], n: int, seed: int) -> list[T]:
    """`n` of `items` chosen by `seeded_order(keys, seed)`, returned in key order (stable output).

    >>> choose(["x", "y", "z"], ["k1", "k2", "k3"], 3, seed=1)
    ['x', 'y', 'z']
    """
    if len(items) != len(keys):
        raise ValueError(f"choose: {len(items)} items but {len(keys)} keys")
    picked = sorted(seeded_order(keys, seed)[: max(0, n)], key=lambda i: keys[i])
    return [items[i] for i in picked]
