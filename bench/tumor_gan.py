"""Training and sampling throughput of the tumor-patch GAN at 64x64 (patches per second).

Times the trainer's own pieces (models/train_tumor_gan.py: sample_batch, make_latents, the
generator forward, discriminator_step, generator_step, the EMA update) on synthetic patches
already on the device, with the recipe of configs/tumor_gan.yaml (hinge, spectral norm,
minibatch std, mode seeking, DiffAugment), for two settings in one run:

  baseline: fp32, batch 16, eager
  fastest:  bf16 autocast, batch 128, cuDNN autotuning, torch.compile (GPU only)

and sampling (`generate`, EMA generator in eval mode) at batch 64 fp32 vs. batch 512 bf16.
The result is a Markdown table on stdout (device, date, command, ratio of the two), each row
printed (and flushed) as soon as it is measured, so a run cut short by `timeout` keeps the rows
it finished; SIGTERM ends it with a line saying how many rows it measured. Nothing is written to
the repository. On a GPU machine:

    .venv/bin/python bench/tumor_gan.py > $OUT/tumor_gan_bench.md

`--smoke` runs both settings on CPU at 16x16 with tiny widths for 2 steps (no compile), so
tests can check the script works without a GPU.
"""

from __future__ import annotations

import argparse
import platform
import signal
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any folder
    sys.path.insert(0, str(REPO))

from bench.common import RowPrinter, Stopped, failure  # noqa: E402
from medaug.config import load_section  # noqa: E402
from models.common import EMA, select_device  # noqa: E402
from models.train_tumor_gan import (  # noqa: E402
    TumorGANConfig,
    TumorPatchData,
    build_networks,
    build_optimisers,
    discriminator_step,
    generate,
    generator_step,
    make_latents,
    sample_batch,
)


@dataclass(frozen=True)
class Setting:
    """One row: a name, the training batch, bf16 on/off, torch.compile on/off, the sampling batch."""

    name: str
    batch_size: int
    bf16: bool
    compile: bool
    sample_batch: int


