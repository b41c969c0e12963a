"""Benchmark `medaug ingest` against dcm2niix on the same DICOM input and gzip level.

Three inputs are written once to a cache folder (synthetic CT, explicit VR little endian):

1. one series of 512 x 512 x 400 slices;
2. four series of 512 x 512 x 100 slices in one folder (both cores busy);
3. the same four series with one slice file truncated (dcm2niix gives up on that series
   or errors; ingest must quarantine it and still write the other three).

Each command runs as a whole process (interpreter start and imports included), 5 times,
alternating the two tools, and the median wall time is reported. Both tools write gzip
level 1: ingest with `--gzip-level 1` (its default; parallel deflate blocks in threads),
dcm2niix with `-z y -1` (pigz, all cores). Results are printed and, with --append,
appended to bench/RESULTS.md with the CPU model, core count and date.

Usage: python bench/ingest.py [--repeat 5] [--append] [--cache /tmp/medaug-bench]
Needs dcm2niix and pigz on PATH (apt-get install -y dcm2niix pigz); prints a clear
message and exits 1 when dcm2niix is missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


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


def prepare(cache: Path) -> dict[str, Path]:
    """Write the three inputs under `cache` (kept between runs)."""
    one, four, trunc = cache / "one_series", cache / "four_series", cache / "four_series_truncated"
    if not (one / ".done").exists():
        shutil.rmtree(one, ignore_errors=True)
        _write(one / "s0", _ct_slab(400, 512, 0), 0, "BENCH1")
        (one / ".done").write_text("")
    if not (four / ".done").exists():
        shutil.rmtree(four, ignore_errors=True)
        for s in range(4):
            _write(four / f"s{s}", _ct_slab(100, 512, s + 1), s, "BENCH4")
        (four / ".done").write_text("")
    if not (trunc / ".done").exists():
        shutil.rmtree(trunc, ignore_errors=True)
        shutil.copytree(four, trunc)
        victim = sorted((trunc / "s1").iterdir())[50]
        victim.write_bytes(victim.read_bytes()[:200_000])
        (trunc / ".done").write_text("")
    return {"one series 512x512x400": one, "4 series 512x512x100": four, "4 series, one truncated file": trunc}


def _time(cmd: list[str], out: Path, env: dict[str, str]) -> tuple[float, int, str]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, proc.returncode, (proc.stdout + proc.stderr)[-400:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--append", action="store_true", help="append the results to bench/RESULTS.md")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "medaug-bench")
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
    for label, src in inputs.items():
        ours_cmd = [medaug, "ingest", str(src), "--out", str(outdir / "medaug"), "--gzip-level", "1", "--workers", "2"]
        theirs_cmd = ["dcm2niix", "-z", "y", "-1", "-f", "%p_%s", "-o", str(outdir / "dcm2niix"), str(src)]
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(args.repeat):
            t, rc, tail = _time(ours_cmd, outdir / "medaug", env)
            if rc != 0:
                print(f"medaug ingest failed (exit {rc}): {tail}", file=sys.stderr)
                return 2
            ours.append(t)
            t, rc_d, tail_d = _time(theirs_cmd, outdir / "dcm2niix", env)
            theirs.append(t)
        n_ours = len(list((outdir / "medaug" / "volumes").glob("*.nii.gz")))
        n_theirs = len(list((outdir / "dcm2niix").glob("*.nii.gz")))
        mo, md = statistics.median(ours), statistics.median(theirs)
        line = (f"| {label} | {mo:.2f} s ({n_ours} volumes) | {md:.2f} s ({n_theirs} volumes, exit {rc_d}) "
                f"| {mo / md:.2f} |")
        print(line, flush=True)
        lines.append(line)

    cpu = _cpu_model()
    cores = os.cpu_count()
    entry = [
        "",
        f"## Ingest vs dcm2niix ({dt.date.today().isoformat()})",
        "",
        f"Device: {cpu}, {cores} cores (CPU only). dcm2niix {version[-1] if version else '?'}, "
        f"pigz {'present' if shutil.which('pigz') else 'absent'}. Median of {args.repeat} whole-process runs "
        "each, alternating the two tools; gzip level 1 for both.",
        "",
        "Commands: `MEDAUG_DEID_KEY=... medaug ingest SRC --out OUT --gzip-level 1 --workers 2` and "
        "`dcm2niix -z y -1 -f %p_%s -o OUT SRC`; inputs written by `python bench/ingest.py` "
        "(synthetic CT, explicit VR little endian, one file per slice).",
        "",
        "| input | medaug ingest | dcm2niix | ratio (ingest / dcm2niix) |",
        "|---|---|---|---|",
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
