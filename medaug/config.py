"""Load YAML configs into pydantic models.

A YAML file in configs/ only says what differs from the defaults (which equal the
published recipes). A file may hold several sections (`cyclegan:`, `gate:`, ...); a
command reads its own section. Overrides are dotted `key=value` strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file; a clear ConfigError when it is missing or not a mapping."""
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


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML scalars).

    >>> apply_overrides({"gate": {"fid_max": 50}}, ["gate.fid_max=80"])
    {'gate': {'fid_max': 80}}
    """
    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_section(model: type[M], path: Path | None, section: str | None = None, overrides: list[str] | None = None) -> M:
    """Validate `section` of the YAML at `path` (or the whole file) as `model`.

    With no path, the model's defaults. Validation errors name the key and the problem.
    """
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    if section is not None:
        data = data.get(section, {}) or {}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        where = f"{path}" + (f" [{section}]" if section else "") if path else "defaults"
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"config {where} is invalid: {problems}") from None
