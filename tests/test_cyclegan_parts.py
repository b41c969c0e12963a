"""Known-answer tests of the CycleGAN building blocks: networks, losses, DiffAugment/ADA and the shared GAN helpers."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, versioned
from models.common import (
    EMA,
    HealthMonitor,
    ImagePool,
    MetricsWriter,
    NonFiniteGuard,
    TrainingDivergedError,
    autocast_dtype,
    batch_diversity,
    config_hash,
    grad_norm,
    gradient_penalty,
    r1_penalty,
    read_metrics,
    rng_state,
    save_image_grid,
    select_device,
    set_rng_state,
    write_model_card,
)
from models.cyclegan import PatchGANDiscriminator, ResnetGenerator
from models.diffaug import AdaptiveAugment, cutout, diff_augment, translation
from models.losses import (
    discriminator_loss,
    filled_body,
    generator_loss,
    gradient_correlation,
    mind_descriptor,
    shape_loss,
    structure_loss,
)

torch.set_num_threads(1)


# --- networks ----------------------------------------------------------------------------------


def test_generator_shapes_range_and_2p5d_channels() -> None:
    g = ResnetGenerator(in_channels=3, ngf=4, n_res_blocks=1)
    y = g(torch.randn(2, 3, 32, 32) * 5)
    assert y.shape == (2, 3, 32, 32)
    assert y.abs().max() <= 1.0
    with pytest.raises(ValueError, match="multiples of 4"):
        g(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        g(torch.randn(1, 1, 32, 32))


def test_published_sizes() -> None:
    # ResNet-9 generator and 70x70 PatchGAN with 64 filters; single channel (reference with RGB: 11.378 M, 2.765 M)
    assert sum(p.numel() for p in ResnetGenerator().parameters()) == 11_365_633
    d = PatchGANDiscriminator()
    assert sum(p.numel() for p in d.parameters()) == 2_762_689
    assert PatchGANDiscriminator(ndf=4)(torch.zeros(1, 1, 256, 256)).shape == (1, 1, 30, 30)


def test_patchgan_receptive_field_is_70() -> None:
    d = PatchGANDiscriminator(ndf=4)
    for block in d.net.children():  # instance norm mixes all positions; without it the field is local
        if hasattr(block, "adn") and hasattr(block.adn, "N"):
            block.adn.N = nn.Identity()
    x = torch.randn(1, 1, 128, 128, requires_grad=True)
    out = d(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    assert x.grad is not None
    rows = (x.grad[0, 0].abs().sum(dim=1) > 0).nonzero()
    cols = (x.grad[0, 0].abs().sum(dim=0) > 0).nonzero()
    assert int(rows.max() - rows.min() + 1) == 70
    assert int(cols.max() - cols.min() + 1) == 70


def test_patchgan_spectral_norm_parametrizes_every_conv() -> None:
    d = PatchGANDiscriminator(ndf=4, spectral_norm=True)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5 and all(parametrize.is_parametrized(m, "weight") for m in convs)
    for _ in range(30):  # power iteration runs once per training-mode forward
        d(torch.randn(1, 1, 32, 32))
    for m in convs:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert float(sigma) == pytest.approx(1.0, abs=0.05)
    assert len(d.features(torch.randn(1, 1, 32, 32))) == 5


# --- losses ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "d_perfect", "d_blind", "g_fooled"),
    [("lsgan", 0.0, 1.0, 0.0), ("hinge", 0.0, 2.0, -1.0), ("wgan", -2.0, 0.0, -1.0)],
)
def test_adversarial_losses_known_values(kind: str, d_perfect: float, d_blind: float, g_fooled: float) -> None:
    real, fake = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    if kind in ("hinge", "wgan"):
        fake = -torch.ones(2, 1, 3, 3)
    assert float(discriminator_loss(kind, real, fake)) == pytest.approx(d_perfect)  # type: ignore[arg-type]
    zeros = torch.zeros(2, 1, 3, 3)
    assert float(discriminator_loss(kind, zeros, zeros)) == pytest.approx(d_blind)  # type: ignore[arg-type]
    assert float(generator_loss(kind, torch.ones(4))) == pytest.approx(g_fooled)  # type: ignore[arg-type]


def test_vanilla_loss_is_non_saturating() -> None:
    assert float(discriminator_loss("vanilla", torch.zeros(3), torch.zeros(3))) == pytest.approx(2 * math.log(2))
    x = torch.tensor([-20.0], requires_grad=True)  # D is sure the fake is fake: G still gets a gradient
    generator_loss("vanilla", x).backward()
    assert x.grad is not None
    assert float(x.grad.abs()) > 0.99


def test_unknown_loss_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="lsgan, vanilla, hinge, wgan"):
        generator_loss("bce", torch.zeros(1))  # type: ignore[arg-type]


def _blob(shift: int = 0) -> torch.Tensor:
    """(1, 1, 32, 32): a bright disc with a dark ring (a skull-like edge), moved `shift` pixels right."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    r = torch.sqrt((yy - 16) ** 2 + (xx - 16 - shift) ** 2)
    return (torch.where(r < 10, 0.6, -1.0) - 1.2 * ((r > 7) & (r < 10)).float())[None, None]


