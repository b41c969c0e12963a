"""The checkpoint file format of both GANs: one schema, a version number, weights-only loading.

A checkpoint is one dict written with `torch.save` whose every value is a tensor or plain
data (dict, list, str, int, float, bool, None), so that `torch.load(weights_only=True)`
reads it without running any code from the file (issue 14: a `.pt` is untrusted input).
RNG states are tensors and lists (see `models.common.rng_state`); the model card and
free-form metadata are JSON text. The schema (version 2):

    format      "medaug.checkpoint"
    version     2
    kind        "cyclegan" | "tumor_gan"
    step        optimiser steps done
    config      the trainer's config as a JSON-mode dict
    card        the model card as JSON text (what `medaug translate` / `sample-tumors` need)
    nets        {name: state_dict} of the unwrapped networks
    ema         {name: EMA.state_dict()} or None
    optimizers  {name: state_dict};  schedulers  {name: state_dict} (may be empty)
    guards      {name: NonFiniteGuard.state_dict()};  monitor  HealthMonitor.state_dict()
    ranks       one dict per rank: RNG states, data samplers, pools, ADA (what differs per rank)
    world_size  len(ranks)
    extra       what only one trainer keeps (plain data; e.g. the tumor GAN's classes)

Checkpoints of medaug before version 2 were pickles of numpy arrays and python tuples;
weights-only loading refuses them, and `load_checkpoint` says how to convert one
(`convert_legacy_checkpoint`, the `medaug convert-checkpoint` command) when its origin is
trusted. Writing goes through a temporary file and a rename, so a full disk or a killed run
never leaves a half-written checkpoint. models/ does not import pipeline/, so the error type
is defined here; the CLI and pipeline/ map it to pipeline.errors.CheckpointError.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

CHECKPOINT_FORMAT = "medaug.checkpoint"
CHECKPOINT_VERSION = 2
Kind = Literal["cyclegan", "tumor_gan"]
CONVERT_HINT = ("if you trust where the file came from, convert it once with "
                "`medaug convert-checkpoint --i-trust-this-file OLD NEW` (this runs the file's pickled code)")


class CheckpointError(ValueError):
    """A checkpoint cannot be read, written or resumed from; the message names the file and the fix.

    Subclasses ValueError (a bad input value) so older callers that catch ValueError still see it.
    """


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write `state` with torch.save to a temporary file beside `path`, then rename it over `path`.

    A run killed mid-write or a full disk leaves the previous checkpoint intact (os.replace is
    atomic on one filesystem). A failed write raises CheckpointError naming the file and the
    cause (one line; the temporary file is removed).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(state), tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a failed write as RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise CheckpointError(
            f"cannot write checkpoint {path}: {reason}; the previous checkpoint (if any) is kept. "
            "Free disk space (or choose another --out) and resume"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def read_checkpoint_file(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict in a checkpoint file, loaded weights-only (no code from the file runs).

    Raises CheckpointError, naming the file, when it is missing, empty, not a PyTorch file
    (random bytes, truncated), holds pickled objects (an old medaug checkpoint, or a hostile
    file: the message says how to convert a trusted one) or holds something other than a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give RUN_DIR/checkpoints/last.pt or best.pt")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was not written completely, use another one")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint (truncated or corrupt file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for one cause: an unusable file
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} holds pickled python objects, which medaug does not load (an old "
                f"checkpoint format, or a file that runs code); {CONVERT_HINT}"
            ) from None
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupt file: "
                              f"{str(exc).splitlines()[0][:120]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict (found {type(state).__name__})")
    return state


def load_checkpoint(path: Path, kind: Kind | None = None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A version-2 checkpoint of `kind` (any kind when None), weights-only; see `read_checkpoint_file`.

    Raises CheckpointError when the file is unreadable, of another format or version, or of
    another kind (e.g. a tumor GAN checkpoint given to `medaug translate`).
    """
    path = Path(path)
    state = read_checkpoint_file(path, map_location)
    if state.get("format") != CHECKPOINT_FORMAT:
        if state.get("format") == "medaug.cyclegan/1" or state.get("kind") == "tumor_gan":
            raise CheckpointError(f"checkpoint {path} has an old medaug format; {CONVERT_HINT}")
        raise CheckpointError(f"{path} is not a medaug checkpoint (no format {CHECKPOINT_FORMAT!r})")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')!r}; this medaug reads "
                              f"version {CHECKPOINT_VERSION}")
    if kind is not None and state.get("kind") != kind:
        raise CheckpointError(f"{path} is a {state.get('kind')} checkpoint, not a {kind} one")
    return state


