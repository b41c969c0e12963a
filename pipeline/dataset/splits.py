"""Subject-level train/val/test splits of the dataset writer.

Every subject goes to exactly one split, so no subject's images appear in two splits.
Explicit "val"/"test" splits in the real manifest (e.g. ingest's held-out "test"
subjects) are honoured; the other subjects are drawn, seeded and stratified by class,
into the splits the manifest does not name. Subjects a generator was trained on are
pinned to "train" (their synthetic offspring may only train), and the writer refuses
when a pinned subject is explicitly val/test (pipeline.errors.ProvenanceError).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from pipeline.dataset.balance import seeded_order
from pipeline.dataset.config import SplitFractions
from pipeline.types import Split

log = logging.getLogger(__name__)

SPLITS: tuple[Split, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Subject:
    """One subject as the splitter sees it: its class (the most frequent class of its
    items) and the split the real manifest names for it ("" when none, or "train")."""

    subject_id: str
    klass: str
    explicit: str = ""


def subject_class(classes: Collection[str]) -> str:
    """Most frequent class of a subject's items (ties: alphabetically first).

    >>> subject_class(["necrotic", "round", "round"]), subject_class(["round", "necrotic"])
    ('round', 'necrotic')
    """
    counts = Counter(classes)
    return min(counts, key=lambda c: (-counts[c], c)) if counts else ""


def assign_splits(
    subjects: Collection[Subject],
    fractions: SplitFractions,
    seed: int,
    pinned_train: Collection[str] = (),
) -> dict[str, Split]:
    """Map each subject id to one split.

    Explicit "val"/"test" subjects keep their split. The rest are drawn per class (sorted),
    in `seeded_order` of their ids, into the splits that no subject names explicitly, with
    the fractions renormalised over those splits; a drawn split gets at least one subject
    of a class while that class keeps one for training. Subjects in `pinned_train` always
    go to "train" unless explicitly val/test (the caller checks that conflict).

    >>> s = [Subject(f"s{i}", "round") for i in range(10)] + [Subject("t0", "necrotic", "test")]
    >>> out = assign_splits(s, SplitFractions(train=0.8, val=0.2, test=0.0), seed=0)
    >>> sorted(Counter(out.values()).items())
    [('test', 1), ('train', 8), ('val', 2)]
    """
    explicit = {s.explicit for s in subjects if s.explicit in ("val", "test")}
    drawn: list[Split] = [sp for sp in ("val", "test") if sp not in explicit]  # type: ignore[misc]
    weights = {"train": fractions.train, "val": fractions.val, "test": fractions.test}
    total_w = fractions.train + sum(weights[sp] for sp in drawn)
    share = {sp: weights[sp] / total_w for sp in drawn}
    pinned = set(pinned_train)

    out: dict[str, Split] = {}
    pool: dict[str, list[str]] = defaultdict(list)
    n_class: Counter[str] = Counter()
    for s in subjects:
        if s.subject_id in out:
            raise ValueError(f"subject listed twice in the split input ({len(subjects)} subjects)")
        if s.explicit in ("val", "test"):
            out[s.subject_id] = s.explicit  # type: ignore[assignment]
            continue
        n_class[s.klass] += 1
        if s.subject_id in pinned:
            out[s.subject_id] = "train"
        else:
            pool[s.klass].append(s.subject_id)

    for klass in sorted(n_class):
        ids = sorted(pool[klass])
        order = [ids[i] for i in seeded_order(ids, seed)]
        n, taken = n_class[klass], 0
        for sp in drawn:
            k = round(share[sp] * n)
            if k == 0 and share[sp] > 0 and n - taken - 1 >= 1:
                k = 1  # keep every class present in every drawn split while train keeps one
            k = min(k, len(order) - taken, max(0, n - taken - 1))
            for sid in order[taken : taken + k]:
                out[sid] = sp
            taken += k
        for sid in order[taken:]:
            out[sid] = "train"
    log.info("splits: %s", dict(sorted(Counter(out.values()).items())))
    return out


def split_counts(assignment: Mapping[str, Split]) -> dict[str, int]:
    """Number of subjects per split, all three splits present.

    >>> split_counts({"a": "train", "b": "test"})
    {'train': 1, 'val': 0, 'test': 1}
    """
    c = Counter(assignment.values())
    return {sp: c.get(sp, 0) for sp in SPLITS}