def synthetic_data(n: int, size: int, device: torch.device) -> TumorPatchData:
    """`n` random patches (discs on noise) of 3 classes, on `device`."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * size * 0.5 + size * 0.25
    d = ((yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2).sqrt()
    masks = (d < size * 0.15).float()
    images = (masks * 1.2 - 0.6 + 0.1 * torch.randn(n, size, size, generator=g)).clamp(-1, 1)
    return TumorPatchData(images[:, None].to(device), masks[:, None].to(device), (torch.arange(n) % 3).to(device),
                          ["healthy", "necrotic", "round"], "CT", (1.0, 1.0, 1.0), ["bench"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_setting(base: TumorGANConfig, s: Setting, data: TumorPatchData, device: torch.device,
                 steps: int, warmup: int, n_sample: int) -> dict[str, float]:
    """Training patches/s (real patches seen by D per second) and sampling patches/s of one setting."""
    cfg = base.model_copy(update={"batch_size": s.batch_size, "amp": s.bf16, "compile": s.compile})
    torch.backends.cudnn.benchmark = s.compile or s.bf16
    torch.manual_seed(0)
    g, d = build_networks(cfg, len(data.classes))
    g, d = g.to(device), d.to(device)
    opt_g, opt_d = build_optimisers(cfg, g, d)
    ema = EMA(g, 0.999)
    g_run: torch.nn.Module = torch.compile(g) if s.compile else g  # type: ignore[assignment]
    d_run: torch.nn.Module = torch.compile(d) if s.compile else d  # type: ignore[assignment]
    data_gen, noise_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)

    def one_step() -> None:
        real, y = sample_batch(data, cfg.batch_size, data_gen, True)
        z, y_fake = make_latents(cfg, y, noise_gen, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16 and device.type == "cuda"):
            fake = g_run(z, y_fake)
        discriminator_step(d_run, opt_d, real, y, fake, y_fake, cfg, device)
        generator_step(g_run, d_run, opt_g, fake, y_fake, z, real, y, cfg, device)
        ema.update(g)

    for _ in range(warmup):
        one_step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    _sync(device)
    train_s = time.perf_counter() - t0

    generate(ema.module, 0, s.sample_batch, 0, cfg.latent_dim, device, s.sample_batch, amp=s.bf16)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    generate(ema.module, 0, n_sample, 1, cfg.latent_dim, device, s.sample_batch, amp=s.bf16)
    _sync(device)
    sample_s = time.perf_counter() - t0
    return {"train_patches_per_s": steps * cfg.batch_size / train_s, "sample_patches_per_s": n_sample / sample_s}


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark and return the Markdown report, printed line by line as it is measured.
    On SIGTERM: print and flush "- stopped by SIGTERM after N of M rows", then exit with status 143."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, 16x16, tiny widths, 2 steps: checks the script runs.")
    parser.add_argument("--steps", type=int, default=50, help="Timed training steps per setting.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    args = parser.parse_args(argv)

    recipe = REPO / "configs" / "tumor_gan.yaml"
    if args.smoke:
        device = torch.device("cpu")
        base = load_section(TumorGANConfig, recipe, "tumor_gan", ["tumor_gan.patch_size=16", "tumor_gan.latent_dim=8",
                                                                  "tumor_gan.g_channels=4", "tumor_gan.d_channels=4"])
        settings = [Setting("baseline: fp32, batch 4", 4, False, False, 8), Setting("fastest: batch 8", 8, True, False, 16)]
        steps, warmup, n_sample = 2, 1, 32
    else:
        device = select_device(args.device)
        base = load_section(TumorGANConfig, recipe, "tumor_gan", ["tumor_gan.patch_size=64"])
        on_gpu = device.type == "cuda"
        settings = [
            Setting("baseline: fp32, batch 16, eager", 16, False, False, 64),
            # the same without compile first: if compile fails on this torch, the table still has a fast row
            *([Setting("bf16, batch 128, cudnn.benchmark, eager", 128, True, False, 512)] if on_gpu else []),
            Setting("fastest: bf16, batch 128, cudnn.benchmark" + (", compile" if on_gpu else ""), 128, on_gpu, on_gpu, 512),
        ]
        steps, warmup, n_sample = args.steps, 10, 4096
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines: list[str] = []

    def emit(*new: str) -> None:
        lines.extend(new)
        print("\n".join(new), flush=True)

    rows: list[dict[str, float]] = []
    with RowPrinter() as table:
        try:
            emit(f"## Tumor GAN throughput ({base.patch_size}x{base.patch_size}, g/d width {base.g_channels})",
                 "",
                 f"device: {name} ({device.type}); torch {torch.__version__}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
                 f"command: python bench/tumor_gan.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
                 f"{steps} timed steps after {warmup} warm-up; sampling {n_sample} patches with the EMA generator",
                 "",
                 "| setting | train patches/s | sample patches/s |",
                 "|---|---:|---:|")
            data = synthetic_data(512 if not args.smoke else 32, base.patch_size, device)
            for s in settings:
                try:
                    r = time_setting(base, s, data, device, steps, warmup, n_sample)
                except (RuntimeError, AssertionError) as exc:  # e.g. compile on this torch; the baseline must work
                    if not rows:
                        raise
                    lines.append(f"| {s.name} | {failure(exc)} | |")
                    table.row(lines[-1])
                    continue
                lines.append(f"| {s.name} | {r['train_patches_per_s']:.1f} | {r['sample_patches_per_s']:.1f} |")
                table.row(lines[-1])
                rows.append({**r, "name": s.name})  # type: ignore[dict-item]
        except Stopped:
            emit("", f"- stopped by SIGTERM after {table.printed} of {len(settings)} rows")
            raise SystemExit(128 + signal.SIGTERM) from None
    if len(rows) < 2:
        emit("", "fastest / baseline: no row besides the baseline ran")
        return "\n".join(lines) + "\n"
    base_r = rows[0]
    fast_r = max(rows[1:], key=lambda r: r["train_patches_per_s"])
    emit("",
         f"fastest / baseline: training x{fast_r['train_patches_per_s'] / base_r['train_patches_per_s']:.2f}, "
         f"sampling x{fast_r['sample_patches_per_s'] / base_r['sample_patches_per_s']:.2f} ({fast_r['name']})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
