"""The pipeline config: its schema (one pydantic section per stage) and its one loader.

A YAML file in configs/ only says what differs from the defaults (which equal the
published recipes). A file holds sections (`cyclegan:`, `gate:`, `runtime:`, ...), may
`include:` other files (configs/mri-ct.yaml builds on configs/cyclegan.yaml and changes
single keys of it) and is changed further by dotted `section.key=value` overrides.

`load_config` is the only function that reads a config file: the CLI (`--config`, `--set`),
the `augment` flow (flows/params.py) and the benches all call it (or `load_section`, one
section of it), so a file means the same thing on every path. It raises ConfigError, one
line naming the file, section and key, for an unknown section (`cyclgan:`), an unknown key,
a bad value, a missing include and an include loop.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.train_cyclegan import CycleGANConfig
from models.train_tumor_gan import TumorGANConfig
from pipeline.dataset.config import DatasetConfig, Deployment
from pipeline.errors import ConfigError
from pipeline.gate.config import GateConfig
from pipeline.ingest.dicomweb import QUERY_KEYS, redact_url
from pipeline.slices import SliceConfig
from pipeline.types import HUWindow, Modality

M = TypeVar("M", bound=BaseModel)

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout that holds configs/ (relative config paths are also tried against it)."""

TaskRunnerKind = Literal["thread", "dask"]
"""How independent tasks (ingest of several sources, generation shards) run side by side."""


# --- the schema: one section per stage --------------------------------------------------


