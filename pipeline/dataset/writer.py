"""The balanced dataset writer behind `medaug build-dataset`: real items of the target
modality plus gated synthetic items, split by subject, class-balanced in the training
split, written atomically as NIfTI with a manifest, a MONAI Decathlon datalist and a
datasheet.

Flow: `plan_dataset` reads the inputs (pipeline/dataset/inputs.py), checks generator
provenance against the splits (pipeline/dataset/splits.py) and picks items
(pipeline/dataset/balance.py); `write_dataset` writes the plan into a temporary folder
beside the target and renames it into place, so an interrupted write leaves no half
dataset. The same inputs and config give a byte-identical folder and content hash: the
images are the inputs' own .nii.gz bytes (write_nifti_gz), so each file's sha256 is the
one its input manifest gives.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
from isal import igzip

from pipeline.dataset.balance import ClassPlan, choose, plan_balance
from pipeline.dataset.config import DatasetConfig
from pipeline.dataset.datasheet import write_datasheet, write_sample_grid
from pipeline.dataset.inputs import (
    GateInfo,
    GeneratorCard,
    Item,
    apply_gates,
    find_cards,
    read_gate,
    read_real,
    read_synthetic,
)
from pipeline.dataset.splits import SPLITS, Subject, assign_splits, split_counts, subject_class
from pipeline.errors import ConfigError, DatasetExistsError, InputRejected, ProvenanceError, UngatedError
from pipeline.ingest.writer import gzip_bytes
from pipeline.manifest import MANIFEST_NAME, sha256_file, write_manifest
from pipeline.types import Split

log = logging.getLogger(__name__)

DATALIST_NAME = "dataset.json"
REPORT_NAME = "build_report.json"
MANIFEST_COLUMNS = (
    "id",
    "path",
    "label_path",
    "class",
    "class_index",
    "split",
    "synthetic",
    "source",
    "subject_id",
    "checkpoint_sha256",
    "seed",
    "sample_index",
    "gate_report_id",
    "modality",
    "sha256",
    "label_sha256",
)
"""Columns of the dataset's manifest.csv. `source` is the real subject pseudonym or the
generator checkpoint sha256; `subject_id` is the subject a real or translated item comes from."""

_DATALIST_SPLIT = {"train": "training", "val": "validation", "test": "test"}
_EXPLICIT = {"train": "train", "val": "val", "validation": "val", "test": "test", "": ""}


@dataclass(frozen=True)
class Chosen:
    """An item the dataset takes, its split and its id (prefix r/s + input sha256)."""

    item: Item
    split: Split
    id: str


@dataclass
class DatasetPlan:
    """What `write_dataset` writes: chosen items in output order, classes and the report."""

    chosen: list[Chosen]
    classes: list[str]
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildResult:
    """Where the dataset is, its content hash, counts per split and class, and whether an
    identical dataset was already in place (`unchanged`)."""

    out: Path
    content_hash: str
    counts: dict[str, dict[str, dict[str, int]]]
    manifests_copy: Path
    unchanged: bool = False
    ungated: int = 0
    """Synthetic items in the dataset that no gate judged (built with allow_ungated)."""
    unverified_gates: tuple[str, ...] = ()
    """Ids of the gate reports no key verified (no MEDAUG_GATE_KEY): bound to their content only."""


def _explicit_split(item: Item) -> str:
    value = item.explicit_split.strip().lower()
    if value not in _EXPLICIT:
        raise ConfigError(f"{item.origin}: unknown split {item.explicit_split!r}; allowed: train, val, test or empty")
    return _EXPLICIT[value]


def _explicit_by_subject(items: Sequence[Item]) -> dict[str, str]:
    """The split the real manifest names per subject (test beats val beats train)."""
    rank = {"": 0, "train": 1, "val": 2, "test": 3}
    out: dict[str, str] = {}
    for it in items:
        sp = _explicit_split(it)
        if rank[sp] > rank[out.get(it.subject_id, "")]:
            out[it.subject_id] = sp
    return out


def _check_provenance(cards: dict[str, GeneratorCard], split_of: dict[str, str]) -> None:
    """Refuse a generator trained on any validation or test subject (names only the count and the split)."""
    for sha, card in sorted(cards.items()):
        for sp in ("test", "val"):
            n = sum(1 for s in card.train_subjects if split_of.get(s) == sp)
            if n:
                name = "validation" if sp == "val" else "test"
                raise ProvenanceError(
                    f"generator {sha[:12]} was trained on {n} subject(s) of the {name} split; its synthetic data "
                    f"would leak {name} anatomy into training. Retrain it on training subjects only, or leave its folder out"
                )


@dataclass
class _Inputs:
    """What `plan_dataset` read: real items (all modalities, and of the target modality), the
    gated synthetic items, the gate reports, and counts of items left out with the reason."""

    real_all: list[Item]
    real_target: list[Item]
    synth: list[Item]
    gate_infos: list[GateInfo]
    excluded: Counter[str] = field(default_factory=Counter)
    ungated: int = 0


def _read_inputs(real: Path, synthetic: Sequence[Path], cfg: DatasetConfig, gates: Sequence[Path],
                 allow_ungated: bool, gate_key: bytes | None = None) -> _Inputs:
    """Read the real manifest and the synthetic folders; keep the target modality and, for
    synthetic items, only the bytes a gate report accepted.

    Raises UngatedError for synthetic items without a gate unless `allow_ungated`,
    GateMismatchError for items no report judged (pipeline/dataset/inputs.py `apply_gates`),
    GateSignatureError for a report `gate_key` does not verify (`read_gate`).
    """
    target = cfg.target_modality

    def is_target(it: Item) -> bool:
        return not it.modality or it.modality.upper() == target

    # real items: every modality for explicit splits and source lookup, the target modality for the dataset
    real_all = read_real(real)
    real_target = [it for it in real_all if is_target(it)]
    if not real_target:
        raise ConfigError(f"real manifest has no {target} items; check target_modality (found {sorted({i.modality for i in real_all})})")
    got = _Inputs(real_all, real_target, [], [read_gate(g, gate_key) for g in gates])
    real_by_sha = {it.sha256: it for it in real_all}
    for folder in synthetic:
        items = read_synthetic(folder, cfg.deployment, real_by_sha)
        in_target = [it for it in items if is_target(it)]
        got.excluded["synthetic, other modality"] += len(items) - len(in_target)
        kept, n_out = apply_gates(in_target, got.gate_infos, folder.resolve())
        got.excluded["synthetic, not accepted by the gate"] += n_out
        got.synth.extend(kept)
    if got.synth and not got.gate_infos:
        if not allow_ungated:
            raise UngatedError(
                f"{len(got.synth)} synthetic items and no gate report: synthetic data enters a dataset only after the "
                "quality gate accepted its bytes. Run `medaug gate` and pass --gate GATE_DIR, or pass --allow-ungated "
                "to ship them unfiltered (the datasheet will say so)"
            )
        got.ungated = len(got.synth)
        log.warning("%d synthetic items enter the dataset UNGATED (--allow-ungated): no quality gate judged them", got.ungated)
    return got


def _keep_classes(got: _Inputs, cfg: DatasetConfig) -> list[str]:
    """The dataset's classes (config, else the real items'); drops items of other classes from `got`."""
    classes = list(cfg.classes) if cfg.classes else sorted({it.klass for it in got.real_target if it.klass})
    if not classes:
        raise ConfigError("no real item has a class; the dataset balances over classes (class column of the real manifest)")
    known = set(classes)
    n_real, n_synth = len(got.real_target), len(got.synth)
    got.real_target = [it for it in got.real_target if it.klass in known]
    got.synth = [it for it in got.synth if it.klass in known]
    got.excluded["real, no class or class not in config"] += n_real - len(got.real_target)
    got.excluded["synthetic, no class or class not in config"] += n_synth - len(got.synth)
    return classes


def _split_subjects(got: _Inputs, cfg: DatasetConfig, cards: dict[str, GeneratorCard]) -> tuple[dict[str, Split], list[str]]:
    """Assign real subjects to splits (explicit val/test honoured; subjects that trained a
    generator or picked its checkpoint pinned to train), check provenance, and drop synthetic
    items made from a validation/test subject's volume. Returns the assignment and notes."""
    explicit = _explicit_by_subject(got.real_all)
    _check_provenance(cards, explicit)
    by_subject: dict[str, list[str]] = defaultdict(list)
    for it in got.real_target:
        by_subject[it.subject_id].append(it.klass)
    subjects = [Subject(sid, subject_class(ks), explicit.get(sid, "")) for sid, ks in sorted(by_subject.items())]
    pinned = set().union(*(c.train_subjects | c.monitor_subjects for c in cards.values())) & set(by_subject)
    assignment = assign_splits(subjects, cfg.fractions, cfg.seed, pinned_train=pinned)
    split_of: dict[str, str] = {**explicit, **assignment}
    _check_provenance(cards, split_of)
    notes: list[str] = []
    if cfg.fractions.val > 0 and "val" not in assignment.values():
        notes.append(
            f"the validation split is empty: {len(pinned)} of {len(subjects)} subjects trained a generator (or picked its "
            "checkpoint) and must stay in training; train generators on fewer subjects to keep some for validation"
        )
        log.warning(notes[-1])
    # synthetic items made from a validation/test subject's volume would leak it
    n_before = len(got.synth)
    got.synth = [
        it
        for it in got.synth
        if split_of.get(it.subject_id, "") not in ("val", "test") and _explicit_split(it) not in ("val", "test")
    ]
    got.excluded["synthetic, source subject outside the training split"] += n_before - len(got.synth)
    return assignment, notes


