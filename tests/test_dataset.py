"""Tests of the balanced dataset writer (pipeline/dataset): balancing arithmetic, subject-level
splits, provenance and gate refusals, the MONAI datalist, byte-identical rebuilds and the
atomic write under SIGKILL.

Inputs are tiny NIfTI folders in the formats of the real-patch folder (pipeline/patches.py),
sample-tumors, translate and the gate, written by `make_tumor_inputs` / `make_mri_ct_inputs`
(also used by tests/test_dataset_loader.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.dataset.balance import choose, plan_balance, seeded_order, synthetic_cap
from pipeline.dataset.config import DatasetConfig, SplitFractions
from pipeline.dataset.inputs import content_id
from pipeline.dataset.splits import Subject, assign_splits
from pipeline.dataset.writer import build_dataset, plan_dataset
from pipeline.errors import ConfigError, DatasetExistsError, GateRejected, ProvenanceError
from pipeline.gate.signing import gate_key_from_env, sign
from pipeline.manifest import read_manifest, sha256_file, write_manifest

REPO = Path(__file__).resolve().parents[1]
SHAPE = (8, 8, 4)


# --- input builders ----------------------------------------------------------------------


def _write_volume(path: Path, rng: np.random.Generator, label: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if label:
        arr = np.zeros(SHAPE, dtype=np.uint8)
        arr[2:5, 2:5, 1:3] = 1
    else:
        arr = rng.normal(40.0, 20.0, SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))


def make_tumor_inputs(
    root: Path,
    n_round: int = 12,
    n_necrotic: int = 4,
    n_test: int = 4,
    synth: tuple[int, int] = (4, 30),
    card_subjects: str = "train",
    gate_verdict: str | None = "accept",
    gate_drop: int = 3,
) -> dict[str, Path]:
    """Real patch folder (one patch per subject; `n_test` subjects explicit "test", half of
    each class), a synthetic patch folder (synth = (round, necrotic) patches), a run folder
    with last.pt + last.json (train_subjects: "train" = most non-test subjects, "test" adds
    one test subject), and a gate folder accepting all but the first `gate_drop` synthetic items."""
    rng = np.random.default_rng(0)
    real = root / "real"
    subjects = [("round", i) for i in range(n_round)] + [("necrotic", i) for i in range(n_necrotic)]
    test_ids = {f"subj{k:02d}" for k in [*range(n_test // 2), *range(n_round, n_round + n_test - n_test // 2)]}
    rows: list[dict[str, Any]] = []
    for k, (klass, _) in enumerate(subjects):
        sid = f"subj{k:02d}"
        name = f"{sid}_CT_0"
        _write_volume(real / "patches" / f"{name}.nii.gz", rng)
        _write_volume(real / "masks" / f"{name}.nii.gz", rng, label=True)
        rows.append({
            "path": f"patches/{name}.nii.gz", "label_path": f"masks/{name}.nii.gz", "class": klass,
            "subject_id": sid, "split": "test" if sid in test_ids else "train", "modality": "CT", "synthetic": 0,
        })
    write_manifest(real, rows, ("path", "label_path", "class", "subject_id", "split", "modality", "synthetic"))

    run = root / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"not really a checkpoint")
    ckpt_sha = sha256_file(run / "last.pt")
    # the generator saw the non-test subjects except the last two round and the last necrotic one,
    # which stay free for the validation split (a generator's subjects are pinned to train)
    held = {f"subj{n_round - 2:02d}", f"subj{n_round - 1:02d}", f"subj{n_round + n_necrotic - 1:02d}"}
    train_ids = sorted({r["subject_id"] for r in rows} - test_ids - held)
    card_ids = train_ids + (sorted(test_ids)[:1] if card_subjects == "test" else [])
    (run / "last.json").write_text(json.dumps({"modality": "CT", "train_subjects": card_ids}), encoding="utf-8")

    syn = root / "synthetic"
    srows: list[dict[str, Any]] = []
    index = 0
    for klass, n in (("round", synth[0]), ("necrotic", synth[1])):
        for _ in range(n):
            name = f"sample_{index:04d}"
            _write_volume(syn / "patches" / f"{name}.nii.gz", rng)
            _write_volume(syn / "masks" / f"{name}.nii.gz", rng, label=True)
            srows.append({
                "path": f"patches/{name}.nii.gz", "label_path": f"masks/{name}.nii.gz", "class": klass,
                "modality": "CT", "synthetic": 1, "checkpoint_sha256": ckpt_sha, "seed": 7, "index": index,
            })
            index += 1
    write_manifest(syn, srows, ("path", "label_path", "class", "modality", "synthetic", "checkpoint_sha256", "seed", "index"))

    out = {"real": real, "synthetic": syn, "card": run / "last.json", "runs": root / "run"}
    if gate_verdict is not None:
        gate = root / "gate"
        gate.mkdir()
        out["gate"] = write_gate_report(gate, syn, srows, gate_verdict, gate_drop)
    return out


def write_gate_report(gate: Path, syn: Path, srows: list[dict[str, Any]], verdict: str, drop: int) -> Path:
    """A gate folder in `medaug gate`'s format: gate_report.json judging every synthetic item by
    the sha256 of its bytes and of its mask's (the first `drop` rejected), with a report_id that matches its content,
    signed with MEDAUG_GATE_KEY when it is set."""
    gate.mkdir(parents=True, exist_ok=True)
    samples = [{"path": r["path"], "sha256": sha256_file(syn / r["path"]), "decision": "reject" if k < drop else "accept",
                "label_sha256": sha256_file(syn / r["label_path"]) if r.get("label_path") else ""}
               for k, r in enumerate(srows)]
    report: dict[str, Any] = {"verdict": verdict, "failed_checks": ["fid"] if verdict == "reject" else [], "samples": samples,
                              "checks": [{"name": "fid", "value": 1.0, "threshold": 2.0, "op": "<=", "passed": verdict != "reject"}]}
    report["report_id"] = content_id(report)
    key = gate_key_from_env()  # signed as `medaug gate` signs, when a test sets MEDAUG_GATE_KEY
    report["signature"] = sign(report, key) if key else None
    (gate / "gate_report.json").write_text(json.dumps(report), encoding="utf-8")
    return gate


def gate_id(inputs: dict[str, Path]) -> str:
    """The report id of the inputs' gate report."""
    return str(json.loads((inputs["gate"] / "gate_report.json").read_text(encoding="utf-8"))["report_id"])