class PhantomsConfig(BaseModel):
    """The synthetic phantom cohort a run can generate for itself (pipeline/phantoms.py)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | Literal["auto"] = Field(default=False, description="Generate a phantom cohort under OUT/phantoms and ingest it: true (demo, tests), false (real data), or auto: only while ingest.sources, dicom_sources and dicomweb are empty (so a fresh checkout's deployments run end to end).")
    n_subjects: int = Field(default=16, ge=2, description="Number of phantom subjects (about 85/15 round/necrotic tumors).")
    size: int = Field(default=64, ge=16, description="In-plane size in voxels; volumes are size x size x size//2.")
    seed: int = Field(default=0, description="Seed of the phantom cohort (same seed, same files).")


def use_phantoms(phantoms: PhantomsConfig, ingest: IngestSection) -> bool:
    """Whether a run generates and ingests the phantom cohort (enabled, or auto with no sources).

    >>> use_phantoms(PhantomsConfig(enabled="auto"), IngestSection()), use_phantoms(PhantomsConfig(), IngestSection())
    (True, False)
    """
    if phantoms.enabled == "auto":
        return not ingest.sources and not ingest.dicom_sources and not ingest.dicomweb
    return bool(phantoms.enabled)


class DicomWebSource(BaseModel):
    """A PACS the training ingest queries over DICOMweb (pipeline.ingest.dicomweb.ingest_with_pacs).

    Only the secret's name is config; its value is read inside the ingest task, so it is
    never a flow or task parameter, never stored with a run and never logged.
    """

    # a rejected URL may carry a password: keep input values out of validation messages
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, coerce_numbers_to_str=True)

    url: str = Field(description="DICOMweb root of the PACS, e.g. http://pacs.local:8042/dicom-web; credentials never go in it (use credentials_secret or the environment).")
    query: dict[str, str] = Field(default_factory=dict, description=f"QIDO-RS study filters, e.g. {{ModalitiesInStudy: CT, StudyDate: 20240101-20241231}}; keys: {', '.join(QUERY_KEYS)}. Empty: every study.")
    credentials_secret: str | None = Field(default=None, min_length=1, description='Name of a Prefect Secret block holding {"user": ..., "password": ...}, {"token": ...} or a bearer-token string; None: the MEDAUG_DICOMWEB_USER/MEDAUG_DICOMWEB_PASSWORD or MEDAUG_DICOMWEB_TOKEN environment variables of the process that runs the flow.')

    @field_validator("url")
    @classmethod
    def _plain_http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                f"{redact_url(url)} must not carry user:password; put the credentials in a Prefect Secret block "
                "(credentials_secret) or in MEDAUG_DICOMWEB_USER/MEDAUG_DICOMWEB_PASSWORD"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL such as http://pacs.local:8042/dicom-web; got {redact_url(url)!r}")
        if parts.query or parts.fragment:
            # a query string may carry a token (?access_token=...); filters go in `query`
            raise ValueError(
                f"{redact_url(url)} must not carry a query string or fragment (?... or #...); put study filters "
                "in query and credentials in a Prefect Secret block (credentials_secret)"
            )
        return url

    @field_validator("query")
    @classmethod
    def _known_query_keys(cls, query: dict[str, str]) -> dict[str, str]:
        for key, value in query.items():
            if key not in QUERY_KEYS:
                raise ValueError(f"key {key!r} is not supported; use one of: {', '.join(QUERY_KEYS)}")
            if not str(value).strip():
                raise ValueError(f"{key} is empty; give a value (e.g. ModalitiesInStudy: CT) or leave the key out")
        return {k: str(v).strip() for k, v in query.items()}


class IngestSection(BaseModel):
    """What the ingest stage reads: labelled sources that feed training, and DICOM trees."""

    # its dicomweb entries hold URLs and query values: keep input values out of validation messages
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    sources: list[Path] = Field(default_factory=list, description="Folders or files to ingest for training (Decathlon NIfTI datasets, DICOM trees); relative to the working directory. With phantoms enabled, the phantom NIfTI datasets are added.")
    dicom_sources: list[Path] = Field(default_factory=list, description="DICOM trees ingested on their own into OUT/ingest-dicom (de-identified volumes, not used for training). With phantoms enabled, the phantom DICOM tree is added.")
    dicomweb: list[DicomWebSource] = Field(default_factory=list, description="PACS queried over DICOMweb whose series are ingested for training with `sources`, in the same run (same validation, de-identification, manifest and quarantine; never cached, so each run asks the PACS again). Each: url, query, credentials_secret.")
    modality: Modality | None = Field(default=None, description="Modality of NIfTI inputs that have neither dataset.json nor a sidecar.")
    deid_key_secret: str | None = Field(default=None, description="Name of a Prefect Secret block holding the de-identification key; None: the MEDAUG_DEID_KEY environment variable (a fixed demo key for phantom runs).")


class GenerateSection(BaseModel):
    """How synthetic data are generated from a trained generator (translate or sample-tumors)."""

    model_config = ConfigDict(extra="forbid")

    split: str = Field(default="train", description="mri-ct: translate source volumes of this split only (synthetic data may only train).")
    use_ema: bool = Field(default=True, description="mri-ct: translate with the EMA generator when the checkpoint has one.")
    batch_size: int = Field(default=16, ge=1, description="Slices (mri-ct) or patches (tumor-patches) per forward pass.")
    samples_per_class: int | None = Field(default=None, ge=1, description="tumor-patches: patches sampled per tumor class; None: what class balancing needs, times oversample.")
    oversample: float = Field(default=1.5, ge=1.0, description="tumor-patches: sample this many times what balancing needs, since the gate drops some.")
    min_per_class: int = Field(default=32, ge=1, description="tumor-patches: sample at least this many per class (the gate needs enough samples to score).")
    seed: int = Field(default=0, description="Seed of the sampled latents.")


class PatchesSection(BaseModel):
    """How real tumor patches are cut for the tumor GAN (pipeline.patches.extract_patches).

    Patch size and 2-D/3-D come from the tumor_gan section, so data and network agree.
    """

    model_config = ConfigDict(extra="forbid")

    modality: Modality = Field(default="CT", description="Modality the tumor GAN trains on and generates.")
    neighbours: int = Field(default=1, ge=0, description="2-D: slices either side of the largest-lesion slice that are cut too.")
    healthy_per_volume: int = Field(default=2, ge=0, description="Healthy-tissue patches per volume (class 'healthy').")
    hu_window: HUWindow = Field(default=(-100.0, 200.0), description="CT window (low, high) in HU mapped to [-1, 1] for patches.")
    min_body_fraction: float = Field(default=0.9, ge=0.0, le=1.0, description="Least fraction of body voxels inside a healthy patch.")
    brain_margin_mm: float = Field(default=10.0, ge=0.0, description="Least depth (mm) of a healthy patch's centre below the body surface (keeps healthy patches in brain, off skin and skull).")
    seed: int = Field(default=0, description="Seeds where healthy patches go.")


class RuntimeConfig(BaseModel):
    """Where and how the flow runs: output folder, device, task runner, retries, torchrun."""

    model_config = ConfigDict(extra="forbid")

    out_dir: Path = Field(default=Path("medaug-output"), description="Output folder of a run when the flow's `out` parameter is not given.")
    device: str = Field(default="cpu", description="Torch device of training and generation: auto (cuda when available), cpu, cuda, cuda:1.")
    task_runner: TaskRunnerKind = Field(default="thread", description="thread: a thread pool in the flow's process; dask: prefect-dask's DaskTaskRunner (a LocalCluster, or dask_address).")
    max_workers: int = Field(default=2, ge=1, description="Threads of the thread runner, or Dask workers of a LocalCluster.")
    dask_address: str | None = Field(default=None, description="Address of a running Dask scheduler (tcp://host:8786); None starts a LocalCluster per stage.")
    dask_processes: bool = Field(default=False, description="LocalCluster with worker processes (True) or threads in this process (False: quick start, shared memory).")
    nproc_per_node: int = Field(default=1, ge=1, description="Processes per node for training; >1 launches `torchrun --nproc_per_node N` as a subprocess (multi-GPU).")
    retries: int = Field(default=2, ge=0, description="Retries of the I/O tasks (ingest, generation, dataset writing), with exponential backoff.")
    retry_backoff_s: float = Field(default=2.0, ge=0.0, description="First retry delay in seconds; doubles on every retry.")
    train_retries: int = Field(default=1, ge=0, description="Retries of a training task; a retry resumes from RUN_DIR/checkpoints/last.pt.")
    gate_key_secret: str | None = Field(default=None, description="Name of a Prefect Secret block holding the key that signs the gate report and that build-dataset checks it with; None: the MEDAUG_GATE_KEY environment variable (unset: the report is unsigned and the datasheet says so; medaug demo sets a per-run key).")
    cache: bool = Field(default=True, description="Reuse ingest and preprocessing results while their input files' content hash is unchanged (Prefect result storage: PREFECT_LOCAL_STORAGE_PATH, OUT/.prefect/storage in the demo; the CycleGAN slices are kept there as a pickle).")


class PipelineConfig(BaseModel):
    """Every stage's section of one pipeline config file (configs/mri-ct.yaml, configs/tiny.yaml)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    phantoms: PhantomsConfig
    ingest: IngestSection
    cyclegan_data: SliceConfig
    cyclegan: CycleGANConfig
    patches: PatchesSection
    tumor_gan: TumorGANConfig
    generate: GenerateSection
    gate: GateConfig
    dataset: DatasetConfig
    runtime: RuntimeConfig

    @property
    def pipeline(self) -> Deployment:
        """Which pipeline runs: "mri-ct" (CycleGAN translation) or "tumor-patches" (tumor GAN)."""
        return self.dataset.deployment


