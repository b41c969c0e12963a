"""The `medaug` command line (typer).

Heavy imports (torch, MONAI, pydicom, Prefect) stay inside the commands so that
`medaug --help` is instant. Errors of type MedaugError print as one line and exit 2;
the quality gate's reject exits 3.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
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

    return wrapper  # type: ignore[return-value]


# --- phantoms --------------------------------------------------------------------------

# --- ingest ----------------------------------------------------------------------------

# --- train / translate / evaluate (CycleGAN) -------------------------------------------

# --- tumor GAN -------------------------------------------------------------------------

# --- gate ------------------------------------------------------------------------------

# --- dataset ---------------------------------------------------------------------------

# --- demo / serve (Prefect) ------------------------------------------------------------


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
