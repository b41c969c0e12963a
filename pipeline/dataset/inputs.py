"""Read the dataset writer's inputs: the real manifest (ingest or real-patch folder), the
synthetic folders (translate or sample-tumors output), gate reports and generator cards.

Each becomes a list of `Item`s with absolute paths, a class, and provenance. Nothing here
decides splits or balance (pipeline/dataset/splits.py, balance.py); the writer
(pipeline/dataset/writer.py) puts the pieces together.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.dataset.config import Deployment
from pipeline.errors import ConfigError, GateMismatchError, GateRejected, ProvenanceError
from pipeline.gate.signing import (
    SignatureStatus,
    check_signature,
    content_id,
    gate_key_from_env,
    status_note,
)
from pipeline.manifest import MANIFEST_NAME, manifest_sha256, read_manifest, sha256_file

log = logging.getLogger(__name__)

GATE_REPORT = "gate_report.json"
PROVENANCE_NAME = "provenance.json"  # pipeline/sample_tumors.py: {"checkpoints": {sha256: card}, ...}
_PASS = {"accept", "accepted", "pass", "passed", "ok"}
_FAIL = {"reject", "rejected", "fail", "failed"}


@dataclass(frozen=True)
class Item:
    """One image (and mask) the dataset may take.

    `subject_id` is the real subject pseudonym (for a translated volume: its source
    subject; empty for sampled patches). `explicit_split` is the split the input names.
    `sha256` is the sha256 of the input image file (selection key and id): the one its
    manifest gives, else measured here; the writer checks the bytes it copies against it,
    so the file is hashed once in the dataset stage. `own_label`: the mask is the synthetic
    folder's own (not inherited from the source volume), so a gate report must have judged it;
    `label_sha256` is then the sha256 the report recorded for it (before gating: the manifest's
    claim, or ""), and the writer checks the mask's bytes against it.
    """

    path: Path
    label_path: Path | None
    klass: str
    modality: str
    synthetic: bool
    subject_id: str
    sha256: str
    explicit_split: str = ""
    checkpoint_sha256: str = ""
    seed: str = ""
    sample_index: str = ""
    gate_report_id: str = ""
    origin: str = ""  # input folder name, for messages
    label_sha256: str = ""
    own_label: bool = False


@dataclass
class GateInfo:
    """A gate report: its id, verdict, and the synthetic files it judged, by the sha256 of their bytes.

    `judged` maps the sha256 of every synthetic item the report decided on to its decision
    ("accept" or "reject"); `judged_labels` maps it to the sha256s of the masks judged with it.
    `signature` is whether the gate key verified it
    (pipeline/gate/signing.py SignatureStatus).
    """

    folder: Path
    report_id: str
    verdict: str
    judged: dict[str, str] = field(default_factory=dict)
    judged_labels: dict[str, set[str]] = field(default_factory=dict)
    signature: SignatureStatus = "unsigned"
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted_sha256(self) -> set[str]:
        """sha256s of the items this report accepted (none when the batch verdict is a reject)."""
        if self.verdict not in _PASS:
            return set()
        return {sha for sha, decision in self.judged.items() if decision == "accept"}


@dataclass(frozen=True)
class GeneratorCard:
    """The model card of a generator: which checkpoint, which subjects it was trained on, and which
    held-out train subjects picked its checkpoint (CycleGAN best.pt; pipeline.slices.plan_monitor)."""

    path: Path
    checkpoint_sha256: str
    train_subjects: frozenset[str]
    monitor_subjects: frozenset[str] = frozenset()


def manifest_file(folder_or_file: Path, what: str) -> Path:
    """The manifest.csv of a folder (or the file itself); ConfigError naming `what` when missing."""
    path = folder_or_file / MANIFEST_NAME if folder_or_file.is_dir() else folder_or_file
    if not path.is_file():
        raise ConfigError(f"{what} {folder_or_file} has no {MANIFEST_NAME}; pass the output folder of the stage that wrote it")
    return path


def _resolve(base: Path, rel: str) -> Path:
    p = Path(rel)
    return (p if p.is_absolute() else base / p).resolve()


def _flag(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes")


def read_real(manifest: Path) -> list[Item]:
    """All rows of a real manifest (ingest folder or real-patch folder), every modality.

    Rows marked synthetic=1 are skipped with a warning: real inputs must be real.
    """
    path = manifest_file(manifest, "real manifest")
    rows = read_manifest(path)
    if rows and "path" not in rows[0]:
        raise ConfigError(f"real manifest {path} has no 'path' column")
    base = path.parent
    items: list[Item] = []
    skipped = 0
    for row in rows:
        if _flag(row.get("synthetic")):
            skipped += 1
            continue
        image = _resolve(base, row["path"])
        if not image.is_file():
            raise ConfigError(f"real manifest {path.name}: image {row['path']} does not exist")
        label = _resolve(base, row["label_path"]) if row.get("label_path") else None
        items.append(
            Item(
                path=image,
                label_path=label,
                klass=(row.get("class") or "").strip(),
                modality=(row.get("modality") or "").strip(),
                synthetic=False,
                subject_id=(row.get("subject_id") or "").strip(),
                sha256=manifest_sha256(row) or sha256_file(image),
                explicit_split=(row.get("split") or "").strip(),
                origin=base.name,
            )
        )
    if skipped:
        log.warning("real manifest: %d rows marked synthetic were skipped", skipped)
    missing_subject = sum(1 for it in items if not it.subject_id)
    if missing_subject:
        raise ConfigError(f"real manifest {path}: {missing_subject} rows have no subject_id; subject-level splits need one")
    return items


def _load_report(folder: Path) -> dict[str, Any]:
    """gate_report.json of a gate folder as a dict; ConfigError when missing or not JSON."""
    report_path = folder / GATE_REPORT
    if not report_path.is_file():
        raise ConfigError(f"gate folder {folder} has no {GATE_REPORT}; run `medaug gate` first")
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"gate report {report_path} is not readable JSON ({type(exc).__name__}); run `medaug gate` again") from None
    if not isinstance(report, dict):
        raise ConfigError(f"gate report {report_path} must hold a JSON object; run `medaug gate` again")
    return report


def _require_fields(report: Mapping[str, Any], where: Path) -> None:
    """ConfigError unless the report has what read_gate relies on: report_id and verdict (strings),
    checks (a list) and samples (a list of objects, each with a sha256 of 64 hex digits and a
    decision)."""
    missing = [k for k, kind in (("report_id", str), ("verdict", str), ("checks", list), ("samples", list))
               if not isinstance(report.get(k), kind) or (kind is str and not report[k])]
    samples = report.get("samples")
    bad = [i for i, s in enumerate(samples if isinstance(samples, list) else ())
           if not isinstance(s, dict) or not manifest_sha256(s) or not str(s.get("decision") or "").strip()]
    if missing:
        raise ConfigError(f"gate report {where} lacks {', '.join(missing)} (written by an older medaug, or not by "
                          "`medaug gate`); run `medaug gate` on the synthetic folder again")
    if bad:
        raise ConfigError(f"gate report {where}: judged item {bad[0] + 1} of {len(samples or [])} has no sha256 of its "
                          "bytes or no decision; run `medaug gate` again")


def _judged(report: Mapping[str, Any], where: Path) -> tuple[dict[str, str], dict[str, set[str]]]:
    """sha256 -> decision of every synthetic item the report judged (its `samples` list, checked by
    _require_fields), and sha256 -> the sha256s of the masks judged with it."""
    judged: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for s in report["samples"]:
        sha = manifest_sha256(s)
        decision = str(s["decision"]).strip().lower()
        # the same bytes judged twice (a file listed twice) count as accepted only if every copy was
        judged[sha] = decision if judged.get(sha, decision) == decision else "reject"
        if label := manifest_sha256(s, "label_sha256"):
            labels.setdefault(sha, set()).add(label)
    if not judged:
        raise ConfigError(
            f"gate report {where} lists no judged items by sha256 (written by an older medaug, or not by `medaug gate`); "
            "run `medaug gate` on the synthetic folder again"
        )
    return judged, labels


def read_gate(folder: Path, key: bytes | None = None) -> GateInfo:
    """A gate output folder's gate_report.json: report_id, verdict, and each judged item's sha256 and decision.

    The report is the only source of truth: an item is accepted only if the report judged its
    exact bytes (sha256) and accepted them, never by its file name. `key` is the gate's signing
    key (None: MEDAUG_GATE_KEY, pipeline/gate/signing.py). With a key, the report must carry an
    HMAC under it (GateSignatureError when unsigned, signed with another key, or edited);
    without one it is taken with a warning (its content id detects accidental edits, not
    forgery) and `signature` says so. Raises GateRejected when the verdict is a reject,
    ConfigError when the report is missing, unreadable, lacks a field it relies on (verdict,
    checks, samples with sha256 and decision), lists no judged items, or was edited after the
    gate wrote it (its report_id no longer matches its content).
    """
    report = _load_report(folder)
    where = folder / GATE_REPORT
    _require_fields(report, where)
    report_id = str(report["report_id"])
    if report_id != content_id(report):
        raise ConfigError(
            f"gate report {where} was changed after the gate wrote it (its report_id {report_id[:12]} no "
            "longer matches its content); run `medaug gate` again"
        )
    signature = check_signature(report, key if key is not None else gate_key_from_env(), str(where))
    if signature != "verified":
        log.warning("gate report %s: %s", report_id[:12], status_note(signature))
    verdict = str(report["verdict"]).strip().lower()
    if verdict in _FAIL:
        failed = report.get("failed_checks") or report.get("failed") or []
        why = f" (failed: {', '.join(map(str, failed))})" if failed else ""
        raise GateRejected(f"gate report {report_id[:12]} rejected the synthetic data{why}; fix the generator or run the gate again")
    if verdict not in _PASS:
        raise ConfigError(f"gate report {report_id}: unknown verdict {verdict!r}; expected one of {sorted(_PASS | _FAIL)}")
    judged, labels = _judged(report, where)
    info = GateInfo(folder=folder, report_id=report_id, verdict=verdict, judged=judged, judged_labels=labels, signature=signature)
    info.summary = {k: report[k] for k in ("report_id", "verdict", "failed_checks", "n_accepted", "n_rejected") if k in report}
    sig = report.get("signature")
    info.summary["signature"] = signature
    if isinstance(sig, dict) and signature == "verified":
        info.summary["key_id"] = str(sig.get("key_id"))
    # pipeline/gate/report.py CheckResult dicts; keep what the datasheet shows
    info.summary["checks"] = [
        {k: c.get(k) for k in ("name", "value", "threshold", "op", "passed")} for c in report["checks"] if isinstance(c, dict)
    ]
    return info


def read_synthetic(
    folder: Path,
    deployment: Deployment,
    real_by_sha: Mapping[str, Item],
) -> list[Item]:
    """The synthetic items of one translate or sample-tumors output folder.

    mri-ct: a translated volume inherits the class, mask and subject of its source volume
    (looked up by source_sha256 in the real manifest) where its own row leaves them empty,
    because the geometry is identical. tumor-patches: each patch row must carry its class.
    """
    path = manifest_file(folder, "synthetic folder")
    base = path.parent
    items: list[Item] = []
    for n, row in enumerate(read_manifest(path), start=2):
        where = f"synthetic folder {base.name}, {MANIFEST_NAME} line {n}"
        if "synthetic" in row and not _flag(row.get("synthetic")):
            log.warning("%s: row not marked synthetic=1, skipped", where)
            continue
        ckpt = (row.get("checkpoint_sha256") or "").strip().lower()
        if not ckpt:
            raise ProvenanceError(f"{where}: no checkpoint_sha256; synthetic data without generator provenance cannot enter a dataset")
        image = _resolve(base, row["path"])
        if not image.is_file():
            raise ConfigError(f"{where}: image {row['path']} does not exist")
        label = _resolve(base, row["label_path"]) if row.get("label_path") else None
        own_label = label is not None
        klass = (row.get("class") or "").strip()
        subject = (row.get("subject_id") or "").strip()
        match deployment:
            case "mri-ct":
                src = real_by_sha.get((row.get("source_sha256") or "").strip().lower())
                if src is not None:
                    klass = klass or src.klass
                    label = label or src.label_path
                    subject = subject or src.subject_id
            case "tumor-patches":
                pass
            case _:
                raise ConfigError(f"unknown deployment {deployment!r}; allowed: mri-ct, tumor-patches")
        items.append(
            Item(
                path=image,
                label_path=label,
                klass=klass,
                modality=(row.get("modality") or "").strip(),
                synthetic=True,
                subject_id=subject,
                sha256=manifest_sha256(row) or sha256_file(image),
                explicit_split=(row.get("split") or "").strip(),
                checkpoint_sha256=ckpt,
                seed=(row.get("seed") or "").strip(),
                sample_index=(row.get("index") or "").strip(),
                origin=base.name,
                label_sha256=manifest_sha256(row, "label_sha256") if own_label else "",
                own_label=own_label,
            )
        )
    return items


def apply_gates(items: Sequence[Item], gates: Sequence[GateInfo], folder: Path) -> tuple[list[Item], int]:
    """Items of `folder` whose exact bytes (sha256) a gate report accepted, tagged with that
    report's id; and the number the reports rejected.

    Raises GateMismatchError when some item's bytes were judged by none of the reports: the
    report is for another synthetic set, or files changed after the gate ran. With no gates
    every item passes untagged (the caller decides whether ungated data may ship).
    """
    if not gates:
        return list(items), 0
    unjudged = [it for it in items if not any(it.sha256 in g.judged for g in gates)]
    if unjudged:
        ids = ", ".join(g.report_id[:12] for g in gates)
        raise GateMismatchError(
            f"synthetic folder {folder.name}: {len(unjudged)} of {len(items)} items (first: {unjudged[0].path.name}, sha256 "
            f"{unjudged[0].sha256[:12]}) were never judged by gate report {ids}; the report is for another synthetic set or "
            "the files changed after the gate ran. Run `medaug gate` on this folder and pass that report"
        )
    kept: list[Item] = []
    for it in items:
        judges = [g for g in gates if it.sha256 in g.judged]
        # two reports that judged the same bytes must both accept them: a reject anywhere wins
        if all(it.sha256 in g.accepted_sha256 for g in judges):
            kept.append(_bind_label(replace(it, gate_report_id=judges[0].report_id), judges, folder))
    return kept, len(items) - len(kept)


def _bind_label(it: Item, judges: Sequence[GateInfo], folder: Path) -> Item:
    """`it` with label_sha256 set to the mask sha256 its reports judged with its image.

    A synthetic item's own mask must be one every report that accepted the image judged with it:
    the manifest's label_sha256 when it names such a mask (the writer then checks the bytes it
    copies against it), else the mask's bytes hashed here. Raises GateMismatchError for a mask no
    report judged (the report predates masks in it, or the mask was swapped after gating).
    """
    if it.label_path is None or not it.own_label:
        return it
    allowed = set.intersection(*(g.judged_labels.get(it.sha256, set()) for g in judges))
    label_sha = it.label_sha256 if it.label_sha256 in allowed else sha256_file(it.label_path)
    if label_sha not in allowed:
        ids = ", ".join(g.report_id[:12] for g in judges)
        raise GateMismatchError(
            f"synthetic folder {folder.name}: the mask of {it.path.name} (sha256 {label_sha[:12]}) is not the one gate report "
            f"{ids} judged with its image{'' if allowed else ' (the report lists no mask for it)'}; the mask changed after "
            "the gate ran. Run `medaug gate` on this folder again"
        )
    return replace(it, label_sha256=label_sha)


def _card_from_file(path: Path) -> tuple[dict[str, Any], str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"generator card {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"generator card {path} must hold a JSON object")
    sha = str(data.get("checkpoint_sha256") or "").strip().lower()
    if not sha:
        for suffix in (".pt", ".ckpt", ".pth"):
            ckpt = path.with_suffix(suffix)
            if ckpt.is_file():
                sha = sha256_file(ckpt)
                break
    return data, sha


def _candidate_cards(synthetic_dirs: Iterable[Path], runs_dir: Path | None) -> list[Path]:
    """Cards found without being named: beside checkpoints named in synthetic sidecar JSONs,
    and RUN_DIR/checkpoints/*.json under `runs_dir`."""
    found: list[Path] = []
    for d in synthetic_dirs:
        for sidecar in sorted(d.rglob("*.json")):
            try:
                data = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(data, dict):
                continue
            for key, value in data.items():
                if "checkpoint" in key and isinstance(value, str) and value.endswith((".pt", ".ckpt", ".pth")):
                    card = Path(value).with_suffix(".json")
                    if card.is_file() and card not in found:
                        found.append(card)
    if runs_dir is not None:
        found.extend(p for p in sorted(runs_dir.glob("*/checkpoints/*.json")) if p not in found)
        found.extend(p for p in sorted(runs_dir.glob("checkpoints/*.json")) if p not in found)
    return found


def _cards_from_provenance(synthetic_dirs: Sequence[Path], wanted: set[str]) -> dict[str, GeneratorCard]:
    """Cards of the `wanted` checkpoints that sample-tumors copied into the synthetic folders'
    provenance.json ({"checkpoints": {sha256: card}}); unreadable files are skipped."""
    found: dict[str, GeneratorCard] = {}
    for d in synthetic_dirs:
        prov = d / PROVENANCE_NAME
        if not prov.is_file():
            continue
        try:
            data = json.loads(prov.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        for sha, card in (data.get("checkpoints") or {}).items() if isinstance(data, dict) else ():
            key = str(sha).lower()
            if key in wanted and isinstance(card, dict):
                found.setdefault(key, _card(prov, card, key))
    return found


def find_cards(
    checkpoint_shas: Iterable[str],
    explicit: Sequence[Path],
    synthetic_dirs: Sequence[Path],
    runs_dir: Path | None = None,
) -> dict[str, GeneratorCard]:
    """The generator card of each checkpoint sha256.

    A card names its checkpoint by a `checkpoint_sha256` key or by the checkpoint file
    beside it (last.json beside last.pt). A card passed explicitly (`--generator-card`)
    whose checkpoint cannot be determined is taken to describe every generator. Without
    an explicit card, the synthetic folders' provenance.json (sample-tumors keeps each
    checkpoint's card there), checkpoints named in sidecar JSONs and RUN_DIR/checkpoints
    under `runs_dir` are searched.
    Raises ProvenanceError for a generator with no card or a card without train_subjects.
    """
    wanted = sorted(set(checkpoint_shas))
    cards: dict[str, GeneratorCard] = {}
    fallback: tuple[Path, dict[str, Any]] | None = None
    for path in explicit:
        if not path.is_file():
            raise ConfigError(f"generator card {path} does not exist")
        data, sha = _card_from_file(path)
        if sha:
            cards.setdefault(sha, _card(path, data, sha))
        else:
            fallback = (path, data)
    missing = [s for s in wanted if s not in cards]
    if missing and fallback is None:
        for sha, card in _cards_from_provenance(synthetic_dirs, set(missing)).items():
            cards.setdefault(sha, card)
        missing = [s for s in wanted if s not in cards]
    if missing and fallback is None:
        for path in _candidate_cards(synthetic_dirs, runs_dir):
            data, sha = _card_from_file(path)
            if sha in missing:
                cards.setdefault(sha, _card(path, data, sha))
    for sha in wanted:
        if sha in cards:
            continue
        if fallback is not None:
            cards[sha] = _card(fallback[0], fallback[1], sha)
            continue
        raise ProvenanceError(
            f"synthetic items from generator {sha[:12]} have no model card with train_subjects; "
            "pass --generator-card RUN_DIR/checkpoints/last.json (or --runs-dir)"
        )
    return {s: cards[s] for s in wanted}


def _card(path: Path, data: Mapping[str, Any], sha: str) -> GeneratorCard:
    subjects = data.get("train_subjects")
    if not isinstance(subjects, list) or not subjects:
        raise ProvenanceError(
            f"generator card {path.name} (checkpoint {sha[:12]}) lists no train_subjects; "
            "its training subjects cannot be checked against the validation and test splits"
        )
    monitor = data.get("monitor_subjects") or []
    return GeneratorCard(path=path, checkpoint_sha256=sha, train_subjects=frozenset(str(s) for s in subjects),
                         monitor_subjects=frozenset(str(s) for s in monitor))
