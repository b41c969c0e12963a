"""Invariants every GAN of medaug must keep, run on tiny seeded configs on CPU (diffusers' common model tests).

Each GAN contributes one `GANCase` to `CASES`; every test below runs for every case.

The case interface
------------------
`GANCase(name, make_parts, train, load_generators)`:

* `make_parts(seed) -> StepParts`: freshly built tiny networks (weights seeded by `seed`)
  and two closures on a fixed tiny batch: `generator_step()` and `discriminator_step()`
  each perform ONE optimiser step of the trainer's own step function (backward included)
  and return its dict of floats. After a step the gradients of the stepped networks must
  still be in `.grad` (zero them at the start of a step, not at the end).
* `train(run_dir, steps, checkpoint_every, resume, seed) -> RunOutcome`: the trainer's public
  entry point with log_every = 1, on CPU, writing RUN_DIR/checkpoints/last.pt every
  `checkpoint_every` steps and at the end; `resume=True` continues from last.pt.
* `load_generators(checkpoint) -> {name: module}`: what inference loads from a checkpoint
  (the same names as `RunOutcome.generators`, in eval mode).

`RunOutcome(losses, generators, discriminators, checkpoint)`: `losses` is one dict per step
(keys "step" plus loss terms; the values compared across runs), `generators` the modules
inference uses (EMA copies when the case enables EMA), `discriminators` the trained ones.

The invariants: losses are finite and weights move; every trainable parameter gets a
gradient; a D step leaves G unchanged and a G step leaves D's parameters unchanged; a
checkpoint loads back to the same generator; resume after k steps equals an uninterrupted
run; same seed, same result (and another seed, another result).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_tumor_gan_data import tiny_patch_data
from torch import nn

import models.train_tumor_gan as tg
from models.train_cyclegan import (
    CycleGANConfig,
    UnpairedData,
    build_training,
    discriminator_step,
    generator_step,
    load_generator,
    train_cyclegan,
)
from models.train_tumor_gan import TumorGANConfig


@dataclass
class StepParts:
    generators: dict[str, nn.Module]
    discriminators: dict[str, nn.Module]
    generator_step: Callable[[], dict[str, float]]
    discriminator_step: Callable[[], dict[str, float]]


@dataclass
class RunOutcome:
    losses: list[dict[str, float]]
    generators: dict[str, nn.Module]
    discriminators: dict[str, nn.Module]
    checkpoint: Path


@dataclass
class GANCase:
    name: str
    make_parts: Callable[[int], StepParts]
    train: Callable[[Path, int, int, bool, int], RunOutcome]
    load_generators: Callable[[Path], dict[str, nn.Module]]


# --- the CycleGAN case -------------------------------------------------------------------------


def _cyclegan_cfg(**overrides: object) -> CycleGANConfig:
    # EMA on, so the round trip and resume also cover the EMA state and inference weights
    base: dict[str, object] = dict(image_size=32, ngf=8, ndf=8, n_res_blocks=2, batch_size=2,
                                   n_steps_constant=3, n_steps_decay=6, pool_size=3, ema_decay=0.9,
                                   log_every=1, sample_every=1000, eval_every=1000, health_window=4)
    base.update(overrides)
    return CycleGANConfig.model_validate(base)


def _cyclegan_data(n: int = 6) -> UnpairedData:
    g = torch.Generator().manual_seed(1234)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    mri, ct = [], []
    for _ in range(n):  # procedural "slices": a bright disc (MRI) or ring (CT) at a random place
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.4]) - torch.tensor([0.5, 0.5, -0.3])).tolist()
        d = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        mri.append(torch.where(d < r, 0.6, -0.8)[None] + 0.05 * torch.randn(1, 32, 32, generator=g))
        ct.append(torch.where((d < r) & (d > r * 0.7), 0.9, -1.0)[None] + 0.05 * torch.randn(1, 32, 32, generator=g))
    return UnpairedData(a=[x.clamp(-1, 1) for x in mri], b=[x.clamp(-1, 1) for x in ct], meta={"train_subjects": ["s1"]})


def _cyclegan_parts(seed: int) -> StepParts:
    s = build_training(_cyclegan_cfg(seed=seed), torch.device("cpu"))
    data = _cyclegan_data()
    real_mri, real_ct = torch.stack([data.a[0], data.a[1]]), torch.stack([data.b[0], data.b[1]])
    fakes: dict[str, torch.Tensor] = {}

    def g_step() -> dict[str, float]:
        metrics, fakes["mri"], fakes["ct"], _ = generator_step(s, real_mri, real_ct)
        return metrics

    def d_step() -> dict[str, float]:
        if not fakes:
            with torch.no_grad():
                fakes["mri"], fakes["ct"] = s.nets.g_ct2mri(real_ct), s.nets.g_mri2ct(real_mri)
        return discriminator_step(s, real_mri, real_ct, fakes["mri"], fakes["ct"])[0]

    return StepParts(
        generators={"g_mri2ct": s.nets.g_mri2ct, "g_ct2mri": s.nets.g_ct2mri},
        discriminators={"d_mri": s.nets.d_mri, "d_ct": s.nets.d_ct},
        generator_step=g_step,
        discriminator_step=d_step,
    )


def _cyclegan_train(run_dir: Path, steps: int, checkpoint_every: int, resume: bool, seed: int) -> RunOutcome:
    cfg = _cyclegan_cfg(steps=steps, checkpoint_every=checkpoint_every, seed=seed)
    result = train_cyclegan(cfg, _cyclegan_data(), run_dir, resume=resume, device="cpu")
    assert result.ema is not None
    return RunOutcome(
        losses=[{k: v for k, v in row.items() if not k.startswith("eval/")} for row in result.history],
        generators=dict(result.ema),
        discriminators={"d_mri": result.nets.d_mri, "d_ct": result.nets.d_ct},
        checkpoint=result.last_checkpoint,
    )


def _cyclegan_load(checkpoint: Path) -> dict[str, nn.Module]:
    return {f"g_{d}": load_generator(checkpoint, d)[0] for d in ("mri2ct", "ct2mri")}


CASES: list[GANCase] = [GANCase("cyclegan", _cyclegan_parts, _cyclegan_train, _cyclegan_load)]


# --- the tumor GAN case -------------------------------------------------------------------------


def _tumor_cfg(**overrides: object) -> TumorGANConfig:
    # Every toolkit switch on, so the step invariants, round trip and resume cover all their state
    # (EMA, ADA probability, unrolled copies, minibatch std, R1, DiffAugment's RNG draws).
    base: dict[str, object] = dict(patch_size=16, latent_dim=8, g_channels=4, d_channels=4, batch_size=4,
                                   log_every=1, sample_every=0, diversity_samples=2, ema_decay=0.9,
                                   minibatch_std=True, feature_matching_weight=1.0, mode_seeking_weight=1.0,
                                   unrolled_steps=1, diffaug=["translation", "cutout"], ada_target=0.6,
                                   ada_interval=1, ada_speed_images=40, r1_gamma=1.0)
    base.update(overrides)
    return TumorGANConfig.model_validate(base)


def _tumor_parts(seed: int) -> StepParts:
    cfg, cpu = _tumor_cfg(seed=seed), torch.device("cpu")
    torch.manual_seed(seed)
    g, d = tg.build_networks(cfg, 3)
    opt_g, opt_d = tg.build_optimisers(cfg, g, d)
    gen = torch.Generator().manual_seed(seed)
    real, y = tg.sample_batch(tiny_patch_data(n=6, size=16), cfg.batch_size, gen, cfg.balanced_classes)
    z, y_fake = tg.make_latents(cfg, y, gen, cpu)

    def g_step() -> dict[str, float]:
        return tg.generator_step(g, d, opt_g, g(z, y_fake), y_fake, z, real, y, cfg, cpu)

    def d_step() -> dict[str, float]:
        with torch.no_grad():
            fake = g(z, y_fake)
        return tg.discriminator_step(d, opt_d, real, y, fake, y_fake, cfg, cpu)

    return StepParts({"generator": g}, {"discriminator": d}, g_step, d_step)


def _tumor_train(run_dir: Path, steps: int, checkpoint_every: int, resume: bool, seed: int) -> RunOutcome:
    cfg = _tumor_cfg(steps=steps, checkpoint_every=checkpoint_every, seed=seed)
    result = tg.train_tumor_gan(cfg, tiny_patch_data(n=6, size=16), run_dir, resume=resume, device="cpu")
    return RunOutcome(result.history, {"generator": result.sampler}, {"discriminator": result.discriminator},
                      result.checkpoint)


def _tumor_load(checkpoint: Path) -> dict[str, nn.Module]:
    return {"generator": tg.load_tumor_generator(checkpoint)[0]}


CASES.append(GANCase("tumor_gan", _tumor_parts, _tumor_train, _tumor_load))


# --- the invariants ----------------------------------------------------------------------------


def _snapshot(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v.detach().clone() for m, mod in modules.items() for k, v in mod.named_parameters()}


def _assert_rows_equal(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if math.isnan(ra[k]):
                assert math.isnan(rb[k]), (ra["step"], k)
            else:
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k, ra[k], rb[k])


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request: pytest.FixtureRequest) -> GANCase:
    return request.param


def test_losses_finite_and_weights_move(case: GANCase, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    init = case.make_parts(0)
    out = case.train(tmp_path, 6, 6, False, 0)
    assert len(out.losses) == 6
    for row in out.losses:
        assert all(math.isfinite(v) for k, v in row.items() if "loss" in k), row
    before = _snapshot({**init.generators, **init.discriminators})
    after = _snapshot({**out.generators, **out.discriminators})
    for net in list(init.generators) + list(init.discriminators):
        moved = [k for k in before if k.startswith(net + ".") and not torch.equal(before[k], after[k])]
        assert moved, f"{case.name}: no weight of {net} moved in 6 steps"


def test_every_trainable_parameter_gets_a_gradient(case: GANCase) -> None:
    parts = case.make_parts(0)
    parts.generator_step()
    for name, net in parts.generators.items():
        for pname, p in net.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname} got no gradient"
    parts.discriminator_step()
    for name, net in parts.discriminators.items():
        for pname, p in net.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname} got no gradient"
    grads = [p.grad.abs().sum() for net in parts.discriminators.values() for p in net.parameters() if p.grad is not None]
    assert sum(float(g) for g in grads) > 0


def test_d_step_leaves_g_unchanged_and_g_step_leaves_d_unchanged(case: GANCase) -> None:
    parts = case.make_parts(0)
    g_before = _snapshot(parts.generators)
    d_before = _snapshot(parts.discriminators)
    parts.discriminator_step()
    g_after = _snapshot(parts.generators)
    assert all(torch.equal(g_before[k], g_after[k]) for k in g_before)
    assert any(not torch.equal(d_before[k], v) for k, v in _snapshot(parts.discriminators).items())
    d_before = _snapshot(parts.discriminators)
    parts.generator_step()
    assert all(torch.equal(d_before[k], v) for k, v in _snapshot(parts.discriminators).items())
    assert any(not torch.equal(g_after[k], v) for k, v in _snapshot(parts.generators).items())


def test_checkpoint_round_trip(case: GANCase, tmp_path: Path) -> None:
    out = case.train(tmp_path, 3, 3, False, 0)
    loaded = case.load_generators(out.checkpoint)
    assert loaded.keys() == out.generators.keys()
    for name, net in loaded.items():
        assert not net.training
        trained = out.generators[name].state_dict()
        for k, v in net.state_dict().items():
            assert torch.equal(v, trained[k]), f"{name}.{k} differs after loading"


def test_resume_equals_uninterrupted_run(case: GANCase, tmp_path: Path) -> None:
    full = case.train(tmp_path / "full", 6, 100, False, 0)
    first = case.train(tmp_path / "split", 3, 3, False, 0)  # "killed" after the step-3 checkpoint
    rest = case.train(tmp_path / "split", 6, 3, True, 0)  # a fresh call resumes from last.pt
    _assert_rows_equal(first.losses, full.losses[:3])
    _assert_rows_equal(rest.losses, full.losses[3:])
    a, b = _snapshot(full.generators), _snapshot(rest.generators)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_same_seed_same_result(case: GANCase, tmp_path: Path) -> None:
    a = case.train(tmp_path / "a", 3, 3, False, 0)
    b = case.train(tmp_path / "b", 3, 3, False, 0)
    c = case.train(tmp_path / "c", 3, 3, False, 1)
    _assert_rows_equal(a.losses, b.losses)
    key = next(k for k in a.losses[0] if "loss" in k)
    assert [r[key] for r in a.losses] != [r[key] for r in c.losses]
