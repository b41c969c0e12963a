"""Benchmark `medaug ingest` against dcm2niix on the same DICOM input and gzip level.

Inputs are written once to a cache folder (synthetic CT, explicit VR little endian, unless said):

1. one series of 512 x 512 x 400 slices;
2. four series of 512 x 512 x 100 slices in one folder (both cores busy);
3. the same four series with one slice file truncated (dcm2niix gives up on that series
   or errors; ingest quarantines that file and writes the intact runs around it as parts);
4. one CT series of 512 x 512 x 100 slices compressed as JPEG 2000 lossless (pydicom with
   pylibjpeg-openjpeg encodes it);
5. JPEG lossless (1.2.840.10008.1.2.4.70): the real Siemens mosaic of dcm2niix's QA corpus
   (../shared/dicom-qa/dcm_qa_ts/In/5.dcm, 64 x 64 x 35) copied into 60 series (new UIDs);
   skipped with a note when the corpus is absent (no encoder for this syntax ships with pydicom);
6. one 4D MR series: 40 volumes of 128 x 128 x 30 slices (1200 files); dcm2niix writes one
   4D file, ingest 40 3D volumes.

Each command runs as a whole process (interpreter start and imports included), 5 times,
alternating the tools, and the median wall and CPU times are reported; ingest runs both as
the `medaug ingest` CLI and as a plain `run_ingest` library call (what the Prefect flow
does); the gap between the two is the CLI's start-up. Both tools write gzip
level 1: ingest with `--gzip-level 1` (its default; parallel deflate blocks in threads, ISA-L),
dcm2niix with `-z y -1` (pigz, all cores, zlib); the table lists the bytes each wrote, so the
same level can be checked to mean the same compression. Results are printed and, with --append,
appended to bench/RESULTS.md with the CPU model, core count and date.

Usage: python bench/ingest.py [--repeat 5] [--append] [--cache /tmp/medaug-bench] [--only SUBSTRING]
Needs dcm2niix and pigz on PATH (apt-get install -y dcm2niix pigz); prints a clear
message and exits 1 when dcm2niix is missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_name  # noqa: E402


def _ct_slab(n: int, size: int, seed: int) -> np.ndarray:
    """CT-like int16 HU slab (size, size, n): air, a skull ring, soft tissue with noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    vol = np.empty((size, size, n), np.int16)
    for k in range(n):
        t = 0.8 + 0.2 * np.sin(np.pi * k / max(1, n - 1))
        r = np.hypot((x - c) / (0.42 * size * t), (y - c) / (0.36 * size * t))
        sl = np.full((size, size), -1000.0, np.float32)
        sl[r < 1.0] = 900.0
        sl[r < 0.93] = 35.0
        sl += (r < 1.0) * rng.normal(0, 12, (size, size)).astype(np.float32)
        vol[:, :, k] = np.rint(sl).astype(np.int16)
    return vol


def _write(folder: Path, vol: np.ndarray, series: int, patient: str) -> None:
    from pipeline.phantoms import write_dicom_series

    aff = np.diag([0.5, 0.5, 1.0, 1.0])
    aff[:3, 3] = [-128.0, -128.0, -200.0 + 100.0 * series]
    write_dicom_series(vol, aff, folder, {"PatientID": patient, "SeriesNumber": series + 1,
                                          "SeriesInstanceUID": f"1.2.826.0.1.3680043.9.{series + 1}",
                                          "SeriesDescription": f"bench {series}"}, "CT")


QA_MOSAIC = ROOT.parent / "shared" / "dicom-qa" / "dcm_qa_ts" / "In" / "5.dcm"
"""A real JPEG-lossless Siemens mosaic (dcm2niix QA corpus, BSD-2)."""


def _j2k_series(folder: Path) -> None:
    """512 x 512 x 100 CT compressed as JPEG 2000 lossless (written by pydicom)."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    _write(folder, _ct_slab(100, 512, 7), 0, "BENCHJ2K")
    for p in sorted(folder.iterdir()):
        ds = pydicom.dcmread(p)
        ds.compress(JPEG2000Lossless)
        ds.save_as(p, enforce_file_format=True)


def _jpeg_lossless_copies(folder: Path, n: int = 60) -> bool:
    """`n` copies of the QA corpus's JPEG-lossless mosaic, each its own series; False without it."""
    import pydicom

    if not QA_MOSAIC.is_file():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n):
        ds = pydicom.dcmread(QA_MOSAIC)
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.9.70.{s + 1}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.9.70.{s + 1}.1"
        ds.SeriesNumber = s + 1
        ds.save_as(folder / f"m{s:03d}.dcm")
    return True