def make_mri_ct_inputs(root: Path) -> dict[str, Path]:
    """An ingest-style folder (CT and MR volumes; MR of train subjects and of one test
    subject) and a translate-style folder of MR->CT volumes with empty class/label, which
    must inherit them from the source volume (source_sha256)."""
    rng = np.random.default_rng(1)
    ing = root / "ingest"
    rows: list[dict[str, Any]] = []
    plan = [(f"p{k:02d}", "round" if k < 8 else "necrotic", "test" if k in (0, 8) else "train") for k in range(10)]
    for sid, klass, split in plan:
        for mod in ("CT", "MR") if split == "test" or sid in ("p05", "p09") else ("CT",):
            name = f"{sid}_{mod}_0"
            _write_volume(ing / "volumes" / f"{name}.nii.gz", rng)
            _write_volume(ing / "labels" / f"{name}.nii.gz", rng, label=True)
            rows.append({"path": f"volumes/{name}.nii.gz", "label_path": f"labels/{name}.nii.gz", "subject_id": sid,
                         "modality": mod, "class": klass, "split": split, "source_kind": "nifti",
                         "sha256": sha256_file(ing / "volumes" / f"{name}.nii.gz")})
    write_manifest(ing, rows, ("path", "label_path", "subject_id", "modality", "sha256", "class", "split", "source_kind"))
    run = root / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"cyclegan")
    (run / "last.json").write_text(json.dumps({"direction": "mri2ct", "train_subjects": [s for s, _, sp in plan if sp == "train"]}))
    ckpt = sha256_file(run / "last.pt")
    tr = root / "translated"
    trows: list[dict[str, Any]] = []
    for r in rows:
        if r["modality"] != "MR":
            continue
        name = f"syn_{r['sha256'][:16]}_CT"
        _write_volume(tr / "volumes" / f"{name}.nii.gz", rng)
        trows.append({"path": f"volumes/{name}.nii.gz", "label_path": "", "subject_id": "", "modality": "CT", "class": "",
                      "split": "", "synthetic": 1, "source_sha256": r["sha256"], "checkpoint_sha256": ckpt,
                      "direction": "mri2ct", "seed": 3})
    write_manifest(tr, trows, ("path", "label_path", "subject_id", "modality", "class", "split", "synthetic",
                               "source_sha256", "checkpoint_sha256", "direction", "seed"))
    return {"real": ing, "synthetic": tr, "card": run / "last.json"}


