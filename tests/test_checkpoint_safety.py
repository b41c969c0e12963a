"""Checkpoints are untrusted input (issue 14): weights-only loading everywhere a checkpoint is read.

A `.pt` whose unpickling would run code is given to every command and flow stage that loads a
checkpoint (translate, evaluate-translation, sample-tumors, evaluate-tumors, train cyclegan
--resume, train tumor-gan --resume, the flow's `checkpoint` parameter): the code must not run
and the error must be one clear line with exit code 2. Truncated, random, empty and
other-architecture files, a resume with another image size, an old pickled checkpoint (and its
conversion) and a full disk while saving get the same treatment.
"""

from __future__ import annotations

import errno
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_gan_invariants import _cyclegan_cfg, _cyclegan_data, _tumor_cfg
from test_slices import make_ingest_like
from test_tumor_gan_data import make_ingest_folder, tiny_patch_data
from typer.testing import CliRunner

from medaug.cli import app
from models.checkpoint import CheckpointError, convert_legacy_checkpoint, load_checkpoint
from models.train_cyclegan import load_generator, train_cyclegan
from models.train_tumor_gan import load_tumor_generator, train_tumor_gan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
runner = CliRunner()
torch.set_num_threads(1)


class RunsCode:
    """Pickled as a call of open(marker, "w"): unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def write_hostile(path: Path, marker: Path, kind: str) -> Path:
    """A checkpoint-shaped .pt (right format keys) whose weights are a code-running object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "medaug.checkpoint", "version": 2, "kind": kind, "nets": RunsCode(marker)}, path)
    return path


def one_line_error(result: Any, *needles: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line that contains every needle."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def cyclegan_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cg")
    return train_cyclegan(_cyclegan_cfg(steps=1), _cyclegan_data(), run, device="cpu").last_checkpoint


@pytest.fixture(scope="module")
def tumor_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("tg")
    return train_tumor_gan(_tumor_cfg(steps=1), tiny_patch_data(n=6, size=16), run, device="cpu").checkpoint


@pytest.fixture(scope="module")
def mr_ct_ingest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ingest_like(tmp_path_factory.mktemp("ing") / "ingest", n_subjects=4)


@pytest.fixture(scope="module")
def tumor_ingest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ingest_folder(tmp_path_factory.mktemp("ting") / "ingest", n_subjects=6, size=64, depth=8, seed=3)


def test_the_hostile_file_does_run_code_when_unpickled(tmp_path: Path) -> None:
    """The fixture is real: a plain (not weights-only) load of it creates the marker."""
    path = write_hostile(tmp_path / "evil.pt", tmp_path / "marker", "cyclegan")
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").exists()


# --- every command that loads a checkpoint --------------------------------------------------------


def _args(command: str, ckpt: Path, tmp: Path, mr_ct: Path, tumor: Path) -> list[str]:
    match command:
        case "translate":
            return ["translate", str(mr_ct), "--checkpoint", str(ckpt), "--direction", "mri2ct",
                    "--out", str(tmp / "o"), "--device", "cpu"]
        case "evaluate-translation":
            return ["evaluate-translation", "--checkpoint", str(ckpt), "--data", str(mr_ct), "--out", str(tmp / "o"),
                    "--device", "cpu"]
        case "sample-tumors":
            return ["sample-tumors", "--checkpoint", str(ckpt), "--class", "round", "--n", "2", "--out", str(tmp / "o")]
        case "evaluate-tumors":
            return ["evaluate-tumors", "--checkpoint", str(ckpt), "--real", str(tmp / "real"), "--out", str(tmp / "o")]
    raise ValueError(command)


LOADERS = {"translate": "cyclegan", "evaluate-translation": "cyclegan", "sample-tumors": "tumor_gan",
           "evaluate-tumors": "tumor_gan"}


@pytest.mark.parametrize("command", sorted(LOADERS))
def test_a_code_running_checkpoint_is_refused_by_every_loading_command(
    command: str, tmp_path: Path, mr_ct_ingest: Path, tumor_ingest: Path
) -> None:
    marker = tmp_path / "marker"
    ckpt = write_hostile(tmp_path / "evil.pt", marker, LOADERS[command])
    result = runner.invoke(app, _args(command, ckpt, tmp_path, mr_ct_ingest, tumor_ingest))
    one_line_error(result, "evil.pt", "pickled python objects", "--i-trust-this-file")
    assert not marker.exists(), "code from the checkpoint ran"