def checkpoint_card(state: Mapping[str, Any]) -> dict[str, Any]:
    """The model card stored in a checkpoint (JSON text) as a dict."""
    card = json.loads(state["card"])
    if not isinstance(card, dict):
        raise CheckpointError("the checkpoint's model card is not a JSON object")
    return card


def check_resume_config(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any],
                        free: Iterable[str] = ()) -> None:
    """Raise CheckpointError when a resumed run's config differs from the checkpoint's in an option
    outside `free` (options that may change on resume). Both are JSON-mode config dicts."""
    free = set(free)
    changed = sorted(k for k in set(saved) | set(current) if k not in free and saved.get(k) != current.get(k))
    if changed:
        diffs = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in changed)
        raise CheckpointError(f"cannot resume from {path}: it was trained with other {diffs}; "
                              "use the checkpoint's options or start a new run folder")


def load_state_dict_checked(module: torch.nn.Module, state: Mapping[str, Any], path: Path, name: str) -> None:
    """`module.load_state_dict(state)`, raising CheckpointError (one line) for missing keys or wrong shapes."""
    try:
        module.load_state_dict(state)  # type: ignore[arg-type]
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()
        detail = next((ln.strip() for ln in first[1:] if ln.strip()), first[0] if first else "")
        raise CheckpointError(f"checkpoint {path}: the {name} weights do not fit this network ({detail[:200]}); "
                              "was it trained with other network options?") from None


# --- old (version 1) checkpoints -------------------------------------------------------------