def tumor_config(tmp: Path, **kw: Any) -> DatasetConfig:
    base: dict[str, Any] = {"fractions": {"train": 0.8, "val": 0.2, "test": 0.0}, "manifests_dir": tmp / "data_manifests", "grid_per_class": 2}
    return DatasetConfig.model_validate(base | kw)


def build_tumor_dataset(tmp: Path, out_name: str = "ds", **kw: Any) -> tuple[Path, dict[str, Path]]:
    """A finished tumor-patch dataset under tmp/out_name (used by the loader tests)."""
    inputs = make_tumor_inputs(tmp / "inputs")
    out = tmp / out_name
    build_dataset(inputs["real"], [inputs["synthetic"]], out, tumor_config(tmp, **kw), gates=[inputs["gate"]], generator_cards=[inputs["card"]])
    return out, inputs


# --- balancing arithmetic ------------------------------------------------------------------


def test_balance_equalise_known_answer() -> None:
    p = plan_balance({"round": 85, "necrotic": 15}, {"round": 10, "necrotic": 200}, "equalise", max_synthetic_share=0.9)
    assert (p["round"].real, p["round"].synthetic) == (85, 0)
    assert (p["necrotic"].real, p["necrotic"].synthetic, p["necrotic"].short) == (15, 70, 0)


def test_balance_cap_limits_fill() -> None:
    p = plan_balance({"round": 85, "necrotic": 15}, {"necrotic": 200}, "equalise", max_synthetic_share=0.75)
    assert (p["necrotic"].synthetic, p["necrotic"].short) == (45, 25)  # 45 / 60 = 0.75 exactly
    assert plan_balance({"a": 10, "b": 2}, {"b": 9}, "equalise", max_synthetic_share=0.0)["b"].synthetic == 0
    assert plan_balance({"a": 10, "b": 2}, {"b": 5}, "equalise", max_synthetic_share=1.0)["b"].synthetic == 5  # supply-bound
    assert [synthetic_cap(10, s) for s in (0.1, 0.2, 0.5)] == [1, 2, 10]


def test_balance_fixed_count_subsamples_real_and_fills() -> None:
    p = plan_balance({"round": 85, "necrotic": 15}, {"necrotic": 200}, "fixed", fixed_count=50, max_synthetic_share=0.75)
    assert (p["round"].real, p["round"].synthetic, p["round"].target) == (50, 0, 50)
    assert (p["necrotic"].real, p["necrotic"].synthetic) == (15, 35)
    assert plan_balance({"a": 3}, {}, "none")["a"] == plan_balance({"a": 3}, {"a": 9}, "none")["a"]


