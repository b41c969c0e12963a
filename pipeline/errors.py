"""Exception types of medaug, in one module so callers and tests can tell them apart.

Every message says what was wrong, with which input (by a path relative to the input
root or a pseudonym, never a patient identifier), and what to do.
"""


class MedaugError(Exception):
    """Base class: an error the CLI reports as one clear line, without a traceback."""


class ConfigError(MedaugError):
    """A config file or option is invalid (names the key and the allowed values)."""


class InputRejected(MedaugError):
    """One input cannot be used; ingest records it in quarantine.csv with this message."""


class GeometryError(InputRejected):
    """Slices or a volume header have inconsistent or impossible geometry."""


class MissingDecoderError(InputRejected):
    """Pixel data uses a compressed transfer syntax with no decoder package installed."""


class FatalIngestError(MedaugError):
    """Ingest cannot run at all (unreadable input root, unwritable output folder)."""


class DicomWebAuthError(FatalIngestError):
    """A PACS refused the credentials, or asks for some and none were given (HTTP 401/403).

    Never retried: repeating a refused login can lock the account. The message names where
    the credentials come from (a Secret block's name, environment variables), never a value.
    """


class WeightsMissingError(MedaugError):
    """An optional pretrained weights file named in config does not exist."""


class CheckpointError(MedaugError):
    """A checkpoint cannot be used: missing, empty, truncated or corrupt, an old pickled format
    (the message says how to convert a trusted one), another kind or architecture than asked
    for, or it cannot be written (full disk). A bad file does not get better: never retried.

    models/ raises models.checkpoint.CheckpointError (models/ does not import pipeline/);
    pipeline/ and the CLI re-raise it as this type with the same message.
    """


class TrainingDivergedError(MedaugError):
    """Repeated non-finite losses stopped training; the last good checkpoint is kept."""


class GateRejected(MedaugError):
    """The quality gate rejected a batch of synthetic data (names the failed checks)."""


class ProvenanceError(MedaugError):
    """Synthetic data whose generator provenance is missing or was trained on non-training subjects."""


class DatasetExistsError(MedaugError):
    """A dataset folder already holds a different dataset (pass --overwrite to replace it)."""


class DatasetError(MedaugError):
    """A data folder cannot be used by a stage (no manifest, no volumes of a needed modality or split)."""


class StageFailed(MedaugError):
    """A stage of the `augment` flow failed with an unexpected error (names the stage and the cause)."""


class PatchError(MedaugError):
    """Tumor patches cannot be extracted, read, sampled or evaluated (names the folder or class and the fix)."""


class GateMismatchError(MedaugError):
    """A gate report did not judge these synthetic bytes (a report for another set, or files changed since)."""


class GateSignatureError(ConfigError):
    """A gate report fails its HMAC check under MEDAUG_GATE_KEY: unsigned, signed with another key, or edited."""


class UngatedError(MedaugError):
    """Synthetic items would enter a dataset without a gate report (pass --gate, or --allow-ungated)."""


class OutputLockedError(MedaugError):
    """Another live process is writing the same output folder (names its pid and host)."""


class OutputOverlapError(MedaugError):
    """An output folder is, contains, or lies inside one of the command's inputs."""


class OutputWriteError(MedaugError):
    """Writing an output failed (full disk, read-only folder); nothing half-written is left behind."""
