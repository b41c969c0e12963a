"""Quality-gate cost at scale: feature extraction and every metric for N synthetic vs N real images,
timed beside the same metrics computed the naive way, in one run.

What runs (all of it the gate's own code from pipeline/gate/, at the gate's default settings):

  data      N real and N synthetic single-channel S x S images in [-1, 1], generated on the
            device from a seed: smoothed noise inside a random ellipse, air (-1) outside; the
            synthetic recipe differs a little (so FID > 0) and every 50th synthetic image is a
            real one plus noise sigma 0.02 (a planted near-copy for the nearest-neighbour search);
  features  the domain encoder trained with `train_domain_encoder` (GateConfig's steps, batch,
            width; on the first min(N, max_slices) real images, as run_gate does) and run
            through `DomainExtractor`; the FID InceptionV3 pool3 network (`FIDInceptionV3`,
            run through `InceptionExtractor`) with RANDOM weights: no weights file can be
            downloaded, so the network is built as `load_fid_inception` builds it and the
            load is skipped; its convolutions get He-normal weights, because PyTorch's default
            init shrinks the activations ~3x per layer and the 2048-d features would be ~1e-8;
  metrics   FID, KID, precision/recall/density/coverage and nearest-neighbour distances
            (memorisation synthetic->real, real->real baseline and synthetic->synthetic
            duplicates, other items only) in both feature spaces, nearest neighbours in pixel
            space too (rows of S*S float32, as run_gate's `_flat`), MS-SSIM diversity and the
            intensity Wasserstein distance. The gate's distances, k-NN radii, PRDC, KID and FID
            run on --device in float64: distances as matrix products (||a||^2 + ||b||^2 - 2 a.b)
            in blocks of 1024 query rows against the whole reference set, each set copied from
            the host to the device once per call, as in run_gate; FID exact also with fewer
            samples than dimensions (nuclear norm of X1 X2^T). MS-SSIM runs on --device too
            (float32, no TF32); the intensity distance on the CPU, as in run_gate.

The naive way, on the first n images of each set (n = N when that is affordable):
nearest neighbours and k-NN radii by a Python loop over query rows, each row's float64
distances to the whole reference set by numpy broadcasting (no matrix product, no chunks);
KID's kernel sums by the same row loop on the same random subsets; FID by the textbook
scipy.linalg.sqrtm of S1 S2 (pytorch-fid's way); MS-SSIM one pair per call instead of
batches of 256, on fewer pairs (--naive-pairs; the gate is timed again on those). Each naive result is compared with the gate's on the same n (max abs diff);
the ratio is the gate's time over the naive time at that n. Nothing is extrapolated.

Peak memory per step: the rise of the process's resident set above its level at the step's
start (VmHWM after resetting it through /proc/self/clear_refs) and, on CUDA,
torch.cuda.max_memory_allocated. Output: a Markdown table on stdout, each row printed (and
flushed) as soon as its step is measured, so a run cut short by `timeout` keeps the rows it
finished; SIGTERM ends it with a line saying how many rows it measured. Nothing is written.

    .venv/bin/python bench/gate.py                        # GPU: N=10000, S=256
    .venv/bin/python bench/gate.py --device cpu --n 2000 --size 64 --inception-n 128
    .venv/bin/python bench/gate.py --smoke                # CPU, seconds (tests/test_gate_bench.py)
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any folder
    sys.path.insert(0, str(REPO))

from bench.common import RowPrinter, Stopped, cpu_name  # noqa: E402
from medaug.config import load_section  # noqa: E402
from pipeline.gate import metrics as M  # noqa: E402
from pipeline.gate.config import GateConfig  # noqa: E402
from pipeline.gate.encoder import state_dict_sha256, train_domain_encoder  # noqa: E402
from pipeline.gate.features import DomainExtractor, InceptionExtractor  # noqa: E402
from pipeline.gate.inception import FIDInceptionV3  # noqa: E402

log = logging.getLogger("bench.gate")

F64 = NDArray[np.float64]
COPY_EVERY = 50
"""Every 50th synthetic image is a planted near-copy of the real image with the same index."""

TOLERANCE = {"fid": 1e-6, "kid": 1e-9, "prdc": 1e-12, "nn": 1e-9, "ms-ssim": 1e-5}
"""Agreement limits of gate vs naive (FID: gate vs the exact value): relative for FID, KID and distances, absolute for the
PRDC fractions and MS-SSIM (float32 convolutions, batched vs one pair)."""


# --- measuring ---------------------------------------------------------------------------------------


def _status_kib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Timed:
    """A step's wall time, peak memory rises (MiB; NaN where not measurable) and return value."""

    seconds: float
    rss_mib: float
    gpu_mib: float
    value: Any