def test_balance_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="fixed_count"):
        plan_balance({"a": 1}, {}, "fixed")
    with pytest.raises(ConfigError, match="allowed: equalise, fixed, none"):
        plan_balance({"a": 1}, {}, "smote")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fixed_count"):
        DatasetConfig(strategy="fixed")
    with pytest.raises(ValueError, match="sum to 1"):
        SplitFractions(train=0.5, val=0.1, test=0.1)


def test_seeded_choice_is_order_independent_and_seed_dependent() -> None:
    keys = [f"k{i}" for i in range(50)]
    a = choose(keys, keys, 10, seed=0)
    assert a == choose(keys[::-1], keys[::-1], 10, seed=0)
    assert a != choose(keys, keys, 10, seed=1)
    assert sorted(seeded_order(keys, 3)) == list(range(50))


# --- subject-level splits ------------------------------------------------------------------


def test_splits_honour_explicit_test_and_stratify() -> None:
    subjects = [Subject(f"r{i}", "round") for i in range(20)] + [Subject(f"n{i}", "necrotic") for i in range(5)]
    subjects += [Subject("t1", "round", "test"), Subject("t2", "necrotic", "test")]
    out = assign_splits(subjects, SplitFractions(train=0.7, val=0.15, test=0.15), seed=0)
    assert {k for k, v in out.items() if v == "test"} == {"t1", "t2"}  # explicit test: no test drawn
    val = [k for k, v in out.items() if v == "val"]
    assert any(k.startswith("n") for k in val) and any(k.startswith("r") for k in val)  # stratified
    assert out == assign_splits(list(reversed(subjects)), SplitFractions(train=0.7, val=0.15, test=0.15), seed=0)


@settings(max_examples=40, deadline=None)
@given(
    classes=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=30),
    explicit=st.lists(st.sampled_from(["", "", "train", "val", "test"]), min_size=30, max_size=30),
    pinned=st.sets(st.integers(0, 29), max_size=10),
    seed=st.integers(0, 5),
)
def test_split_invariants(classes: list[str], explicit: list[str], pinned: set[int], seed: int) -> None:
    subjects = [Subject(f"s{i}", c, explicit[i]) for i, c in enumerate(classes)]
    pin = {f"s{i}" for i in pinned}
    out = assign_splits(subjects, SplitFractions(), seed, pinned_train=pin)
    assert set(out) == {s.subject_id for s in subjects}  # every subject exactly one split
    for s in subjects:
        if s.explicit in ("val", "test"):
            assert out[s.subject_id] == s.explicit
        elif s.subject_id in pin:
            assert out[s.subject_id] == "train"
        if s.explicit == "train":
            assert out[s.subject_id] != "test" or not any(x.explicit == "test" for x in subjects)


# --- the writer ----------------------------------------------------------------------------


def test_build_invariants_and_counts(tmp_path: Path) -> None:
    out, inputs = build_tumor_dataset(tmp_path)
    rows = read_manifest(out)
    splits_of: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r["synthetic"] == "0":
            splits_of[r["subject_id"]].add(r["split"])
        assert (out / r["path"]).is_file() and sha256_file(out / r["path"]) == r["sha256"]
        assert r["label_path"] and sha256_file(out / r["label_path"]) == r["label_sha256"]
    assert all(len(s) == 1 for s in splits_of.values())  # no subject in two splits
    assert {r["split"] for r in rows if r["synthetic"] == "1"} == {"train"}  # synthetic only in train
    assert all(r["source"] == r["subject_id"] for r in rows if r["synthetic"] == "0")
    syn = [r for r in rows if r["synthetic"] == "1"]
    assert syn and all(r["gate_report_id"] == gate_id(inputs) and r["seed"] == "7" and len(r["source"]) == 64 for r in syn)
    report = json.loads((out / "build_report.json").read_text())
    counts = report["counts"]
    train = {c: counts["train"][c]["real"] + counts["train"][c]["synthetic"] for c in ("round", "necrotic")}
    # 10 train+val round subjects and 2 necrotic: val takes 2 round + 1 necrotic (stratified)
    assert counts["val"] == {"round": {"real": 2, "synthetic": 0}, "necrotic": {"real": 1, "synthetic": 0}}
    assert counts["test"] == {"round": {"real": 2, "synthetic": 0}, "necrotic": {"real": 2, "synthetic": 0}}
    # necrotic: 1 real, cap 0.75 -> at most 3 synthetic; round is the largest class (8)
    assert train == {"round": 8, "necrotic": 4} and counts["train"]["necrotic"]["synthetic"] == 3
    assert report["balance"]["necrotic"] == {"target": 8, "real": 1, "synthetic": 3, "short": 4}
    assert report["excluded"] == {"synthetic, not accepted by the gate": 3}
    sheet = (out / "datasheet.md").read_text()
    assert gate_id(inputs) in sheet and "| necrotic |" in sheet and (out / "sample_grid.png").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial folder left


