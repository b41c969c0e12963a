"""Check pipeline/gate/inception.py's FIDInceptionV3 against torchvision's Inception3, block by block.

Our network is typed out by hand (so the gate needs no torchvision); a layer that differed from
the reference would give a non-standard FID with no error. The reference here is torchvision's
own Inception3 (1008 classes, no auxiliary head) with the one change pytorch-fid makes to it for
FID (pytorch-fid's FIDInceptionA/C/E_1/E_2 are torchvision's blocks with that change): the
branch pools of the Inception blocks do not count padding, and the last block (Mixed_7c) pools
that branch with a 3x3 max instead of an average. That change is applied by swapping the
`avg_pool2d` torchvision's blocks call, not by retyping any block, so the wiring, kernel sizes,
paddings, strides, channel orders and BatchNorm settings compared are torchvision's.

One random state dict (BatchNorm statistics and affine parameters random too) is loaded into
both networks in float64; each block gets the reference's input to the block, so a difference
shows at the block that causes it; then the whole forward pass is compared at pool3 (the
reference's own forward, read by a hook on its avgpool). Every difference must be <= 1e-5.

Run: `make verify-inception` (a throwaway venv with torchvision) or
`PYTHONPATH=. python tests/inception_reference.py` where torchvision imports;
tests/test_inception_reference.py runs the same check when torchvision imports, and skips
otherwise; it also plants the stock torchvision pool (padding counted) in our blocks and
requires the check to flag Mixed_5b first.

Last run (2026-12-06, AMD EPYC CPU, torch 2.14.1, torchvision 0.29.1, float64): every block and
pool3 of the whole network equal to torchvision's exactly (max abs difference 0 in all 20 rows;
reference outputs up to 70). With the planted pool the differences are 2.6 to 11 from Mixed_5b on.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: the repository root holds pipeline/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.gate.inception import FIDInceptionV3  # noqa: E402

TOLERANCE = 1e-5
"""Largest absolute difference allowed between the two networks' outputs (float64)."""

BLOCKS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
          "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
          "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")
"""Inception3's blocks up to pool3, in the order its forward pass runs them."""


def torchvision_reference() -> Any:
    """torchvision's Inception3 as FID uses it: 1008 classes, no aux head, inputs not transformed."""
    from torchvision.models.inception import Inception3

    return Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)


@contextlib.contextmanager
def fid_pools(last_block: bool) -> Iterator[None]:
    """Make torchvision's Inception blocks pool their pool branch the FID way while inside.

    Their `F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)` becomes the same average
    without padding counted, or (last_block) a 3x3 max pool, as pytorch-fid's FID blocks do.
    """
    import torchvision.models.inception as tv_inception

    def pool(x: torch.Tensor, kernel_size: int, stride: int | None = None, padding: int = 0, **_: Any) -> torch.Tensor:
        if last_block:
            return F.max_pool2d(x, kernel_size, stride, padding)
        return F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=False)

    shim = types.SimpleNamespace(**{name: getattr(F, name) for name in dir(F) if not name.startswith("__")})
    shim.avg_pool2d = pool
    saved = tv_inception.F
    tv_inception.F = shim  # type: ignore[assignment]
    try:
        yield
    finally:
        tv_inception.F = saved


def random_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A random state dict for `model`: conv and fc weights at their default scale, BatchNorm
    running mean ~N(0, 0.1), running variance in [0.5, 1.5], affine weight in [0.5, 1.5], bias ~N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            out[key] = value.clone()
        elif key.endswith("running_var") or (key.endswith(".weight") and value.ndim == 1):
            out[key] = 0.5 + torch.rand(value.shape, generator=gen, dtype=value.dtype)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            out[key] = 0.1 * torch.randn(value.shape, generator=gen, dtype=value.dtype)
        else:  # conv / linear weights: variance-preserving for a ReLU network
            fan_in = value[0].numel()
            out[key] = torch.randn(value.shape, generator=gen, dtype=value.dtype) * (2.0 / fan_in) ** 0.5
    return out


def compare(seed: int = 0, n_images: int = 2) -> list[tuple[str, float, float]]:
    """(block, max |ours - reference|, max |reference|) per block, then ("pool3 (whole network)", ...)."""
    ref, ours = torchvision_reference(), FIDInceptionV3()
    state = random_state_dict(ref, seed)
    ref.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)  # the same keys and shapes, or this raises
    ref, ours = ref.double().eval(), ours.double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand((n_images, 3, 299, 299), generator=gen, dtype=torch.float64) * 2 - 1
    rows = []
    with torch.no_grad():
        h = x
        for name in BLOCKS:
            with fid_pools(last_block=name == "Mixed_7c"):
                want = getattr(ref, name)(h)
            got = getattr(ours, name)(h)
            if got.shape != want.shape:
                raise AssertionError(f"{name}: output shape {tuple(got.shape)}, torchvision's {tuple(want.shape)}")
            rows.append((name, float((got - want).abs().max()), float(want.abs().max())))
            h = want
        pooled: list[torch.Tensor] = []
        hook = ref.avgpool.register_forward_hook(lambda module, inputs, output: pooled.append(output))
        try:
            with fid_pools(last_block=False):
                # Mixed_7c must pool with max: run the reference's own forward with that block's pool swapped too
                block = ref.Mixed_7c
                forward = block.forward

                def last(t: torch.Tensor) -> torch.Tensor:
                    with fid_pools(last_block=True):
                        return forward(t)

                block.forward = last  # type: ignore[method-assign]
                try:
                    ref(x)
                finally:
                    del block.forward
        finally:
            hook.remove()
        want = torch.flatten(pooled[0], 1)
        got = ours(x)
        rows.append(("pool3 (whole network)", float((got - want).abs().max()), float(want.abs().max())))
    return rows


def main() -> int:
    import torchvision

    rows = compare()
    print(f"FIDInceptionV3 vs torchvision {torchvision.__version__} Inception3 (torch {torch.__version__}), "
          f"one random state dict, float64, tolerance {TOLERANCE:g}")
    print("| block | max abs difference | max abs reference output |")
    print("|---|---|---|")
    for name, diff, scale in rows:
        print(f"| {name} | {diff:.3g} | {scale:.3g} |")
    bad = [name for name, diff, _ in rows if not diff <= TOLERANCE]
    print("all blocks agree" if not bad else f"DIFFER: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
