"""Quick tests of the flow wiring: parameters and configs, deployments, cache keys, task runners.

The flow runs themselves are in test_flows_run.py (Prefect test harness) and
test_flows_server.py (`medaug serve` and `prefect deployment run` against a Prefect server).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.params import (
    REPO_ROOT,
    AugmentParams,
    load_pipeline_config,
    output_dir,
    resolve_config_path,
)
from pipeline.errors import ConfigError

CONFIGS = REPO_ROOT / "configs"


@pytest.mark.parametrize("name", ["tiny.yaml", "mri-ct.yaml", "tumor-patches.yaml", "tumor-insertion.yaml"])
def test_pipeline_configs_load(name: str) -> None:
    cfg = load_pipeline_config(AugmentParams(config=f"configs/{name}"))
    assert cfg.pipeline == ("tumor-patches" if name.startswith("tumor") else "mri-ct")
    assert cfg.dataset.synthesis == ("insertion" if "insertion" in name else "patches")
    assert cfg.runtime.task_runner == "thread"


def test_tiny_config_is_tiny() -> None:
    cfg = load_pipeline_config(AugmentParams(config="configs/tiny.yaml"))
    assert cfg.phantoms.enabled and cfg.phantoms.n_subjects <= 8 and cfg.phantoms.size <= 32
    assert cfg.runtime.device == "cpu"


def test_overrides_and_pipeline_parameter() -> None:
    params = AugmentParams(
        config="configs/tiny.yaml",
        overrides=["phantoms.n_subjects=4", "runtime.task_runner=dask"],
        pipeline="tumor-patches",
    )
    cfg = load_pipeline_config(params)
    assert cfg.phantoms.n_subjects == 4
    assert cfg.runtime.task_runner == "dask"
    assert cfg.pipeline == "tumor-patches"


def test_output_dir_prefers_the_parameter(tmp_path: Path) -> None:
    params = AugmentParams(config="configs/tiny.yaml", out=str(tmp_path / "x"))
    assert output_dir(params, load_pipeline_config(params)) == tmp_path / "x"


def test_config_path_resolves_against_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("configs/tiny.yaml") == CONFIGS / "tiny.yaml"
    (tmp_path / "mine.yaml").write_text("phantoms:\n  enabled: true\n")
    assert resolve_config_path("mine.yaml") == Path("mine.yaml")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["runtime.task_runner=ray"], "task_runner.*thread.*dask"),
        (["phantoms.n_subjects=1"], "n_subjects"),
        (["bogus.key=1"], "bogus.key"),
        (["phantoms.colour=red"], "colour"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_pipeline_config(AugmentParams(config="configs/tiny.yaml", overrides=overrides))


def test_unknown_section_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("phantom:\n  enabled: true\n")
    with pytest.raises(ConfigError, match="unknown section.*phantom"):
        load_pipeline_config(AugmentParams(config=str(bad)))
    with pytest.raises(ConfigError, match="does not exist"):
        load_pipeline_config(AugmentParams(config=str(tmp_path / "nope.yaml")))


def test_override_syntax_is_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        AugmentParams(overrides=["no equals sign"])


def test_prefect_yaml_defines_both_deployments() -> None:
    from flows.deploy import deployment_specs, schedules_of

    specs = {s["name"]: s for s in deployment_specs()}
    assert set(specs) == {"mri-ct", "tumor-patches"}
    for name, spec in specs.items():
        assert spec["entrypoint"] == "flows/augment.py:augment"
        assert spec["parameters"]["pipeline"] == name
        assert (REPO_ROOT / spec["parameters"]["config"]).is_file()
        (schedule,) = schedules_of(spec)
        assert schedule.cron and not schedule.active
        assert schedules_of(spec, activate=True)[0].active


def test_runner_deployments_carry_parameters_and_schedules() -> None:
    from flows.deploy import deployments

    deps = {d.name: d for d in deployments(activate_schedules=False)}
    assert set(deps) == {"mri-ct", "tumor-patches"}
    assert deps["mri-ct"].parameters["config"] == "configs/mri-ct.yaml"
    assert deps["mri-ct"].entrypoint == "flows.augment.augment"
    assert len(deps["tumor-patches"].schedules or []) == 1


def test_content_hash_follows_file_content(tmp_path: Path) -> None:
    from flows.tasks import content_hash

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.dcm").write_bytes(b"one")
    first = content_hash([tmp_path / "a"])
    assert content_hash([tmp_path / "a"]) == first
    (tmp_path / "a" / "x.dcm").write_bytes(b"two")
    assert content_hash([tmp_path / "a"]) != first
    # the same files under another parent folder: the same hash
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.dcm").write_bytes(b"two")
    assert content_hash([tmp_path / "b"]) == content_hash([tmp_path / "a"])


def test_task_runners_from_config() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.augment import task_runner
    from flows.params import RuntimeConfig

    assert isinstance(task_runner(RuntimeConfig(task_runner="thread")), ThreadPoolTaskRunner)
    dask = task_runner(RuntimeConfig(task_runner="dask", max_workers=2))
    assert isinstance(dask, DaskTaskRunner)
    assert dask.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1, "processes": False, "dashboard_address": None}
    remote = task_runner(RuntimeConfig(task_runner="dask", dask_address="tcp://127.0.0.1:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://127.0.0.1:8786"


def test_torchrun_command_line(tmp_path: Path) -> None:
    from flows.tasks import cyclegan_cli_args, torchrun_command, tumor_gan_cli_args
    from models.train_tumor_gan import TumorGANConfig

    run = tmp_path / "run"
    args = cyclegan_cli_args(Path("ingest"), run, {"steps": 5}, {"min_foreground": 0.2}, "cuda", resume=True)
    cmd = torchrun_command(4, args)
    assert Path(cmd[0]).name == "torchrun"
    assert cmd[1:7] == ["--standalone", "--nproc_per_node", "4", "-m", "medaug.cli", "train"]
    assert cmd[7:] == ["cyclegan", "--data", "ingest", "--out", str(run), "--config", str(run / "config.yaml"),
                       "--device", "cuda", "--resume"]
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text()) == {"cyclegan": {"steps": 5}, "cyclegan_data": {"min_foreground": 0.2}}
    tumor = tumor_gan_cli_args(Path("patches"), run, TumorGANConfig(patch_size=16), "CT", "cuda", resume=False)
    assert tumor[:6] == ["train", "tumor-gan", "--data", "patches", "--out", str(run)] and "--resume" not in tumor
    assert yaml.safe_load((run / "config.yaml").read_text())["tumor_gan"]["patch_size"] == 16


def test_the_cli_accepts_what_torchrun_passes(tmp_path: Path) -> None:
    """The torchrun arguments name real options of `medaug train ...` (checked with --help, no training)."""
    from typer.testing import CliRunner

    from flows.tasks import cyclegan_cli_args, tumor_gan_cli_args
    from medaug.cli import app
    from models.train_tumor_gan import TumorGANConfig

    runs = [
        cyclegan_cli_args(Path("i"), tmp_path / "a", {}, {}, "cpu", resume=True),
        tumor_gan_cli_args(Path("p"), tmp_path / "b", TumorGANConfig(), "CT", "cpu", resume=True),
    ]
    for args in runs:
        helptext = CliRunner().invoke(app, [*args[:2], "--help"]).output
        for option in (a for a in args if a.startswith("--")):
            assert option in helptext, f"{option} is not an option of medaug {' '.join(args[:2])}"


def test_includes_merge_under_the_including_file(tmp_path: Path) -> None:
    from flows.params import compose_yaml

    (tmp_path / "base.yaml").write_text("cyclegan:\n  ngf: 8\n  ndf: 8\nruntime:\n  max_workers: 3\n")
    (tmp_path / "top.yaml").write_text("include: [base.yaml]\ncyclegan:\n  ndf: 16\n")
    assert compose_yaml(tmp_path / "top.yaml") == {"cyclegan": {"ngf": 8, "ndf": 16}, "runtime": {"max_workers": 3}}
    cfg = load_pipeline_config(AugmentParams(config=str(tmp_path / "top.yaml")))
    assert (cfg.cyclegan.ngf, cfg.cyclegan.ndf, cfg.runtime.max_workers) == (8, 16, 3)
    (tmp_path / "loop.yaml").write_text("include: [loop.yaml]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        compose_yaml(tmp_path / "loop.yaml")


def test_pipeline_configs_build_on_the_stage_recipes() -> None:
    import yaml

    recipe = yaml.safe_load((CONFIGS / "cyclegan.yaml").read_text())["cyclegan"]
    cfg = load_pipeline_config(AugmentParams(config="configs/mri-ct.yaml"))
    assert cfg.cyclegan.image_size == recipe["image_size"] and cfg.cyclegan.ngf == recipe["ngf"]
    assert cfg.pipeline == "mri-ct"  # mri-ct.yaml overrides dataset.yaml's deployment
    tiny = load_pipeline_config(AugmentParams(config="configs/tiny.yaml"))
    assert tiny.cyclegan.total_steps <= 20 and tiny.cyclegan.ngf <= 8 and tiny.tumor_gan.steps <= 20


def test_demo_exit_codes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A gate reject exits 3 and says no dataset was written; a bad config exits 2 with one line."""
    from typer.testing import CliRunner

    import flows.demo
    from medaug.cli import app
    from pipeline.errors import GateRejected

    def rejects(*args: object, **kwargs: object) -> None:
        raise GateRejected("stage gate: the quality gate rejected the synthetic data (failed checks: fid); "
                           "nothing was written to d/dataset")

    monkeypatch.setattr(flows.demo, "run_demo", rejects)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d")])
    assert result.exit_code == 3
    assert "stage gate" in result.output and "nothing was written" in result.output

    def bad_config(*args: object, **kwargs: object) -> None:
        load_pipeline_config(AugmentParams(config=str(tmp_path / "missing.yaml")))

    monkeypatch.setattr(flows.demo, "run_demo", bad_config)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_serve_needs_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import serve_all

    with temporary_settings(updates={PREFECT_API_URL: None}), pytest.raises(ConfigError, match="prefect server start"):
        serve_all()


def test_phantoms_auto_only_without_sources() -> None:
    from flows.params import IngestSection, PhantomsConfig, use_phantoms

    auto = PhantomsConfig(enabled="auto")
    assert use_phantoms(auto, IngestSection())
    assert not use_phantoms(auto, IngestSection(sources=[Path("/data/ct")]))
    assert use_phantoms(PhantomsConfig(enabled=True), IngestSection(sources=[Path("/data/ct")]))
    assert not use_phantoms(PhantomsConfig(), IngestSection())
    cfg = load_pipeline_config(AugmentParams(config="configs/mri-ct.yaml"))
    assert cfg.phantoms.enabled == "auto"
