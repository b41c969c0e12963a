"""Tumor GAN networks and training loop: shapes, conditioning, and one test per mode-collapse switch
showing that the switch is active. Tiny models (8 channels, 32x32 or 16x16 patches), CPU, few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_tumor_gan_data import tiny_patch_data

from models.checkpoint import CheckpointError, save_checkpoint, versioned
from models.common import TrainingDivergedError, read_metrics
from models.train_tumor_gan import (
    TumorGANConfig,
    build_networks,
    build_optimisers,
    d_view,
    discriminator_step,
    generator_step,
    load_tumor_generator,
    make_latents,
    train_tumor_gan,
    unrolled_discriminator,
)
from models.tumor_gan import MinibatchStdDev, ProjectionDiscriminator, TumorGenerator

TINY = dict(patch_size=16, latent_dim=8, g_channels=4, d_channels=4, batch_size=8, steps=4, log_every=2,
            sample_every=0, checkpoint_every=2, diversity_samples=4)


def cfg_of(**kw: object) -> TumorGANConfig:
    return TumorGANConfig.model_validate(TINY | kw)


def batch(cfg: TumorGANConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real (B, 2, S, S) in the generator's output units, its labels, z, fake labels, with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    b, s = cfg.batch_size, cfg.patch_size
    real = torch.cat([torch.rand(b, 1, s, s, generator=gen) * 2 - 1, (torch.rand(b, 1, s, s, generator=gen) > 0.7).float()], 1)
    y = torch.arange(b) % 3
    z, y_fake = make_latents(cfg, y, gen, torch.device("cpu"))
    return real, y, z, y_fake, real


def step_parts(cfg: TumorGANConfig):
    torch.manual_seed(0)
    g, d = build_networks(cfg, 3)
    opt_g, opt_d = build_optimisers(cfg, g, d)
    real, y, z, y_fake, _ = batch(cfg)
    return g, d, opt_g, opt_d, real, y, z, y_fake


# --- networks ------------------------------------------------------------------------------


def test_generator_gives_image_and_mask_channels_in_range() -> None:
    g = TumorGenerator(num_classes=3, latent_dim=8, base_channels=4, patch_size=32)
    x = g(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    assert x.shape == (4, 2, 32, 32)
    assert x[:, 0].abs().max() <= 1.0 and x[:, 1].min() >= 0.0 and x[:, 1].max() <= 1.0


def test_class_conditions_generator_and_discriminator() -> None:
    torch.manual_seed(0)
    g = TumorGenerator(num_classes=3, latent_dim=8, base_channels=4, patch_size=16)
    with torch.no_grad():  # move the class gains away from their initial 1 so classes differ
        for m in g.modules():
            if hasattr(m, "gain"):
                m.gain.weight.normal_(1.0, 0.5)
    g.eval()
    z = torch.randn(2, 8)
    assert not torch.allclose(g(z, torch.tensor([0, 0])), g(z, torch.tensor([1, 1])))
    d = ProjectionDiscriminator(num_classes=3, base_channels=4, patch_size=16)
    x = torch.randn(2, 2, 16, 16)
    assert not torch.allclose(d(x, torch.tensor([0, 0]))[0], d(x, torch.tensor([2, 2]))[0])


def test_3d_networks() -> None:
    g = TumorGenerator(num_classes=2, latent_dim=8, base_channels=4, patch_size=8, spatial_dims=3)
    d = ProjectionDiscriminator(num_classes=2, base_channels=4, patch_size=8, spatial_dims=3, minibatch_std=True)
    x = g(torch.randn(2, 8), torch.tensor([0, 1]))
    assert x.shape == (2, 2, 8, 8, 8) and d(x, torch.tensor([0, 1]))[0].shape == (2,)


def test_bad_network_arguments() -> None:
    with pytest.raises(ValueError, match="power of two"):
        TumorGenerator(num_classes=2, patch_size=48)
    with pytest.raises(ValueError, match="spatial_dims"):
        ProjectionDiscriminator(num_classes=2, spatial_dims=4)


def test_spectral_norm_switch() -> None:
    on = ProjectionDiscriminator(num_classes=2, base_channels=4, patch_size=16, spectral_norm=True)
    off = ProjectionDiscriminator(num_classes=2, base_channels=4, patch_size=16, spectral_norm=False)
    assert any(hasattr(m, "parametrizations") for m in on.modules())
    assert not any(hasattr(m, "parametrizations") for m in off.modules())


# --- the toolkit: each switch is active ----------------------------------------------------


def test_minibatch_std_known_answer_and_d_sees_the_batch() -> None:
    layer = MinibatchStdDev(group_size=4)
    same = torch.ones(4, 3, 2, 2)
    assert torch.allclose(layer(same)[:, 3], torch.full((4, 2, 2), 1e-4))
    spread = torch.tensor([0.0, 2.0, 0.0, 2.0]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    assert torch.allclose(layer(spread)[:, 3], torch.ones(4, 2, 2), atol=1e-4)
    # With the layer on, one sample's logit depends on the other samples in the batch.
    x, y = torch.randn(4, 2, 16, 16), torch.zeros(4, dtype=torch.long)
    x2 = x.clone()
    x2[1:] = torch.randn(3, 2, 16, 16)
    for on in (True, False):
        torch.manual_seed(0)
        d = ProjectionDiscriminator(num_classes=1, base_channels=4, patch_size=16, minibatch_std=on).eval()
        changed = not torch.allclose(d(x, y)[0][0], d(x2, y)[0][0])
        assert changed == on


def test_feature_matching_switch() -> None:
    for w in (0.0, 2.0):
        cfg = cfg_of(feature_matching_weight=w)
        g, d, opt_g, _, real, y, z, y_fake = step_parts(cfg)
        out = generator_step(g, d, opt_g, g(z, y_fake), y_fake, z, real, y, cfg, torch.device("cpu"))
        assert (out["g_fm"] > 0) == (w > 0)
        assert out["loss_g"] == pytest.approx(out["g_adv"] + w * out["g_fm"], rel=1e-5)


def test_mode_seeking_switch_pairs_latents_and_adds_its_loss() -> None:
    cfg = cfg_of(mode_seeking_weight=1.0)
    g, d, opt_g, _, real, y, z, y_fake = step_parts(cfg)
    assert torch.equal(y_fake[0::2], y_fake[1::2]) and not torch.allclose(z[0::2], z[1::2])
    out = generator_step(g, d, opt_g, g(z, y_fake), y_fake, z, real, y, cfg, torch.device("cpu"))
    assert out["g_ms"] > 0 and out["loss_g"] == pytest.approx(out["g_adv"] + out["g_ms"], rel=1e-5)
    off = cfg_of()
    assert generator_step(g, d, opt_g, g(z, y_fake), y_fake, z, real, y, off, torch.device("cpu"))["g_ms"] == 0.0
    with pytest.raises(ValueError, match="even batch_size"):
        cfg_of(mode_seeking_weight=1.0, batch_size=7)


def test_mode_seeking_pairs_never_share_a_minibatch_std_group() -> None:
    """The fakes of a mode-seeking pair share a class and were pushed apart; in one minibatch-std
    group they would give D a label pattern (and a spread) that no real batch has, so even a perfect
    generator could be told apart. Each group must hold samples of different pairs."""
    for b, group in ((8, 4), (32, 4), (12, 4), (6, 2)):
        cfg = cfg_of(mode_seeking_weight=1.0, batch_size=b, minibatch_std=True, minibatch_std_group=group)
        # real labels 0..B-1: each fake's label names the real sample (hence the pair) it copied
        _, y_fake = make_latents(cfg, torch.arange(b), torch.Generator().manual_seed(0), torch.device("cpu"))
        # MinibatchStdDev's grouping: view the batch as (g, B/g); column j is one group
        g = max(k for k in range(1, min(group, b) + 1) if b % k == 0)
        for members in y_fake.reshape(g, b // g).T:
            assert len(set(members.tolist())) == g, f"B={b}, group {group}: a pair shares a group {members.tolist()}"


def test_mode_seeking_leaves_the_mask_channel_alone() -> None:
    """Mode seeking rewards different images for different z; the mask is a label of the image
    (identically empty for healthy patches), so its loss must not push the mask channel apart."""
    cfg = cfg_of(mode_seeking_weight=1.0)
    g, d, opt_g, _, real, y, z, y_fake = step_parts(cfg)
    d.eval()  # spectral norm's power iteration would move D between the two calls
    grads = []
    for weight in (1.0, 0.0):  # the same fakes, with and without the mode-seeking term
        fake = g(z, y_fake).detach().requires_grad_(True)
        generator_step(g, d, opt_g, fake, y_fake, z, real, y, cfg_of(mode_seeking_weight=weight), torch.device("cpu"))
        assert fake.grad is not None
        grads.append(fake.grad)
    on, off = grads
    assert not torch.allclose(on[:, 0], off[:, 0]), "mode seeking reaches the image channel"
    assert torch.allclose(on[:, 1], off[:, 1], atol=1e-9), "mode seeking must not reach the mask channel"


def test_unrolled_discriminator_is_a_look_ahead_copy() -> None:
    cfg = cfg_of(unrolled_steps=3)
    g, d, opt_g, opt_d, real, y, z, y_fake = step_parts(cfg)
    fake = g(z, y_fake)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    d_k = unrolled_discriminator(d, opt_d, real, y, fake, y_fake, cfg, torch.device("cpu"), 1.0)
    assert all(torch.equal(before[k], v) for k, v in d.state_dict().items()), "D itself is untouched"
    moved = [not torch.allclose(a, b) for a, b in zip(d.parameters(), d_k.parameters(), strict=True)]
    assert any(moved), "the copy took k steps"
    out_plain = generator_step(g, d, opt_g, g(z, y_fake), y_fake, z, real, y, cfg, torch.device("cpu"))
    out_unrolled = generator_step(g, d_k, opt_g, g(z, y_fake), y_fake, z, real, y, cfg, torch.device("cpu"))
    assert out_plain["g_adv"] != pytest.approx(out_unrolled["g_adv"])
    assert all(p.grad is None for p in d.parameters())


def test_diffaug_switch_changes_what_d_sees_and_keeps_gradients() -> None:
    x = torch.rand(4, 2, 16, 16, requires_grad=True)
    plain = d_view(x, cfg_of(), 1.0)
    assert torch.equal(plain[:, 1], x[:, 1] * 2 - 1)  # the mask channel goes to [-1, 1]
    torch.manual_seed(0)
    aug = d_view(x, cfg_of(diffaug=["translation", "cutout"]), 1.0)
    assert not torch.allclose(aug, plain)
    aug.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(d_view(x, cfg_of(diffaug=["cutout"]), 0.0), plain)
    with pytest.raises(ValueError):
        cfg_of(diffaug=["saturation"])


def test_r1_and_wgan_gp_switches() -> None:
    for kw, key in ((dict(r1_gamma=10.0), "d_r1"), (dict(loss="wgan"), "d_gp")):
        cfg = cfg_of(**kw)
        g, d, _, opt_d, real, y, z, y_fake = step_parts(cfg)
        out = discriminator_step(d, opt_d, real, y, g(z, y_fake), y_fake, cfg, torch.device("cpu"))
        assert out[key] > 0
        off = discriminator_step(d, opt_d, real, y, g(z, y_fake), y_fake, cfg_of(), torch.device("cpu"))
        assert off[key] == 0.0


def test_two_time_scale_learning_rates() -> None:
    cfg = cfg_of()
    g, d = build_networks(cfg, 3)
    opt_g, opt_d = build_optimisers(cfg, g, d)
    assert opt_g.param_groups[0]["lr"] == 1e-4 and opt_d.param_groups[0]["lr"] == 4e-4
    assert opt_g.param_groups[0]["betas"] == (0.0, 0.9)


def test_bad_loss_name_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="hinge"):
        cfg_of(loss="bce")


# --- the loop --------------------------------------------------------------------------------


def test_training_writes_checkpoint_card_samples_and_health_metrics(tmp_path: Path) -> None:
    data = tiny_patch_data(n=12, size=16)
    cfg = cfg_of(ada_target=0.6, ada_speed_images=20, diffaug=["translation"], sample_every=2)
    result = train_tumor_gan(cfg, data, tmp_path / "run", device="cpu")
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "last.pt"
    card = json.loads(result.card.read_text())
    assert card["classes"] == ["healthy", "necrotic", "round"]
    assert card["patch_size"] == 16 and card["modality"] == "CT" and card["spacing"] == [2.0, 2.0, 4.0]
    assert card["train_subjects"] == sorted(data.train_subjects) and len(card["config_hash"]) == 16
    assert "torch" in card["versions"] and card["normalisation"]["hu_window"] == [-100.0, 200.0]
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("d_real", "d_fake", "grad_g", "grad_d", "loss_d", "loss_g", "diversity/round", "aug_p"):
        assert key in rows[-1]
    assert rows[-1]["aug_p"] > 0, "ADA raised p (D is confident on reals early)"
    grids = sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png"))
    assert grids == [f"step_{s:06d}_{c}.png" for s in (2, 4) for c in ("healthy", "necrotic", "round")]
    # EMA: the sampler's weights are the average, not the live generator's
    state = torch.load(result.checkpoint, weights_only=True)  # plain data and tensors only
    live, ema = state["nets"]["generator"], state["ema"]["generator"]["module"]
    assert any(not torch.equal(live[k], ema[k]) for k in live if live[k].is_floating_point())
    g, card2 = load_tumor_generator(result.checkpoint)
    assert not g.training and card2["classes"] == card["classes"]
    assert all(torch.equal(v, ema[k]) for k, v in g.state_dict().items())


def test_nan_guard_stops_a_diverging_run(tmp_path: Path) -> None:
    data = tiny_patch_data(n=6, size=16)
    data.images[:] = float("nan")
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        train_tumor_gan(cfg_of(max_nonfinite=2, steps=5), data, tmp_path / "run", device="cpu")


def test_data_and_config_must_agree(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="patch_size=32"):
        train_tumor_gan(cfg_of(patch_size=32), tiny_patch_data(n=6, size=16), tmp_path / "run", device="cpu")
    with pytest.raises(CheckpointError, match="is a cyclegan checkpoint, not a tumor_gan one"):
        save_checkpoint(tmp_path / "x.pt", versioned({"kind": "cyclegan"}))
        load_tumor_generator(tmp_path / "x.pt")