def test_mind_known_answers() -> None:
    x = _blob() + 0.05 * torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    m = mind_descriptor(x)
    assert m.shape == (1, 4, 32, 32) and float(m.min()) > 0 and float(m.amax(dim=1).min()) == pytest.approx(1.0)
    # MIND ignores any affine intensity map, contrast inversion included (bone: dark in MR, bright in CT)
    assert float(structure_loss("mind", x, x)) == 0.0
    assert float(structure_loss("mind", x, 0.3 - 0.5 * x)) < 1e-4
    # ...but not moved anatomy
    assert float(structure_loss("mind", _blob(), _blob(3))) > 0.05
    assert torch.allclose(mind_descriptor(torch.zeros(2, 3, 8, 8)), torch.ones(2, 12, 8, 8))  # flat: all alike


def test_gradient_correlation_known_answers() -> None:
    a = _blob() + 0.05 * torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert float(gradient_correlation(a, 3 * a - 1)) == pytest.approx(1.0, abs=1e-5)
    assert float(gradient_correlation(a, -a)) == pytest.approx(-1.0, abs=1e-5)
    assert float(structure_loss("gradcorr", a, a)) == pytest.approx(0.0, abs=1e-5)
    assert 0.3 < float(structure_loss("gradcorr", _blob(), _blob(3))) < 2.0
    assert float(structure_loss("none", a, -a)) == 0.0
    with pytest.raises(ValueError, match="none, mind, gradcorr"):
        structure_loss("ssim", a, a)  # type: ignore[arg-type]


def test_structure_losses_pass_gradients() -> None:
    for kind in ("mind", "gradcorr"):
        y = (_blob(2) * 0.5).requires_grad_(True)
        structure_loss(kind, _blob(), y).backward()  # type: ignore[arg-type]
        assert y.grad is not None and float(y.grad.abs().sum()) > 0



def _head(shift: int = 0, size: int = 32) -> torch.Tensor:
    """(1, 1, size, size) MR-like head: tissue (0.4) with a dark skull ring (-0.98) inside, air -1 around it."""
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    r = torch.sqrt((yy - size / 2) ** 2 + (xx - size / 2 - shift) ** 2)
    head = torch.where(r < 12, 0.4, -1.0)
    return torch.where((r > 8) & (r < 10), -0.98, head)[None, None]


