"""Benchmark the dataset stage (`medaug build-dataset`) before and after "hash once, copy ingest's bytes".

A seeded phantom cohort (pipeline.phantoms, --subjects of --size) is written and its CT
volumes and masks are ingested once into a cache folder (gzip level 1, as ingest writes
them). Then the dataset stage builds the same dataset (mri-ct deployment, the real CT
items, strategy none) two ways, alternating, --repeat times each:

- before: what the writer did until this change, kept here as `legacy_write_nifti_gz`: every
  real item's file hashed while planning, then each image and mask gunzipped, parsed, gzipped
  again with the stdlib at level 6 (one thread) and the written file hashed again;
- after: pipeline.dataset as it is: the ingest manifest's sha256 travels with each item and
  each .nii.gz is copied byte for byte, hashed once while copying (checked against it).

The median wall and CPU (all threads) seconds of the whole stage (plan, write, manifest,
sample grid, datasheet) are reported with their ratio, plus the bytes of the datasets; the
script checks that both datasets hold identical NIfTI content (the gunzipped bytes of every
file) and that every image of the new one has its ingest sha256.

Usage: python bench/dataset.py [--subjects 24] [--size 128] [--repeat 5] [--cache DIR] [--smoke]
(bench/RESULTS.md records --subjects 32 --size 128 --repeat 5.)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gzip
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from any folder
    sys.path.insert(0, str(ROOT))

from bench.common import cpu_name  # noqa: E402

KEY = b"bench-dataset-key"


def legacy_write_nifti_gz(src: Path, dst: Path, sha256: str = "", since: str = "") -> str:
    """The writer before this change (for the "before" row only): gunzip, parse with nibabel,
    gzip again with the stdlib at level 6 in one thread, hash the written file (`sha256`, `since`: unused)."""
    import nibabel as nib

    from pipeline.manifest import sha256_file

    raw = src.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    klass = nib.Nifti1Image if int.from_bytes(raw[:4], "little") in (348, 348 << 24) else nib.Nifti2Image
    klass.from_bytes(raw)
    dst.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
    return sha256_file(dst)


@contextlib.contextmanager
def legacy_writer() -> Iterator[None]:
    """Swap in the old writer and the old planning (hash every real file, ignore the manifest's sha256)."""
    import pipeline.dataset.inputs as inputs
    import pipeline.dataset.writer as writer

    saved = writer.write_nifti_gz, inputs.manifest_sha256
    writer.write_nifti_gz, inputs.manifest_sha256 = legacy_write_nifti_gz, lambda row: ""  # type: ignore[assignment]
    try:
        yield
    finally:
        writer.write_nifti_gz, inputs.manifest_sha256 = saved


def prepare(cache: Path, subjects: int, size: int) -> Path:
    """The ingest folder of a seeded phantom cohort's CT volumes (written once, kept in `cache`)."""
    from pipeline.ingest import run_ingest
    from pipeline.phantoms import write_cohort

    ingest = cache / f"ingest-{subjects}x{size}"
    if not (ingest / "manifest.csv").is_file():
        cohort = cache / f"cohort-{subjects}x{size}"
        shutil.rmtree(cohort, ignore_errors=True)
        write_cohort(cohort, n_subjects=subjects, size=size, seed=0)
        run_ingest([cohort / "nifti" / "CT"], ingest, key=KEY, workers=2)
        shutil.rmtree(cohort)
    return ingest


def build(ingest: Path, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one dataset stage (plan + write) from `ingest` into `out`."""
    from pipeline.dataset import DatasetConfig, build_dataset

    cfg = DatasetConfig(deployment="mri-ct", target_modality="CT", strategy="none", manifests_dir=out.parent / "manifests")
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = time.perf_counter(), time.process_time()
    build_dataset(ingest, [], out, cfg)
    return time.perf_counter() - wall, time.process_time() - cpu


def check(before: Path, after: Path, ingest: Path) -> int:
    """Both datasets hold the same NIfTI bytes once gunzipped; the new images keep their ingest sha256.
    Returns the number of files compared."""
    from pipeline.manifest import read_manifest, sha256_file

    shas = {r["sha256"] for r in read_manifest(ingest)}
    old, new = read_manifest(before), read_manifest(after)
    assert [r["id"] for r in old] == [r["id"] for r in new], "the two ways chose different items"
    n = 0
    for o, w in zip(old, new, strict=True):
        for col in ("path", "label_path"):
            if o[col]:
                assert gzip.decompress((before / o[col]).read_bytes()) == gzip.decompress((after / w[col]).read_bytes())
                n += 1
        assert w["sha256"] in shas and sha256_file(after / w["path"]) == w["sha256"]
    return n


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=24, help="Phantom subjects (about 85 %% of them train).")
    parser.add_argument("--size", type=int, default=128, help="In-plane voxels; volumes are S x S x S//2 int16.")
    parser.add_argument("--repeat", type=int, default=5, help="Builds per way, alternating.")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/medaug-bench-dataset"), help="Where the cohort's ingest is kept.")
    parser.add_argument("--smoke", action="store_true", help="4 subjects of 32x32x16, one build per way: checks the script runs.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.subjects, args.size, args.repeat = 4, 32, 1

    ingest = prepare(args.cache, args.subjects, args.size)
    load0 = os.getloadavg()[0]
    times: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    outs = {way: args.cache / f"dataset-{way}" for way in times}
    for _ in range(args.repeat):
        with legacy_writer():
            times["before"].append(build(ingest, outs["before"]))
        times["after"].append(build(ingest, outs["after"]))
    n_files = check(outs["before"], outs["after"], ingest)

    def med(way: str, i: int) -> float:
        return statistics.median(t[i] for t in times[way])

    lines = [
        f"## Dataset stage: copy ingest's bytes, hash once ({'SMOKE, ' if args.smoke else ''}{dt.date.today().isoformat()})",
        "",
        f"- Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/dataset.py --subjects {args.subjects} --size {args.size} "
        f"--repeat {args.repeat}`",
        f"- Machine: {cpu_name()}, {os.cpu_count()} cores, load average {load0:.1f} at start and "
        f"{os.getloadavg()[0]:.1f} at end (a shared machine: the ratio is indicative)",
        f"- Input: {args.subjects} phantom subjects' CT, {args.size}x{args.size}x{args.size // 2} int16, ingested at "
        f"gzip level 1; {n_files} files (images and masks) per dataset, identical NIfTI content both ways",
        "",
        "| way | wall s (median) | CPU s (median) | dataset bytes |",
        "|---|---|---|---|",
    ]
    for way, label in (("before", "before: hash at plan, gunzip + stdlib gzip level 6 + hash again"),
                       ("after", "after: manifest sha256, byte copy hashed once")):
        lines.append(f"| {label} | {med(way, 0):.3f} | {med(way, 1):.3f} | {folder_bytes(outs[way])} |")
    lines += ["", f"- after / before wall time: {med('after', 0) / med('before', 0):.2f}x "
                  f"(before / after: {med('before', 0) / med('after', 0):.1f}x faster)"]
    report = "\n".join(lines)
    print(report, flush=True)
    return report


if __name__ == "__main__":
    main()
