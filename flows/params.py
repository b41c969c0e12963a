"""Parameters of the `augment` flow and the pipeline config they resolve to.

A flow run (or a deployment) is parameterised the way the CLI is: a YAML path under
configs/ plus dotted `key=value` overrides. `AugmentParams` is what Prefect validates
(the flow's signature mirrors it); `load_pipeline_config` hands them to
medaug.config.load_config, the one config loader the CLI and the benches use too, so a
file (with its `include:`s) means the same on every path and a bad key gives the same
one-line ConfigError. The schema (`PipelineConfig`, one section per stage) lives there
and is re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from medaug.config import (
    REPO_ROOT,
    SECTIONS,
    DicomWebSource,
    GenerateSection,
    IngestSection,
    PatchesSection,
    PhantomsConfig,
    PipelineConfig,
    RuntimeConfig,
    TaskRunnerKind,
    compose_yaml,
    load_config,
    resolve_config_path,
    use_phantoms,
)
from pipeline.dataset.config import Deployment

__all__ = [
    "REPO_ROOT", "SECTIONS", "AugmentParams", "DicomWebSource", "GenerateSection", "IngestSection", "Override",
    "PatchesSection", "PhantomsConfig", "PipelineConfig", "RuntimeConfig", "TaskRunnerKind", "compose_yaml",
    "load_pipeline_config", "output_dir", "resolve_config_path", "use_phantoms",
]

Override = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][\w.]*=.*$")]
"""A dotted `section.key=value` override; the value is parsed as a YAML scalar."""


class AugmentParams(BaseModel):
    """The `augment` flow's parameters (what a deployment or `medaug demo` passes)."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field(default="configs/mri-ct.yaml", description="Pipeline config YAML (relative to the working directory or the medaug checkout).")
    overrides: list[Override] = Field(default_factory=list, description="Dotted overrides, e.g. ['cyclegan.steps=20', 'runtime.task_runner=dask'].")
    pipeline: Deployment | None = Field(default=None, description="mri-ct or tumor-patches; None takes dataset.deployment from the config.")
    out: str | None = Field(default=None, description="Output folder of the run; None takes runtime.out_dir from the config.")
    checkpoint: str | None = Field(default=None, description="A trained generator checkpoint (last.pt) to generate with instead of training.")


def load_pipeline_config(params: AugmentParams) -> PipelineConfig:
    """Every section of `params.config` (includes merged, overrides applied), via medaug.config.load_config.

    `params.pipeline`, when given, overrides dataset.deployment. Raises ConfigError naming
    the file, the section and the key (the same message as the CLI's).
    """
    overrides = list(params.overrides)
    if params.pipeline is not None:
        overrides.append(f"dataset.deployment={params.pipeline}")
    return load_config(params.config, overrides)


def output_dir(params: AugmentParams, cfg: PipelineConfig) -> Path:
    """The run's output folder (absolute): `params.out`, else runtime.out_dir."""
    return Path(params.out if params.out is not None else cfg.runtime.out_dir).expanduser().resolve()
