"""The one config loader (medaug/config.py): the CLI, the flow and the benches read a file alike.

Each CLI command is invoked for real (typer's CliRunner) up to the point where it hands its
config to the stage function, which is replaced by one that records the config and stops;
the recorded config must equal what the flow's `load_pipeline_config` gives for the same file.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.params import AugmentParams, load_pipeline_config
from medaug.cli import app
from medaug.config import REPO_ROOT, load_config, load_section
from pipeline.errors import ConfigError

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


class Captured(Exception):
    """Raised by a stand-in stage function once it has recorded the config it was given."""


def capture(seen: dict[str, Any], key: str, index: int) -> Any:
    """A stage function stand-in that stores its positional argument `index` under `key` and stops."""

    def fake(*args: Any, **kwargs: Any) -> Any:
        seen[key] = args[index]
        raise Captured

    return fake


def run_cli(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, Captured), result.output


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cli_and_flow_read_every_config_alike(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import models.train_cyclegan
    import models.train_tumor_gan
    import pipeline.dataset.writer
    import pipeline.gate.run
    import pipeline.patches
    import pipeline.slices

    flow = load_pipeline_config(AugmentParams(config=str(path)))
    seen: dict[str, Any] = {}
    data = SimpleNamespace(a=[0], b=[0], meta={"train_subjects": ["s"]})

    def slices(paths: Any, image_size: int, in_channels: int, data_cfg: Any) -> Any:
        seen["cyclegan_data"] = data_cfg
        return SimpleNamespace(data=data, evaluate=None, monitor=None)

    monkeypatch.setattr(pipeline.slices, "load_training_inputs", slices)
    monkeypatch.setattr(models.train_cyclegan, "train_cyclegan", capture(seen, "cyclegan", 0))
    monkeypatch.setattr(pipeline.patches, "load_patches", lambda *a, **k: None)
    monkeypatch.setattr(pipeline.patches, "to_train_data", lambda *a, **k: SimpleNamespace(
        images=SimpleNamespace(shape=(1,)), modality="CT", classes=["round"]))
    monkeypatch.setattr(models.train_tumor_gan, "train_tumor_gan", capture(seen, "tumor_gan", 0))
    monkeypatch.setattr(pipeline.gate.run, "run_gate", capture(seen, "gate", 3))
    monkeypatch.setattr(pipeline.dataset.writer, "build_dataset", capture(seen, "dataset", 3))

    # inputs and output apart: commands refuse an --out inside an input (pipeline/outputs.py)
    data_dir, out, cfg = str(tmp_path / "data"), str(tmp_path / "out"), ["--config", str(path)]
    run_cli(["train", "cyclegan", "--data", data_dir, "--out", out, *cfg])
    run_cli(["train", "tumor-gan", "--data", data_dir, "--out", out, *cfg])
    run_cli(["gate", "--real", data_dir, "--synthetic", data_dir, "--out", out, *cfg])
    run_cli(["build-dataset", "--real", data_dir, "--out", out, *cfg])
    for section in ("cyclegan", "cyclegan_data", "tumor_gan", "gate", "dataset"):
        assert seen[section] == getattr(flow, section), f"{path.name} [{section}]: the CLI and the flow differ"
        assert seen[section] == load_section(type(seen[section]), path, section)


def test_tiny_config_trains_what_it_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`medaug train cyclegan --config configs/tiny.yaml` honours the file's include (cyclegan-tiny.yaml)."""
    import models.train_cyclegan
    import pipeline.slices

    seen: dict[str, Any] = {}
    data = SimpleNamespace(a=[0], b=[0], meta={"train_subjects": ["s"]})
    monkeypatch.setattr(pipeline.slices, "load_training_inputs", lambda *a: SimpleNamespace(data=data, evaluate=None, monitor=None))
    monkeypatch.setattr(models.train_cyclegan, "train_cyclegan", capture(seen, "cyclegan", 0))
    monkeypatch.chdir(tmp_path)  # a relative --config is also looked up in the checkout
    run_cli(["train", "cyclegan", "--data", str(tmp_path), "--out", "run", "--config", "configs/tiny.yaml"])
    cfg = seen["cyclegan"]
    # cyclegan-tiny.yaml says these; tiny.yaml adds sample_every
    assert (cfg.image_size, cfg.ngf, cfg.ndf, cfg.n_res_blocks, cfg.total_steps) == (32, 8, 8, 2, 20)
    assert cfg.sample_every == 20
    run_cli(["train", "cyclegan", "--data", str(tmp_path), "--out", "run", "--config", "configs/tiny.yaml",
             "--steps", "7", "--set", "cyclegan.ngf=4"])
    assert (seen["cyclegan"].steps, seen["cyclegan"].ngf, seen["cyclegan"].image_size) == (7, 4, 32)


