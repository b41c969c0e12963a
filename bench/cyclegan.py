"""GPU training throughput of the CycleGAN (ResNet-9 generators, 70x70 PatchGAN discriminators, 1 channel, 256x256).

Times the trainer's own `generator_step` + `discriminator_step` (models/train_cyclegan.py:
both generators and both discriminators, image pools, loss bookkeeping) on synthetic
slices already on the GPU, for a ladder of settings:

  (a) reference: fp32 (cuDNN's default TF32 convolutions), batch 1, eager, foreach Adam
  (b) + bf16 autocast
  (c) fastest:   bf16, batch 16, channels_last, fused Adam, torch.compile
  plus the steps between (b) and (c), so each setting's share is visible, and (c) with CUDA
  graphs (torch.compile mode reduce-overhead) last; a row that fails says so in the table.

It also counts the FLOPs of one training iteration (torch.utils.flop_counter.FlopCounterMode:
convolutions and matmuls, forward and backward) and reports achieved TFLOP/s against a
measured bf16 matmul ceiling on the same device. The result is a Markdown table on stdout,
each row printed (and flushed) as soon as it is measured, so a run cut short by `timeout`
keeps the rows it finished; SIGTERM ends it with a line saying how many rows it measured.
Nothing is written to the repository. One call through the device tool:

    .venv/bin/python bench/cyclegan.py > $OUT/cyclegan_bench.md

`--smoke` runs every row on CPU at 32x32 with tiny widths for 2 iterations (no compile),
so tests/test_cyclegan_bench.py can check that the script works without a GPU.
"""

from __future__ import annotations

import argparse
import logging
import platform
import signal
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any folder
    sys.path.insert(0, str(REPO))

from bench.common import RowPrinter, Stopped, failure  # noqa: E402
from models.train_cyclegan import (  # noqa: E402
    CycleGANConfig,
    RunState,
    build_training,
    discriminator_step,
    generator_step,
)

log = logging.getLogger("bench.cyclegan")




@dataclass(frozen=True)
class Setting:
    """One row of the table: a name and the config options it changes."""

    name: str
    batch_size: int
    bf16: bool
    channels_last: bool
    fused_adam: bool
    compile: bool
    compile_mode: str = "default"


def settings(smoke: bool) -> list[Setting]:
    big = 2 if smoke else 16
    return [
        Setting("(a) reference: fp32, batch 1", 1, False, False, False, False),
        Setting("(b) bf16 autocast, batch 1", 1, True, False, False, False),
        Setting(f"bf16, batch {big}", big, True, False, False, False),
        Setting(f"bf16, batch {big}, channels_last, fused Adam", big, True, True, True, False),
        Setting(f"(c) fastest: bf16, batch {big}, channels_last, fused Adam, "
                + ("no compile (smoke)" if smoke else "compile"), big, True, True, True, not smoke),
        # last, so a limit that cuts the run short costs only this row
        Setting(f"bf16, batch {big}, channels_last, fused Adam, compile + CUDA graphs (reduce-overhead)"
                + (", no compile (smoke)" if smoke else ""), big, True, True, True, not smoke, "reduce-overhead"),
    ]


