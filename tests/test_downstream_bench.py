"""bench/downstream.py runs end to end on a tiny cohort (mri-ct deployment: phantoms, ingest,
CycleGAN, translation, gate, dataset, patches, the classifier arms) and prints its report.

The numbers of such a tiny run mean nothing; the test guards the script against bit rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.bench
def test_downstream_bench_mri_ct_smoke(tmp_path: Path) -> None:
    args = ["--deployment", "mri-ct", "--subjects", "16", "--size", "32", "--patch-size", "16", "--cyclegan-steps", "4",
            "--seeds", "2", "--steps", "4", "--crop", "8", "--work", str(tmp_path / "work")]
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "downstream.py"), *args], capture_output=True, text=True,
                         timeout=400, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert out.startswith("## Downstream classifier, mri-ct deployment")
    assert "- Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/downstream.py --deployment mri-ct" in out
    arms = [line for line in out.splitlines() if line.startswith("| (")]
    assert [a.split("|")[1].strip()[:3] for a in arms[:3]] == ["(a)", "(b)", "(c)"]
    assert "**Verdict:**" in out and "gate" in out and "verdict **" in out
    # 6 CT and 6 MR training subjects: one of each held out of the CycleGAN's training to pick best.pt
    assert "best.pt was picked" in out and "on 2 training-split subjects held out of its training" in out
    assert not (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8").count(str(tmp_path))  # --record not given


@pytest.mark.bench
def test_downstream_bench_insertion_smoke(tmp_path: Path) -> None:
    """tumor-patches by lesion insertion: GAN patches inserted into real CTs, gated, arms (a)-(d), (d) - (b) bootstrap."""
    args = ["--synthesis", "insertion", "--n-insert", "8", "--subjects", "16", "--size", "64", "--patch-size", "32",
            "--gan-steps", "4", "--n-synth", "16", "--seeds", "2", "--steps", "4", "--work", str(tmp_path / "work")]
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "downstream.py"), *args], capture_output=True, text=True,
                         timeout=400, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert out.startswith("## Downstream classifier, tumor-patches deployment by lesion insertion")
    arms = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| (")]
    assert [a[:3] for a in arms[:4]] == ["(a)", "(b)", "(c)", "(d)"]
    assert "(d) - (b), paired, seeds x subjects" in arms
    assert "**Beyond classical augmentation:**" in out and "seam" in out
    (manifest,) = (tmp_path / "work").glob("from-tumor_gan-*/insertion_n8_*/manifest.csv")  # one folder per GAN recipe and patch gate
    rows = manifest.read_text().splitlines()
    assert len(rows) == 9 and all(",train," in r for r in rows[1:])  # inserted volumes stay in training

    # the sweep script on the same work folder: a lesion-scale GAN, its insertions and their gate
    sweep = ["--work", str(tmp_path / "work"), "--name", "l16", "--lesions", "--class-checks", "--set", "patch_size=16",
             "--steps", "4", "--insert", "8"]
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "tumor_gan_sweep.py"), *sweep], capture_output=True, text=True,
                         timeout=400, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["verdict"] in ("accept", "reject") and "class" in result["checks"]  # the class check ran
    assert result["insertion"]["n"] == 8 and result["insertion"]["verdict"] in ("accept", "reject")
    assert "seam" in result["insertion"]["checks"]
    assert (tmp_path / "work" / "patches_real_lesions16_s0" / "manifest.csv").is_file()


def test_paired_bootstrap_known_answers() -> None:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from bench.downstream import paired_bootstrap

    classes = [0] * 6 + [1] * 4
    subjects = [f"s{i // 2}" for i in range(10)]  # 5 subjects, 2 patches each
    same = np.random.default_rng(0).random((4, 10)) < 0.5
    assert paired_bootstrap(same, same, classes, subjects, n_boot=200) == (0.0, 0.0, 0.0)
    right, wrong = np.ones((4, 10), bool), np.zeros((4, 10), bool)
    assert paired_bootstrap(right, wrong, classes, subjects, n_boot=200) == (1.0, 1.0, 1.0)
    # x is right on the minority only, y on the majority only: balanced accuracy 0.5 each, difference 0,
    # and every resample keeps both classes, so the interval is exactly 0 too
    x = np.array([[c == 1 for c in classes]] * 4)
    assert paired_bootstrap(x, ~x, classes, subjects, n_boot=200) == (0.0, 0.0, 0.0)
    # one subject decides: x beats y on subject s0 only; the interval must reach down to 0 (s0 not drawn)
    x = np.zeros((4, 10), bool)
    x[:, :2] = True
    m, lo, hi = paired_bootstrap(x, wrong, classes, subjects, n_boot=500)
    assert m == pytest.approx(1 / 3 / 2) and lo == 0.0 and hi > m


def test_downstream_bench_refuses_a_work_folder_of_another_cohort(tmp_path: Path) -> None:
    """main() in-process (the script's own start-up is what the smoke tests above run): the refusal
    is a SystemExit with one line (the interpreter prints it without a traceback)."""
    sys.path.insert(0, str(ROOT))
    from bench.downstream import main

    work = tmp_path / "work"
    work.mkdir()
    (work / "cohort_options.json").write_text('{"subjects": 16, "size": 32, "seed": 0}\n', encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        main(["--deployment", "tumor-patches", "--subjects", "20", "--size", "32", "--work", str(work)])
    message = refused.value.code
    assert isinstance(message, str) and "\n" not in message
    assert "holds a cohort made with" in message and "--fresh" in message
    assert sorted(p.name for p in work.iterdir()) == ["cohort_options.json"]  # refused before writing anything


def test_minority_train_keeps_k_necrotic_training_subjects(tmp_path: Path) -> None:
    """The harder task's cohort copy: the first K necrotic training entries, every other entry and the
    whole test list kept; the left-out subjects' files are not in the copy; K out of range is refused."""
    import json

    sys.path.insert(0, str(ROOT))
    from bench.downstream import keep_minority

    src = tmp_path / "CT"
    meta = {"name": "t", "modality": {"0": "CT"}, "training": [], "test": []}
    for i, klass in enumerate(["round", "necrotic", "round", "necrotic", "necrotic", "round"]):
        meta["training"].append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz", "class": klass})
    meta["test"] = [{"image": "./imagesTs/t0.nii.gz", "label": "./labelsTs/t0.nii.gz", "class": "necrotic"}]
    for entry in meta["training"] + meta["test"]:
        for key in ("image", "label"):
            (src / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            (src / entry[key]).write_bytes(entry[key].encode())
    (src / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")

    out = keep_minority(src, tmp_path / "kept", 1)
    kept = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert [e["image"] for e in kept["training"]] == ["./imagesTr/c0.nii.gz", "./imagesTr/c1.nii.gz", "./imagesTr/c2.nii.gz",
                                                      "./imagesTr/c5.nii.gz"]
    assert kept["numTraining"] == 4 and kept["test"] == meta["test"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["c0.nii.gz", "c1.nii.gz", "c2.nii.gz", "c5.nii.gz"]
    assert (out / "labelsTs" / "t0.nii.gz").read_bytes() == b"./labelsTs/t0.nii.gz"
    for bad in (0, 4):
        with pytest.raises(SystemExit, match="3 necrotic CT training subjects"):
            keep_minority(src, tmp_path / f"bad{bad}", bad)


def test_oracle_lesions_needs_insertion_and_real_minority_lesions(tmp_path: Path) -> None:
    """--oracle-lesions without --synthesis insertion is a usage error; a work folder with no real
    necrotic training lesion patch is refused with one line, before anything is written."""
    sys.path.insert(0, str(ROOT))
    from bench.downstream import main, oracle_lesion_inputs
    from pipeline.manifest import write_manifest

    with pytest.raises(SystemExit) as usage:
        main(["--oracle-lesions", "--work", str(tmp_path / "w")])
    assert usage.value.code == 2
    lesions = tmp_path / "work" / "patches_real_lesions32_s0"
    write_manifest(lesions, [{"path": "p.nii.gz", "label_path": "m.nii.gz", "class": "necrotic", "split": "test",
                              "subject_id": "s", "source_sha256": "ab"}], ["path", "label_path", "class", "split", "subject_id",
                                                                            "source_sha256"])
    with pytest.raises(SystemExit, match="no necrotic training lesion patch"):
        oracle_lesion_inputs(tmp_path / "work", {}, 32, 0)
    assert not (tmp_path / "work" / "oracle-real-lesions").exists()