def test_filled_body_fills_enclosed_dark_tissue_like_scipy() -> None:
    from scipy import ndimage

    x = _head()
    filled = filled_body((x > -0.95).float())
    # the skull ring is as dark as air but enclosed: body, as the hole filling of preprocess.body_mask has it
    reference = ndimage.binary_fill_holes((x[0, 0] > -0.95).numpy())
    assert torch.equal(filled[0, 0].bool(), torch.from_numpy(reference))
    assert float(filled[0, 0, 16, 16 - 9]) == 1.0 and float(filled[0, 0, 0, 0]) == 0.0
    # a ring open to the outside is not a hole: the gap lets the outside in
    opened = x.clone()
    opened[..., 15:18, 3:8] = -1.0
    assert float(filled_body((opened > -0.95).float())[0, 0, 16, 6]) == 0.0


def test_shape_loss_known_answers() -> None:
    mr = _head()
    ct = torch.where(mr > -0.95, 0.05, -1.0)  # the same outline in CT units (tissue ~50 HU)
    ct = torch.where((mr < -0.95) & (mr > -0.99), 0.9, ct)  # bone bright in CT
    agree = float(shape_loss(mr, ct, -0.95, -0.5))
    assert agree < 1e-3
    # the same head shrunk or moved by 2 pixels: the outline disagrees
    moved = torch.where(_head(2) > -0.95, 0.05, -1.0)
    assert float(shape_loss(mr, moved, -0.95, -0.5)) > 50 * agree
    # the interior's intensities do not matter: a brain darker than the threshold inside the skull, same loss
    darker = ct.clone()
    darker[..., 12:21, 12:21] = -0.9
    assert float(shape_loss(mr, darker, -0.95, -0.5)) == pytest.approx(agree, abs=1e-4)
    # 2.5D sources: the centre channel is the slice
    stack = torch.cat([-torch.ones_like(mr), mr, -torch.ones_like(mr)], dim=1)
    assert float(shape_loss(stack, ct, -0.95, -0.5)) == pytest.approx(agree)


def test_shape_loss_pulls_the_outline_only() -> None:
    mr = _head()
    y = torch.where(_head(2) > -0.95, 0.05, -1.0).requires_grad_(True)
    shape_loss(mr, y, -0.95, -0.5).backward()
    assert y.grad is not None
    # pixels the translation left as air inside the source's outline get pushed up (negative gradient)...
    assert float(y.grad[0, 0, 16, 5]) < -1e-4
    # ...enclosed interior pixels next to nothing (ties of the soft outside with their own saturated value)
    assert float(y.grad[0, 0, 16, 16].abs()) < 1e-3 * float(y.grad[0, 0, 16, 5].abs())

# --- diffaug -----------------------------------------------------------------------------------