def _choose_items(got: _Inputs, classes: list[str], cfg: DatasetConfig, assignment: dict[str, Split]) -> tuple[list[Chosen], dict[str, ClassPlan]]:
    """Balance the training split and pick its items (seeded); val/test take all their real items."""
    real_by_split: dict[str, list[Item]] = {sp: [] for sp in SPLITS}
    for it in got.real_target:
        real_by_split[assignment[it.subject_id]].append(it)
    train_real: dict[str, list[Item]] = defaultdict(list)
    for it in real_by_split["train"]:
        train_real[it.klass].append(it)
    synth_by_class: dict[str, list[Item]] = defaultdict(list)
    for it in got.synth:
        synth_by_class[it.klass].append(it)
    plans = plan_balance(
        {c: len(train_real[c]) for c in classes},
        {c: len(synth_by_class[c]) for c in classes},
        cfg.strategy,
        cfg.fixed_count,
        cfg.max_synthetic_share,
    )

    chosen: list[Chosen] = []
    used_ids: set[str] = set()

    def add(it: Item, sp: Split) -> None:
        base = ("s" if it.synthetic else "r") + it.sha256[:16]
        cid, k = base, 1
        while cid in used_ids:  # the same file listed twice keeps one id per row
            k += 1
            cid = f"{base}-{k}"
        used_ids.add(cid)
        chosen.append(Chosen(item=it, split=sp, id=cid))

    for c in classes:
        plan = plans[c]
        for it in choose(train_real[c], [i.sha256 + i.path.name for i in train_real[c]], plan.real, cfg.seed):
            add(it, "train")
        pool = synth_by_class[c]
        for it in choose(pool, [i.sha256 + i.path.name for i in pool], plan.synthetic, cfg.seed):
            add(it, "train")
        if plan.short:
            log.warning("class %s: %d training items short of the target %d (synthetic cap or supply)", c, plan.short, plan.target)
    for sp in ("val", "test"):
        for it in sorted(real_by_split[sp], key=lambda i: (classes.index(i.klass), i.sha256, i.path.name)):
            add(it, sp)  # type: ignore[arg-type]
    order = {sp: i for i, sp in enumerate(SPLITS)}
    chosen.sort(key=lambda ch: (order[ch.split], classes.index(ch.item.klass), ch.item.synthetic, ch.id))
    return chosen, plans