@pytest.mark.parametrize(("command", "kind", "data", "config"), [
    ("cyclegan", "cyclegan", "mr_ct_ingest", "cyclegan-tiny.yaml"),
    ("tumor-gan", "tumor_gan", "tumor_ingest", "tumor_gan-tiny.yaml"),
])
def test_train_resume_refuses_a_code_running_checkpoint(tmp_path: Path, request: pytest.FixtureRequest, command: str,
                                                        kind: str, data: str, config: str) -> None:
    marker, run = tmp_path / "marker", tmp_path / "run"
    write_hostile(run / "checkpoints" / "last.pt", marker, kind)
    result = runner.invoke(app, ["train", command, "--data", str(request.getfixturevalue(data)), "--out", str(run),
                                 "--config", str(CONFIGS / config), "--steps", "2", "--device", "cpu", "--resume"])
    one_line_error(result, "last.pt", "pickled python objects")
    assert not marker.exists()


def test_the_flow_never_retries_a_bad_checkpoint() -> None:
    from flows.tasks import retry_unless_config_error
    from pipeline.errors import CheckpointError as PipelineCheckpointError

    class State:
        def __init__(self, exc: Exception) -> None:
            self.data = exc

    assert not retry_unless_config_error(None, None, State(PipelineCheckpointError("x.pt is empty")))
    assert not retry_unless_config_error(None, None, State(CheckpointError("x.pt is empty")))
    assert retry_unless_config_error(None, None, State(OSError("network share went away")))
    # every task that loads a checkpoint carries the condition, also after with_options(retries=...)
    from flows.tasks import sample_tumors_task, train_cyclegan_task, train_tumor_gan_task, translate_task

    for t in (train_cyclegan_task, train_tumor_gan_task, translate_task, sample_tumors_task):
        assert t.with_options(retries=3).retry_condition_fn is retry_unless_config_error, t.name


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("kind", ["translate", "sample"])
def test_the_flows_checkpoint_parameter_refuses_a_code_running_checkpoint_once(
    kind: str, tmp_path: Path, mr_ct_ingest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """generate_synthetic is what `augment(checkpoint=...)` hands the checkpoint to: two retries
    allowed, yet the bad file is opened once, no code runs, and the error is the clear one."""
    import models.train_cyclegan
    import models.train_tumor_gan
    from flows.augment import generate_synthetic
    from pipeline.errors import CheckpointError as PipelineCheckpointError

    marker = tmp_path / "marker"
    ckpt = write_hostile(tmp_path / "evil.pt", marker, "cyclegan" if kind == "translate" else "tumor_gan")
    module, name = (models.train_cyclegan, "load_generator") if kind == "translate" else (models.train_tumor_gan, "load_tumor_generator")
    calls: list[Path] = []
    real_loader = getattr(module, name)

    def counting_loader(path: Path, *args: Any, **kwargs: Any) -> Any:
        calls.append(Path(path))
        return real_loader(path, *args, **kwargs)

    monkeypatch.setattr(module, name, counting_loader)
    if kind == "translate":
        job: dict[str, Any] = {"kind": "translate", "checkpoint": str(ckpt), "direction": "mri2ct", "src": str(mr_ct_ingest),
                               "out": str(tmp_path / "syn"), "split": None, "device": "cpu", "batch_size": 4, "use_ema": True}
    else:
        job = {"kind": "sample", "checkpoint": str(ckpt), "counts": {"round": 2}, "seed": 0, "out": str(tmp_path / "syn"),
               "device": "cpu", "batch_size": 4}
    with pytest.raises(PipelineCheckpointError, match="evil.pt holds pickled python objects"):
        generate_synthetic([job], retries=2, retry_backoff_s=0.0)
    assert not marker.exists()
    assert calls == [ckpt], "a bad checkpoint is not retried"


# --- unreadable, mismatched and old checkpoints ---------------------------------------------------


def _damaged(kind: str, good: Path, path: Path) -> Path:
    data = good.read_bytes()
    match kind:
        case "empty":
            path.write_bytes(b"")
        case "truncated":
            path.write_bytes(data[: len(data) // 2])
        case "random":
            path.write_bytes(np.random.default_rng(0).bytes(4096))
        case "other-architecture":  # the config says wider networks than the weights hold
            state = torch.load(good, weights_only=True)
            cfg = state["config"]
            cfg["ngf" if "ngf" in cfg else "g_channels"] *= 2
            torch.save(state, path)
        case "not-a-dict":
            torch.save([torch.zeros(2)], path)
    return path


DAMAGE = {"empty": "is empty", "truncated": "truncated or corrupt", "random": "truncated or corrupt",
          "other-architecture": "do not fit this network", "not-a-dict": "does not hold a dict"}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["translate", "sample-tumors"])
def test_damaged_checkpoints_end_with_one_line(
    command: str, damage: str, tmp_path: Path, cyclegan_ckpt: Path, tumor_ckpt: Path, mr_ct_ingest: Path
) -> None:
    good = cyclegan_ckpt if command == "translate" else tumor_ckpt
    bad = _damaged(damage, good, tmp_path / f"{damage}.pt")
    result = runner.invoke(app, _args(command, bad, tmp_path, mr_ct_ingest, tmp_path))
    one_line_error(result, f"{damage}.pt", DAMAGE[damage])


def test_a_checkpoint_of_the_other_gan_is_named(cyclegan_ckpt: Path, tumor_ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="is a tumor_gan checkpoint, not a cyclegan one"):
        load_generator(tumor_ckpt, "mri2ct")
    with pytest.raises(CheckpointError, match="is a cyclegan checkpoint, not a tumor_gan one"):
        load_tumor_generator(cyclegan_ckpt)


def test_resume_with_another_image_size_is_one_line(tmp_path: Path, mr_ct_ingest: Path) -> None:
    run = tmp_path / "run"
    base = ["train", "cyclegan", "--data", str(mr_ct_ingest), "--out", str(run), "--config",
            str(CONFIGS / "cyclegan-tiny.yaml"), "--device", "cpu", "--set", "cyclegan.sample_every=1000"]
    assert runner.invoke(app, [*base, "--steps", "1"]).exit_code == 0
    result = runner.invoke(app, [*base, "--steps", "2", "--resume", "--image-size", "48"])
    one_line_error(result, "last.pt", "image_size (32 -> 48)")


def test_tumor_resume_with_another_network_is_refused(tmp_path: Path) -> None:
    train_tumor_gan(_tumor_cfg(steps=1), tiny_patch_data(n=6, size=16), tmp_path, device="cpu")
    with pytest.raises(CheckpointError, match=r"last.pt: it was trained with other g_channels \(4 -> 8\)"):
        train_tumor_gan(_tumor_cfg(steps=2, g_channels=8), tiny_patch_data(n=6, size=16), tmp_path, resume=True, device="cpu")


def _as_version_1(new: Path, old: Path) -> None:
    """Write `new`'s state the way medaug wrote checkpoints before version 2 (pickled tuples, numpy)."""
    s = torch.load(new, weights_only=True)
    legacy_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    ranks = [{**r, "rng": legacy_rng} for r in s["ranks"]]
    if s["kind"] == "cyclegan":
        extra = s["extra"]
        state = {"format": "medaug.cyclegan/1", "step": s["step"], "config": s["config"], "meta": json.loads(extra["meta"]),
                 "nets": s["nets"], "ema": s["ema"], "optimizers": s["optimizers"], "schedulers": s["schedulers"],
                 **ranks[0], "ranks": ranks, "guard": s["guards"]["gan"], "monitor": s["monitor"], "best": extra["best"],
                 "last_metrics": extra["last_metrics"], "world_size": s["world_size"]}
    else:
        state = {"kind": "tumor_gan", "step": s["step"], "config": s["config"], "classes": s["extra"]["classes"],
                 "data_fingerprint": s["extra"]["data_fingerprint"], "generator": s["nets"]["generator"],
                 "discriminator": s["nets"]["discriminator"], "ema": s["ema"]["generator"], "opt_g": s["optimizers"]["g"],
                 "opt_d": s["optimizers"]["d"], "guard_d": s["guards"]["d"], "guard_g": s["guards"]["g"],
                 "health": s["monitor"], **ranks[0], "ranks": ranks, "world_size": s["world_size"],
                 "card": json.loads(s["card"])}
    torch.save(state, old)


@pytest.mark.parametrize("gan", ["cyclegan", "tumor_gan"])
def test_an_old_checkpoint_is_refused_then_converted_by_the_trusted_command(
    gan: str, tmp_path: Path, cyclegan_ckpt: Path, tumor_ckpt: Path
) -> None:
    new = cyclegan_ckpt if gan == "cyclegan" else tumor_ckpt
    old, converted = tmp_path / "old.pt", tmp_path / "converted.pt"
    _as_version_1(new, old)
    with pytest.raises(CheckpointError, match="old.pt holds pickled python objects.*convert-checkpoint --i-trust-this-file"):
        load_checkpoint(old)
    one_line_error(runner.invoke(app, ["convert-checkpoint", str(old), str(converted)]), "--i-trust-this-file")
    assert not converted.exists()
    result = runner.invoke(app, ["convert-checkpoint", "--i-trust-this-file", str(old), str(converted)])
    assert result.exit_code == 0 and f"{gan} checkpoint at step 1" in result.output, result.output
    state = torch.load(converted, weights_only=True)
    assert (state["format"], state["version"], state["kind"]) == ("medaug.checkpoint", 2, gan)
    if gan == "cyclegan":
        a, b = load_generator(new, "mri2ct")[0], load_generator(converted, "mri2ct")[0]
        assert json.loads(state["card"])["train_subjects"] == ["s1"]
    else:
        a, b = load_tumor_generator(new)[0], load_tumor_generator(converted)[0]
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_converting_a_file_that_is_no_checkpoint_is_one_line(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="x.pt is not a medaug checkpoint"):
        convert_legacy_checkpoint(tmp_path / "x.pt", tmp_path / "y.pt")


# --- a full disk while saving ---------------------------------------------------------------------


def _full_disk(monkeypatch: pytest.MonkeyPatch, after: int = 0) -> None:
    """torch.save (as the checkpoint writer calls it) writes `after` files, then fails with ENOSPC."""
    import models.checkpoint

    real_save, done = torch.save, [0]

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if done[0] >= after:
            Path(f).write_bytes(b"PK\x03\x04 half")  # a partial temporary file, as a real full disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done[0] += 1
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(models.checkpoint.torch, "save", save)


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _full_disk(monkeypatch, after=1)  # the step-1 checkpoint is written, the step-2 one hits a full disk
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*last.pt: No space left on device; the previous"):
        train_cyclegan(_cyclegan_cfg(steps=2, checkpoint_every=1), _cyclegan_data(), tmp_path, device="cpu")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.json", "last.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 1


def test_a_full_disk_during_training_is_one_line(tmp_path: Path, tumor_ingest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _full_disk(monkeypatch)
    result = runner.invoke(app, ["train", "tumor-gan", "--data", str(tumor_ingest), "--out", str(tmp_path / "run"),
                                 "--config", str(CONFIGS / "tumor_gan-tiny.yaml"), "--steps", "2", "--device", "cpu"])
    one_line_error(result, "cannot write checkpoint", "No space left on device")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == []


def test_a_full_disk_while_logging_metrics_is_one_line(tmp_path: Path, mr_ct_ingest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.common import MetricsWriter

    def log(self: MetricsWriter, step: int, metrics: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(MetricsWriter, "log", log)
    result = runner.invoke(app, ["train", "cyclegan", "--data", str(mr_ct_ingest), "--out", str(tmp_path / "run"), "--config",
                                 str(CONFIGS / "cyclegan-tiny.yaml"), "--steps", "2", "--device", "cpu",
                                 "--set", "cyclegan.log_every=1"])
    one_line_error(result, "cannot write in the run folder", "No space left on device", "--resume")
