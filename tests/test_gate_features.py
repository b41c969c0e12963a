"""Feature extractors of the gate: domain encoder, FID InceptionV3 (architecture only), plug-ins."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, WeightsMissingError
from pipeline.gate.config import GateConfig
from pipeline.gate.encoder import (
    DomainEncoder,
    augment,
    load_domain_encoder,
    save_domain_encoder,
    state_dict_sha256,
    train_domain_encoder,
)
from pipeline.gate.features import ENCODER_FILE, DomainExtractor, FeatureExtractor, build_extractor
from pipeline.gate.inception import FIDInceptionV3, load_fid_inception


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Small tensors gain nothing from threads, and on a busy 2-core machine OpenMP spin-waits
    make 2 threads ~8x slower than 1; restored afterwards so other modules keep their setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(n: int = 24, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1, 1, size)
    disc = ((x[None, :] ** 2 + x[:, None] ** 2) < 0.6).float()
    return (disc[None, None] * torch.rand((n, 1, 1, 1), generator=g) * 1.6 - 0.8 + 0.05 * torch.randn((n, 1, size, size), generator=g)).clamp(-1, 1)


def test_domain_encoder_trains_deterministically_and_round_trips(tmp_path: Path) -> None:
    x = _images()
    a = train_domain_encoder(x, steps=3, batch=8, width=4, seed=0)
    b = train_domain_encoder(x, steps=3, batch=8, width=4, seed=0)
    c = train_domain_encoder(x, steps=3, batch=8, width=4, seed=1)
    assert state_dict_sha256(a.state_dict()) == state_dict_sha256(b.state_dict())
    assert state_dict_sha256(a.state_dict()) != state_dict_sha256(c.state_dict())
    digest = save_domain_encoder(a, tmp_path / "enc.pt")
    loaded, digest2 = load_domain_encoder(tmp_path / "enc.pt")
    assert digest == digest2 and len(digest) == 64
    ext = DomainExtractor(loaded, digest2)
    assert isinstance(ext, FeatureExtractor)
    f = ext(x)
    assert f.shape == (24, 32) and f.dtype == np.float64
    with torch.no_grad():
        assert np.allclose(f, a.features(x).double().numpy(), atol=1e-6)


def test_domain_encoder_weights_move_and_every_parameter_gets_a_gradient() -> None:
    x = _images(8)
    model = DomainEncoder(width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(torch.cat([x, x]))
    out.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    trained = train_domain_encoder(x, steps=2, batch=4, width=4)
    assert any(not torch.equal(before[k], v) for k, v in trained.state_dict().items() if v.dtype.is_floating_point)


def test_augment_keeps_shape_range_and_is_seeded() -> None:
    x = _images(6)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert not torch.equal(a, x)


def test_missing_encoder_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissingError, match="gate.encoder_path"):
        load_domain_encoder(tmp_path / "nope.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(WeightsMissingError, match="not a domain-simclr-v1 encoder"):
        load_domain_encoder(tmp_path / "other.pt")


def test_build_extractor_trains_and_saves_domain_encoder(tmp_path: Path) -> None:
    cfg = GateConfig(encoder_steps=2, encoder_batch=4, encoder_width=4)
    ext = build_extractor(cfg, _images(8), tmp_path)
    assert ext.name == "domain-simclr-v1"
    assert (tmp_path / ENCODER_FILE).is_file()
    _, digest = load_domain_encoder(tmp_path / ENCODER_FILE)
    assert digest == ext.sha256
    again = build_extractor(cfg.model_copy(update={"encoder_path": tmp_path / ENCODER_FILE}), _images(8), None)
    assert again.sha256 == ext.sha256


# --- FID InceptionV3 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return path


def test_inception_has_the_fid_state_dict_layout() -> None:
    sd = FIDInceptionV3().state_dict()
    # names and shapes of torchvision's Inception3 with 1008 classes and no aux head
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Conv2d_4a_3x3.conv.weight"].shape == (192, 80, 3, 3)
    assert sd["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert sd["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert sd["Mixed_7a.branch3x3_2.conv.weight"].shape == (320, 192, 3, 3)
    assert sd["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    assert sd["fc.weight"].shape == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in sd)
    assert FIDInceptionV3().Conv2d_1a_3x3.bn.eps == pytest.approx(1e-3)


def test_inception_round_trip_gives_2048_features_for_grey_images(inception_file: Path) -> None:
    model = load_fid_inception(inception_file)
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        f = model.features(x)
        ref = FIDInceptionV3()
        torch.manual_seed(0)
        ref = FIDInceptionV3().eval()
        ref.load_state_dict(torch.load(inception_file, weights_only=True))
        g = ref.features(x)
    assert f.shape == (2, 2048)
    assert torch.isfinite(f).all() and (f >= 0).all()  # after ReLU and average pooling
    assert torch.allclose(f, g)


def test_inception_extractor_through_config(inception_file: Path) -> None:
    ext = build_extractor(GateConfig(extractor="inception", inception_weights=inception_file), torch.zeros(1, 1, 8, 8), None)
    assert ext.name == "fid-inception-v3" and len(ext.sha256) == 64
    # random weights are not pytorch-fid's: the report says so, by sha256
    assert ext.weights.startswith("NOT pytorch-fid's") and ext.sha256[:12] in ext.weights  # type: ignore[attr-defined]
    f = ext(torch.rand(1, 1, 32, 32) * 2 - 1)
    assert f.shape == (1, 2048) and f.dtype == np.float64


def test_missing_inception_weights_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissingError, match="gate.inception_weights"):
        build_extractor(GateConfig(extractor="inception"), torch.zeros(1, 1, 8, 8), None)
    with pytest.raises(WeightsMissingError, match="gate.inception_weights.*does not exist"):
        load_fid_inception(tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsMissingError, match="not an FID InceptionV3 state dict"):
        load_fid_inception(tmp_path / "wrong.pth")


# --- plug-ins ----------------------------------------------------------------------------------


def test_python_plugin_extractor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_gate_plugin.py").write_text(
        "import numpy as np\n"
        "class Mean:\n"
        "    name = 'mean-intensity'\n"
        "    sha256 = '0' * 64\n"
        "    def __call__(self, images):\n"
        "        return images.mean(dim=(2, 3)).double().numpy()\n"
        "INSTANCE = Mean()\n"
        "NOT_AN_EXTRACTOR = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for attr in ("Mean", "INSTANCE"):
        ext = build_extractor(GateConfig(extractor=f"python:my_gate_plugin:{attr}"), torch.zeros(1, 1, 4, 4), None)
        assert ext.name == "mean-intensity"
        assert ext(torch.ones(3, 1, 4, 4)).shape == (3, 1)
    with pytest.raises(ConfigError, match="not a FeatureExtractor"):
        build_extractor(GateConfig(extractor="python:my_gate_plugin:NOT_AN_EXTRACTOR"), torch.zeros(1, 1, 4, 4), None)
    with pytest.raises(ConfigError, match="cannot import"):
        build_extractor(GateConfig(extractor="python:no_such_module_xyz:A"), torch.zeros(1, 1, 4, 4), None)


def test_bad_extractor_name_lists_the_choices() -> None:
    from medaug.config import load_section

    with pytest.raises(ConfigError, match='"domain", "inception", "python:module:attr"'):
        load_section(GateConfig, None, "gate", ["gate.extractor=resnet"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_clean_fid_torchscript_file_is_wrapped(tmp_path: Path) -> None:
    class Fake(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            # pool3 stand-in: mean RGB value in [0, 255], repeated to 2048
            return x.mean(dim=(1, 2, 3))[:, None].repeat(1, 2048)

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(Fake()).save(str(path))
    ext = build_extractor(GateConfig(extractor="inception", inception_weights=path), torch.zeros(1, 1, 8, 8), None)
    f = ext(torch.stack([torch.full((1, 16, 16), -1.0), torch.full((1, 16, 16), 1.0)]))
    assert f.shape == (2, 2048)
    assert np.allclose(f[:, 0], [0.0, 255.0], atol=1e-3)


def test_missing_weights_fail_before_any_image_is_read(tmp_path: Path) -> None:
    from pipeline.gate.run import run_gate

    with pytest.raises(WeightsMissingError, match="gate.inception_weights"):
        run_gate(tmp_path / "no_real", tmp_path / "no_synthetic", tmp_path / "out", GateConfig(extractor="inception"))
