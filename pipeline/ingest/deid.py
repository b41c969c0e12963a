"""De-identification for ingest: keyed pseudonyms and keyed references, nothing else leaves.

Ingest follows the semantics of the DICOM PS3.15 Annex E Basic Application Level
Confidentiality Profile by construction: no DICOM attribute is copied to any output. What
leaves ingest is the voxel data (after rescale), the geometry (affine) and values derived
from identifiers only through a keyed hash (HMAC-SHA256, RFC 2104):

* the subject pseudonym (from DICOM PatientID, or the NIfTI case name / BIDS ``sub-`` label);
* references to input files (so that a quarantined input can be found again with the same
  key, see `Deid.path_ref`), and
* the content hashes of the incremental-state file.

Each purpose uses its own sub-key derived from the secret, so a value of one kind cannot be
matched against another. The secret comes from the caller (the CLI reads MEDAUG_DEID_KEY);
without one a random per-run key is used and pseudonyms are not stable across runs. The
secret is never written anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

KEY_ENV = "MEDAUG_DEID_KEY"
"""Environment variable the CLI reads the de-identification secret from."""

PSEUDONYM_PREFIX = "p"
PSEUDONYM_HEX = 12
"""48 bits of HMAC: collisions stay improbable for cohorts far beyond 10^5 subjects."""


def key_from_env() -> bytes | None:
    """The secret from MEDAUG_DEID_KEY as bytes, or None when unset or empty."""
    value = os.environ.get(KEY_ENV, "")
    return value.encode("utf-8") if value else None


@dataclass(frozen=True)
class Deid:
    """Keyed hashing for one ingest run.

    >>> d = Deid(b"secret")
    >>> d.pseudonym("PAT-001") == d.pseudonym(" PAT-001 ")
    True
    >>> d.pseudonym("PAT-001")[:1], len(d.pseudonym("PAT-001"))
    ('p', 13)
    """

    key: bytes = field(repr=False)
    stable: bool = True
    _sub: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def create(cls, key: bytes | None) -> Deid:
        """A Deid from `key`; with None, warn and use a random per-run key."""
        if key:
            return cls(key=key, stable=True)
        log.warning(
            "%s is not set: using a random per-run key, so pseudonyms differ between runs "
            "(set it to a secret to get stable pseudonyms)",
            KEY_ENV,
        )
        return cls(key=secrets.token_bytes(32), stable=False)

    def _subkey(self, purpose: str) -> bytes:
        if purpose not in self._sub:
            self._sub[purpose] = hmac.new(self.key, b"medaug-deid:" + purpose.encode(), hashlib.sha256).digest()
        return self._sub[purpose]

    def digest(self, purpose: str, value: str | bytes) -> str:
        """Hex HMAC-SHA256 of `value` under the sub-key for `purpose`."""
        data = value.encode("utf-8") if isinstance(value, str) else value
        return hmac.new(self._subkey(purpose), data, hashlib.sha256).hexdigest()

    def pseudonym(self, identity: str) -> str:
        """Subject pseudonym of a patient identity (PatientID, case name), e.g. 'p3fa2c9d81b0e'.

        Leading/trailing spaces are ignored (DICOM pads values to even length).
        """
        return PSEUDONYM_PREFIX + self.digest("subject", identity.strip())[:PSEUDONYM_HEX]

    def path_ref(self, relpath: str) -> str:
        """Reference of an input file by its path relative to its input root, e.g. 'f-1a2b3c4d5e6f7a8b'."""
        return "f-" + self.digest("path", relpath)[:16]

    def content_hasher(self) -> hmac.HMAC:
        """A fresh keyed hasher for the content of input files (incremental state)."""
        return hmac.new(self._subkey("content"), digestmod=hashlib.sha256)