def test_subjects_that_picked_the_checkpoint_stay_in_train(tmp_path: Path) -> None:
    # the card's monitor_subjects (held out of a CycleGAN's training to pick best.pt) are pinned to
    # train like its train_subjects; here they are the three subjects the val split would take
    inputs = make_tumor_inputs(tmp_path / "inputs")
    card = json.loads(inputs["card"].read_text())
    rows = read_manifest(inputs["real"])
    free = sorted({r["subject_id"] for r in rows if r["split"] == "train"} - set(card["train_subjects"]))
    assert len(free) == 3
    inputs["card"].write_text(json.dumps({**card, "monitor_subjects": free}), encoding="utf-8")
    out = tmp_path / "ds"
    build_dataset(inputs["real"], [inputs["synthetic"]], out, tumor_config(tmp_path), gates=[inputs["gate"]],
                  generator_cards=[inputs["card"]])
    split_of = {r["subject_id"]: r["split"] for r in read_manifest(out) if r["synthetic"] == "0"}
    assert {split_of[s] for s in free} == {"train"}
    assert "val" not in split_of.values()


def test_datalist_loads_with_monai(tmp_path: Path) -> None:
    from monai.data import load_decathlon_datalist

    out, _ = build_tumor_dataset(tmp_path, max_synthetic_share=0.9)
    rows = read_manifest(out)
    for key, split in (("training", "train"), ("validation", "val"), ("test", "test")):
        items = load_decathlon_datalist(out / "dataset.json", data_list_key=key)
        assert len(items) == sum(r["split"] == split for r in rows)
        assert all(Path(i["image"]).is_file() and Path(i["label"]).is_file() for i in items)
        assert {i["class"] for i in items} <= {"round", "necrotic"}
    data = json.loads((out / "dataset.json").read_text())
    assert data["classes"] == ["necrotic", "round"] and data["numTraining"] == len(data["training"])


def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    inputs = make_tumor_inputs(tmp_path / "inputs")
    cfg = tumor_config(tmp_path)
    args = ([inputs["synthetic"]],)
    a = build_dataset(inputs["real"], *args, tmp_path / "a", cfg, gates=[inputs["gate"]], generator_cards=[inputs["card"]])
    time.sleep(1.1)  # a timestamp anywhere would now differ
    b = build_dataset(inputs["real"], *args, tmp_path / "b", cfg, gates=[inputs["gate"]], runs_dir=inputs["runs"])
    assert a.content_hash == b.content_hash
    files_a = sorted(p.relative_to(a.out) for p in a.out.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b.out) for p in b.out.rglob("*") if p.is_file())
    assert all((a.out / f).read_bytes() == (b.out / f).read_bytes() for f in files_a)
    copy = tmp_path / "data_manifests" / a.content_hash
    assert (copy / "manifest.csv").read_bytes() == (a.out / "manifest.csv").read_bytes()
    assert (copy / "dataset.json").is_file()
    # same target again: left as it is; a different dataset there needs --overwrite
    assert build_dataset(inputs["real"], *args, a.out, cfg, gates=[inputs["gate"]], generator_cards=[inputs["card"]]).unchanged
    other = tumor_config(tmp_path, seed=5)
    with pytest.raises(DatasetExistsError, match="--overwrite"):
        build_dataset(inputs["real"], *args, a.out, other, gates=[inputs["gate"]], generator_cards=[inputs["card"]])
    c = build_dataset(inputs["real"], *args, a.out, other, gates=[inputs["gate"]], generator_cards=[inputs["card"]], overwrite=True)
    assert c.content_hash != a.content_hash and json.loads((a.out / "dataset.json").read_text())["content_hash"] == c.content_hash