def plan_dataset(
    real: Path,
    synthetic: Sequence[Path],
    cfg: DatasetConfig,
    gates: Sequence[Path] = (),
    generator_cards: Sequence[Path] = (),
    runs_dir: Path | None = None,
    allow_ungated: bool = False,
    gate_key: bytes | None = None,
) -> DatasetPlan:
    """Read inputs, split subjects, check provenance, balance the training split.

    A synthetic item enters only if a gate report accepted its exact bytes (sha256); with no
    gate, synthetic items are refused unless `allow_ungated` (then the report says so).
    Raises GateRejected (a gate said reject), GateMismatchError (a report for other bytes),
    UngatedError (synthetic items, no gate, not allowed), ProvenanceError (a generator without
    a card, or trained on a validation/test subject), ConfigError (bad inputs),
    GateSignatureError (a gate report `gate_key` does not verify; None: MEDAUG_GATE_KEY).
    """
    got = _read_inputs(real, synthetic, cfg, gates, allow_ungated, gate_key)
    classes = _keep_classes(got, cfg)
    cards = find_cards({it.checkpoint_sha256 for it in got.synth}, generator_cards, synthetic, runs_dir)
    assignment, notes = _split_subjects(got, cfg, cards)
    chosen, plans = _choose_items(got, classes, cfg, assignment)
    report = _report(chosen, classes, cfg, plans, assignment, got.excluded, got.gate_infos, cards)
    report["notes"] = notes
    report["ungated_synthetic"] = sum(1 for ch in chosen if ch.item.synthetic) if got.ungated else 0
    return DatasetPlan(chosen=chosen, classes=classes, report=report)