def timed(fn: Callable[[], Any], device: torch.device) -> Timed:
    """Run fn once: wall seconds (device synchronised), peak RSS rise and peak CUDA allocation."""
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        gpu_base = torch.cuda.memory_allocated(device)
    rss_ok = _reset_peak_rss()
    rss_base = _status_kib("VmRSS")
    start = time.perf_counter()
    value = fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    rss = (_status_kib("VmHWM") - rss_base) / 1024 if rss_ok else float("nan")
    gpu = (torch.cuda.max_memory_allocated(device) - gpu_base) / 2**20 if cuda else float("nan")
    return Timed(seconds, max(rss, 0.0), gpu, value)


# --- data ----------------------------------------------------------------------------------------------


def structured_images(n: int, size: int, seed: int, device: torch.device, coarse: float, fine: float,
                      chunk: int = 1024) -> torch.Tensor:
    """(n, 1, size, size) float32 in [-1, 1] on `device`: tanh of two octaves of bicubically
    upsampled noise (weights `coarse`, `fine`) inside a random ellipse, -1 (air) outside. Seeded."""
    g = torch.Generator(device=device).manual_seed(seed)
    axis = torch.linspace(-1.0, 1.0, size, device=device)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    out = torch.empty(n, 1, size, size, device=device)
    lo, hi = max(2, size // 16), max(4, size // 4)
    for s in range(0, n, chunk):
        b = min(chunk, n - s)

        def noise(cells: int, b: int = b) -> torch.Tensor:
            low = torch.randn(b, 1, cells, cells, generator=g, device=device)
            return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)

        def u(a: float, z: float, b: int = b) -> torch.Tensor:
            return (a + (z - a) * torch.rand(b, generator=g, device=device)).view(b, 1, 1, 1)

        tissue = torch.tanh(coarse * noise(lo) + fine * noise(hi))
        inside = ((xx - u(-0.1, 0.1)) / u(0.6, 0.9)) ** 2 + ((yy - u(-0.1, 0.1)) / u(0.6, 0.9)) ** 2 < 1.0
        out[s:s + b] = torch.where(inside, tissue, torch.full_like(tissue, -1.0))
    return out


