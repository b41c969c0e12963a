"""CycleGAN training behaviour on tiny configs (ngf 8, ndf 8, 2 res blocks, 32x32, batch 2) on CPU.

Covers what the shared invariant suite (tests/test_gan_invariants.py) does not: the config
(recipe defaults, bad values), each stabiliser changing the computation, health warnings
on a planted too-strong discriminator, the NaN guard, evaluation and the best checkpoint,
the model card and 2.5D inputs. DDP is in tests/test_cyclegan_ddp.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn.utils import parametrize

from models.common import TrainingDivergedError, read_metrics
from models.train_cyclegan import (
    CycleGANConfig,
    UnpairedData,
    build_training,
    d_view,
    discriminator_step,
    generator_step,
    inference_generators,
    load_generator,
    lr_factor,
    train_cyclegan,
)

torch.set_num_threads(1)


def tiny(**overrides: object) -> CycleGANConfig:
    base: dict[str, object] = dict(image_size=32, ngf=8, ndf=8, n_res_blocks=2, batch_size=2, steps=4,
                                   log_every=1, sample_every=1000, checkpoint_every=1000, eval_every=1000,
                                   health_window=4)
    base.update(overrides)
    return CycleGANConfig.model_validate(base)


def random_data(n: int = 6, channels: int = 1, seed: int = 0) -> UnpairedData:
    g = torch.Generator().manual_seed(seed)
    return UnpairedData(
        a=[torch.rand(channels, 32, 32, generator=g) * 2 - 1 for _ in range(n)],
        b=[torch.rand(channels, 32, 32, generator=g) * 1.6 - 0.8 for _ in range(n)],
        meta={"hu_window": [-1000, 1000], "spacing": [1.0, 1.0, 2.0], "train_subjects": ["p01", "p02"]},
    )


def one_step(cfg: CycleGANConfig) -> tuple[dict[str, float], dict[str, float], object]:
    s = build_training(cfg, torch.device("cpu"))
    data = random_data()
    mri, ct = torch.stack([data.a[0], data.a[1]]), torch.stack([data.b[0], data.b[1]])
    g, fake_mri, fake_ct, _ = generator_step(s, mri, ct)
    d, _ = discriminator_step(s, mri, ct, fake_mri, fake_ct)
    return g, d, s


# --- config ------------------------------------------------------------------------------------


def test_defaults_are_the_published_recipe() -> None:
    cfg = CycleGANConfig()
    assert (cfg.loss, cfg.lambda_cycle, cfg.lambda_identity, cfg.pool_size) == ("lsgan", 10.0, 0.5, 50)
    assert (cfg.lr, cfg.lr_d, cfg.beta1, cfg.beta2, cfg.batch_size) == (2e-4, None, 0.5, 0.999, 1)
    assert (cfg.ngf, cfg.ndf, cfg.n_res_blocks, cfg.n_layers_d, cfg.image_size) == (64, 64, 9, 3, 256)
    assert not cfg.spectral_norm and cfg.r1_gamma == 0 and cfg.ema_decay is None and cfg.diffaug == []
    assert cfg.structure_loss == "none" and cfg.lambda_shape == 0
    assert cfg.total_steps == 200_000
    assert lr_factor(100_000, cfg) == 1.0 and lr_factor(200_000, cfg) == pytest.approx(1 / 100_001)
    assert all(f.description for f in CycleGANConfig.model_fields.values())  # every option documented


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss": "bce"}, "lsgan"),
        ({"image_size": 30}, "multiple of 4"),
        ({"diffaug": ["blur"]}, "translation"),
        ({"ada_target": 0.6}, "diffaug"),
        ({"ema_decay": 1.5}, "ema_decay"),
        ({"structure_loss": "ssim"}, "mind"),
        ({"lambda_structure": -1.0}, "lambda_structure"),
        ({"cycle_noise": -0.1}, "cycle_noise"),
        ({"lambda_shape": -1.0}, "lambda_shape"),
        ({"learning_rate": 1e-3}, "learning_rate"),
    ],
)
def test_bad_config_values_name_the_option(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CycleGANConfig.model_validate(overrides)


def test_data_that_do_not_match_the_config_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        train_cyclegan(tiny(image_size=64), random_data(), tmp_path, device="cpu")
    with pytest.raises(ValueError, match="both domains"):
        train_cyclegan(tiny(), UnpairedData(a=[], b=random_data().b), tmp_path, device="cpu")


# --- stabilisers: each one changes the computation ----------------------------------------------


def test_recipe_step_reports_every_term() -> None:
    g, d, _ = one_step(tiny())
    assert {"loss_g", "g_adv_ct", "g_adv_mri", "cycle_mri", "cycle_ct", "identity_ct", "identity_mri",
            "grad_norm_g"} <= g.keys()
    assert {"loss_d", "d_real_ct", "d_fake_ct", "d_real_mri", "d_fake_mri", "grad_norm_d"} <= d.keys()
    expected = g["g_adv_ct"] + g["g_adv_mri"] + 10 * (g["cycle_mri"] + g["cycle_ct"]) + 5 * (g["identity_ct"] + g["identity_mri"])
    assert g["loss_g"] == pytest.approx(expected, rel=1e-5)
    assert "identity_ct" not in one_step(tiny(lambda_identity=0.0))[0]


@pytest.mark.parametrize(
    ("overrides", "term", "weight"),
    [
        ({"structure_loss": "mind", "lambda_structure": 2.0}, "structure", 2.0),
        ({"structure_loss": "gradcorr", "lambda_structure": 2.0}, "structure", 2.0),
        ({"lambda_shape": 3.0}, "shape", 3.0),
    ],
)
def test_input_vs_translation_terms_add_to_the_loss(overrides: dict[str, object], term: str, weight: float) -> None:
    g_off, _, s_off = one_step(tiny())
    g, _, s = one_step(tiny(**overrides))
    assert f"{term}_mri2ct" not in g_off
    assert g[f"{term}_mri2ct"] > 0 and g[f"{term}_ct2mri"] > 0
    assert g["loss_g"] == pytest.approx(g_off["loss_g"] + weight * (g[f"{term}_mri2ct"] + g[f"{term}_ct2mri"]), rel=1e-5)
    # the same initial weights and batch, a different update
    w_off, w = (next(x.nets.g_mri2ct.parameters()) for x in (s_off, s))  # type: ignore[attr-defined]
    assert not torch.equal(w_off, w)

def test_cycle_noise_changes_the_reconstruction_only() -> None:
    g_off, _, _ = one_step(tiny())
    g, _, _ = one_step(tiny(cycle_noise=0.5))
    assert g["g_adv_ct"] == pytest.approx(g_off["g_adv_ct"]) and g["identity_ct"] == pytest.approx(g_off["identity_ct"])
    assert g["cycle_mri"] != pytest.approx(g_off["cycle_mri"]) and g["cycle_ct"] != pytest.approx(g_off["cycle_ct"])


def test_spectral_norm_option() -> None:
    _, d_off, s_off = one_step(tiny())
    _, d_on, s_on = one_step(tiny(spectral_norm=True))
    assert d_on["loss_d"] != d_off["loss_d"]
    convs = [m for m in s_on.nets.d_ct.modules() if isinstance(m, nn.Conv2d)]  # type: ignore[attr-defined]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
    assert not any(parametrize.is_parametrized(m) for m in s_off.nets.d_ct.modules())  # type: ignore[attr-defined]


@pytest.mark.parametrize(("option", "term"), [({"r1_gamma": 10.0}, "r1_ct"), ({"gp_weight": 10.0, "loss": "wgan"}, "gp_ct")])
def test_gradient_penalties_add_a_positive_term(option: dict[str, object], term: str) -> None:
    _, d_off, _ = one_step(tiny(**{k: v for k, v in option.items() if k == "loss"}))
    _, d_on, _ = one_step(tiny(**option))
    assert term not in d_off and d_on[term] > 0
    assert d_on["loss_d"] != pytest.approx(d_off["loss_d"])
    assert d_on["grad_norm_d"] != pytest.approx(d_off["grad_norm_d"])


def test_learning_rate_is_constant_then_decays_linearly(tmp_path: Path) -> None:
    cfg = tiny(steps=5, n_steps_constant=2, n_steps_decay=3, lr_d=4e-4)
    rows = train_cyclegan(cfg, random_data(), tmp_path, device="cpu").history
    assert [r["lr_g"] for r in rows] == pytest.approx([2e-4, 2e-4, 2e-4, 1.5e-4, 1e-4])
    assert [r["lr_d"] for r in rows] == pytest.approx([4e-4, 4e-4, 4e-4, 3e-4, 2e-4])


def test_ttur_gives_the_discriminator_its_own_rate() -> None:
    _, _, s = one_step(tiny(lr_d=4e-4))
    assert s.opt_d.param_groups[0]["lr"] == 4e-4 and s.opt_g.param_groups[0]["lr"] == 2e-4  # type: ignore[attr-defined]


def test_ema_weights_differ_and_are_used_for_inference(tmp_path: Path) -> None:
    result = train_cyclegan(tiny(ema_decay=0.9, steps=3), random_data(), tmp_path, device="cpu")
    assert result.ema is not None
    live, ema = result.nets.g_mri2ct, result.ema["g_mri2ct"]
    assert any(not torch.equal(a, b) for a, b in zip(live.parameters(), ema.parameters(), strict=True))
    loaded, card = load_generator(result.last_checkpoint, "mri2ct", use_ema=True)
    assert card["weights"] == "ema" and card["weights_for_inference"] == "ema"
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), ema.eval()(x))
        assert not torch.equal(loaded(x), live.eval()(x))
    assert load_generator(result.last_checkpoint, "mri2ct", use_ema=False)[1]["weights"] == "live"
    s = build_training(tiny(ema_decay=0.9), torch.device("cpu"))
    assert inference_generators(s)[0] is s.ema["g_mri2ct"].module  # type: ignore[index]


def test_diffaug_changes_what_the_discriminator_sees() -> None:
    s = build_training(tiny(diffaug=["translation", "cutout", "brightness"]), torch.device("cpu"))
    seen: list[torch.Tensor] = []
    s.nets.d_ct.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    data = random_data()
    mri, ct = torch.stack([data.a[0], data.a[1]]), torch.stack([data.b[0], data.b[1]])
    _, fake_mri, fake_ct, _ = generator_step(s, mri, ct)
    discriminator_step(s, mri, ct, fake_mri, fake_ct)
    assert not torch.equal(seen[-2], ct)  # D's real input is an augmented copy of the raw batch
    assert torch.equal(d_view(ct, build_training(tiny(), torch.device("cpu"))), ct)
    _, d_off, _ = one_step(tiny())
    _, d_on, _ = one_step(tiny(diffaug=["translation", "cutout"]))
    assert d_on["loss_d"] != d_off["loss_d"]


def test_ada_moves_the_augmentation_probability(tmp_path: Path) -> None:
    cfg = tiny(diffaug=["translation"], ada_target=0.6, ada_interval=1, ada_speed_images=16, steps=6, lr_d=2e-3)
    rows = train_cyclegan(cfg, random_data(), tmp_path, device="cpu").history
    assert "aug_p" in rows[0]
    assert len({r["aug_p"] for r in rows}) > 1


@pytest.mark.parametrize("loss", ["vanilla", "hinge"])
def test_other_adversarial_losses_train(loss: str, tmp_path: Path) -> None:
    rows = train_cyclegan(tiny(loss=loss, steps=2), random_data(), tmp_path, device="cpu").history
    assert all(math.isfinite(r["loss_g"]) and math.isfinite(r["loss_d"]) for r in rows)


# --- health, NaN guard ---------------------------------------------------------------------------


def test_health_warns_about_a_planted_too_strong_discriminator(tmp_path: Path) -> None:
    cfg = tiny(steps=24, lr=0.0, lr_d=2e-2, health_window=8, log_every=8)  # frozen G, D at 100x the rate
    result = train_cyclegan(cfg, random_data(), tmp_path, device="cpu")
    assert any("discriminator too strong" in w for w in result.warnings), result.warnings
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["warnings"] == result.warnings
    calm = train_cyclegan(tiny(steps=24, health_window=8, log_every=8), random_data(), tmp_path / "calm", device="cpu")
    assert not any("discriminator too strong" in w for w in calm.warnings)


class _Poisonable(list):  # type: ignore[type-arg]
    """A list of slices that returns NaN slices once `poisoned` is set."""

    poisoned = False

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        item = super().__getitem__(i)
        return torch.full_like(item, float("nan")) if self.poisoned else item


def test_nan_batches_are_skipped_then_training_stops_with_the_last_checkpoint_kept(tmp_path: Path) -> None:
    data = random_data()
    mri = _Poisonable(data.a[i] for i in range(len(data.a)))

    def poison(_g1: nn.Module, _g2: nn.Module) -> dict[str, float]:  # evaluation at step 4 poisons the data
        mri.poisoned = True
        return {}

    cfg = tiny(steps=20, checkpoint_every=4, eval_every=4, max_nonfinite=3)
    with pytest.raises(TrainingDivergedError, match="step 7.*3 consecutive"):
        train_cyclegan(cfg, UnpairedData(a=mri, b=data.b, meta=data.meta), tmp_path, device="cpu", evaluate=poison)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["nets"]["g_mri2ct"].values())
    rows = read_metrics(tmp_path)
    assert [r["skipped"] for r in rows if r["step"] in (5, 6)] == [1.0, 1.0]
    # the run resumes from the kept checkpoint once the data are fixed
    mri.poisoned = False
    resumed = train_cyclegan(cfg.model_copy(update={"steps": 6}), UnpairedData(a=mri, b=data.b, meta=data.meta),
                             tmp_path, resume=True, device="cpu")
    assert resumed.step == 6 and all(r["skipped"] == 0.0 for r in resumed.history)


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_metrics(tmp_path: Path) -> None:
    first = train_cyclegan(tiny(steps=2), random_data(), tmp_path, device="cpu")
    again = train_cyclegan(tiny(steps=2), random_data(), tmp_path, resume=True, device="cpu")
    assert again.step == 2 and again.history == [] and again.final_metrics == first.final_metrics
    assert json.loads((tmp_path / "metrics.json").read_text())["last"] == first.final_metrics
    assert len(read_metrics(tmp_path)) == 2


def test_a_fresh_run_refuses_a_folder_with_a_checkpoint(tmp_path: Path) -> None:
    train_cyclegan(tiny(steps=1), random_data(), tmp_path, device="cpu")
    with pytest.raises(FileExistsError, match="resume"):
        train_cyclegan(tiny(steps=1), random_data(), tmp_path, device="cpu")
    with pytest.raises(ValueError, match="ngf"):
        train_cyclegan(tiny(steps=2, ngf=4), random_data(), tmp_path, resume=True, device="cpu")


# --- evaluation, best checkpoint, outputs -----------------------------------------------------------


def test_evaluation_keeps_the_best_checkpoint_and_flags_a_falling_score(tmp_path: Path) -> None:
    scores = iter([0.5, 0.9, 0.4, 0.3])
    calls: list[tuple[bool, bool]] = []

    def evaluate(g_ab: nn.Module, g_ba: nn.Module) -> dict[str, float]:
        calls.append((g_ab.training, torch.is_grad_enabled()))
        return {"ssim": next(scores), "mae": 1.0}

    cfg = tiny(steps=8, eval_every=2, checkpoint_every=8, sample_every=4)
    result = train_cyclegan(cfg, random_data(), tmp_path, device="cpu", evaluate=evaluate, best_key="ssim:max")
    assert calls == [(False, False)] * 4
    assert result.best_checkpoint == tmp_path / "checkpoints" / "best.pt"
    assert torch.load(result.best_checkpoint, weights_only=True)["step"] == 4
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 4
    assert any("ssim got worse" in w for w in result.warnings)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000004.png", "step_000008.png"]
    assert [r["eval/ssim"] for r in read_metrics(tmp_path) if "eval/ssim" in r] == [0.5, 0.9, 0.4, 0.3]
    assert (tmp_path / "tb").is_dir()
    with pytest.raises(ValueError, match="NAME:min"):
        train_cyclegan(cfg, random_data(), tmp_path / "x", device="cpu", evaluate=evaluate, best_key="ssim:up")


def test_checkpoint_layout_and_model_card(tmp_path: Path) -> None:
    result = train_cyclegan(tiny(steps=2), random_data(), tmp_path, device="cpu")
    ckpt = torch.load(result.last_checkpoint, weights_only=True)  # plain data and tensors only
    assert ckpt.keys() == {"format", "version", "kind", "step", "config", "card", "nets", "ema", "optimizers",
                           "schedulers", "guards", "monitor", "ranks", "world_size", "extra"}
    assert (ckpt["format"], ckpt["version"], ckpt["kind"]) == ("medaug.checkpoint", 2, "cyclegan")
    assert {"pools", "samplers", "rng", "ada"} <= ckpt["ranks"][0].keys()
    assert json.loads(ckpt["card"])["hu_window"] == [-1000, 1000]
    assert set(ckpt["nets"]) == {"g_mri2ct", "g_ct2mri", "d_mri", "d_ct"}
    assert not any(k.startswith(("_orig_mod", "module.")) for k in ckpt["nets"]["d_ct"])
    card = json.loads((tmp_path / "checkpoints" / "last.json").read_text())
    assert card["modalities"] == {"a": "MR", "b": "CT"} and card["hu_window"] == [-1000, 1000]
    assert card["train_subjects"] == ["p01", "p02"] and card["spacing"] == [1.0, 1.0, 2.0]
    assert len(card["config_hash"]) == 16 and "torch" in card["versions"] and card["step"] == 2
    g, card2 = load_generator(result.last_checkpoint, "ct2mri")
    assert card2["direction"] == "ct2mri" and not g.training
    with pytest.raises(ValueError, match="mri2ct"):
        load_generator(result.last_checkpoint, "ct2pet")  # type: ignore[arg-type]


def test_two_and_a_half_d_inputs(tmp_path: Path) -> None:
    result = train_cyclegan(tiny(in_channels=3, steps=2), random_data(channels=3), tmp_path, device="cpu")
    g, card = load_generator(result.last_checkpoint, "mri2ct")
    assert card["in_channels"] == 3
    assert g(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