def test_translation_shifts_by_whole_pixels_and_fills_background() -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 1, 16, 16)
    y = translation(x, ratio=0.25)
    for i in range(8):
        found = False
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                shifted = torch.full_like(x[i], -1.0)
                src = x[i][:, max(0, -dy):16 - max(0, dy), max(0, -dx):16 - max(0, dx)]
                shifted[:, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
                found = found or torch.equal(shifted, y[i])
        assert found, f"sample {i} is not a whole-pixel shift of the input"


def test_cutout_blanks_a_quarter_at_most_and_passes_gradients() -> None:
    torch.manual_seed(0)
    x = torch.zeros(16, 1, 16, 16, requires_grad=True)
    y = cutout(x, ratio=0.5, fill=-1.0)
    blank = (y == -1.0).float().mean(dim=(1, 2, 3))
    assert (blank <= 0.25 + 1e-6).all() and (blank > 0).all()
    y.sum().backward()
    assert x.grad is not None
    assert float(x.grad.sum()) == pytest.approx(16 * 256 - float((y == -1).sum()))


def test_diff_augment_identity_cases_and_bad_name() -> None:
    x = torch.rand(2, 1, 8, 8)
    assert diff_augment(x, []) is x
    assert diff_augment(x, ["cutout"], p=0.0) is x
    assert not torch.equal(diff_augment(x, ["brightness", "contrast"]), x)
    with pytest.raises(ValueError, match="brightness, contrast, translation, cutout"):
        diff_augment(x, ["saturation"])  # type: ignore[list-item]
    assert diff_augment(torch.rand(2, 1, 4, 8, 8), ["translation", "cutout"]).shape == (2, 1, 4, 8, 8)


def test_ada_probability_follows_overfitting_signal() -> None:
    ada = AdaptiveAugment(target=0.6, interval=2, speed_images=40)
    for _ in range(10):
        ada.update(torch.ones(4, 1, 2, 2))  # D sure that every real is real: overfitting -> p rises
    assert ada.p == pytest.approx(1.0)
    state = ada.state_dict()
    for _ in range(4):
        ada.update(-torch.ones(4, 1, 2, 2))
    assert ada.p == pytest.approx(1.0 - 2 * (2 * 4 / 40))
    ada.load_state_dict(state)
    assert ada.p == pytest.approx(1.0)


# --- shared helpers ------------------------------------------------------------------------------


def test_select_device_and_dtype() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert autocast_dtype(torch.device("cpu")) is None
    assert autocast_dtype(torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda'"):
        select_device("tpu")


def test_rng_state_round_trip() -> None:
    state = rng_state()
    a = (torch.rand(3), float(torch.randint(0, 100, (1,))))
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a[0])


def test_checkpoint_is_atomic_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "c" / "last.pt"
    save_checkpoint(path, versioned({"kind": "cyclegan", "w": torch.arange(3), "rng": rng_state()}))
    save_checkpoint(path, versioned({"kind": "cyclegan", "w": torch.arange(4), "rng": rng_state()}))
    draws = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(2))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4))
    # the RNG states are plain data: a weights-only load reads them and restores the same streams
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    again = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(2))
    assert draws[:3] == again[:3] and torch.equal(draws[3], again[3])
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_model_card_and_config_hash(tmp_path: Path) -> None:
    write_model_card(tmp_path / "last.json", {"hu_window": (-1000, 1000)})
    card = json.loads((tmp_path / "last.json").read_text())
    assert card["hu_window"] == [-1000, 1000] and "torch" in card["versions"]
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1}) != config_hash({"a": 1, "b": 3})


def test_ema_averages_and_round_trips() -> None:
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.75)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(4.0)
    ema.update(net)
    torch.testing.assert_close(ema.module.weight, start + 1.0)  # 0.75 * w + 0.25 * (w + 4)
    other = EMA(nn.Linear(2, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.module.state_dict()["weight"], ema.module.state_dict()["weight"]) and other.decay == 0.75
    assert not ema.module.weight.requires_grad
    with pytest.raises(ValueError, match="decay"):
        EMA(net, 1.0)


def test_image_pool_fills_then_swaps_and_resumes() -> None:
    pool = ImagePool(4, seed=0)
    first = torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first)  # filling: everything returned as is
    new = torch.full((64, 1, 1, 1), 9.0)
    out = pool.query(new)
    swapped = int((out != 9.0).sum())
    assert 0 < swapped <= 4  # each stored image can come back once before being replaced by a 9
    state = pool.state_dict()
    clone = ImagePool(4, seed=123)
    clone.load_state_dict(state)
    x = torch.randn(8, 1, 1, 1)
    assert torch.equal(pool.query(x), clone.query(x))
    assert torch.equal(ImagePool(0).query(x), x)


def test_r1_and_gradient_penalty_known_values() -> None:
    w = torch.tensor([3.0, 4.0])
    real = torch.randn(5, 2, requires_grad=True)
    out = real @ w  # D(x) = w . x, gradient w, squared norm 25
    assert float(r1_penalty(out, real).detach()) == pytest.approx(25.0)
    unit = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        unit.weight.copy_(torch.tensor([[0.6, 0.8]]))  # gradient norm 1 everywhere: penalty 0
    assert float(gradient_penalty(unit, torch.randn(4, 2), torch.randn(4, 2)).detach()) == pytest.approx(0.0, abs=1e-10)
    net = nn.Linear(3, 1)
    net(torch.ones(1, 3)).sum().backward()
    assert float(grad_norm(net)) == pytest.approx(math.sqrt(3 + 1))