def test_provenance_refusal_names_count_and_split_only(tmp_path: Path) -> None:
    inputs = make_tumor_inputs(tmp_path / "inputs", card_subjects="test")
    cfg = tumor_config(tmp_path)
    with pytest.raises(ProvenanceError, match=r"trained on 1 subject\(s\) of the test split") as info:
        build_dataset(inputs["real"], [inputs["synthetic"]], tmp_path / "ds", cfg, generator_cards=[inputs["card"]],
                      allow_ungated=True)
    assert not re.search(r"subj\d", str(info.value))  # no pseudonym in the message
    assert not (tmp_path / "ds").exists()


def test_provenance_missing_card(tmp_path: Path) -> None:
    inputs = make_tumor_inputs(tmp_path / "inputs")
    with pytest.raises(ProvenanceError, match="no model card"):
        plan_dataset(inputs["real"], [inputs["synthetic"]], tumor_config(tmp_path), allow_ungated=True)
    card = tmp_path / "nosubjects.json"
    card.write_text(json.dumps({"modality": "CT"}))
    with pytest.raises(ProvenanceError, match="lists no train_subjects"):
        plan_dataset(inputs["real"], [inputs["synthetic"]], tumor_config(tmp_path), generator_cards=[card], allow_ungated=True)


def test_gate_reject_refuses(tmp_path: Path) -> None:
    inputs = make_tumor_inputs(tmp_path / "inputs", gate_verdict="reject")
    with pytest.raises(GateRejected, match=f"{gate_id(inputs)[:12]}.*fid"):
        build_dataset(inputs["real"], [inputs["synthetic"]], tmp_path / "ds", tumor_config(tmp_path), gates=[inputs["gate"]], generator_cards=[inputs["card"]])
    assert not (tmp_path / "ds").exists()


def test_fixed_strategy_and_no_synthetic(tmp_path: Path) -> None:
    inputs = make_tumor_inputs(tmp_path / "inputs")
    plan = plan_dataset(inputs["real"], [inputs["synthetic"]], tumor_config(tmp_path, strategy="fixed", fixed_count=5, max_synthetic_share=0.9),
                        gates=[inputs["gate"]], generator_cards=[inputs["card"]])
    train = Counter((c.item.klass, c.item.synthetic) for c in plan.chosen if c.split == "train")
    assert train == {("round", False): 5, ("necrotic", False): 1, ("necrotic", True): 4}
    real_only = plan_dataset(inputs["real"], [], tumor_config(tmp_path))
    assert not any(c.item.synthetic for c in real_only.chosen) and real_only.report["generators"] == []