def test_sections_of_a_pipeline_config_come_from_its_includes() -> None:
    """load_section of configs/mri-ct.yaml sees what its included stage recipes say."""
    from models.train_cyclegan import CycleGANConfig
    from pipeline.dataset.config import DatasetConfig

    cyclegan = load_section(CycleGANConfig, "configs/mri-ct.yaml", "cyclegan")
    assert (cyclegan.image_size, cyclegan.ngf, cyclegan.ema_decay) == (64, 16, 0.995)  # configs/cyclegan.yaml
    dataset = load_section(DatasetConfig, "configs/mri-ct.yaml", "dataset")
    assert (dataset.deployment, dataset.strategy) == ("mri-ct", "equalise")  # mri-ct.yaml over dataset.yaml


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("cyclgan:\n  steps: 5\n", r"unknown section 'cyclgan' \(did you mean cyclegan\?\)"),
        ("include: [nope.yaml]\n", r"includes nope.yaml, which does not exist"),
        ("include: cyclegan.yaml\n", r"must be a list"),
        ("cyclegan:\n  stepz: 5\n", r"\[cyclegan\] is invalid: stepz"),
        ("gate:\n  fid_max_excess: lots\n", r"\[gate\] is invalid: fid_max_excess"),
        ("- a\n- b\n", r"must hold a mapping"),
        ("cyclegan: {steps: [\n", r"not valid YAML"),
    ],
)
def test_bad_config_files_are_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=needle):
        load_config(path)
    result = CliRunner().invoke(app, ["gate", "--real", str(tmp_path), "--synthetic", str(tmp_path),
                                      "--out", str(tmp_path / "g"), "--config", str(path)])
    assert result.exit_code == 2 and "error: " in result.output and "Traceback" not in result.output


def test_include_errors_name_the_including_file(tmp_path: Path) -> None:
    (tmp_path / "top.yaml").write_text("include: [mid.yaml]\n", encoding="utf-8")
    (tmp_path / "mid.yaml").write_text("include: [gone.yaml]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"mid.yaml includes gone.yaml, which does not exist"):
        load_config(tmp_path / "top.yaml")


def test_overrides_name_known_sections() -> None:
    with pytest.raises(ConfigError, match=r"override 'steps=5' names unknown section 'steps'"):
        load_config("configs/tiny.yaml", ["steps=5"])
    with pytest.raises(ConfigError, match=r"did you mean tumor_gan"):
        load_config(None, ["tumor-gan.steps=5"])
    assert load_config(None, ["gate.min_samples=3"]).gate.min_samples == 3


def test_load_section_checks_the_model() -> None:
    from pipeline.gate.config import GateConfig

    with pytest.raises(TypeError, match="cyclegan"):
        load_section(GateConfig, None, "cyclegan")


def test_an_empty_section_keeps_what_the_include_set(tmp_path: Path) -> None:
    """`gate:` with every key commented out reads as None in YAML: it must not reset the
    included file's gate section to the defaults."""
    (tmp_path / "base.yaml").write_text("gate:\n  gate_size: 48\n", encoding="utf-8")
    (tmp_path / "top.yaml").write_text("include: [base.yaml]\ngate:\n  # gate_size: 32\n", encoding="utf-8")
    assert load_config(tmp_path / "top.yaml").gate.gate_size == 48