def test_nonfinite_guard_skips_then_raises() -> None:
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check({"loss": 1.0}, 1)
    assert not guard.check({"loss": float("nan")}, 2)
    assert guard.check({"loss": 0.5}, 3)  # a good step resets the count
    assert not guard.check({"loss": float("inf")}, 4)
    assert not guard.check({"loss": float("nan")}, 5)
    with pytest.raises(TrainingDivergedError, match="step 6.*loss_d"):
        guard.check({"loss_d": float("nan"), "loss_g": 1.0}, 6)
    assert guard.total_skipped == 4


def test_health_monitor_warnings_on_planted_statistics() -> None:
    mon = HealthMonitor(window=10, d_gap_max=0.8, g_grad_min=1e-4, oscillation_amplitude=0.4)
    for _ in range(10):
        mon.update(d_real=0.5, d_fake=0.45, grad_g=1.0, diversity=0.2)
    assert mon.check(10) == []
    for _ in range(10):
        mon.update(d_real=0.98, d_fake=0.02, grad_g=1e-6, diversity=0.01)
    found = " | ".join(mon.check(20))
    assert "discriminator too strong" in found and "gradient vanishing" in found and "diversity collapsing" in found
    trend = HealthMonitor(window=10, d_gap_max=None)
    for i in range(10):
        trend.update(loss_g=0.5 if i < 5 else 2.0, loss_d=0.6 if i < 5 else 0.1)
    assert any("discriminator is winning" in w for w in trend.check(10))
    osc = HealthMonitor(window=5, oscillation_amplitude=0.4, d_gap_max=None)
    for chunk in range(4):
        for _ in range(5):
            osc.update(d_real=0.9 if chunk % 2 else 0.1, d_fake=0.1)
    assert any("oscillation" in w for w in osc.check(20))
    ev = HealthMonitor()
    assert ev.observe_eval(1, "ssim", 0.8) == []
    assert ev.observe_eval(2, "ssim", 0.82) == []
    assert "got worse" in ev.observe_eval(3, "ssim", 0.6)[0]
    low = HealthMonitor()
    assert low.observe_eval(1, "mae", 50.0, higher_is_better=False) == []
    assert low.observe_eval(2, "mae", 40.0, higher_is_better=False) == []
    assert "got worse" in low.observe_eval(3, "mae", 60.0, higher_is_better=False)[0]
    restored = HealthMonitor()
    restored.load_state_dict(mon.state_dict())
    assert restored.warnings == mon.warnings


def test_batch_diversity_zero_for_identical_images() -> None:
    assert batch_diversity(torch.ones(4, 1, 8, 8)) == 0.0
    assert math.isnan(batch_diversity(torch.ones(1, 1, 8, 8)))
    assert batch_diversity(torch.randn(4, 1, 8, 8)) > 0.5


def test_metrics_writer_and_image_grid(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        w.log(step, {"loss": float(step)})
    w.close()
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=2)  # steps after the checkpoint are dropped
    w.log(3, {"loss": 30.0})
    w.write_summary({"step": 3})
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0, 2.0, 30.0]
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 3
    assert not MetricsWriter(tmp_path / "r1", enabled=False).jsonl.parent.exists()

    from PIL import Image

    rows = [torch.full((3, 1, 8, 8), -1.0), torch.full((3, 1, 8, 8), 1.0)]
    save_image_grid(rows, tmp_path / "g.png")
    img = Image.open(tmp_path / "g.png")
    assert img.size == (24, 16) and img.mode == "L"
    assert img.getpixel((0, 0)) == 0 and img.getpixel((23, 15)) == 255


def test_losses_doctests() -> None:
    import doctest

    import models.losses

    assert doctest.testmod(models.losses, raise_on_error=False).failed == 0