def make_sets(n: int, size: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and synthetic sets (n, 1, size, size); synthetic[::COPY_EVERY] are noisy copies of real[::COPY_EVERY]."""
    real = structured_images(n, size, seed, device, coarse=0.8, fine=0.3)
    syn = structured_images(n, size, seed + 1, device, coarse=0.9, fine=0.2)
    g = torch.Generator(device=device).manual_seed(seed + 2)
    planted = real[::COPY_EVERY]
    syn[::COPY_EVERY] = (planted + 0.02 * torch.randn(planted.shape, generator=g, device=device)).clamp(-1.0, 1.0)
    return real, syn


def random_inception(seed: int) -> FIDInceptionV3:
    """The gate's FID InceptionV3 without its weights file: He-normal convolutions, BN at identity stats."""
    torch.manual_seed(seed)
    model = FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model.eval()


# --- the naive way -----------------------------------------------------------------------------------


def _row_distances(ref: F64, q: F64) -> F64:
    """Euclidean distances (M,) of one query row q (D,) to every row of ref (M, D): broadcasting, float64."""
    return np.asarray(np.sqrt(((ref - q) ** 2).sum(axis=1)), dtype=np.float64)


def naive_nearest(query: NDArray[np.floating], ref: NDArray[np.floating], exclude_self: bool) -> tuple[F64, F64]:
    """Nearest ref row of each query row by a Python loop over queries (self excluded when asked)."""
    q, r = np.asarray(query, np.float64), np.asarray(ref, np.float64)
    dist, index = np.empty(len(q)), np.empty(len(q))
    for i in range(len(q)):
        d = _row_distances(r, q[i])
        if exclude_self:
            d[i] = np.inf
        j = int(np.argmin(d))
        dist[i], index[i] = d[j], j
    return dist, index


def naive_knn_radii(x: F64, k: int) -> F64:
    """Distance of each row to its k-th nearest other row, one row at a time."""
    radii = np.empty(len(x))
    for i in range(len(x)):
        d = _row_distances(x, x[i])
        d[i] = np.inf
        radii[i] = np.sort(d)[k - 1]
    return radii


def naive_prdc(real: NDArray[np.floating], fake: NDArray[np.floating], k: int) -> tuple[float, float, float, float]:
    """Precision, recall, density, coverage (Naeem et al. 2020) with per-row loops."""
    r, f = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    r_radii, f_radii = naive_knn_radii(r, k), naive_knn_radii(f, k)
    in_ball, hits = np.empty(len(f)), np.empty(len(f))
    for j in range(len(f)):
        inside = _row_distances(r, f[j]) < r_radii
        in_ball[j], hits[j] = inside.any(), inside.sum() / k
    recalled, covered = np.empty(len(r)), np.empty(len(r))
    for i in range(len(r)):
        d = _row_distances(f, r[i])
        recalled[i], covered[i] = (d < f_radii).any(), d.min() < r_radii[i]
    return float(in_ball.mean()), float(recalled.mean()), float(hits.mean()), float(covered.mean())


def naive_fid(a: NDArray[np.floating], b: NDArray[np.floating]) -> float:
    """FID as pytorch-fid computes it: scipy.linalg.sqrtm of S1 S2, eps offset when not finite, real part."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    s1, s2 = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    with warnings.catch_warnings():
        # with fewer samples than dimensions S1 S2 is singular: sqrtm says so; the diff column shows the cost
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(s1)) * 1e-6
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(np.real(covmean)))


def exact_fid(a: NDArray[np.floating], b: NDArray[np.floating]) -> float:
    """FID without any D x D matrix, as a reference for both ways: the eigenvalues of S1 S2 are the
    squared singular values of X1 X2^T / sqrt((n1 - 1)(n2 - 1)) (X centred, n x D), so tr sqrt(S1 S2)
    is their sum; well conditioned also when n < D and S1 S2 is singular."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    n1, n2 = len(x) - 1, len(y) - 1
    tr_covmean = float(np.linalg.svd(xc @ yc.T, compute_uv=False).sum()) / np.sqrt(n1 * n2)
    diff = x.mean(axis=0) - y.mean(axis=0)
    return float(diff @ diff + (xc * xc).sum() / n1 + (yc * yc).sum() / n2 - 2.0 * tr_covmean)


def naive_kid(a: NDArray[np.floating], b: NDArray[np.floating], subsets: int, subset_size: int,
              rng: np.random.Generator) -> F64:
    """KID subset values: the gate's subsets (same draws), kernel sums by a loop over rows."""
    n = min(subset_size, len(a), len(b))
    vals = np.empty(subsets)
    for t in range(subsets):
        x = np.asarray(a[rng.choice(len(a), n, replace=False)], np.float64)
        y = np.asarray(b[rng.choice(len(b), n, replace=False)], np.float64)
        d = x.shape[1]
        sxx = syy = sxy = 0.0
        for i in range(n):
            kx = (x @ x[i] / d + 1.0) ** 3
            ky = (y @ y[i] / d + 1.0) ** 3
            sxx += kx.sum() - kx[i]
            syy += ky.sum() - ky[i]
            sxy += ((y @ x[i] / d + 1.0) ** 3).sum()
        vals[t] = sxx / (n * (n - 1)) + syy / (n * (n - 1)) - 2.0 * sxy / (n * n)
    return vals


def naive_ms_ssim(images: torch.Tensor, groups: NDArray[np.int64], max_pairs: int, rng: np.random.Generator) -> F64:
    """MS-SSIM of the gate's random pairs (same draws), one pair per call."""
    ii, jj = M.random_pairs(groups, max_pairs, rng)
    return np.array([M.ms_ssim_pairs(images[i:i + 1], images[j:j + 1])[0] for i, j in zip(ii.tolist(), jj.tolist(), strict=True)])


# --- the gate's way (its own functions, as run_gate calls them) ---------------------------------------


def gate_nn(r: NDArray[np.floating], s: NDArray[np.floating], device: torch.device) -> tuple[F64, ...]:
    """Memorisation (synthetic -> real), baseline (real -> real) and duplicates (synthetic -> synthetic)
    nearest neighbours on `device`, other items only; every image is its own item. Each set goes to
    the device once (float64), as run_gate's `_memorization` and `_duplicates` do."""
    gr, gs = np.arange(len(r)), np.arange(len(s))
    rt, st = M.as_rows(r, device), M.as_rows(s, device)
    d_sr, i_sr = M.nearest(st, rt, device=device)
    d_rr, i_rr = M.nearest(rt, rt, gr, gr, device=device)
    d_ss, i_ss = M.nearest(st, st, gs, gs, device=device)
    return d_sr, d_rr, d_ss, i_sr.astype(np.float64), i_rr.astype(np.float64), i_ss.astype(np.float64)


def naive_nn(r: NDArray[np.floating], s: NDArray[np.floating]) -> tuple[F64, ...]:
    d_sr, i_sr = naive_nearest(s, r, exclude_self=False)
    d_rr, i_rr = naive_nearest(r, r, exclude_self=True)
    d_ss, i_ss = naive_nearest(s, s, exclude_self=True)
    return d_sr, d_rr, d_ss, i_sr, i_rr, i_ss


def nn_agreement(g: tuple[F64, ...], n: tuple[F64, ...]) -> tuple[float, bool, str]:
    dist = max(float(np.max(np.abs(a - b))) for a, b in zip(g[:3], n[:3], strict=True))
    scale = max(1.0, max(float(np.max(a)) for a in g[:3]))
    wrong = sum(int((a != b).sum()) for a, b in zip(g[3:], n[3:], strict=True))
    return dist, dist / scale < TOLERANCE["nn"] and wrong == 0, f"; {wrong} index mismatches"


# --- the table ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """One step: the gate's time at N and, when compared, the gate and naive times at n and their agreement."""

    step: str
    space: str
    n_full: int
    gate: Timed
    n_sub: int | str | None = None
    gate_sub: Timed | None = None
    naive: Timed | None = None
    diff: float = float("nan")
    agree: bool | None = None
    note: str = ""


def _mem(t: Timed, cuda: bool) -> str:
    rss = "n/a" if np.isnan(t.rss_mib) else f"{t.rss_mib:.0f}"
    return f"{rss}; {t.gpu_mib:.0f}" if cuda else rss


def compare(step: str, space: str, gate_fn: Callable[..., Any], naive_fn: Callable[..., Any],
            full: tuple[Any, ...], sub: tuple[Any, ...] | None, n_full: int, n_sub: int | str,
            agreement: Callable[[Any, Any], tuple[float, bool, str]], device: torch.device) -> Row:
    """Time the gate's function at N and, unless `sub` is None (n = N), at n; the naive one at n; compare at n."""
    log.info("%s (%s): gate at N=%d", step, space, n_full)
    g_full = timed(lambda: gate_fn(*full), device)
    args = full if sub is None else sub
    g_sub = g_full if sub is None else timed(lambda: gate_fn(*args), device)
    log.info("%s (%s): naive at n=%s", step, space, n_sub)
    nv = timed(lambda: naive_fn(*args), device)
    diff, ok, note = agreement(g_sub.value, nv.value)
    return Row(step, space, n_full, g_full, n_sub, g_sub, nv, diff, ok, note)


def relative(tol: float) -> Callable[[Any, Any], tuple[float, bool, str]]:
    def check(a: Any, b: Any) -> tuple[float, bool, str]:
        x, y = np.atleast_1d(np.asarray(a, np.float64)), np.atleast_1d(np.asarray(b, np.float64))
        diff = float(np.max(np.abs(x - y)))
        return diff, diff / max(1.0, float(np.max(np.abs(x)))) < tol, ""
    return check


def absolute(tol: float) -> Callable[[Any, Any], tuple[float, bool, str]]:
    def check(a: Any, b: Any) -> tuple[float, bool, str]:
        diff = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        return diff, diff < tol, ""
    return check


def table_header(cuda: bool) -> str:
    """The table's header line and its alignment line."""
    mem = "peak MiB (RSS rise; GPU)" if cuda else "peak MiB (RSS rise)"
    return (f"| step | space | N | gate s | gate {mem} | n (both ways) | gate s at n | naive s at n | naive {mem} | "
            "chunked / naive | max abs diff | agree |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def table_row(r: Row, cuda: bool) -> str:
    """One step's line of the table; a step without a naive variant has dashes in the comparison columns."""
    if r.naive is None or r.gate_sub is None:
        return (f"| {r.step} | {r.space} | {r.n_full} | {r.gate.seconds:.3f} | {_mem(r.gate, cuda)} | - | - | - | - | - | - | "
                f"{r.note or '-'} |")
    verdict = ("yes" if r.agree else "NO") + (f" ({r.note.lstrip('; ')})" if r.note else "")
    return (f"| {r.step} | {r.space} | {r.n_full} | {r.gate.seconds:.3f} | {_mem(r.gate, cuda)} | {r.n_sub} | "
            f"{r.gate_sub.seconds:.3f} | {r.naive.seconds:.3f} | {_mem(r.naive, cuda)} | "
            f"{r.gate_sub.seconds / r.naive.seconds:.3g} | {r.diff:.2e} | {verdict} |")




# --- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where images are made, features extracted and the gate's metrics run (the "
                             "intensity distance on the CPU); auto: cuda if present")
    parser.add_argument("--n", type=int, default=None, help="images per set (default 10000 on cuda, 2000 on cpu)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 256 on cuda, 64 on cpu)")
    parser.add_argument("--inception-n", type=int, default=None,
                        help="images per set through InceptionV3 and scored in its space (default N on cuda, 128 on cpu)")
    parser.add_argument("--naive-n", type=int, default=1000, help="images per set for the naive feature-space metrics (capped at N)")
    parser.add_argument("--naive-pixel-n", type=int, default=None,
                        help="images per set for the naive pixel-space search (default 32768 // S, ~1e9 float64 differences)")
    parser.add_argument("--encoder-steps", type=int, default=None, help="SimCLR steps of the domain encoder (default: the gate's)")
    parser.add_argument("--max-pairs", type=int, default=None, help="MS-SSIM pairs per set (default: the gate's)")
    parser.add_argument("--naive-pairs", type=int, default=50,
                        help="MS-SSIM pairs per set for the naive one-pair-per-call way (~0.2 s a call on a busy CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, N=48, 32x32, 2 encoder steps, 1 Inception image per set without its metrics (a test of the script)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = load_section(GateConfig, REPO / "configs" / "gate.yaml", "gate")  # the gate recipe, as `medaug gate` reads it

    if args.smoke:
        device = torch.device("cpu")
        n, size, inc_n, naive_n, pix_n, steps, pairs, naive_pairs = 48, 32, 1, 48, 48, 2, 20, 5
    else:
        want = args.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU here; use --device cpu, or --smoke to test the script")
        device = torch.device(want)
        gpu = device.type == "cuda"
        n = args.n or (10000 if gpu else 2000)
        size = args.size or (256 if gpu else 64)
        inc_n = min(n, args.inception_n if args.inception_n is not None else (n if gpu else 128))
        naive_n = min(n, args.naive_n)
        pix_n = min(n, args.naive_pixel_n or max(2, 32768 // size))
        steps = args.encoder_steps or cfg.encoder_steps
        pairs = args.max_pairs or cfg.max_pairs
        naive_pairs = min(pairs, args.naive_pairs)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU {cpu_name()}, {torch.get_num_threads()} torch threads"
    train_n = min(n, cfg.max_slices)
    # images, host copy, encoder, two feature extractions; FID, KID, PRDC, NN per feature space;
    # NN in pixels, MS-SSIM, intensity
    planned = 5 + 4 * (1 if args.smoke else 2) + 3
    rows: list[Row] = []
    table = RowPrinter()

    def add(row: Row) -> None:
        table.row(table_row(row, cuda))
        rows.append(row)

    def rng(stream: int) -> np.random.Generator:
        return np.random.default_rng([args.seed, stream])

    with table:
        try:
            load_start = os.getloadavg()
            print(f"## Quality gate at scale: {n} synthetic vs {n} real, {size}x{size}, 1 channel"
                  f"{' (SMOKE: tiny, CPU, inception-space metrics skipped)' if args.smoke else ''}\n")
            print(f"- device: {name}; torch {torch.__version__}; numpy {np.__version__}; scipy {scipy.__version__}; "
                  f"{datetime.now(UTC).isoformat(timespec='seconds')}")
            print(f"- command: `python bench/gate.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
            print(f"- load average at start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}; "
                  f"{os.cpu_count()} CPUs")
            print(f"- images, feature extraction and the gate's distances, k-NN radii, PRDC, KID and FID on {device}, "
                  f"float64: distances as matrix products in blocks of {M.CHUNK} query rows, each set copied from the "
                  "host to the device once per call (as run_gate); FID exact with fewer samples than dimensions "
                  "(nuclear norm of X1 X2^T); MS-SSIM there too (float32, no TF32); intensity on the CPU")
            print(f"- domain encoder: trained here with the gate's recipe, {steps} SimCLR steps x {cfg.encoder_batch} "
                  f"pairs on {train_n} real images; InceptionV3 pool3: RANDOM He-normal weights (no weights file; the "
                  f"gate's network, load skipped), {inc_n} images per set, batch 32")
            print("- naive: per-row Python loop, each row's float64 distances (or kernel values) to the whole reference "
                  "set by numpy broadcasting; FID by scipy.linalg.sqrtm(S1 S2); MS-SSIM one pair per call; run on the "
                  "first n images of each set, the gate's functions timed again at that n for the ratio (nothing "
                  "extrapolated)")
            print(f"- agreement limits: relative {TOLERANCE['fid']:g} (FID), {TOLERANCE['kid']:g} (KID subset values), "
                  f"{TOLERANCE['nn']:g} (NN distances, and every index equal); absolute {TOLERANCE['prdc']:g} (PRDC), "
                  f"{TOLERANCE['ms-ssim']:g} (MS-SSIM)")
            print("- not timed: bootstrap intervals and the real-halves FID baseline (more calls of the same functions)\n")
            print(table_header(cuda), flush=True)

            # data
            log.info("making %d + %d images of %dx%d on %s", n, n, size, size, device)
            t = timed(lambda: make_sets(n, size, args.seed, device), device)
            real, syn = t.value
            add(Row("make images on the device", "pixels", n, t))
            # run_gate holds host arrays: images for MS-SSIM, (N, S*S) float32 rows that the metrics copy to the
            # device for distances; the naive way runs on the host
            t = timed(lambda: (real.cpu(), syn.cpu()), device)
            real_h, syn_h = t.value
            pr, ps = real_h.reshape(n, -1).numpy(), syn_h.reshape(n, -1).numpy()
            add(Row("images to host (float32)", "pixels", n, t))

            # features: the domain encoder (trained here, as run_gate does) and random-weight InceptionV3
            log.info("training the domain encoder: %d steps on %d images", steps, train_n)
            t = timed(lambda: train_domain_encoder(real[:train_n], steps=steps, batch=cfg.encoder_batch, width=cfg.encoder_width,
                                                   lr=cfg.encoder_lr, temperature=cfg.encoder_temperature, seed=args.seed,
                                                   device=str(device)), device)
            encoder = t.value.cpu()
            add(Row(f"train domain encoder ({steps} steps x {cfg.encoder_batch} pairs)", "domain", train_n, t))
            domain = DomainExtractor(encoder, state_dict_sha256(encoder.state_dict()), str(device))
            t = timed(lambda: (domain(real), domain(syn)), device)
            fr_d, fs_d = t.value
            add(Row("extract features (real + synthetic)", f"domain {fr_d.shape[1]}-d", n, t))
            inception = InceptionExtractor(random_inception(args.seed), "random-init", str(device))
            log.info("InceptionV3 pool3 features of %d + %d images", inc_n, inc_n)
            t = timed(lambda: (inception(real[:inc_n]), inception(syn[:inc_n])), device)
            fr_i, fs_i = t.value
            add(Row("extract features (real + synthetic)", "inception 2048-d", inc_n, t, note="random weights"))

            # metrics in each feature space: the gate's functions at N (and at n), the naive way at n
            spaces = [("domain", fr_d, fs_d)]
            if not args.smoke:
                spaces.append(("inception", fr_i, fs_i))
            for space, fr, fs in spaces:
                nf = len(fr)
                ns = min(nf, naive_n)
                full, sub = (fr, fs), (None if ns == nf else (fr[:ns], fs[:ns]))
                kk = min(cfg.nearest_k, ns - 1)
                exact = exact_fid(fs[:ns], fr[:ns])

                def fid_check(g: float, nv: float, exact: float = exact) -> tuple[float, bool, str]:
                    # judged against the exact value: with fewer samples than dimensions sqrtm (the
                    # naive way) is the one that is off, by the round-off eigenvalues it sums
                    diff = abs(g - nv)
                    return diff, abs(exact - g) / max(1.0, abs(exact)) < TOLERANCE["fid"], (
                        f"; FID {g:.6g}; exact (n x n SVD) minus gate {exact - g:.1e}, minus naive {exact - nv:.1e}")

                add(compare("FID", space, lambda a, b: M.fid(b, a, device), lambda a, b: naive_fid(b, a),
                            full, sub, nf, ns, fid_check, device))
                add(compare(
                    f"KID ({cfg.kid_subsets} subsets of {min(cfg.kid_subset_size, ns)})", space,
                    lambda a, b: M.kid(b, a, cfg.kid_subsets, cfg.kid_subset_size, rng(3), device).values,
                    lambda a, b: naive_kid(b, a, cfg.kid_subsets, cfg.kid_subset_size, rng(3)),
                    full, sub, nf, ns, relative(TOLERANCE["kid"]), device))
                add(compare(
                    f"precision/recall/density/coverage (k={kk})", space,
                    lambda a, b, kk=kk: (lambda p: (p.precision, p.recall, p.density, p.coverage))(
                        M.prdc(a, b, kk, np.arange(len(a)), np.arange(len(b)), device=device)),
                    lambda a, b, kk=kk: naive_prdc(a, b, kk),
                    full, sub, nf, ns, absolute(TOLERANCE["prdc"]), device))
                add(compare("nearest neighbours: syn->real, real->real, syn->syn", space,
                            lambda r, s: gate_nn(r, s, device), naive_nn,
                            full, sub, nf, ns, nn_agreement, device))
            add(compare("nearest neighbours: syn->real, real->real, syn->syn", f"pixels {size * size}-d",
                        lambda r, s: gate_nn(r, s, device), naive_nn, (pr, ps),
                        None if pix_n == n else (pr[:pix_n], ps[:pix_n]), n, pix_n, nn_agreement, device))

            # diversity (the gate's pairs at N; the naive per-pair calls on fewer pairs, the gate timed again on those)
            groups = np.arange(n)

            def gate_ms(a: torch.Tensor, b: torch.Tensor, p: int) -> F64:
                return np.concatenate([M.mean_pairwise_ms_ssim(b, groups, p, rng(4), device=device),
                                       M.mean_pairwise_ms_ssim(a, groups, p, rng(5), device=device)])

            def naive_ms(a: torch.Tensor, b: torch.Tensor, p: int) -> F64:
                return np.concatenate([naive_ms_ssim(b, groups, p, rng(4)), naive_ms_ssim(a, groups, p, rng(5))])

            add(compare(f"MS-SSIM diversity ({pairs} pairs per set; n = pairs)", "pixels", gate_ms, naive_ms,
                        (real_h, syn_h, pairs), (real_h, syn_h, naive_pairs), n, f"{naive_pairs} pairs",
                        absolute(TOLERANCE["ms-ssim"]), device))

            # intensity
            def w1() -> float:
                r = rng(1)
                vs, vr = ps.ravel(), pr.ravel()
                return M.intensity_w1(r.choice(vs, min(len(vs), 400_000), replace=False), r.choice(vr, min(len(vr), 400_000), replace=False))
            add(Row("intensity W1 (400k pixels per set)", "pixels", n, timed(w1, device), note="no naive variant"))

            # summary
            load_end = os.getloadavg()
            compared = [r for r in rows if r.naive is not None and r.gate_sub is not None]
            gate_sub = sum(r.gate_sub.seconds for r in compared if r.gate_sub is not None)
            naive = sum(r.naive.seconds for r in compared if r.naive is not None)
            total = sum(r.gate.seconds for r in rows)
            print(f"\n- gate, every step above at its N: {total:.1f} s")
            print(f"- compared steps at their n: gate {gate_sub:.1f} s, naive {naive:.1f} s, "
                  f"chunked / naive {gate_sub / naive:.3g}")
            differ = [f"{r.step} ({r.space})" for r in compared if not r.agree]
            print(f"- naive and chunked results agree: {'yes' if not differ else 'NO, in ' + ', '.join(differ)}")
            print(f"- load average at end {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}", flush=True)
        except Stopped:
            print(f"\n- stopped by SIGTERM after {table.printed} of {planned} rows", flush=True)
            return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