def _report(
    chosen: Sequence[Chosen],
    classes: Sequence[str],
    cfg: DatasetConfig,
    plans: dict[str, ClassPlan],
    assignment: dict[str, Split],
    excluded: Counter[str],
    gate_infos: Sequence[Any],
    cards: dict[str, GeneratorCard],
) -> dict[str, Any]:
    counts: dict[str, dict[str, dict[str, int]]] = {
        sp: {c: {"real": 0, "synthetic": 0} for c in classes} for sp in SPLITS
    }
    for ch in chosen:
        counts[ch.split][ch.item.klass]["synthetic" if ch.item.synthetic else "real"] += 1
    gate_of_generator: dict[str, set[str]] = defaultdict(set)
    for ch in chosen:
        if ch.item.synthetic and ch.item.gate_report_id:
            gate_of_generator[ch.item.checkpoint_sha256].add(ch.item.gate_report_id)
    return {
        "deployment": cfg.deployment,
        "target_modality": cfg.target_modality,
        "strategy": cfg.strategy,
        "classes": list(classes),
        "counts": counts,
        "subjects": split_counts(assignment),
        "balance": {c: {"target": p.target, "real": p.real, "synthetic": p.synthetic, "short": p.short} for c, p in plans.items()},
        "excluded": {k: v for k, v in sorted(excluded.items()) if v},
        "gates": [dict(g.summary) for g in gate_infos],
        "generators": [
            {
                "checkpoint_sha256": sha,
                "card": card.path.name,
                "n_train_subjects": len(card.train_subjects),
                "gate_report_ids": sorted(gate_of_generator.get(sha, set())),
            }
            for sha, card in sorted(cards.items())
        ],
    }


CANONICAL_GZIP_HEAD = b"\x1f\x8b\x08\x00\x00\x00\x00\x00"
"""gzip magic, deflate, no flags (so no file name or comment in the header), mtime 0: the
header pipeline.ingest.writer and nibabel write. A member that starts so is copied as it is."""


def _check_nifti_header(head: bytes, name: str) -> None:
    """Raise InputRejected unless `head` (the first bytes of the decompressed file) is a NIfTI-1/2 header."""
    try:
        klass = nib.Nifti1Header if int.from_bytes(head[:4], "little") in (348, 348 << 24) else nib.Nifti2Header
        klass.from_fileobj(io.BytesIO(head))
    except Exception as exc:  # nibabel raises several types for a bad header
        raise InputRejected(f"{name} is not a readable NIfTI file ({type(exc).__name__}); the dataset holds NIfTI only") from None