def make_config(s: Setting, size: int, smoke: bool) -> CycleGANConfig:
    options: dict[str, object] = dict(image_size=size, in_channels=1, batch_size=s.batch_size, bf16=s.bf16,
                                      channels_last=s.channels_last, fused_adam=s.fused_adam, compile=s.compile,
                                      compile_mode=s.compile_mode)
    if smoke:
        options.update(ngf=8, ndf=8, n_res_blocks=2)
    return CycleGANConfig.model_validate(options)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(cfg: CycleGANConfig, device: torch.device, state: RunState) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (cfg.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
    mri = (torch.rand(shape, generator=g) * 2 - 1).to(device).contiguous(memory_format=state.memory_format)
    ct = (torch.rand(shape, generator=g) * 2 - 1).to(device).contiguous(memory_format=state.memory_format)
    return mri, ct


def iteration(state: RunState, mri: torch.Tensor, ct: torch.Tensor) -> None:
    """One CycleGAN training step: G step, then D step on the same fakes (as train_cyclegan does)."""
    _, fake_mri, fake_ct, _ = generator_step(state, mri, ct)
    discriminator_step(state, mri, ct, fake_mri, fake_ct)
    state.sched_g.step()
    state.sched_d.step()


def time_setting(s: Setting, device: torch.device, size: int, warmup: int, iters: int, smoke: bool) -> float:
    """Seconds per training iteration (median-free: total wall time of `iters` after `warmup`)."""
    cfg = make_config(s, size, smoke)
    state = build_training(cfg, device)
    mri, ct = batches(cfg, device, state)
    for _ in range(warmup):  # compile, cuDNN autotuning, allocator warm-up, pools filling
        iteration(state, mri, ct)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        iteration(state, mri, ct)
    sync(device)
    return (time.perf_counter() - start) / iters


def flops_per_iteration(device: torch.device, size: int, smoke: bool) -> int:
    """FLOPs of one fp32 eager iteration at batch 1 (conv/matmul, forward + backward), counted not timed."""
    s = Setting("flops", 1, False, False, False, False)
    cfg = make_config(s, size, smoke)
    state = build_training(cfg, device)
    mri, ct = batches(cfg, device, state)
    with FlopCounterMode(display=False) as counter:
        iteration(state, mri, ct)
    return int(counter.get_total_flops())


def matmul_ceiling(device: torch.device, smoke: bool) -> float:
    """Achieved TFLOP/s of a large square bf16 matmul (fp32 on CPU) on this device."""
    n, reps = (256, 2) if smoke else (8192, 50)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def print_header(name: str, device: torch.device, size: int, warmup: int, iters: int, flops: int, ceiling: float,
                 smoke: bool, argv: list[str] | None) -> None:
    """Print (and flush) what comes before the rows: title, device, command, FLOPs, ceiling, table header."""
    print(f"## CycleGAN training throughput, {size}x{size}, 1 channel{' (SMOKE: tiny widths, CPU)' if smoke else ''}\n")
    print(f"- device: {name}; torch {torch.__version__}; {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(f"- command: `python bench/cyclegan.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(f"- {warmup} warm-up + {iters} timed iterations per row; one iteration = G step + D step of "
          "both directions (2 generators, 2 PatchGANs, image pools); images/s counts MRI+CT pairs")
    print(f"- FLOPs per image (FlopCounterMode, conv + matmul, fwd + bwd): {flops / 1e9:.2f} GFLOP")
    print(f"- matmul ceiling ({'bf16' if device.type == 'cuda' else 'fp32'}, measured here): {ceiling:.1f} TFLOP/s\n")
    print("| setting | batch | ms / iteration | images/s | vs (a) | achieved TFLOP/s | % of matmul ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)


def table_row(s: Setting, seconds: float, ref_rate: float, flops: int, ceiling: float) -> str:
    """One row of the table: `seconds` per iteration of setting `s`; `ref_rate` is row (a)'s images/s."""
    rate = s.batch_size / seconds
    tflops = flops * rate / 1e12
    return (f"| {s.name} | {s.batch_size} | {seconds * 1e3:.1f} | {rate:.1f} | {rate / ref_rate:.2f}x | "
            f"{tflops:.2f} | {100 * tflops / ceiling:.1f}% |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, 32x32, tiny widths, 2 iterations (a test of the script)")
    parser.add_argument("--size", type=int, default=256, help="image height and width (default 256)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations per row (default 10)")
    parser.add_argument("--iters", type=int, default=30, help="timed iterations per row (default 30)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    if args.smoke:
        device, size, warmup, iters = torch.device("cpu"), 32, 1, 2
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU: run on a GPU machine, or pass --smoke to test the script on CPU")
        device, size, warmup, iters = torch.device("cuda"), args.size, args.warmup, args.iters
        torch.backends.cudnn.benchmark = True

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    ladder = settings(args.smoke)
    with RowPrinter() as table:
        try:
            ceiling = matmul_ceiling(device, args.smoke)
            flops = flops_per_iteration(device, size, args.smoke)
            print_header(name, device, size, warmup, iters, flops, ceiling, args.smoke, argv)
            ref_rate = 0.0
            for s in ladder:  # (a) comes first: every row's "vs (a)" needs its rate
                log.info("timing %s", s.name)
                try:
                    seconds = time_setting(s, device, size, warmup, iters, args.smoke)
                except (RuntimeError, AssertionError) as exc:  # a setting this torch cannot run (e.g. CUDA graphs)
                    if not ref_rate:
                        raise
                    log.exception("%s failed", s.name)
                    table.row(f"| {s.name} | {s.batch_size} | {failure(exc)} | | | | |")
                    continue
                ref_rate = ref_rate or s.batch_size / seconds
                table.row(table_row(s, seconds, ref_rate, flops, ceiling))
        except Stopped:
            print(f"\n- stopped by SIGTERM after {table.printed} of {len(ladder)} rows", flush=True)
            return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