SECTIONS: dict[str, type[BaseModel]] = {
    "phantoms": PhantomsConfig,
    "ingest": IngestSection,
    "cyclegan_data": SliceConfig,
    "cyclegan": CycleGANConfig,
    "patches": PatchesSection,
    "tumor_gan": TumorGANConfig,
    "generate": GenerateSection,
    "gate": GateConfig,
    "dataset": DatasetConfig,
    "runtime": RuntimeConfig,
}
"""Config file sections and the model each one is validated as."""


INCLUDE_KEY = "include"
"""Top-level key of a config listing the files it builds on (paths relative to it)."""


# --- the loader ---------------------------------------------------------------------------


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file; a clear ConfigError when it is missing or not a mapping.

    Raw YAML, no includes or validation: for prefect.yaml and the like. A config file
    goes through `load_config`.
    """
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options, not {type(data).__name__}")
    return data


def resolve_config_path(config: str | Path) -> Path:
    """The config file: as given (relative to the working directory), else under the checkout.

    >>> resolve_config_path("configs/tiny.yaml").name
    'tiny.yaml'
    """
    path = Path(config).expanduser()
    if path.is_file() or path.is_absolute():
        return path
    in_repo = REPO_ROOT / path
    return in_repo if in_repo.is_file() else path


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` merged over `base`: mappings merge key by key, anything else is replaced.

    An empty value over a mapping (a section header whose keys are all commented out,
    `gate:` alone, which YAML reads as None) changes nothing: it must not wipe the
    included section back to the defaults.

    >>> deep_merge({"a": {"x": 1, "y": 2}, "b": [1]}, {"a": {"y": 3}, "b": [2]})
    {'a': {'x': 1, 'y': 3}, 'b': [2]}
    >>> deep_merge({"gate": {"gate_size": 48}}, {"gate": None})
    {'gate': {'gate_size': 48}}
    """
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        if isinstance(below, dict) and value is None:
            continue
        out[key] = deep_merge(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return out


def compose_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a config file with its `include:` files merged under it.

    Included files (relative to the including file, in order, themselves able to include)
    are deep-merged first; the including file's own keys win. A missing include or a loop
    is a ConfigError naming the including file.
    """
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path} includes itself (through {' -> '.join(p.name for p in seen)})")
    data = read_yaml(path)
    includes = data.pop(INCLUDE_KEY, None) or []
    if not isinstance(includes, list):
        raise ConfigError(f"config {path}: `{INCLUDE_KEY}` must be a list of YAML paths, got {includes!r}")
    merged: dict[str, Any] = {}
    for inc in includes:
        included = path.parent / str(inc)
        if not included.is_file():
            raise ConfigError(f"config {path} includes {inc}, which does not exist (looked for {included})")
        merged = deep_merge(merged, compose_yaml(included, (*seen, path)))
    return deep_merge(merged, data)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML scalars).

    >>> apply_overrides({"gate": {"fid_max": 50}}, ["gate.fid_max=80"])
    {'gate': {'fid_max': 80}}
    """
    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def _unknown_section(name: str, where: str) -> ConfigError:
    """The error for a section no stage knows, with the closest known name when there is one."""
    close = difflib.get_close_matches(name, list(SECTIONS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{where} names unknown section {name!r}{hint}; allowed: {', '.join(SECTIONS)}")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Every section of the config at `path` (includes merged, overrides applied), validated.

    Args:
        path: a YAML file, relative to the working directory or the checkout
            (`resolve_config_path`); None: the defaults of every section.
        overrides: dotted `section.key=value` strings, applied after the includes.
    Raises ConfigError naming the file, the section and the key for an unknown section (in
    the file or an override), an unknown key or a bad value; sections the file does not
    name take their defaults.
    """
    file = resolve_config_path(path) if path is not None else None
    where = f"config {file}" if file is not None else "the default config"
    data = compose_yaml(file) if file is not None else {}
    for name in data:
        if name not in SECTIONS:
            raise _unknown_section(name, where)
    for item in overrides:
        head = item.split("=", 1)[0].split(".", 1)[0].strip()
        if head not in SECTIONS:
            raise _unknown_section(head, f"override {item!r}")
    data = apply_overrides(data, overrides)
    sections: dict[str, BaseModel] = {}
    for name, model in SECTIONS.items():
        try:
            sections[name] = model.model_validate(data.get(name) or {})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{where} [{name}] is invalid: {problems}") from None
    return PipelineConfig.model_validate(sections)


def load_section(model: type[M], path: str | Path | None, section: str, overrides: Sequence[str] = ()) -> M:
    """One section of `load_config(path, overrides)`, e.g. what `medaug gate --config` reads.

    The whole file is validated (a bad key in another section is an error too), so a
    command reads exactly what the flow reads from the same file.

    >>> load_section(GateConfig, "configs/tiny.yaml", "gate").gate_size
    32
    """
    if SECTIONS.get(section) is not model:
        raise TypeError(f"section {section!r} is validated as {SECTIONS.get(section)}, not {model.__name__}")
    value = getattr(load_config(path, overrides), section)
    assert isinstance(value, model)
    return value