def write_nifti_gz(src: Path, dst: Path, sha256: str = "", since: str = "its manifest was written") -> str:
    """Write NIfTI `src` (.nii or .nii.gz) to `dst` (.nii.gz), voxels and header unchanged;
    returns the sha256 of the bytes written.

    A .nii.gz with a reproducible header (CANONICAL_GZIP_HEAD: ingest's, translate's and
    sample-tumors' files) is copied byte for byte: recompressing it would cost CPU time and
    undo ingest's measured deflate choice for no gain. Anything else (plain .nii, a gzip
    header with a name or a time) is recompressed with ingest's deflate
    (pipeline.ingest.writer.gzip_bytes: mtime 0, no name, GZIP_LEVEL), so the output is
    reproducible either way. The file is read and hashed once: `sha256`, the input
    manifest's hash of `src` when it has one, is checked against the bytes read (a file
    changed since its manifest was written is refused); without it the whole gzip stream
    is inflated once to check its CRC; `since` says what the hash is from (for the message).
    Raises InputRejected for a file that is not NIfTI,
    a broken gzip stream or a hash that does not match.
    """
    raw = src.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 and digest != sha256:
        raise InputRejected(f"{src.name} changed since {since} (sha256 {digest[:12]}, expected {sha256[:12]}); run the "
                            "stage that wrote it again")
    gzipped = raw[:2] == b"\x1f\x8b"
    if gzipped and raw[:8] == CANONICAL_GZIP_HEAD:
        try:
            # the header is in the first 540 bytes (NIfTI-2); a hash-checked stream needs no more
            head = zlib.decompressobj(wbits=31).decompress(raw, 540) if sha256 else igzip.decompress(raw)[:540]
        except (OSError, EOFError, zlib.error) as exc:
            raise InputRejected(f"{src.name} is not a readable gzip stream ({type(exc).__name__}: {exc})") from None
        _check_nifti_header(head, src.name)
        dst.write_bytes(raw)
        return digest
    try:
        data = igzip.decompress(raw) if gzipped else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise InputRejected(f"{src.name} is not a readable gzip stream ({type(exc).__name__}: {exc})") from None
    _check_nifti_header(data[:540], src.name)
    out = gzip_bytes(data)
    dst.write_bytes(out)
    return hashlib.sha256(out).hexdigest()


