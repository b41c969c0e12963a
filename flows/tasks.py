"""Prefect tasks of the `augment` flow: thin wrappers over pipeline/ and models/.

Each task calls one stage function and returns a small dict of strings and numbers (so
results persist and cache cheaply); the work and its tests live in pipeline/ and models/.
I/O tasks retry with exponential backoff; ingest and preprocessing are cached by a
content hash of their input files, so an unchanged cohort is not read twice. `stage`
marks a stage's start and end in the run log and for the CLI's progress display.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from prefect import get_run_logger, task
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from pipeline.errors import CheckpointError, ConfigError, DicomWebAuthError, MedaugError, StageFailed
from pipeline.manifest import MANIFEST_NAME, read_manifest, sha256_file

if TYPE_CHECKING:
    from pipeline.ingest.dicomweb import DicomWebAuth, PacsSource

STAGE_LOGGER = logging.getLogger("medaug.flow")
"""Stage events (extra fields `medaug_stage`, `medaug_event`, `medaug_detail`) for progress displays."""

CACHE_VERSION = "1"
"""Bump to invalidate every cached ingest/preprocess result (e.g. when their output format changes)."""


# --- stage events -------------------------------------------------------------------------


def emit(stage_name: str, event: str, detail: str = "", **fields: Any) -> None:
    """Tell progress displays (the CLI's rich view) that `stage_name` started/advanced/finished."""
    STAGE_LOGGER.info(
        "%s %s %s", stage_name, event, detail,
        extra={"medaug_stage": stage_name, "medaug_event": event, "medaug_detail": detail, "medaug_fields": fields},
    )


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Run a block as the pipeline stage `name`: logged, and re-raised with the stage named.

    A MedaugError keeps its type (GateRejected stays GateRejected, so the CLI can exit 3)
    with "stage NAME: " in front of its message; any other error becomes StageFailed.
    """
    logger = get_run_logger()
    logger.info("stage %s: started", name)
    emit(name, "start")
    try:
        yield
    except MedaugError as exc:
        emit(name, "failed", str(exc))
        logger.error("stage %s failed: %s", name, exc)
        if str(exc).startswith("stage "):
            raise
        try:
            named = type(exc)(f"stage {name}: {exc}")
        except TypeError:  # an error type whose constructor takes more than a message
            named = StageFailed(f"stage {name}: {exc}")
        raise named from exc
    except Exception as exc:
        emit(name, "failed", f"{type(exc).__name__}: {exc}")
        logger.error("stage %s failed: %s: %s", name, type(exc).__name__, exc)
        raise StageFailed(f"stage {name}: {type(exc).__name__}: {exc}") from exc
    emit(name, "done")
    logger.info("stage %s: done", name)


# --- content hashes and cache keys --------------------------------------------------------


def files_under(paths: Sequence[Path]) -> list[tuple[str, Path]]:
    """Every file under `paths` (files or folders) as (label, path), in a stable order.

    The label is the source's index and the path relative to it, so the same files in a
    different parent folder give the same labels.
    """
    found: list[tuple[str, Path]] = []
    for i, root in enumerate(paths):
        root = Path(root)
        if root.is_file():
            found.append((f"{i}:{root.name}", root))
        elif root.is_dir():
            found.extend((f"{i}:{p.relative_to(root).as_posix()}", p) for p in sorted(root.rglob("*")) if p.is_file())
    return found


def content_hash(paths: Sequence[Path]) -> str:
    """sha256 over the names and sha256s of every file under `paths` (a missing path counts as empty).

    >>> content_hash([]) == hashlib.sha256(b"").hexdigest()
    True
    """
    h = hashlib.sha256()
    for label, path in files_under(paths):
        h.update(f"{label}\t{sha256_file(path)}\n".encode())
    return h.hexdigest()


def _key(stage_name: str, **parts: Any) -> str:
    blob = json.dumps({"stage": stage_name, "version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return f"medaug-{stage_name}-{hashlib.sha256(blob.encode()).hexdigest()}"


def ingest_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Cache key of `ingest_task`: the content of its input files, its output folder, modality
    and de-identification key (as an HMAC under that key, which reveals nothing of it).

    None (never cached, the task always runs) when the ingest queries a PACS: what a PACS
    holds can change while no local file does, so a key from local file hashes would lie.
    A re-run still only converts series whose retrieved files changed (run_ingest's
    .ingest_state.json), but it asks the PACS and retrieves again.
    """
    import hmac

    if parameters.get("pacs"):
        return None
    sources = [Path(p) for p in parameters["sources"]]
    key = resolve_deid_key(parameters.get("key_source", "env"))
    key_id = hmac.new(key, b"medaug-ingest-cache", hashlib.sha256).hexdigest() if key else "random-per-run"
    return _key(
        "ingest", inputs=content_hash(sources), out=str(parameters["out"]), modality=parameters.get("modality"), key=key_id
    )


def preprocess_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of a preprocessing task: its ingest manifests' content and its options."""
    manifests = [Path(d) / MANIFEST_NAME for d in parameters["ingest_dirs"]]
    options = {k: v for k, v in parameters.items() if k != "ingest_dirs"}
    return _key(context.task.name, inputs=content_hash(manifests), options=options)


def backoff(retry_backoff_s: float) -> Callable[[int], list[float]]:
    """Retry delays doubling from `retry_backoff_s` seconds (Prefect's exponential_backoff)."""
    return exponential_backoff(backoff_factor=retry_backoff_s)


def retry_unless_config_error(task: Any, task_run: Any, state: Any) -> bool:
    """A task's retry_condition_fn: retry, except after a ConfigError (a missing Secret block,
    a malformed secret), which a retry cannot fix, a CheckpointError (a missing, corrupt,
    pickled or mismatched checkpoint: a bad file does not get better, and loading it twice
    helps no one), or a DicomWebAuthError (a PACS refused the credentials, HTTP 401/403):
    retrying those would only risk locking the account."""
    from models.checkpoint import CheckpointError as ModelCheckpointError

    return not isinstance(state.data, (ConfigError, CheckpointError, ModelCheckpointError, DicomWebAuthError))


# --- phantoms and ingest ------------------------------------------------------------------


@task(name="phantoms", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=1.0))
def phantoms_task(out: Path, n_subjects: int, size: int, seed: int) -> dict[str, Any]:
    """Write the phantom cohort under `out` (pipeline.phantoms.write_cohort); returns its folders."""
    from pipeline.phantoms import write_cohort

    logger = get_run_logger()
    write_cohort(Path(out), n_subjects=n_subjects, size=size, seed=seed)
    logger.info("phantom cohort: %d subjects, %dx%dx%d voxels", n_subjects, size, size, size // 2)
    return {"out": str(out), "dicom": str(Path(out) / "dicom"), "nifti": [str(Path(out) / "nifti" / m) for m in ("CT", "MR")]}


def summarise_ingest(out: Path) -> dict[str, Any]:
    """Counts of an ingest output folder read from its manifest.csv and quarantine.csv."""
    rows = read_manifest(out) if (out / MANIFEST_NAME).is_file() else []
    quarantine = out / "quarantine.csv"
    n_quarantined = len(read_manifest(quarantine)) if quarantine.is_file() else 0
    by_modality: dict[str, int] = {}
    for r in rows:
        by_modality[r.get("modality", "")] = by_modality.get(r.get("modality", ""), 0) + 1
    summary: dict[str, Any] = {"out": str(out), "volumes": len(rows), "quarantined": n_quarantined,
                               "by_modality": by_modality}
    report = out / "ingest_report.json"  # pipeline.ingest.run.REPORT_NAME (its import is heavy)
    if report.is_file():
        counts = json.loads(report.read_text(encoding="utf-8"))
        summary.update({k: counts[k] for k in ("pacs_series_found", "pacs_series_failed") if k in counts})
    return summary


DEMO_DEID_KEY = b"medaug-demo-key: phantom data only, never real patients"
"""The de-identification key of runs on the generated phantom cohort (no real patient in it)."""


def resolve_deid_key(key_source: str) -> bytes | None:
    """The de-identification secret named by `key_source`, resolved inside the task.

    "secret:NAME": a Prefect Secret block; "env": MEDAUG_DEID_KEY (None when unset: ingest
    then uses a random per-run key and warns); "demo": the fixed phantom-only key. The key
    itself never becomes a task parameter, so it is never stored with a run.
    """
    from pipeline.ingest.deid import key_from_env

    if key_source.startswith("secret:"):
        from prefect.blocks.system import Secret

        value = Secret.load(key_source.removeprefix("secret:")).get()  # type: ignore[union-attr]
        return str(value).encode("utf-8")
    match key_source:
        case "env":
            return key_from_env()
        case "demo":
            return key_from_env() or DEMO_DEID_KEY
        case _:
            raise ValueError(f"key_source must be env, demo or secret:NAME; got {key_source!r}")


def resolve_gate_key(key_source: str) -> bytes | None:
    """The gate's signing key named by `key_source`, resolved inside the gate and dataset tasks.

    "secret:NAME": the Prefect Secret block NAME (runtime.gate_key_secret); "env":
    MEDAUG_GATE_KEY (None when unset: the report is unsigned, build-dataset warns and the
    datasheet says so). Like the de-identification key, the key never becomes a task
    parameter and is never logged. Raises ConfigError when the block cannot be loaded or is empty.
    """
    from pipeline.gate.signing import gate_key_from_env

    if key_source.startswith("secret:"):
        from prefect.blocks.system import Secret

        name = key_source.removeprefix("secret:")
        try:
            value = Secret.load(name).get()  # type: ignore[union-attr]
        except ValueError:  # Prefect: no block document of that name (or not a Secret)
            raise ConfigError(f"the Prefect Secret block {name!r} (runtime.gate_key_secret) does not exist; create it "
                              f"(Secret(value=...).save({name!r})) or fix the name") from None
        if not value:
            raise ConfigError(f"the Prefect Secret block {name!r} (runtime.gate_key_secret) is empty")
        return str(value).encode("utf-8")
    match key_source:
        case "env":
            return gate_key_from_env()
        case _:
            raise ValueError(f"key_source must be env or secret:NAME; got {key_source!r}")


def resolve_dicomweb_auth(credentials: str) -> DicomWebAuth:
    """The PACS credentials named by `credentials`, resolved inside the ingest task.

    "secret:NAME": the Prefect Secret block NAME, holding {"user", "password"}, {"token"} or
    a bearer-token string (DicomWebAuth.from_secret_value); "env": MEDAUG_DICOMWEB_USER and
    MEDAUG_DICOMWEB_PASSWORD, or MEDAUG_DICOMWEB_TOKEN. Like the de-identification key, the
    value never becomes a task parameter, so it is never stored with a run or logged.
    Raises ConfigError when the block cannot be loaded or holds something else.
    """
    from pipeline.ingest.dicomweb import DicomWebAuth

    if credentials.startswith("secret:"):
        from prefect.blocks.system import Secret

        name = credentials.removeprefix("secret:")
        source = f"the Prefect Secret block {name!r} (ingest.dicomweb credentials_secret)"
        try:
            block = Secret.load(name)
        except ValueError:  # Prefect: no block document of that name (or not a Secret)
            raise ConfigError(
                f"{source} does not exist; create it (prefect block create secret, or "
                f"Secret(value={{'user': ..., 'password': ...}}).save({name!r})) or fix the name"
            ) from None
        return DicomWebAuth.from_secret_value(block.get(), source=source)  # type: ignore[union-attr]
    match credentials:
        case "env":
            return DicomWebAuth.from_env()
        case _:
            raise ValueError(f"credentials must be env or secret:NAME; got {credentials!r}")


def pacs_ref(config: dict[str, Any], index: int, url: str) -> dict[str, Any]:
    """A reference to the PACS `ingest.dicomweb[index]` of a run's config, for `ingest_task`'s `pacs`.

    `config` holds the run's AugmentParams fields config (an absolute path), overrides and
    pipeline; `url` is the PACS root as redact_url shows it (a check that the config still
    names the same PACS). The QIDO-RS filter values are left out on purpose: one may be a
    PatientID, an AccessionNumber or a StudyInstanceUID, and Prefect stores flow and task
    parameters with the run and shows them in its UI; `resolve_pacs_source` reads them inside
    the task, from the same config.
    """
    return {"config": config, "index": index, "url": url}


def resolve_pacs_source(ref: dict[str, Any]) -> PacsSource:
    """The PACS a `pacs_ref` names: its URL, query and credentials, read inside the ingest task.

    Raises ConfigError when the config no longer names that PACS at that position (edited
    since the run started), or when its credentials cannot be resolved (resolve_dicomweb_auth).
    """
    from flows.params import AugmentParams, load_pipeline_config
    from pipeline.ingest.dicomweb import PacsSource, redact_url

    params = AugmentParams.model_validate(ref["config"])
    index = int(ref["index"])
    servers = load_pipeline_config(params).ingest.dicomweb
    if index >= len(servers) or redact_url(servers[index].url) != ref["url"]:
        raise ConfigError(
            f"config {params.config} changed while the run was going: ingest.dicomweb entry {index + 1} is no "
            f"longer the PACS {ref['url']}; start the run again"
        )
    server = servers[index]
    credentials = f"secret:{server.credentials_secret}" if server.credentials_secret else "env"
    return PacsSource(server.url, dict(server.query), resolve_dicomweb_auth(credentials))


@task(name="ingest", cache_key_fn=ingest_cache_key, persist_result=True)
def ingest_task(
    sources: list[str], out: str, modality: str | None = None, key_source: str = "env",
    pacs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Ingest `sources` and the series of `pacs` into `out` in one run; returns counts (no identifiers).

    Local sources go through pipeline.ingest.run_ingest; with PACS (references made by
    `pacs_ref`: URL, query and credentials are read here from the run's config, so no filter
    value nor secret is ever a task parameter) through
    pipeline.ingest.dicomweb.ingest_with_pacs, which stages the PACS series and ingests them
    with the local sources. Cached by the content hash of the input files (an unchanged
    cohort is not re-ingested), except with PACS: never cached (see ingest_cache_key).
    """
    from pipeline.ingest import run_ingest
    from pipeline.ingest.dicomweb import ingest_with_pacs, redact_url

    logger = get_run_logger()
    key = resolve_deid_key(key_source)
    if pacs:
        servers = [resolve_pacs_source(ref) for ref in pacs]
        for i, server in enumerate(servers):
            # filter keys only: a value may be a PatientID or an accession number
            logger.info("ingest %s: PACS %d of %d, %s, credentials from %s, studies filtered by %s", Path(out).name,
                        i + 1, len(servers), redact_url(server.url), server.auth.source if server.auth else "-",
                        ", ".join(server.query) or "nothing (every study)")
        report = ingest_with_pacs(servers, Path(out), [Path(s) for s in sources], modality=modality,  # type: ignore[arg-type]
                                  key=key)
    else:
        report = run_ingest([Path(s) for s in sources], Path(out), modality=modality, key=key)  # type: ignore[arg-type]
    summary = summarise_ingest(Path(out))
    logger.info(
        "ingest %s: %d volumes %s written %d, reused %d, %d quarantined%s",
        Path(out).name, summary["volumes"], summary["by_modality"], report.volumes_written, report.volumes_reused,
        summary["quarantined"],
        f"; PACS series {summary['pacs_series_found']} found, {summary['pacs_series_failed']} not retrieved"
        if pacs else "",
    )
    return summary


# --- training helpers ---------------------------------------------------------------------


def run_dir_for(root: Path, name: str, config: dict[str, Any], data_hash: str) -> Path:
    """RUN_DIR of a trainer: ROOT/NAME-<hash of its config and data>.

    The same config on the same data maps to the same folder, so a retried (or re-run)
    training task finds its checkpoint and resumes; a changed config starts a new run.
    """
    blob = json.dumps({"config": config, "data": data_hash}, sort_keys=True, default=str)
    return Path(root) / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def should_resume(run_dir: Path) -> bool:
    """Resume when RUN_DIR/checkpoints/last.pt exists (a retry, or a re-run of the same config)."""
    return (Path(run_dir) / "checkpoints" / "last.pt").is_file()


def torchrun_command(nproc_per_node: int, cli_args: Sequence[str]) -> list[str]:
    """The command line that runs `medaug CLI_ARGS...` under torchrun with N processes per node.

    >>> torchrun_command(4, ["train", "cyclegan", "--run-dir", "r"])[-9:]
    ['--standalone', '--nproc_per_node', '4', '-m', 'medaug.cli', 'train', 'cyclegan', '--run-dir', 'r']
    """
    import shutil
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [shutil.which("torchrun") or "torchrun"]
    return [*launcher, "--standalone", "--nproc_per_node", str(nproc_per_node), "-m", "medaug.cli", *cli_args]


def last_logged_step(run_dir: Path) -> int:
    """The step of the last line of RUN_DIR/metrics.jsonl (models.common.MetricsWriter), or 0."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return int(json.loads(lines[-1]).get("step", 0)) if lines else 0
    except (OSError, ValueError):
        return 0


@contextmanager
def training_progress(run_dir: Path, total_steps: int, stage_name: str = "train", poll_s: float = 1.0) -> Iterator[None]:
    """A Prefect progress artifact (and stage progress events) that follow RUN_DIR/metrics.jsonl.

    A watcher thread reads the trainer's metrics file every `poll_s` seconds while the
    block runs, so this works for in-process training and for a torchrun subprocess alike.
    """
    import contextvars
    import threading

    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    artifact_id = cast(UUID, create_progress_artifact(
        progress=0.0, key=f"{stage_name}-progress", description=f"Training progress ({total_steps} steps)"
    ))
    stop = threading.Event()
    seen = {"step": -1}

    def update(step: int) -> None:
        if step == seen["step"]:
            return
        seen["step"] = step
        pct = 100.0 * min(step, total_steps) / max(total_steps, 1)
        try:
            update_progress_artifact(artifact_id=artifact_id, progress=pct)
        except Exception as exc:  # a progress display must never fail the training
            logger.debug("progress artifact update failed: %s", exc)
        emit(stage_name, "progress", f"step {step}/{total_steps}", completed=step, total=total_steps)

    def watch() -> None:
        while not stop.wait(poll_s):
            update(last_logged_step(run_dir))

    thread = threading.Thread(target=contextvars.copy_context().run, args=(watch,), daemon=True, name="train-progress")
    thread.start()
    try:
        yield
        update(total_steps)
    finally:
        stop.set()
        thread.join(timeout=5)


# --- tumor-patches: real patches and the tumor GAN ----------------------------------------


@task(name="extract-patches", cache_key_fn=preprocess_cache_key, persist_result=True)
def patches_task(
    ingest_dirs: list[str], out: str, patch_size: int, dims: int, neighbours: int,
    healthy_per_volume: int, hu_window: list[float], min_body_fraction: float, seed: int, brain_margin_mm: float = 10.0,
) -> dict[str, Any]:
    """Cut real tumor and healthy patches from ingest folders into `out` (pipeline.patches).

    Cached by the content of the ingest manifests (which hold each volume's sha256) and the options.
    """
    from pipeline.patches import extract_patches, write_patch_folder

    logger = get_run_logger()
    patch_set = extract_patches(
        [Path(d) for d in ingest_dirs], patch_size=patch_size, seed=seed, dims=dims, neighbours=neighbours,
        healthy_per_volume=healthy_per_volume, hu_window=(hu_window[0], hu_window[1]), min_body_fraction=min_body_fraction,
        brain_margin_mm=brain_margin_mm,
    )
    write_patch_folder(patch_set, Path(out))
    logger.info("real patches: %s (%d volumes skipped)", patch_set.counts(), len(patch_set.skipped))
    return {"out": str(out), "counts": patch_set.counts(), "skipped": len(patch_set.skipped)}


@task(name="train-tumor-gan", retry_condition_fn=retry_unless_config_error)
def train_tumor_gan_task(patches_dir: str, run_dir: str, config: dict[str, Any], modality: str, device: str,
                         nproc_per_node: int = 1) -> dict[str, Any]:
    """Train (or resume) the tumor GAN on a real patch folder; returns the checkpoint and card paths.

    Resumes from RUN_DIR/checkpoints/last.pt when it exists, so a retried task continues
    where the failed attempt stopped. With nproc_per_node > 1 the training runs under torchrun.
    """
    from models.train_tumor_gan import TumorGANConfig, train_tumor_gan
    from pipeline.patches import read_patch_folder, to_train_data

    logger = get_run_logger()
    cfg = TumorGANConfig.model_validate(config)
    rd = Path(run_dir)
    resume = should_resume(rd)
    logger.info("tumor GAN: %d steps, %s, run %s%s", cfg.steps, device, rd.name, " (resuming)" if resume else "")
    with training_progress(rd, cfg.steps):
        if nproc_per_node > 1:
            run_torchrun(nproc_per_node, tumor_gan_cli_args(Path(patches_dir), rd, cfg, modality, device, resume))
            ckpt, card = rd / "checkpoints" / "last.pt", rd / "checkpoints" / "last.json"
        else:
            data = to_train_data(read_patch_folder(Path(patches_dir), synthetic=False), modality=modality)
            result = train_tumor_gan(cfg, data, rd, resume=resume, device=device)
            ckpt, card = result.checkpoint, result.card
            for warning in result.warnings:
                logger.warning("tumor GAN health: %s", warning)
    return {"run_dir": str(rd), "checkpoint": str(ckpt), "card": str(card)}


def tumor_gan_cli_args(patches_dir: Path, run_dir: Path, cfg: Any, modality: str, device: str, resume: bool) -> list[str]:
    """`medaug train tumor-gan ...` arguments for a torchrun launch (the config goes to RUN_DIR/config.yaml)."""
    config_path = write_run_config(run_dir, {"tumor_gan": cfg.model_dump(mode="json")})
    args = ["train", "tumor-gan", "--data", str(patches_dir), "--out", str(run_dir), "--config", str(config_path),
            "--modality", modality, "--device", device]
    return [*args, "--resume"] if resume else args


def write_run_config(run_dir: Path, sections: dict[str, Any]) -> Path:
    """Write config `sections` to RUN_DIR/config.yaml (what a torchrun subprocess reads)."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(sections, sort_keys=True), encoding="utf-8")
    return path


def run_torchrun(nproc_per_node: int, cli_args: Sequence[str]) -> None:
    """Run `medaug CLI_ARGS` under torchrun and wait; StageFailed names the exit code."""
    import subprocess

    cmd = torchrun_command(nproc_per_node, cli_args)
    get_run_logger().info("launching %s", " ".join(cmd[:6]) + " ...")
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise StageFailed(f"torchrun training exited with code {done.returncode} (command: {' '.join(cmd)})")


# --- mri-ct: slices and the CycleGAN ------------------------------------------------------


@task(name="preprocess-slices", cache_key_fn=preprocess_cache_key, persist_result=True)
def slices_task(ingest_dirs: list[str], image_size: int, context: int, slices: dict[str, Any]) -> Any:
    """Unpaired MRI/CT training slices of the ingest folders' train split (pipeline.slices), the
    monitor subjects (`pipeline.slices.plan_monitor`) left out.

    `slices` is the `cyclegan_data` section (SliceConfig as JSON). Returns
    models.train_cyclegan.UnpairedData; cached (persisted) by the content of the ingest
    manifests and the options, so an unchanged cohort is not normalised again.
    """
    from pipeline.slices import SliceConfig, load_train_slices

    data, _ = load_train_slices([Path(d) for d in ingest_dirs], image_size, context, SliceConfig.model_validate(slices))
    get_run_logger().info("CycleGAN slices: %s (%d subjects)", data.meta.get("n_slices"), len(data.meta.get("train_subjects", [])))
    return data


@task(name="train-cyclegan", retry_condition_fn=retry_unless_config_error)
def train_cyclegan_task(data: Any, run_dir: str, config: dict[str, Any], device: str, ingest_dir: str,
                        slices: dict[str, Any], nproc_per_node: int = 1) -> dict[str, Any]:
    """Train (or resume) the CycleGAN; returns the generator checkpoint, its card and the latest sample grid.

    Like `medaug train cyclegan`: structure scores on the monitor volumes (the val split, else
    train subjects held out; `pipeline.slices.plan_monitor`) pick checkpoints/best.pt, which is
    then the generator (else last.pt). Resumes from
    RUN_DIR/checkpoints/last.pt when it exists, so a retried task continues where the
    failed attempt stopped (and a finished run is not trained again). With nproc_per_node
    > 1 the training runs under torchrun (`medaug train cyclegan`), reading the ingest folder itself.
    """
    from models.train_cyclegan import CycleGANConfig, train_cyclegan
    from pipeline.slices import SliceConfig, monitor_scores, plan_monitor
    from pipeline.structure import STRUCTURE_KEY

    logger = get_run_logger()
    cfg = CycleGANConfig.model_validate(config)
    rd = Path(run_dir)
    resume = should_resume(rd)
    logger.info("CycleGAN: %d steps, %s, run %s%s", cfg.total_steps, device, rd.name, " (resuming)" if resume else "")
    with training_progress(rd, cfg.total_steps):
        if nproc_per_node > 1:
            run_torchrun(nproc_per_node, cyclegan_cli_args(Path(ingest_dir), rd, config, slices, device, resume))
        else:
            sl = SliceConfig.model_validate(slices)
            dirs = [Path(ingest_dir)]
            monitor = plan_monitor(dirs, sl.monitor_fraction, sl.seed)
            evaluate = monitor_scores(dirs, monitor, cfg.image_size, (cfg.in_channels - 1) // 2, sl)
            if evaluate is not None and monitor is not None:
                logger.info("structure scores on the %s pick the best checkpoint", monitor.describe())
            result = train_cyclegan(cfg, data, rd, resume=resume, device=device, evaluate=evaluate,
                                    best_key=STRUCTURE_KEY if evaluate is not None else None)
            for warning in result.warnings:
                logger.warning("CycleGAN health: %s", warning)
    best = rd / "checkpoints" / "best.pt"
    ckpt = best if best.is_file() else rd / "checkpoints" / "last.pt"
    samples = sorted((rd / "samples").glob("*.png"))
    return {"run_dir": str(rd), "checkpoint": str(ckpt), "card": str(ckpt.with_suffix(".json")),
            "samples": str(samples[-1]) if samples else ""}


def cyclegan_cli_args(ingest_dir: Path, run_dir: Path, config: dict[str, Any], slices: dict[str, Any],
                      device: str, resume: bool) -> list[str]:
    """`medaug train cyclegan ...` arguments for a torchrun launch (both config sections go to RUN_DIR/config.yaml)."""
    config_path = write_run_config(run_dir, {"cyclegan": config, "cyclegan_data": slices})
    args = ["train", "cyclegan", "--data", str(ingest_dir), "--out", str(run_dir), "--config", str(config_path),
            "--device", device]
    return [*args, "--resume"] if resume else args


# --- generation ---------------------------------------------------------------------------


@task(name="translate", retry_condition_fn=retry_unless_config_error)
def translate_task(checkpoint: str, direction: str, src: str, out: str, split: str | None, device: str,
                   batch_size: int, use_ema: bool) -> dict[str, Any]:
    """Translate the source-modality volumes of an ingest folder (pipeline.translate.run_translate)."""
    from pipeline.translate import run_translate

    rows = run_translate(Path(checkpoint), direction, Path(src), Path(out), batch_size=batch_size,  # type: ignore[arg-type]
                         device=device, split=split, use_ema=use_ema)
    get_run_logger().info("translated %d volumes (%s)", len(rows), direction)
    return {"out": str(out), "n": len(rows)}


@task(name="sample-tumors", retry_condition_fn=retry_unless_config_error)
def sample_tumors_task(checkpoint: str, counts: dict[str, int], seed: int, out: str, device: str,
                       batch_size: int) -> dict[str, Any]:
    """Sample `counts[class]` synthetic patches per tumor class into one folder (pipeline.sample_tumors).

    Classes are sampled one after another: every call rewrites the folder's manifest.csv.
    """
    from pipeline.sample_tumors import sample_tumors

    for class_name, n in sorted(counts.items()):
        sample_tumors(Path(checkpoint), class_name, n, seed, Path(out), device=device, batch_size=batch_size)
    get_run_logger().info("sampled synthetic patches: %s", dict(sorted(counts.items())))
    return {"out": str(out), "counts": counts}


@task(name="insert-lesions", retry_condition_fn=retry_unless_config_error)
def insertion_task(ingest: str, samples: str, out: str, seed: int, oversample: float, hu_window: list[float]) -> dict[str, Any]:
    """Insert the sampled lesion patches into real training CTs until the classes balance (pipeline.insertion)."""
    from pipeline.insertion import InsertionOptions, insert_lesions, insertion_counts

    counts = insertion_counts(Path(ingest), oversample)
    opts = InsertionOptions(hu_window=(float(hu_window[0]), float(hu_window[1])))
    for klass, n in counts.items():
        insert_lesions(Path(ingest), Path(samples), Path(out), n, klass, seed=seed, opts=opts)
    get_run_logger().info("inserted lesions per class: %s", counts)
    return {"out": out, "counts": counts}


@task(name="gate-insertions")
def insertion_gate_task(real_patches: str, insertion: str, out: str, config: dict[str, Any], patch_size: int,
                        key_source: str = "env") -> dict[str, Any]:
    """Gate inserted volumes as lesion patches against the real lesion patches (pipeline.insertion.gate_insertions).

    The report is signed with the key `key_source` names (resolve_gate_key, read here: never a parameter)."""
    from pipeline.gate.config import GateConfig
    from pipeline.insertion import gate_insertions

    report = gate_insertions(Path(real_patches), Path(insertion), Path(out), GateConfig.model_validate(config), patch_size,
                             key=resolve_gate_key(key_source))
    image_artifact(Path(out) / "patches_gate" / "accepted_samples.png", key="gate-accepted-samples",
                   description="Inserted lesions the gate accepted")
    get_run_logger().info("insertion gate %s: %d volumes accepted, %d rejected; failed checks: %s", report["verdict"],
                          report["n_accepted"], report["n_rejected"], ", ".join(report["failed_checks"]) or "none")
    return {"verdict": report["verdict"], "failed_checks": list(report["failed_checks"]), "report_id": report["report_id"],
            "n_accepted": report["n_accepted"], "n_rejected": report["n_rejected"], "out": str(out)}


# --- gate and dataset ---------------------------------------------------------------------


@task(name="gate")
def gate_task(real: str, synthetic: str, out: str, config: dict[str, Any], key_source: str = "env") -> dict[str, Any]:
    """Score synthetic against real data (pipeline.gate.run_gate); publish the report as artifacts.

    The report is signed with the key `key_source` names (resolve_gate_key, read here: the
    key is never a parameter). Returns the verdict, failed checks and report id; the flow
    decides what a reject means.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from pipeline.gate.config import GateConfig
    from pipeline.gate.report import FIG_ACCEPTED, REPORT_MD
    from pipeline.gate.run import run_gate

    logger = get_run_logger()
    report = run_gate(Path(real), Path(synthetic), Path(out), GateConfig.model_validate(config), key=resolve_gate_key(key_source))
    if report.signature is None:
        from pipeline.gate.signing import NOT_VERIFIED_NOTE

        logger.warning(NOT_VERIFIED_NOTE)
    md = Path(out) / REPORT_MD
    if md.is_file():
        create_markdown_artifact(markdown=md.read_text(encoding="utf-8"), key="gate-report",
                                 description=f"Quality gate {report.verdict} (report {report.report_id[:12]})")
    table = [
        {"check": c.name, "value": c.value, "op": c.op, "threshold": c.threshold, "passed": c.passed, "detail": c.detail}
        for c in report.checks
    ]
    create_table_artifact(table=table, key="gate-checks", description=f"Gate checks: {report.verdict}")
    image_artifact(Path(out) / FIG_ACCEPTED, key="gate-accepted-samples", description="Synthetic samples the gate accepted")
    logger.info("gate %s: %d accepted, %d rejected; failed checks: %s", report.verdict, report.n_accepted,
                report.n_rejected, ", ".join(report.failed_checks) or "none")
    return {"verdict": report.verdict, "failed_checks": list(report.failed_checks), "report_id": report.report_id,
            "n_accepted": report.n_accepted, "n_rejected": report.n_rejected, "out": str(out)}


@task(name="build-dataset")
def dataset_task(real: str, synthetic: list[str], out: str, config: dict[str, Any], gates: list[str],
                 cards: list[str], gate_key_source: str = "env") -> dict[str, Any]:
    """Write the class-balanced dataset (pipeline.dataset.build_dataset); a link artifact points to it.

    The gate reports are checked with the key `gate_key_source` names (resolve_gate_key)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    from pipeline.dataset import DatasetConfig, build_dataset

    cfg = DatasetConfig.model_validate(config)
    result = build_dataset(Path(real), [Path(s) for s in synthetic], Path(out), cfg, gates=[Path(g) for g in gates],
                           generator_cards=[Path(c) for c in cards], overwrite=True,
                           gate_key=resolve_gate_key(gate_key_source))
    if result.unverified_gates:
        from pipeline.gate.signing import NOT_VERIFIED_NOTE

        get_run_logger().warning("%s (report %s)", NOT_VERIFIED_NOTE, ", ".join(r[:12] for r in result.unverified_gates))
    rows = [
        {"split": split, "class": klass, **counts}
        for split, by_class in sorted(result.counts.items())
        for klass, counts in sorted(by_class.items())
    ]
    if rows:
        create_table_artifact(table=rows, key="dataset-counts", description="Items per split and class (real / synthetic)")
    create_link_artifact(link=Path(out).resolve().as_uri(), link_text=f"dataset {result.content_hash[:12]}",
                         key="dataset", description="The class-balanced dataset this run wrote")
    image_artifact(Path(out) / "sample_grid.png", key="dataset-sample-grid", inline=False,
                   description="The dataset's sample grid: real and synthetic examples per class")
    datasheet = Path(out) / "datasheet.md"
    if datasheet.is_file():
        create_markdown_artifact(markdown=datasheet.read_text(encoding="utf-8"), key="dataset-datasheet",
                                 description="The dataset's datasheet")
    get_run_logger().info("dataset %s: %s", result.content_hash[:12], "unchanged" if result.unchanged else "written")
    return {"out": str(result.out), "content_hash": result.content_hash, "counts": result.counts}


def image_artifact(png: Path, key: str, description: str, inline: bool = True, max_bytes: int = 1 << 20) -> None:
    """Publish a PNG as an image artifact (inlined as a data: URL), or as a link to the file.

    Only images of synthetic data are inlined (`inline=True`); a figure that shows real
    patients' pixels (the CycleGAN's sample grid has the real inputs) stays on disk and
    the artifact links to it, so no patient image is copied into the Prefect database.
    """
    import base64

    from prefect.artifacts import create_image_artifact, create_link_artifact

    if not png.is_file():
        return
    data = png.read_bytes()
    if inline and len(data) <= max_bytes:
        create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(data).decode(), key=key,
                              description=description)
    else:
        create_link_artifact(link=png.resolve().as_uri(), link_text=png.name, key=key, description=description)