def _four_d(folder: Path, volumes: int = 40) -> None:
    """One MR series of `volumes` volumes of 128 x 128 x 30 (a 4D fMRI-like run), one folder per volume."""
    from pipeline.phantoms import write_dicom_series

    aff = np.diag([2.0, 2.0, 4.0, 1.0])
    aff[:3, 3] = [-128.0, -128.0, -60.0]
    rng = np.random.default_rng(4)
    base = np.clip(_ct_slab(30, 128, 4).astype(np.int32) + 1000, 0, 3000).astype(np.int16)
    for v in range(volumes):
        vol = np.clip(base + rng.integers(0, 20, base.shape), 0, 4000).astype(np.int16)
        write_dicom_series(vol, aff, folder / f"v{v:03d}", {
            "PatientID": "BENCH4D", "SeriesNumber": 9, "SeriesInstanceUID": "1.2.826.0.1.3680043.9.40",
            "SeriesDescription": "bench 4d", "InstanceNumber": lambda k, v=v: v * 30 + k + 1,
            "SOPInstanceUID": lambda k, v=v: f"1.2.826.0.1.3680043.9.40.{v + 1}.{k + 1}",
            "TemporalPositionIdentifier": v + 1}, "MR")


def prepare(cache: Path) -> dict[str, Path]:
    """Write the inputs under `cache` (kept between runs; markers sit beside them)."""
    one, four, trunc = cache / "one_series", cache / "four_series", cache / "four_series_truncated"
    if not (cache / "one_series.done").exists():
        shutil.rmtree(one, ignore_errors=True)
        _write(one / "s0", _ct_slab(400, 512, 0), 0, "BENCH1")
        (cache / "one_series.done").write_text("")
    if not (cache / "four_series.done").exists():
        shutil.rmtree(four, ignore_errors=True)
        for s in range(4):
            _write(four / f"s{s}", _ct_slab(100, 512, s + 1), s, "BENCH4")
        (cache / "four_series.done").write_text("")
    if not (cache / "four_series_truncated.done").exists():
        shutil.rmtree(trunc, ignore_errors=True)
        shutil.copytree(four, trunc)
        victim = sorted((trunc / "s1").iterdir())[50]
        victim.write_bytes(victim.read_bytes()[:200_000])
        (cache / "four_series_truncated.done").write_text("")
    j2k, jpeg, four_d = cache / "j2k_series", cache / "jpeg_lossless", cache / "four_d"
    if not (cache / "j2k_series.done").exists():
        shutil.rmtree(j2k, ignore_errors=True)
        _j2k_series(j2k / "s0")
        (cache / "j2k_series.done").write_text("")
    if not (cache / "jpeg_lossless.done").exists():
        shutil.rmtree(jpeg, ignore_errors=True)
        if _jpeg_lossless_copies(jpeg):
            (cache / "jpeg_lossless.done").write_text("")
        else:
            print(f"note: {QA_MOSAIC} not found; the JPEG lossless row is left out", file=sys.stderr)
    if not (cache / "four_d.done").exists():
        shutil.rmtree(four_d, ignore_errors=True)
        _four_d(four_d)
        (cache / "four_d.done").write_text("")
    inputs = {"one series 512x512x400": one, "4 series 512x512x100": four, "4 series, one truncated file": trunc,
              "JPEG 2000 lossless 512x512x100": j2k}
    if (cache / "jpeg_lossless.done").exists():
        inputs["JPEG lossless: 60 mosaics 64x64x35 (QA corpus)"] = jpeg
    inputs["4D MR 40 x 128x128x30"] = four_d
    return inputs


