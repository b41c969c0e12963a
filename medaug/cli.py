"""The `medaug` command line (typer).

Heavy imports (torch, MONAI, pydicom, Prefect) stay inside the commands so that
`medaug --help` is instant. Errors of type MedaugError print as one line and exit 2;
the quality gate's reject exits 3.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(
    name="medaug",
    help="Medical image augmentation: ingest DICOM/NIfTI, train GANs, gate synthetic data, write balanced datasets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train a GAN: `cyclegan` (MRI<->CT) or `tumor-gan` (tumor patches).", no_args_is_help=True)
app.add_typer(train_app, name="train")

F = TypeVar("F", bound=Callable[..., Any])


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
"""A full disk, a full quota, a read-only folder: one line from any command, not a traceback."""


def clean_errors(fn: F) -> F:
    """Turn a MedaugError into one red line and exit code 2, instead of a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.errors import MedaugError

        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except MedaugError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None
        except OSError as exc:
            if exc.errno not in _WRITE_ERRNOS:
                raise
            typer.secho(f"error: writing {exc.filename or 'an output'} failed ({exc.strerror}); check free space and "
                        "permissions, then run the command again", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def guarded_output(out: Path, command: str, inputs: list[tuple[str, Path | None]]) -> Iterator[None]:
    """Refuse an --out that is, contains or lies inside an input, and hold its write lock
    (pipeline/outputs.py) while the command writes it."""
    from pipeline.outputs import check_apart, output_lock

    check_apart(out, [(name, p) for name, p in inputs if p is not None])
    with output_lock(out, command):
        yield


# --- phantoms --------------------------------------------------------------------------


@app.command("phantoms")
@clean_errors
def phantoms_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output folder for dicom/, nifti/, truth/ and cohort.csv.")],
    subjects: Annotated[int, typer.Option("--subjects", min=2, help="Number of phantom subjects.")] = 16,
    size: Annotated[int, typer.Option("--size", min=16, help="In-plane voxels; volumes are S x S x S//2.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed writes byte-identical files.")] = 0,
) -> None:
    """Write a seeded head-phantom cohort (CT + MR, DICOM + NIfTI, round and necrotic tumors)."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.phantoms import write_cohort

    summary = write_cohort(out, n_subjects=subjects, size=size, seed=seed)
    table = Table(title=f"{subjects} phantom subjects, {size}x{size}x{size // 2}, seed {seed} -> {out}")
    for column in ("modality", "split", "class", "volumes"):
        table.add_column(column)
    for key, count in sorted(summary["counts"].items()):
        modality, split, cls = key.split("/")
        table.add_row(modality, split, cls, str(count))
    Console().print(table)


# --- ingest ----------------------------------------------------------------------------
@app.command("ingest")
@clean_errors
def ingest_cmd(
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder: volumes/, labels/, manifest.csv, quarantine.csv (required unless --locate).")
    ] = None,
    sources: Annotated[
        list[Path] | None, typer.Argument(help="DICOM folders (any nesting), NIfTI files, Decathlon datasets.")
    ] = None,
    dicomweb: Annotated[
        str | None,
        typer.Option(
            "--dicomweb",
            help="DICOMweb root of a PACS (e.g. http://127.0.0.1:8042/dicom-web); credentials from "
            "MEDAUG_DICOMWEB_USER/MEDAUG_DICOMWEB_PASSWORD or MEDAUG_DICOMWEB_TOKEN.",
        ),
    ] = None,
    query: Annotated[
        list[str] | None,
        typer.Option("--query", help="With --dicomweb: study filter KEY=VALUE, e.g. ModalitiesInStudy=CT (repeatable)."),
    ] = None,
    modality: Annotated[
        str | None, typer.Option("--modality", help="CT or MR: modality of NIfTI inputs without dataset.json or sidecar.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Processes converting series in parallel.")] = 2,
    gzip_level: Annotated[int, typer.Option(help="gzip level of the written .nii.gz (1 fast .. 9 small).")] = 1,
    locate: Annotated[
        str | None, typer.Option(help="Print the input path(s) of a quarantine.csv `source` reference and exit.")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Quarantine a whole DICOM series for one damaged file or missing slices "
                                            "(default: quarantine those files, write the intact runs as parts).")
    ] = False,
) -> None:
    """Convert DICOM/NIfTI inputs to de-identified canonical NIfTI (key from MEDAUG_DEID_KEY).

    Quarantined inputs are reported in quarantine.csv and do not fail the run (exit 0);
    an unreadable input or unwritable output exits 2.
    """
    from pipeline.errors import ConfigError
    from pipeline.ingest import locate as locate_ref
    from pipeline.ingest import run_ingest
    from pipeline.ingest.deid import KEY_ENV, key_from_env
    from pipeline.outputs import output_lock

    mod = modality.upper() if modality else None
    if mod not in (None, "CT", "MR"):
        raise ConfigError(f"--modality must be one of CT, MR; got {modality!r}")
    if not 1 <= gzip_level <= 9:
        raise ConfigError(f"--gzip-level must be 1..9; got {gzip_level}")
    key = key_from_env()
    if locate:
        if key is None:
            raise ConfigError(f"--locate needs the key of the run that wrote the reference: set {KEY_ENV}")
        for rel in locate_ref(sources or [], locate, key):
            typer.echo(rel)
        return
    if out is None:
        raise ConfigError("name the output folder with --out DIR")
    if dicomweb is not None:
        from pipeline.ingest.dicomweb import ingest_dicomweb, parse_query

        if sources:
            raise ConfigError("give either input folders/files or --dicomweb, not both")
        from urllib.parse import urlsplit

        from pipeline.ingest.dicomweb import redact_url

        parts = urlsplit(dicomweb)
        if parts.username is not None or parts.password is not None:
            # a password on the command line ends up in shell history and process lists
            raise ConfigError(f"--dicomweb {redact_url(dicomweb)}: the URL must not carry user:password; set "
                              "MEDAUG_DICOMWEB_USER/MEDAUG_DICOMWEB_PASSWORD or MEDAUG_DICOMWEB_TOKEN instead")
        if parts.query or parts.fragment:
            # a query string may carry a token (?access_token=...), which messages would then show
            raise ConfigError(f"--dicomweb {redact_url(dicomweb)}: the URL must not carry a query string or fragment "
                              "(?... or #...); give study filters with --query KEY=VALUE and a token in "
                              "MEDAUG_DICOMWEB_TOKEN")
        with output_lock(out, "ingest"):
            report = ingest_dicomweb(dicomweb, parse_query(query or []), out, key=key, workers=max(1, workers))
    elif not sources:
        raise ConfigError("name at least one input folder or file, or a PACS with --dicomweb URL")
    else:
        with output_lock(out, "ingest"):  # a second ingest into the same --out gets one line, not interleaved files
            report = run_ingest(sources, out, modality=mod, key=key, workers=max(1, workers), level=gzip_level,  # type: ignore[arg-type]
                                strict=strict)
    typer.echo(
        f"{report.volumes_written} volumes written to {out} ({report.volumes_reused} unchanged); "
        f"{report.files_seen} files seen: {report.files_used} used, {report.skipped} skipped, "
        f"{report.quarantined} quarantined (see quarantine.csv)"
    )


# --- train / translate / evaluate (CycleGAN) -------------------------------------------


@train_app.command("cyclegan")
@clean_errors
def train_cyclegan_cmd(
    data: Annotated[list[Path], typer.Option("--data", help="Ingest output folder with MR and CT volumes (repeat for several).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints/last.pt + last.json, best.pt, samples/, metrics.")],
    config: Annotated[Path | None, typer.Option("--config", help="YAML with `cyclegan:` and `cyclegan_data:` sections (configs/cyclegan.yaml).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Training steps (overrides the config).")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Slice side in pixels, multiple of 4, >= 32 (overrides the config).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Slices per domain per step (overrides the config).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/last.pt exactly.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override, e.g. --set cyclegan.ema_decay=0.999.")] = None,
) -> None:
    """Train the MRI<->CT CycleGAN on the train-split slices of ingest folder(s).

    Structure scores on monitor volumes pick checkpoints/best.pt: the val split, else a few
    train subjects held out of training (cyclegan_data.monitor_fraction), never the test
    split; they compare each input with its translation and never use paired truth.
    """
    from medaug.config import load_config
    from models.checkpoint import CheckpointError as _CheckpointError
    from models.common import TrainingDivergedError as _Diverged
    from models.train_cyclegan import train_cyclegan
    from pipeline.errors import CheckpointError, ConfigError, TrainingDivergedError
    from pipeline.outputs import output_lock
    from pipeline.slices import load_training_inputs
    from pipeline.structure import STRUCTURE_KEY

    overrides = list(set_ or [])
    for key, value in (("steps", steps), ("image_size", image_size), ("batch_size", batch_size)):
        if value is not None:
            overrides.append(f"cyclegan.{key}={value}")
    pipeline_cfg = load_config(config, overrides)
    cfg, data_cfg = pipeline_cfg.cyclegan, pipeline_cfg.cyclegan_data
    try:
        inputs = load_training_inputs(data, cfg.image_size, cfg.in_channels, data_cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    train_data, evaluate = inputs.data, inputs.evaluate
    if inputs.monitor:
        typer.echo(f"structure scores on the {inputs.monitor.describe()} pick the best checkpoint")
    typer.echo(f"training on {len(train_data.a)} MRI and {len(train_data.b)} CT slices "  # type: ignore[arg-type]
               f"from {len(train_data.meta['train_subjects'])} subjects, {cfg.total_steps} steps")
    try:
        with output_lock(out, "train cyclegan"):
            result = train_cyclegan(cfg, train_data, out, resume=resume, device=device, evaluate=evaluate,
                                    best_key=STRUCTURE_KEY if evaluate is not None else None)
    except _Diverged as exc:
        raise TrainingDivergedError(str(exc)) from None
    except _CheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:  # a full disk or a vanished folder while writing metrics, samples or cards
        raise CheckpointError(f"cannot write in the run folder {out}: {exc.strerror or exc}; "
                              "free space (or choose another --out) and resume with --resume") from None
    except (ValueError, FileExistsError) as exc:
        raise ConfigError(str(exc)) from None
    typer.secho(f"{result.step} steps; checkpoint {result.last_checkpoint}"
                + (f", best {result.best_checkpoint}" if result.best_checkpoint else ""), fg=typer.colors.GREEN)
    for w in result.warnings[-3:]:
        typer.secho(f"health: {w}", fg=typer.colors.YELLOW)


def _checkpoint_option_check(checkpoint: Path) -> None:
    from pipeline.errors import ConfigError

    if not checkpoint.is_file():
        raise ConfigError(f"--checkpoint {checkpoint} does not exist; give RUN_DIR/checkpoints/last.pt or best.pt")


@app.command("translate")
@clean_errors
def translate_cmd(
    src: Annotated[Path, typer.Argument(help="Ingest folder, NIfTI file, or folder of NIfTI files (taken as the source modality).")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="CycleGAN checkpoint (RUN_DIR/checkpoints/best.pt or last.pt).")],
    direction: Annotated[str, typer.Option("--direction", help="mri2ct (output in HU) or ct2mri (output 0..1000).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for volumes/ (+ sidecar JSON), labels/, manifest.csv.")],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Slices per forward pass.")] = 16,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    split: Annotated[str | None, typer.Option("--split", help="Only this split of an ingest folder (default: all).")] = None,
) -> None:
    """Translate volumes MRI->CT or CT->MRI; outputs keep the source geometry, label and class, marked synthetic."""
    from pipeline.errors import ConfigError
    from pipeline.translate import run_translate

    if direction not in ("mri2ct", "ct2mri"):
        raise ConfigError(f"--direction must be one of mri2ct, ct2mri; got {direction!r}")
    _checkpoint_option_check(checkpoint)
    try:
        with guarded_output(out, "translate", [("SRC", src), ("--checkpoint", checkpoint)]):
            rows = run_translate(checkpoint, direction, src, out, batch_size=batch_size, device=device, split=split)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    labelled = sum(1 for r in rows if r["label_path"])
    typer.echo(f"translated {len(rows)} volumes ({direction}, {labelled} with labels) to {out}")


@app.command("evaluate-translation")
@clean_errors
def evaluate_translation_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="CycleGAN checkpoint (RUN_DIR/checkpoints/best.pt or last.pt).")],
    data: Annotated[list[Path], typer.Option("--data", help="Ingest folder (repeat for several): paired test subjects, train split for the baseline.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for evaluation.json, evaluation.md and the PNG grids.")],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Slices per forward pass.")] = 16,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
) -> None:
    """MAE (HU), PSNR, SSIM vs a histogram-matching baseline on paired held-out subjects, plus structure scores."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.errors import ConfigError
    from pipeline.evaluate_translation import run_evaluate_translation

    _checkpoint_option_check(checkpoint)
    try:
        with guarded_output(out, "evaluate-translation", [("--checkpoint", checkpoint), *[("--data", d) for d in data]]):
            report = run_evaluate_translation(checkpoint, data, out, batch_size=batch_size, device=device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    def fmt(v: object) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    if report["paired"]:
        table = Table(title=f"CycleGAN vs histogram matching on {report['n_paired_subjects']} paired held-out subjects")
        for column in ("direction", "metric", "CycleGAN", "baseline", "better"):
            table.add_column(column)
        for direction, res in report["paired"].items():
            for m in ("mae", "psnr", "ssim"):
                table.add_row(direction, m, fmt(res["cyclegan"][m]), fmt(res["baseline"][m]),
                              "CycleGAN" if res["beats_baseline"][m] else "baseline")
        Console().print(table)
        if not report["beats_baseline"]:
            typer.secho("the CycleGAN does not beat the baseline on every metric", fg=typer.colors.YELLOW)
    else:
        typer.echo("no paired held-out subjects: structure scores only")
    typer.echo(f"report: {out / 'evaluation.md'}")

# --- tumor GAN -------------------------------------------------------------------------


@app.command("extract-patches")
@clean_errors
def extract_patches_cmd(
    data: Annotated[list[Path], typer.Option("--data", help="Ingest output folder (repeat for several).")],
    out: Annotated[Path, typer.Option("--out", help="Patch folder to write: patches/, masks/, manifest.csv, patches.json.")],
    patch_size: Annotated[int, typer.Option("--patch-size", min=4, help="Patch side in voxels.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seeds where healthy patches go; same seed, same patches.")] = 0,
    dims: Annotated[int, typer.Option("--dims", min=2, max=3, help="2: axial patches (largest-lesion slice and neighbours); 3: cubes.")] = 2,
    neighbours: Annotated[int, typer.Option("--neighbours", min=0, help="2D: slices either side of the largest-lesion slice.")] = 1,
    healthy_per_volume: Annotated[int, typer.Option("--healthy-per-volume", min=0, help="Healthy-tissue patches per volume.")] = 2,
    hu_low: Annotated[float, typer.Option("--hu-low", help="CT window low end (HU) mapped to -1.")] = -100.0,
    hu_high: Annotated[float, typer.Option("--hu-high", help="CT window high end (HU) mapped to +1.")] = 200.0,
    brain_margin_mm: Annotated[float, typer.Option("--brain-margin-mm", min=0.0, help="Healthy patch centres at least this deep below the body surface (mm).")] = 10.0,
) -> None:
    """Cut lesion-centred patches per tumor class and healthy-tissue patches, each with its mask."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.patches import extract_patches, write_patch_folder

    with guarded_output(out, "extract-patches", [("--data", d) for d in data]):
        ps = extract_patches(data, patch_size, seed, dims, neighbours, healthy_per_volume, (hu_low, hu_high),
                             brain_margin_mm=brain_margin_mm)
        manifest = write_patch_folder(ps, out)
    table = Table(title=f"{len(ps)} patches ({patch_size}^{dims}, seed {seed}) -> {manifest}")
    table.add_column("class")
    table.add_column("patches", justify="right")
    for cls, n in ps.counts().items():
        table.add_row(cls, str(n))
    Console().print(table)
    for reason in ps.skipped:
        typer.echo(f"skipped {reason}")


@train_app.command("tumor-gan")
@clean_errors
def train_tumor_gan_cmd(
    data: Annotated[list[Path], typer.Option("--data", help="Ingest folder or real patch folder (repeat for several).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints/last.pt + last.json, samples/, metrics.")],
    config: Annotated[Path | None, typer.Option("--config", help="YAML with a `tumor_gan:` section (configs/tumor_gan.yaml).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Training steps (overrides the config).")] = None,
    patch_size: Annotated[int | None, typer.Option("--patch-size", help="Patch side (overrides the config; power of two).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/last.pt exactly.")] = False,
    modality: Annotated[str | None, typer.Option("--modality", help="CT or MR (default: the modality with most training patches).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Patch extraction seed (ingest folders only).")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override, e.g. --set tumor_gan.mode_seeking_weight=1.")] = None,
) -> None:
    """Train the class-conditional tumor-patch GAN on the train-split patches of the data."""
    from medaug.config import load_section
    from models.checkpoint import CheckpointError as _CheckpointError
    from models.common import TrainingDivergedError as _Diverged
    from models.train_tumor_gan import TumorGANConfig, train_tumor_gan
    from pipeline.errors import CheckpointError, ConfigError, TrainingDivergedError
    from pipeline.outputs import output_lock
    from pipeline.patches import load_patches, to_train_data

    overrides = list(set_ or [])
    if steps is not None:
        overrides.append(f"tumor_gan.steps={steps}")
    if patch_size is not None:
        overrides.append(f"tumor_gan.patch_size={patch_size}")
    cfg = load_section(TumorGANConfig, config, "tumor_gan", overrides)
    patches = load_patches(data, patch_size=cfg.patch_size, dims=cfg.spatial_dims, seed=seed)
    train_data = to_train_data(patches, modality)
    typer.echo(f"training on {train_data.images.shape[0]} {train_data.modality} patches of {', '.join(train_data.classes)}")
    try:
        with output_lock(out, "train tumor-gan"):
            result = train_tumor_gan(cfg, train_data, out, resume=resume, device=device)
    except _Diverged as exc:
        raise TrainingDivergedError(str(exc)) from None
    except _CheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:  # a full disk or a vanished folder while writing metrics, samples or cards
        raise CheckpointError(f"cannot write in the run folder {out}: {exc.strerror or exc}; "
                              "free space (or choose another --out) and resume with --resume") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    typer.secho(f"{result.steps} steps; checkpoint {result.checkpoint}", fg=typer.colors.GREEN)
    for w in result.warnings[-3:]:
        typer.secho(f"health: {w}", fg=typer.colors.YELLOW)


@app.command("sample-tumors")
@clean_errors
def sample_tumors_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Tumor GAN checkpoint (RUN_DIR/checkpoints/last.pt).")],
    class_name: Annotated[str, typer.Option("--class", help="Class to generate (one of the checkpoint's classes).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of patches.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for patches/, masks/, manifest.csv, provenance.json (merged across calls).")],
    seed: Annotated[int, typer.Option("--seed", help="Same seed, byte-identical patches.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu (byte-reproducible) or cuda.")] = "cpu",
) -> None:
    """Write synthetic tumor patches and masks of one class as NIfTI, with provenance."""
    from pipeline.sample_tumors import sample_tumors

    with guarded_output(out, "sample-tumors", [("--checkpoint", checkpoint)]):
        report = sample_tumors(checkpoint, class_name, n, seed, out, device=device)
    typer.echo(f"wrote {len(report.files)} {class_name} patches (seed {seed}) to {out}")


@app.command("evaluate-tumors")
@clean_errors
def evaluate_tumors_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Tumor GAN checkpoint (RUN_DIR/checkpoints/last.pt).")],
    real: Annotated[Path, typer.Option("--real", help="Real patch folder (from `medaug extract-patches`).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for tumor_eval.json and real_vs_generated.png.")],
    n_per_class: Annotated[int, typer.Option("--n-per-class", min=2, help="Generated patches per class.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of sampling, pairs and the classifier.")] = 0,
    classifier_steps: Annotated[int, typer.Option("--classifier-steps", min=1, help="Training steps of the fidelity classifier.")] = 300,
) -> None:
    """Class fidelity, per-class diversity (MS-SSIM) and mask statistics of generated vs. real patches."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.tumor_eval import evaluate_tumors

    with guarded_output(out, "evaluate-tumors", [("--checkpoint", checkpoint), ("--real", real)]):
        report = evaluate_tumors(checkpoint, real, out, n_per_class, seed, classifier_steps)
    clf = report["classifier"]
    table = Table(title=f"tumor GAN vs real (classifier accuracy on real {clf['real_accuracy_on']}: {clf['real_accuracy']:.2f})")
    for column in ("class", "fidelity acc", "MS-SSIM gen", "MS-SSIM real", "area gen", "area real"):
        table.add_column(column)

    def fmt(v: object) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    for cls, r in report["per_class"].items():
        real_area = r["mask_real"]["area_vox_mean"] if r["mask_real"] else None
        table.add_row(cls, fmt(r["fidelity_accuracy"]), fmt(r["ms_ssim_generated"]), fmt(r["ms_ssim_real"]),
                      fmt(r["mask_generated"]["area_vox_mean"]), fmt(real_area))
    Console().print(table)
    if report["less_diverse_classes"]:
        typer.secho(f"less diverse than real: {', '.join(report['less_diverse_classes'])}", fg=typer.colors.YELLOW)
    typer.echo(f"report: {out / 'tumor_eval.json'}")


@app.command("convert-checkpoint")
@clean_errors
def convert_checkpoint_cmd(
    old: Annotated[Path, typer.Argument(help="A checkpoint of an older medaug (pickled objects).")],
    new: Annotated[Path, typer.Argument(help="Where to write the converted checkpoint (a new file).")],
    trust: Annotated[bool, typer.Option("--i-trust-this-file", help="Required: OLD is unpickled, which runs any code it holds.")] = False,
) -> None:
    """Rewrite an old pickled checkpoint in the weights-only format (UNPICKLES OLD: trusted files only)."""
    from models.checkpoint import CheckpointError as _CheckpointError
    from models.checkpoint import convert_legacy_checkpoint
    from pipeline.errors import CheckpointError, ConfigError

    if not trust:
        raise ConfigError(f"converting {old} unpickles it, which runs any code the file holds; if you wrote it "
                          "yourself or trust its origin, add --i-trust-this-file")
    try:
        state = convert_legacy_checkpoint(old, new)
    except _CheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    typer.echo(f"wrote {new}: {state['kind']} checkpoint at step {state['step']}, format version {state['version']}")


# --- gate ------------------------------------------------------------------------------


@app.command("gate")
@clean_errors
def gate_cmd(
    real: Annotated[Path, typer.Option("--real", help="Real training folder (ingest or real-patch output, or plain NIfTI folder).")],
    synthetic: Annotated[Path, typer.Option("--synthetic", help="Synthetic folder (translate or sample-tumors output, or plain NIfTI folder).")],
    out: Annotated[Path, typer.Option("--out", help="Gate folder: gate_report.json/.md, PNG figures, accepted.csv, domain_encoder.pt.")],
    config: Annotated[Path | None, typer.Option("--config", help="YAML with a `gate:` section (configs/gate.yaml).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override, e.g. --set gate.extractor=inception.")] = None,
) -> None:
    """Score synthetic data against the real training data; exit 0 on accept, 3 on reject."""
    from rich.console import Console
    from rich.table import Table

    from medaug.config import load_section
    from pipeline.gate.config import GateConfig
    from pipeline.gate.run import run_gate

    cfg = load_section(GateConfig, config, "gate", set_ or [])
    with guarded_output(out, "gate", [("--real", real), ("--synthetic", synthetic)]):
        report = run_gate(real, synthetic, out, cfg)
    table = Table(title=f"gate {report.report_id[:12]}: {report.feature_extractor['name']}")
    for col in ("check", "value", "threshold", "result"):
        table.add_column(col)
    for c in report.checks:
        value = "-" if c.value is None else f"{c.value:.4g}"
        table.add_row(c.name, value, f"{c.op} {c.threshold:.4g}" if c.threshold is not None else "-",
                      "pass" if c.passed else "[red]FAIL[/red]")
    Console().print(table)
    typer.echo(f"per-sample filter: {report.n_accepted} accepted, {report.n_rejected} rejected; report in {out}")
    if report.signature is None:
        from pipeline.gate.signing import NOT_VERIFIED_NOTE

        typer.secho(f"warning: {NOT_VERIFIED_NOTE}", fg=typer.colors.YELLOW, err=True)
    if not report.accepted:
        typer.secho(f"REJECT: failed {', '.join(report.failed_checks)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=3)
    typer.secho("ACCEPT", fg=typer.colors.GREEN)


# --- dataset ---------------------------------------------------------------------------


@app.command("build-dataset")
@clean_errors
def build_dataset_cmd(
    real: Annotated[Path, typer.Option("--real", help="Real manifest: an ingest or real-patch folder (or its manifest.csv).")],
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to write (atomically).")],
    synthetic: Annotated[list[Path] | None, typer.Option("--synthetic", help="Synthetic folder (translate or sample-tumors output); repeat for several.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with a `dataset:` section (configs/dataset.yaml).")] = None,
    gate: Annotated[list[Path] | None, typer.Option("--gate", help="Gate output folder (gate_report.json, accepted.csv); only accepted items are used.")] = None,
    generator_card: Annotated[list[Path] | None, typer.Option("--generator-card", help="Generator model card JSON (RUN_DIR/checkpoints/last.json) with train_subjects.")] = None,
    runs_dir: Annotated[Path | None, typer.Option("--runs-dir", help="Folder of training runs searched for RUN_DIR/checkpoints/*.json cards.")] = None,
    manifests_dir: Annotated[Path | None, typer.Option("--manifests-dir", help="Where manifest copies go under <content-hash>/ (default: config, data_manifests/).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different dataset already at --out.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override, e.g. --set dataset.strategy=fixed.")] = None,
    allow_ungated: Annotated[bool, typer.Option("--allow-ungated", help="Ship synthetic items without --gate (console and datasheet say so).")] = False,
) -> None:
    """Write a class-balanced dataset: real items split by subject plus gated synthetic items in training."""
    from rich.console import Console
    from rich.table import Table

    from medaug.config import load_section
    from pipeline.dataset.config import DatasetConfig
    from pipeline.dataset.writer import build_dataset

    cfg = load_section(DatasetConfig, config, "dataset", set_ or [])
    if manifests_dir is not None:
        cfg = cfg.model_copy(update={"manifests_dir": manifests_dir})
    inputs = [("--real", real), ("--runs-dir", runs_dir), *[("--synthetic", p) for p in synthetic or []],
              *[("--gate", p) for p in gate or []], *[("--generator-card", p) for p in generator_card or []]]
    with guarded_output(out, "build-dataset", inputs):
        result = build_dataset(real, synthetic or [], out, cfg, gate or [], generator_card or [], runs_dir, overwrite, allow_ungated)
    table = Table(title=f"{result.out} ({'unchanged, ' if result.unchanged else ''}content hash {result.content_hash[:12]})")
    table.add_column("split")
    table.add_column("class")
    table.add_column("real", justify="right")
    table.add_column("synthetic", justify="right")
    for split, per_class in result.counts.items():
        for klass, n in per_class.items():
            table.add_row(split, klass, str(n["real"]), str(n["synthetic"]))
    Console().print(table)
    if result.ungated:
        typer.secho(f"warning: {result.ungated} synthetic items are UNGATED (--allow-ungated): no quality gate judged them",
                    fg=typer.colors.YELLOW, err=True)
    if result.unverified_gates:
        from pipeline.gate.signing import NOT_VERIFIED_NOTE

        typer.secho(f"warning: {NOT_VERIFIED_NOTE} (report {', '.join(r[:12] for r in result.unverified_gates)}; "
                    "the datasheet says so)", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"manifest copy: {result.manifests_copy}")


# --- demo / serve (Prefect) ------------------------------------------------------------


@app.command()
@clean_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder (phantoms, ingest, runs, gate, dataset).")] = Path("demo-output"),
    config: Annotated[Path, typer.Option("--config", help="Pipeline config YAML.")] = Path("configs/tiny.yaml"),
    override: Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set cyclegan.steps=40 (repeatable).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show Prefect's own log lines.")] = False,
) -> None:
    """Run the whole mri-ct pipeline on a generated phantom cohort, in-process (no server needed)."""
    import time

    from pipeline.errors import GateRejected

    start = time.monotonic()
    from flows.demo import run_demo

    try:
        result = run_demo(out, config, list(override or []), verbose=verbose)
    except GateRejected as exc:
        typer.secho(f"rejected: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=3) from None
    took = time.monotonic() - start
    typer.secho(f"demo finished in {took:.0f} s ({result['pipeline']})", fg=typer.colors.GREEN, bold=True)
    labels = {
        "phantoms": "phantom cohort",
        "ingest": "ingested volumes (training)",
        "ingest_dicom": "de-identified DICOM ingest",
        "run_dir": "training run",
        "synthetic": "synthetic data",
        "gate_report": "gate report",
        "dataset": "dataset",
    }
    for key, label in labels.items():
        if result.get(key):
            typer.echo(f"  {label:<28} {result[key]}")
    if result.get("ingest_dicom"):
        from pipeline.manifest import read_manifest

        rows = read_manifest(Path(result["ingest_dicom"]))
        subjects = sorted({r["subject_id"] for r in rows})
        typer.echo(f"  {len(rows)} DICOM series of {len(subjects)} patients de-identified: names and IDs "
                   f"replaced by keyed-hash pseudonyms ({', '.join(subjects[:3])}, ...)")


@app.command()
@clean_errors
def serve(
    schedules: Annotated[bool | None, typer.Option("--schedules/--no-schedules", help="Switch the example cron schedules of prefect.yaml on or off (default: as prefect.yaml says).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Most flow runs at the same time.")] = None,
) -> None:
    """Serve the `mri-ct` and `tumor-patches` deployments (in a supervised child process; needs PREFECT_API_URL)."""
    import os
    import sys

    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline,models")
    from flows.deploy import CHILD_ENV, serve_all, supervise

    if not os.environ.get(CHILD_ENV):  # serve in a child that a stop signal cannot leave hanging
        args = ["serve", *([] if schedules is None else ["--schedules" if schedules else "--no-schedules"]),
                *([] if limit is None else ["--limit", str(limit)])]
        raise typer.Exit(code=supervise([sys.executable, "-m", "medaug.cli", *args]))
    serve_all(activate_schedules=schedules, limit=limit)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
