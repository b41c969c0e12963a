"""The `augment` flow: ingest -> preprocess -> train (or load) -> generate -> gate -> dataset.

One Prefect flow for both pipelines: "mri-ct" (CycleGAN MRI->CT translation) and
"tumor-patches" (conditional tumor GAN). Its parameters mirror the CLI (a config YAML
plus dotted overrides, see flows/params.py); the stages are tasks from flows/tasks.py,
and the stages that run several independent jobs (ingest of several source groups,
generation) are subflows whose task runner `runtime.task_runner` picks (a thread pool or
prefect-dask's DaskTaskRunner). Outputs of a run, under OUT:

    OUT/phantoms/       the phantom cohort (phantoms.enabled: true, or auto while no source is named)
    OUT/ingest/         the labelled NIfTI route and the PACS series (ingest.dicomweb): the volumes
                        training and the dataset use
    OUT/ingest-dicom/   DICOM trees, de-identified (shown, not used for training)
    OUT/patches/        tumor-patches: the real patches (the GAN's training data and the real reference)
    OUT/runs/NAME-HASH/ the training run (checkpoints/last.pt + last.json card, samples, metrics)
    OUT/synthetic/      translated volumes or sampled patches (manifest.csv, synthetic=1)
    OUT/gate/           gate_report.json/.md, figures, accepted.csv
    OUT/dataset/        the class-balanced dataset (only when the gate accepts)
    OUT/data_manifests/ copies of its manifest and datalist by content hash (dataset.manifests_dir
                        when relative; an absolute one, e.g. a shared registry, is used as it is)

When the gate rejects, the flow fails at stage "gate" (GateRejected) and writes no dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.params import (
    AugmentParams,
    Override,
    PipelineConfig,
    RuntimeConfig,
    load_pipeline_config,
    output_dir,
    resolve_config_path,
    use_phantoms,
)
from flows.tasks import (
    backoff,
    content_hash,
    dataset_task,
    gate_task,
    image_artifact,
    ingest_task,
    insertion_gate_task,
    insertion_task,
    pacs_ref,
    patches_task,
    phantoms_task,
    retry_unless_config_error,
    run_dir_for,
    sample_tumors_task,
    slices_task,
    stage,
    train_cyclegan_task,
    train_tumor_gan_task,
    translate_task,
)
from pipeline.dataset.config import Deployment
from pipeline.errors import ConfigError, GateRejected
from pipeline.ingest.dicomweb import redact_url
from pipeline.outputs import output_lock
from pipeline.translate import resolve_device


def task_runner(rt: RuntimeConfig) -> TaskRunner[Any]:
    """The task runner of the parallel stages: a thread pool, or Dask (a LocalCluster or `dask_address`)."""
    match rt.task_runner:
        case "thread":
            return ThreadPoolTaskRunner(max_workers=rt.max_workers)
        case "dask":
            from prefect_dask import DaskTaskRunner

            if rt.dask_address:
                return DaskTaskRunner(address=rt.dask_address)
            return DaskTaskRunner(
                cluster_class="distributed.LocalCluster",
                cluster_kwargs={
                    "n_workers": rt.max_workers,
                    "threads_per_worker": 1,
                    "processes": rt.dask_processes,
                    "dashboard_address": None,
                },
            )
        case _:
            raise ValueError(f"runtime.task_runner must be one of thread, dask; got {rt.task_runner!r}")


@flow(name="ingest-sources")
def ingest_sources(jobs: list[dict[str, Any]], retries: int, retry_backoff_s: float, cache: bool) -> list[dict[str, Any]]:
    """Ingest each job side by side; returns their summaries.

    A job is {"sources": [...], "out": DIR, "modality": ..., "key_source": ..., "pacs": [...]},
    where each PACS is a reference (flows.tasks.pacs_ref: the run's config and the PACS's
    position in ingest.dicomweb); its query and credentials are read inside the ingest task,
    so no filter value (a PatientID) nor secret is ever a parameter. A job with PACS always
    runs (not cached).
    """
    futures = []
    for job in jobs:
        fresh = not cache or bool(job.get("pacs")) or not (Path(job["out"]) / "manifest.csv").is_file()
        runnable = ingest_task.with_options(retries=retries, retry_delay_seconds=backoff(retry_backoff_s),
                                            refresh_cache=fresh, retry_condition_fn=retry_unless_config_error)
        futures.append(runnable.submit(job["sources"], job["out"], job.get("modality"), job["key_source"], job.get("pacs") or []))
    return [f.result() for f in futures]


@flow(name="generate-synthetic")
def generate_synthetic(jobs: list[dict[str, Any]], retries: int, retry_backoff_s: float) -> list[dict[str, Any]]:
    """Run generation jobs side by side: {"kind": "translate" | "sample", ...task arguments}."""
    futures = []
    for job in jobs:
        args = {k: v for k, v in job.items() if k != "kind"}
        runnable: Task[..., dict[str, Any]]
        match job["kind"]:
            case "translate":
                runnable = translate_task
            case "sample":
                runnable = sample_tumors_task
            case other:
                raise ValueError(f"generation job kind must be translate or sample, got {other!r}")
        futures.append(runnable.with_options(retries=retries, retry_delay_seconds=backoff(retry_backoff_s)).submit(**args))
    return [f.result() for f in futures]


def run_augment(params: AugmentParams) -> dict[str, Any]:
    """The body of the `augment` flow (inside a flow run); returns where the outputs are.

    The output folder is locked for the whole run (pipeline/outputs.py): a second run into
    the same folder fails at once with one line naming the first, instead of interleaving files.
    """
    cfg: PipelineConfig = load_pipeline_config(params)
    # the device is decided once, here: "auto" becomes cuda or cpu for every stage
    device = str(resolve_device(cfg.runtime.device))
    cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"device": device})})
    out = output_dir(params, cfg)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out, "augment"):
        return _run_stages(params, cfg, out)


def _run_stages(params: AugmentParams, cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """The stages of `run_augment`, with the output folder `out` locked."""
    logger = get_run_logger()
    device = cfg.runtime.device
    rt = cfg.runtime
    logger.info("augment (%s): config %s, output %s, device %s", cfg.pipeline, Path(params.config).name, out, device)
    result: dict[str, Any] = {"pipeline": cfg.pipeline, "out": str(out)}

    sources = [str(Path(s).expanduser().resolve()) for s in cfg.ingest.sources]
    dicom_sources = [str(Path(s).expanduser().resolve()) for s in cfg.ingest.dicom_sources]
    # each PACS by reference: a query may hold a PatientID and Prefect stores and shows every
    # flow and task parameter, so the ingest task reads query and credentials from the config itself
    config_ref = {"config": str(resolve_config_path(params.config).resolve()), "overrides": list(params.overrides),
                  "pipeline": params.pipeline}
    pacs = [pacs_ref(config_ref, i, redact_url(p.url)) for i, p in enumerate(cfg.ingest.dicomweb)]
    phantoms_only = use_phantoms(cfg.phantoms, cfg.ingest) and not sources and not dicom_sources and not pacs
    if use_phantoms(cfg.phantoms, cfg.ingest):
        if cfg.phantoms.enabled == "auto":
            logger.warning("ingest names no sources: running on a generated phantom cohort (phantoms.enabled: auto)")
        with stage("phantoms"):
            p = cfg.phantoms
            cohort = phantoms_task(out / "phantoms", p.n_subjects, p.size, p.seed)
        sources += cohort["nifti"]
        dicom_sources.append(cohort["dicom"])
        result["phantoms"] = cohort["out"]

    with stage("ingest"):
        if not sources and not pacs:
            raise ConfigError(f"nothing to ingest: {Path(params.config).name} names no ingest.sources and no "
                              "ingest.dicomweb (set them, or phantoms.enabled: auto for a phantom cohort)")
        key_source = (
            f"secret:{cfg.ingest.deid_key_secret}" if cfg.ingest.deid_key_secret else "demo" if phantoms_only else "env"
        )
        common = {"modality": cfg.ingest.modality, "key_source": key_source}
        jobs: list[dict[str, Any]] = [{"sources": sources, "out": str(out / "ingest"), "pacs": pacs, **common}]
        if dicom_sources:
            jobs.append({"sources": dicom_sources, "out": str(out / "ingest-dicom"), **common})
        runner_flow = ingest_sources.with_options(task_runner=task_runner(rt))
        summaries = runner_flow(jobs, rt.retries, rt.retry_backoff_s, rt.cache)
    result["ingest"] = summaries[0]["out"]
    if len(summaries) > 1:
        result["ingest_dicom"] = summaries[1]["out"]

    match cfg.pipeline:
        case "mri-ct":
            real, synthetic, card = mri_ct_stages(cfg, params, out, result)
        case "tumor-patches":
            real, synthetic, card = tumor_patches_stages(cfg, params, out, result)
        case _:
            raise ValueError(f"pipeline must be one of mri-ct, tumor-patches; got {cfg.pipeline!r}")

    # the gate key by name only ("env" or a Secret block): the tasks read it, Prefect never stores it
    gate_key_source = f"secret:{rt.gate_key_secret}" if rt.gate_key_secret else "env"
    with stage("gate"):
        if cfg.pipeline == "tumor-patches" and cfg.dataset.synthesis == "insertion":
            gate = insertion_gate_task(str(out / "patches"), synthetic, str(out / "gate"), cfg.gate.model_dump(mode="json"),
                                       cfg.tumor_gan.patch_size, gate_key_source)
        else:
            gate = gate_task(real, synthetic, str(out / "gate"), cfg.gate.model_dump(mode="json"), gate_key_source)
        result["gate_report"] = str(out / "gate" / "gate_report.md")
        if gate["verdict"] != "accept":
            raise GateRejected(
                f"the quality gate rejected the synthetic data (failed checks: {', '.join(gate['failed_checks']) or 'none'}; "
                f"report {gate['report_id'][:12]} in {out / 'gate'}); nothing was written to {out / 'dataset'}"
            )

    with stage("dataset"):
        dataset_cfg = cfg.dataset.model_dump(mode="json")
        # a relative manifests_dir belongs to this run: OUT/data_manifests/<hash>/, not the working directory
        dataset_cfg["manifests_dir"] = str(out / cfg.dataset.manifests_dir)
        written = dataset_task.with_options(retries=rt.retries, retry_delay_seconds=backoff(rt.retry_backoff_s))(
            real, [synthetic], str(out / "dataset"), dataset_cfg, [gate["out"]], [card], gate_key_source
        )
    result["dataset"] = written["out"]
    result["dataset_hash"] = written["content_hash"]
    logger.info("dataset %s written; gate report %s", Path(written["out"]).name, gate["report_id"][:12])
    return result


def mri_ct_stages(cfg: PipelineConfig, params: AugmentParams, out: Path, result: dict[str, Any]) -> tuple[str, str, str]:
    """Slices -> CycleGAN (or the given checkpoint) -> translation; returns (real, synthetic, card)."""
    rt, ingest_dir = cfg.runtime, result["ingest"]
    direction = "mri2ct" if cfg.dataset.target_modality == "CT" else "ct2mri"
    if params.checkpoint:
        checkpoint = str(Path(params.checkpoint).expanduser().resolve())
    else:
        sl = cfg.cyclegan_data
        data: Any = None  # under torchrun every rank reads the ingest folder itself
        data_hash = content_hash([Path(ingest_dir) / "manifest.csv"])
        if rt.nproc_per_node == 1:
            with stage("preprocess"):
                data = slices_task.with_options(refresh_cache=not rt.cache)(
                    [ingest_dir], image_size=cfg.cyclegan.image_size, context=(cfg.cyclegan.in_channels - 1) // 2,
                    slices=sl.model_dump(mode="json"),
                )
                data_hash = data.meta.get("data_sha256", data_hash)
        with stage("train"):
            config = cfg.cyclegan.model_dump(mode="json")
            # the slice options (window, monitor subjects) shape the run too: another choice, another run
            run_dir = run_dir_for(out / "runs", "cyclegan", {"cyclegan": config, "cyclegan_data": sl.model_dump(mode="json")},
                                  data_hash)
            trained = train_cyclegan_task.with_options(retries=rt.train_retries)(
                data, str(run_dir), config, rt.device, ingest_dir, sl.model_dump(mode="json"), rt.nproc_per_node
            )
            if trained["samples"]:
                image_artifact(Path(trained["samples"]), key="cyclegan-samples", inline=False,
                               description="CycleGAN sample grid (MRI, MRI->CT, CT, CT->MRI); real inputs, so a link")
        checkpoint = trained["checkpoint"]
        result["run_dir"] = trained["run_dir"]
    with stage("generate"):
        g = cfg.generate
        job = {"kind": "translate", "checkpoint": checkpoint, "direction": direction, "src": ingest_dir,
               "out": str(out / "synthetic"), "split": g.split, "device": rt.device, "batch_size": g.batch_size,
               "use_ema": g.use_ema}
        generate_synthetic.with_options(task_runner=task_runner(rt))([job], rt.retries, rt.retry_backoff_s)
    result["synthetic"] = str(out / "synthetic")
    return ingest_dir, str(out / "synthetic"), str(Path(checkpoint).with_suffix(".json"))


def tumor_patches_stages(cfg: PipelineConfig, params: AugmentParams, out: Path, result: dict[str, Any]) -> tuple[str, str, str]:
    """Real patches -> tumor GAN (or the given checkpoint) -> sampling; returns (real, synthetic, card)."""
    rt, pc, tg = cfg.runtime, cfg.patches, cfg.tumor_gan
    real = str(out / "patches")
    with stage("preprocess"):
        patches_task.with_options(refresh_cache=not rt.cache or not (out / "patches" / "manifest.csv").is_file())(
            [result["ingest"]], real, patch_size=tg.patch_size, dims=tg.spatial_dims, neighbours=pc.neighbours,
            healthy_per_volume=pc.healthy_per_volume, hu_window=list(pc.hu_window),
            min_body_fraction=pc.min_body_fraction, seed=pc.seed, brain_margin_mm=pc.brain_margin_mm,
        )
    if params.checkpoint:
        checkpoint = str(Path(params.checkpoint).expanduser().resolve())
    else:
        with stage("train"):
            config = tg.model_dump(mode="json")
            run_dir = run_dir_for(out / "runs", "tumor-gan", config, content_hash([Path(real) / "manifest.csv"]))
            trained = train_tumor_gan_task.with_options(retries=rt.train_retries)(
                real, str(run_dir), config, pc.modality, rt.device, rt.nproc_per_node
            )
            grids = sorted((run_dir / "samples").glob("*.png"))
            if grids:
                image_artifact(grids[-1], key="tumor-gan-samples", description="Tumor GAN samples per class")
        checkpoint = trained["checkpoint"]
        result["run_dir"] = trained["run_dir"]
    with stage("generate"):
        counts = samples_per_class(Path(real), cfg)
        job = {"kind": "sample", "checkpoint": checkpoint, "counts": counts, "seed": cfg.generate.seed,
               "out": str(out / "synthetic"), "device": rt.device, "batch_size": cfg.generate.batch_size}
        generate_synthetic.with_options(task_runner=task_runner(rt))([job], rt.retries, rt.retry_backoff_s)
    result["synthetic"] = str(out / "synthetic")
    card = str(Path(checkpoint).with_suffix(".json"))
    if cfg.dataset.synthesis == "insertion":
        # the lesions go into real training volumes; the dataset is then of volumes: real = the ingest folder
        with stage("insert"):
            inserted = insertion_task(result["ingest"], str(out / "synthetic"), str(out / "insertion"), cfg.generate.seed,
                                      cfg.generate.oversample, list(pc.hu_window))
        result["insertion"] = inserted["out"]
        return result["ingest"], inserted["out"], card
    return real, str(out / "synthetic"), card


def samples_per_class(real: Path, cfg: PipelineConfig) -> dict[str, int]:
    """Synthetic patches to sample per tumor class: what the dataset's balancing needs, times
    generate.oversample (the gate drops some), at least generate.min_per_class; or a fixed count."""
    from pipeline.dataset.balance import plan_balance
    from pipeline.manifest import read_manifest
    from pipeline.patches import HEALTHY

    g, d = cfg.generate, cfg.dataset
    rows = [r for r in read_manifest(real) if r.get("modality") == cfg.patches.modality and r.get("split", "train") in ("train", "")]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["class"]] = counts.get(r["class"], 0) + 1
    tumor_classes = sorted(c for c in counts if c != HEALTHY)
    if g.samples_per_class is not None:
        return {c: g.samples_per_class for c in tumor_classes}
    plan = plan_balance(counts, {c: 10**9 for c in tumor_classes}, d.strategy, d.fixed_count, d.max_synthetic_share)
    return {c: max(g.min_per_class, int(plan[c].synthetic * g.oversample + 0.999)) for c in tumor_classes}


def run_name() -> str:
    """Flow run name from the pipeline and config file, e.g. "mri-ct-tiny" ("augment-tiny" when the config decides)."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"{p.get('pipeline') or 'augment'}-{Path(str(p.get('config', 'config'))).stem}"


@flow(name="augment", validate_parameters=True, flow_run_name=run_name)
def augment(
    config: str = "configs/mri-ct.yaml",
    overrides: list[Override] | None = None,
    pipeline: Deployment | None = None,
    out: str | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Run a whole augmentation pipeline from a config: ingest, train, generate, gate, dataset.

    Args:
        config: pipeline config YAML (configs/mri-ct.yaml, configs/tumor-patches.yaml, configs/tiny.yaml).
        overrides: dotted `section.key=value` overrides, e.g. ["cyclegan.steps=20"].
        pipeline: "mri-ct" or "tumor-patches"; None takes dataset.deployment from the config.
        out: output folder; None takes runtime.out_dir from the config.
        checkpoint: a trained generator checkpoint to generate with instead of training.

    Returns:
        Output folders by stage ({"out", "ingest", "dataset", "gate_report", ...}).
    """
    params = AugmentParams(config=config, overrides=list(overrides or []), pipeline=pipeline, out=out, checkpoint=checkpoint)
    return run_augment(params)