def _volumes_in(path: Path) -> int:
    """3D volumes in a .nii.gz file (its 4th dimension, 1 for a 3D file)."""
    import nibabel as nib

    shape = nib.load(path).shape
    return int(np.prod(shape[3:])) if len(shape) > 3 else 1


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _time(cmd: list[str], out: Path, env: dict[str, str]) -> tuple[float, float, int, str]:
    """(wall s, CPU s of the process and its children, exit code, output tail) of one run."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    c0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, _children_cpu() - c0, proc.returncode, (proc.stdout + proc.stderr)[-400:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--append", action="store_true", help="append the results to bench/RESULTS.md")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "medaug-bench")
    ap.add_argument("--only", default="", help="run only the inputs whose label contains this text")
    args = ap.parse_args()

    if shutil.which("dcm2niix") is None:
        print("dcm2niix not found on PATH: install it with `apt-get update && apt-get install -y dcm2niix pigz` "
              "and run again", file=sys.stderr)
        return 1
    if shutil.which("pigz") is None:
        print("note: pigz not found; dcm2niix -z y then falls back to its internal single-thread zlib", file=sys.stderr)
    version = subprocess.run(["dcm2niix", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    medaug = str(Path(sys.executable).with_name("medaug"))
    env = dict(os.environ, MEDAUG_DEID_KEY="bench-key", OMP_NUM_THREADS="1")
    inputs = prepare(args.cache)
    outdir = args.cache / "out"
    lines: list[str] = []
    lib_code = ("import sys; from pipeline.ingest import run_ingest; "
                "run_ingest([sys.argv[1]], sys.argv[2], key=b'bench-key', workers=2, level=1)")
    for label, src in inputs.items():
        if args.only not in label:
            continue
        cmds = {
            "medaug ingest (CLI)": [medaug, "ingest", str(src), "--out", str(outdir / "cli"), "--gzip-level", "1",
                                    "--workers", "2"],
            "run_ingest (library)": [sys.executable, "-c", lib_code, str(src), str(outdir / "lib")],
            "dcm2niix": ["dcm2niix", "-z", "y", "-1", "-f", "%p_%s", "-o", str(outdir / "dcm2niix"), str(src)],
        }
        outs = {"medaug ingest (CLI)": outdir / "cli", "run_ingest (library)": outdir / "lib", "dcm2niix": outdir / "dcm2niix"}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
        codes: dict[str, int] = {}
        for _ in range(args.repeat):
            for name, cmd in cmds.items():  # alternating the tools within each repeat
                t, c, rc, tail = _time(cmd, outs[name], env)
                if rc != 0 and name != "dcm2niix":
                    print(f"{name} failed (exit {rc}): {tail}", file=sys.stderr)
                    return 2
                times[name].append((t, c))
                codes[name] = rc
        md = statistics.median(t for t, _ in times["dcm2niix"])
        cd = statistics.median(c for _, c in times["dcm2niix"])
        for name in cmds:
            w = statistics.median(t for t, _ in times[name])
            c = statistics.median(c for _, c in times[name])
            folder = outs[name] / "volumes" if name != "dcm2niix" else outs[name]
            written = sorted(folder.glob("*.nii.gz"))
            n_vol = sum(_volumes_in(f) for f in written)  # dcm2niix writes a 4D series as one file
            mb = sum(f.stat().st_size for f in written) / 1e6
            extra = ""
            if name != "dcm2niix":
                extra = f", {max(0, len((outs[name] / 'quarantine.csv').read_text().splitlines()) - 1)} quarantined"
            line = (f"| {label} | {name} | {w:.2f} | {c:.2f} | {n_vol}{extra} | {mb:.1f} | {codes[name]} "
                    f"| {w / md:.2f} | {c / cd:.2f} |")
            print(line, flush=True)
            lines.append(line)

    cpu = cpu_name()
    cores = os.cpu_count()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    entry = [
        "",
        f"## Ingest vs dcm2niix ({dt.date.today().isoformat()})",
        "",
        f"Device: {cpu}, {cores} cores (CPU only). dcm2niix {version[-1] if version else '?'}, "
        f"pigz {'present' if shutil.which('pigz') else 'absent'}. Median of {args.repeat} whole-process runs "
        "each, alternating the two tools; gzip level 1 for both (ingest deflates with ISA-L, dcm2niix with pigz/zlib: "
        f"compare the MB column). Load average at the end of the run: {load} (other jobs on the "
        f"machine add noise to wall times); CPU time "
        "(user + sys of the process and its children) is the steadier figure.",
        "",
        "Commands: `MEDAUG_DEID_KEY=... medaug ingest SRC --out OUT --gzip-level 1 --workers 2`; the same "
        "through the library, `python -c \"...run_ingest([SRC], OUT, key=..., workers=2, level=1)\"` (what the flow "
        "calls; the difference between the two rows is the CLI's start-up); and `dcm2niix -z y -1 -f %p_%s -o OUT SRC`. "
        "Inputs written by `python bench/ingest.py` (synthetic CT, explicit VR little endian, one file per slice, "
        "unless the label says otherwise: JPEG 2000 lossless written by pydicom, JPEG lossless copies of the QA "
        "corpus mosaic, a 4D MR series; see the module docstring).",
        "",
        "| input | tool | wall s | CPU s | volumes | .nii.gz MB | exit | wall / dcm2niix | CPU / dcm2niix |",
        "|---|---|---|---|---|---|---|---|---|",
        *lines,
    ]
    text = "\n".join(entry) + "\n"
    print(text)
    if args.append:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