def test_mri_ct_translated_inherit_class_and_mask(tmp_path: Path) -> None:
    inputs = make_mri_ct_inputs(tmp_path / "inputs")
    cfg = DatasetConfig(deployment="mri-ct", fractions=SplitFractions(train=0.8, val=0.2, test=0.0), max_synthetic_share=0.9,
                        manifests_dir=tmp_path / "dm")
    plan = plan_dataset(inputs["real"], [inputs["synthetic"]], cfg, generator_cards=[inputs["card"]], allow_ungated=True)
    syn = [c for c in plan.chosen if c.item.synthetic]
    # MR of p05 (round) and p09 (necrotic) translate; the test subjects' (p00, p08) are left out
    assert sorted((c.item.subject_id, c.item.klass) for c in syn) == [("p09", "necrotic")]  # round is the majority
    assert all(c.item.label_path is not None and c.split == "train" for c in syn)
    assert plan.report["excluded"]["synthetic, source subject outside the training split"] == 2
    assert all(c.item.modality == "CT" for c in plan.chosen)


def test_bad_inputs_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no manifest.csv"):
        plan_dataset(tmp_path, [], tumor_config(tmp_path))
    inputs = make_tumor_inputs(tmp_path / "inputs", gate_verdict=None)
    with pytest.raises(ConfigError, match="no MR items"):
        plan_dataset(inputs["real"], [], tumor_config(tmp_path, target_modality="MR"))


def test_cli_build_dataset(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medaug.cli import app

    inputs = make_tumor_inputs(tmp_path / "inputs", card_subjects="test")
    base = ["build-dataset", "--real", str(inputs["real"]), "--synthetic", str(inputs["synthetic"]), "--out", str(tmp_path / "ds"),
            "--config", str(REPO / "configs" / "dataset.yaml"), "--manifests-dir", str(tmp_path / "dm"), "--set", "dataset.fractions.test=0.0",
            "--set", "dataset.fractions.val=0.3"]
    res = CliRunner().invoke(app, [*base, "--generator-card", str(inputs["card"]), "--allow-ungated"])
    assert res.exit_code == 2 and "test split" in res.output
    ok = make_tumor_inputs(tmp_path / "ok")
    base[2], base[4] = str(ok["real"]), str(ok["synthetic"])
    res = CliRunner().invoke(app, [*base, "--gate", str(ok["gate"]), "--runs-dir", str(ok["runs"])])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ds" / "dataset.json").is_file() and "content hash" in res.output


# --- atomic write ------------------------------------------------------------------------

_WRITER = """
import sys
from pathlib import Path
from pipeline.dataset.config import DatasetConfig
from pipeline.dataset.writer import build_dataset
real, syn, out, card, dm = map(Path, sys.argv[1:6])
cfg = DatasetConfig(fractions={"train": 0.8, "val": 0.2, "test": 0.0}, manifests_dir=dm, max_synthetic_share=0.95)
print(build_dataset(real, [syn], out, cfg, generator_cards=[card], allow_ungated=True).content_hash)
"""


def _complete(out: Path) -> bool:
    rows = read_manifest(out)
    return (out / "dataset.json").is_file() and all(sha256_file(out / r["path"]) == r["sha256"] for r in rows)


@pytest.mark.slow
def test_sigkill_mid_write_leaves_no_half_dataset(tmp_path: Path) -> None:
    inputs = make_tumor_inputs(tmp_path / "inputs", n_round=40, n_necrotic=4, synth=(0, 200), gate_verdict=None)
    out = tmp_path / "ds"
    argv = [sys.executable, "-c", _WRITER, str(inputs["real"]), str(inputs["synthetic"]), str(out), str(inputs["card"]), str(tmp_path / "dm")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed_mid_write = False
    for _ in range(3):
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            partial = list(tmp_path.glob(".ds.partial-*/images/*"))
            if len(partial) >= 5:
                os.kill(proc.pid, signal.SIGKILL)
                killed_mid_write = True
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
        assert not out.exists() or _complete(out)  # absent or complete, never half
        if killed_mid_write:
            break
    assert killed_mid_write, "the writer finished before it could be killed"
    assert not out.exists()
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _complete(out) and not list(tmp_path.glob(".ds.partial-*"))  # rerun completes and cleans up
    assert json.loads((out / "dataset.json").read_text())["content_hash"] == done.stdout.strip().splitlines()[-1]