def _plain_rng(state: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 RNG state (python tuple, numpy tuple) in the plain form of models.common.rng_state."""
    py, npy = state["python"], state["numpy"]
    out: dict[str, Any] = {
        "python": {"version": int(py[0]), "state": [int(x) for x in py[1]], "gauss": py[2]},
        "numpy": {"keys": torch.from_numpy(np.asarray(npy[1]).astype(np.int64)), "pos": int(npy[2]),
                  "has_gauss": int(npy[3]), "cached_gaussian": float(npy[4])},
        "torch": state["torch"],
    }
    if "cuda" in state:
        out["cuda"] = list(state["cuda"])
    return out


def _plain_rank(rank: Mapping[str, Any]) -> dict[str, Any]:
    return {**rank, "rng": _plain_rng(rank["rng"])}


def _convert_cyclegan_v1(old: Mapping[str, Any]) -> dict[str, Any]:
    meta = dict(old.get("meta", {}))
    # version 1 kept no card inside the file (it was rebuilt from config and meta at load time)
    card = {"kind": "cyclegan", "step": int(old["step"]), "config": dict(old["config"]), "meta": meta,
            **{k: meta.get(k) for k in ("hu_window", "mr_scaling", "spacing")},
            "train_subjects": list(meta.get("train_subjects", [])),
            "monitor_subjects": list(meta.get("monitor_subjects", []))}
    return {
        "kind": "cyclegan", "step": int(old["step"]), "config": dict(old["config"]),
        "card": json.dumps(card, default=str),
        "nets": old["nets"], "ema": old.get("ema"), "optimizers": old["optimizers"], "schedulers": old["schedulers"],
        "guards": {"gan": old["guard"]}, "monitor": old["monitor"],
        "ranks": [_plain_rank(r) for r in old["ranks"]], "world_size": int(old.get("world_size", len(old["ranks"]))),
        "extra": {"meta": json.dumps(meta, default=str), "best": dict(old.get("best", {})),
                  "last_metrics": dict(old.get("last_metrics", {}))},
    }


def _convert_tumor_v1(old: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "kind": "tumor_gan", "step": int(old["step"]), "config": dict(old["config"]),
        "card": json.dumps(old["card"], default=str),
        "nets": {"generator": old["generator"], "discriminator": old["discriminator"]},
        "ema": None if old.get("ema") is None else {"generator": old["ema"]},
        "optimizers": {"g": old["opt_g"], "d": old["opt_d"]}, "schedulers": {},
        "guards": {"g": old["guard_g"], "d": old["guard_d"]}, "monitor": old["health"],
        "ranks": [_plain_rank(r) for r in old["ranks"]], "world_size": int(old.get("world_size", len(old["ranks"]))),
        "extra": {"classes": list(old["classes"]), "data_fingerprint": str(old["data_fingerprint"])},
    }


def make_checkpoint(
    *,
    kind: Kind,
    step: int,
    config: Mapping[str, Any],
    card: Mapping[str, Any],
    nets: Mapping[str, Any],
    ema: Mapping[str, Any] | None,
    optimizers: Mapping[str, Any],
    schedulers: Mapping[str, Any],
    guards: Mapping[str, Any],
    monitor: Mapping[str, Any],
    ranks: list[dict[str, Any]],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The one checkpoint dict of both trainers (the schema in the module docstring); every
    argument is a state_dict or plain data; the card becomes JSON text."""
    return versioned({
        "kind": kind, "step": int(step), "config": dict(config), "card": json.dumps(dict(card), default=str),
        "nets": dict(nets), "ema": None if ema is None else dict(ema), "optimizers": dict(optimizers),
        "schedulers": dict(schedulers), "guards": dict(guards), "monitor": dict(monitor),
        "ranks": list(ranks), "world_size": len(ranks), "extra": dict(extra),
    })


def versioned(state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` with the format and version keys in front (what the trainers save)."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}


def convert_legacy_checkpoint(old_path: Path, new_path: Path) -> dict[str, Any]:
    """Rewrite a version-1 medaug checkpoint as version 2 and check that it loads weights-only.

    THIS UNPICKLES `old_path` (torch.load with weights_only=False): any code in the file runs.
    Call it only on files you wrote or whose origin you trust. Returns the new checkpoint's
    dict (as loaded back); raises CheckpointError for a file that is no medaug checkpoint.
    """
    old_path, new_path = Path(old_path), Path(new_path)
    if not old_path.is_file():
        raise CheckpointError(f"checkpoint {old_path} does not exist")
    try:
        old = torch.load(old_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure means: not a loadable checkpoint
        raise CheckpointError(f"checkpoint {old_path} cannot be read ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(old, dict):
        raise CheckpointError(f"{old_path} does not hold a dict (found {type(old).__name__})")
    try:
        if old.get("format") == CHECKPOINT_FORMAT:
            new = {k: v for k, v in old.items() if k not in ("format", "version")}
        elif old.get("format") == "medaug.cyclegan/1":
            new = _convert_cyclegan_v1(old)
        elif old.get("kind") == "tumor_gan":
            new = _convert_tumor_v1(old)
        else:
            raise CheckpointError(f"{old_path} is not a medaug checkpoint (format {old.get('format')!r})")
    except (KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(f"{old_path} is an incomplete medaug checkpoint (missing {exc})") from None
    if new_path.resolve() == old_path.resolve():
        raise CheckpointError("write the converted checkpoint to a new file, not over the old one")
    save_checkpoint(new_path, versioned(new))
    return load_checkpoint(new_path)