def content_hash(files: Sequence[tuple[str, str]], cfg: DatasetConfig) -> str:
    """sha256 over the sorted (relative path, sha256) list of the dataset's files and the
    config (without manifests_dir, which says where copies go, not what the dataset is)."""
    payload = {
        "files": sorted([list(f) for f in files]),
        "config": cfg.model_dump(mode="json", exclude={"manifests_dir"}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _datalist(rows: Sequence[dict[str, Any]], classes: Sequence[str], cfg: DatasetConfig, digest: str) -> dict[str, Any]:
    lists: dict[str, list[dict[str, Any]]] = {name: [] for name in _DATALIST_SPLIT.values()}
    for r in rows:
        entry: dict[str, Any] = {"image": f"./{r['path']}"}
        if r["label_path"]:
            entry["label"] = f"./{r['label_path']}"
        entry.update({"class": r["class"], "class_index": r["class_index"], "synthetic": bool(r["synthetic"]), "id": r["id"]})
        lists[_DATALIST_SPLIT[r["split"]]].append(entry)
    return {
        "name": f"medaug-{cfg.deployment}-{cfg.target_modality}",
        "description": "Class-balanced dataset written by medaug build-dataset: real items plus gated synthetic items in training only.",
        "tensorImageSize": "3D",
        "modality": {"0": cfg.target_modality},
        "labels": {"0": "background", "1": "tumor"},
        "classes": list(classes),
        "content_hash": digest,
        "numTraining": len(lists["training"]),
        "numValidation": len(lists["validation"]),
        "numTest": len(lists["test"]),
        **lists,
    }


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Remove temporary folders of writers of `out` that were killed (their pid is gone)."""
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if stale.is_dir() and not _pid_alive(pid):
            log.info("removing %s left by an interrupted write", stale.name)
            shutil.rmtree(stale, ignore_errors=True)


def _existing_hash(out: Path) -> str | None:
    try:
        return str(json.loads((out / DATALIST_NAME).read_text(encoding="utf-8")).get("content_hash"))
    except (OSError, json.JSONDecodeError):
        return None


def _copy_manifests(tmp: Path, manifests_dir: Path, digest: str) -> Path:
    """Put manifest.csv and dataset.json under manifests_dir/<digest>/ (atomic rename)."""
    target = manifests_dir / digest
    if (target / DATALIST_NAME).is_file() and (target / MANIFEST_NAME).is_file():
        return target
    manifests_dir.mkdir(parents=True, exist_ok=True)
    part = manifests_dir / f".{digest}.partial-{os.getpid()}"
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    for name in (MANIFEST_NAME, DATALIST_NAME):
        shutil.copyfile(tmp / name, part / name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(part, target)
    return target


def write_dataset(plan: DatasetPlan, out: Path, cfg: DatasetConfig, overwrite: bool = False) -> BuildResult:
    """Write `plan` to `out` atomically: everything goes to `.<name>.partial-<pid>` beside
    it, which is renamed to `out` only when complete. An identical dataset already at `out`
    is left as it is; a different one needs `overwrite`."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "labels").mkdir()
    try:
        # files
        rows: list[dict[str, Any]] = []
        files: list[tuple[str, str]] = []
        for ch in plan.chosen:
            it = ch.item
            rel = f"images/{ch.id}.nii.gz"
            sha = write_nifti_gz(it.path, tmp / rel, it.sha256)
            files.append((rel, sha))
            rel_label, label_sha = "", ""
            if it.label_path is not None:
                rel_label = f"labels/{ch.id}.nii.gz"
                # a synthetic mask is shipped only as the gate judged it (Item.label_sha256)
                label_sha = write_nifti_gz(it.label_path, tmp / rel_label, it.label_sha256,
                                           since="the gate judged it with its image" if it.synthetic else "its manifest was written")
                files.append((rel_label, label_sha))
            rows.append(
                {
                    "id": ch.id,
                    "path": rel,
                    "label_path": rel_label,
                    "class": it.klass,
                    "class_index": plan.classes.index(it.klass),
                    "split": ch.split,
                    "synthetic": int(it.synthetic),
                    "source": it.checkpoint_sha256 if it.synthetic else it.subject_id,
                    "subject_id": it.subject_id,
                    "checkpoint_sha256": it.checkpoint_sha256,
                    "seed": it.seed,
                    "sample_index": it.sample_index,
                    "gate_report_id": it.gate_report_id,
                    "modality": it.modality or cfg.target_modality,
                    "sha256": sha,
                    "label_sha256": label_sha,
                }
            )
        write_manifest(tmp, rows, MANIFEST_COLUMNS)
        grid = write_sample_grid(tmp, rows, plan.classes, cfg.grid_per_class)
        files.append((MANIFEST_NAME, sha256_file(tmp / MANIFEST_NAME)))
        if grid is not None:
            files.append((grid.name, sha256_file(grid)))
        digest = content_hash(files, cfg)

        # datalist, report, datasheet
        report = {"content_hash": digest, **plan.report}
        (tmp / DATALIST_NAME).write_text(_json_text(_datalist(rows, plan.classes, cfg, digest)), encoding="utf-8")
        (tmp / REPORT_NAME).write_text(_json_text(report), encoding="utf-8")
        write_datasheet(tmp, report, cfg.model_dump(mode="json", exclude={"manifests_dir"}), grid is not None)
        copy = _copy_manifests(tmp, cfg.manifests_dir, digest)

        # into place
        if out.exists():
            if _existing_hash(out) == digest:
                log.info("dataset at %s is already this one (content hash %s)", out.name, digest[:12])
                shutil.rmtree(tmp)
                return BuildResult(out=out, content_hash=digest, counts=report["counts"], manifests_copy=copy, unchanged=True)
            if not overwrite:
                raise DatasetExistsError(
                    f"{out} already holds a different dataset (content hash {(_existing_hash(out) or 'none')[:12]}); "
                    "pass --overwrite to replace it or choose another --out"
                )
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("dataset written to %s (content hash %s, %d items)", out.name, digest[:12], len(rows))
    return BuildResult(out=out, content_hash=digest, counts=report["counts"], manifests_copy=copy)


def build_dataset(
    real: Path,
    synthetic: Sequence[Path],
    out: Path,
    cfg: DatasetConfig,
    gates: Sequence[Path] = (),
    generator_cards: Sequence[Path] = (),
    runs_dir: Path | None = None,
    overwrite: bool = False,
    allow_ungated: bool = False,
    gate_key: bytes | None = None,
) -> BuildResult:
    """Plan and write a balanced dataset (`medaug build-dataset`); see `plan_dataset` and `write_dataset`."""
    plan = plan_dataset(real, synthetic, cfg, gates, generator_cards, runs_dir, allow_ungated, gate_key)
    result = write_dataset(plan, out, cfg, overwrite=overwrite)
    unverified = tuple(str(g.get("report_id")) for g in plan.report["gates"] if g.get("signature") != "verified")
    return replace(result, ungated=int(plan.report.get("ungated_synthetic", 0)), unverified_gates=unverified)
