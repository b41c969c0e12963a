"""Benchmark `medaug ingest` against dcm2niix on the same DICOM input and gzip level.

Three inputs are written once to a cache folder (synthetic CT, explicit VR little endian):

1. one series of 512 x 512 x 400 slices;
2. four series of 512 x 512 x 100 slices in one folder (both cores busy);
3. the same four series with one slice file truncated (dcm2niix gives up on that series
   or errors; ingest must quarantine it and still write the other three).

Each command runs as a whole process (interpreter start and imports included), 5 times,
alternating the tools, and the median wall and CPU times are reported; ingest runs both as
the `medaug ingest` CLI and as a plain `run_ingest` library call (what the Prefect flow
does); the gap between the two is the CLI's start-up. Both tools write gzip
level 1: ingest with `--gzip-level 1` (its default; parallel deflate blocks in threads, ISA-L),
dcm2niix with `-z y -1` (pigz, all cores, zlib); the table lists the bytes each wrote, so the
same level can be checked to mean the same compression. Results are printed and, with --append,
appended to bench/RESULTS.md with the CPU model, core count and date.

Usage: python bench/ingest.py [--repeat 5] [--append] [--cache /tmp/medaug-bench]
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


def prepare(cache: Path) -> dict[str, Path]:
    """Write the three inputs under `cache` (kept between runs; markers sit beside them)."""
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
    return {"one series 512x512x400": one, "4 series 512x512x100": four, "4 series, one truncated file": trunc}


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
            n_vol = len(written)
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
        "Inputs written by `python bench/ingest.py` (synthetic CT, explicit VR little endian, one file per slice).",
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
