"""The gate report's binding: a content id against accidental edits, an HMAC against forgery.

gate_report.json carries `report_id`, the sha256 of its canonical content (sorted keys, no
whitespace, without `report_id` and `signature`): anyone can recompute it, so it catches an
edit by mistake, not a forged report. With a key (the MEDAUG_GATE_KEY environment variable,
or in the Prefect flow a Secret block named by runtime.gate_key_secret) the gate also writes
`signature`: {"alg": "hmac-sha256", "key_id": ..., "mac": ...}, an HMAC-SHA256 (RFC 2104) of
the same canonical content under that key. `key_id` is an HMAC of a fixed label under the key
(it names the key without revealing it), so a report signed with another key is told apart
from an edited one. build-dataset (pipeline/dataset/inputs.py `read_gate`) checks both. Kept
free of heavy imports: the dataset writer reads reports without loading torch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from pipeline.errors import GateSignatureError

GATE_KEY_ENV = "MEDAUG_GATE_KEY"
"""Environment variable holding the gate's signing key (any non-empty string)."""

ALG = "hmac-sha256"
NOT_VERIFIED_NOTE = (
    f"gate report not signed: it detects accidental edits, not forgery; set {GATE_KEY_ENV}"
)
"""What the gate's log, build-dataset's console and the datasheet say about an unsigned report."""
UNVERIFIED_NOTE = (
    f"gate report signed but not verified ({GATE_KEY_ENV} is not set here): it detects accidental edits, not forgery; "
    f"set {GATE_KEY_ENV}"
)
"""The same for a signed report read without a key to check it with."""

SignatureStatus = Literal["verified", "unsigned", "unverified"]
"""verified: signed and checked under the key; unsigned: no signature and no key; unverified:
signed, but no key here to check it with."""

_UNBOUND = ("report_id", "signature")


def status_note(status: SignatureStatus) -> str:
    """The warning for a report no key verified ("" for a verified one).

    >>> status_note("unsigned") == NOT_VERIFIED_NOTE, status_note("verified")
    (True, '')
    """
    return {"verified": "", "unsigned": NOT_VERIFIED_NOTE, "unverified": UNVERIFIED_NOTE}[status]


def gate_key_from_env() -> bytes | None:
    """The key in MEDAUG_GATE_KEY as bytes, or None when unset or empty."""
    value = os.environ.get(GATE_KEY_ENV, "")
    return value.encode("utf-8") if value else None


def canonical(report: Mapping[str, Any]) -> bytes:
    """The bytes the id and the signature cover: the report's JSON without report_id and signature.

    >>> canonical({"verdict": "accept", "report_id": "x", "signature": None, "a": [1, 2]})
    b'{"a":[1,2],"verdict":"accept"}'
    """
    content = {k: v for k, v in report.items() if k not in _UNBOUND}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def content_id(report: Mapping[str, Any]) -> str:
    """The report id its content gives: sha256 of `canonical(report)` (hex)."""
    return hashlib.sha256(canonical(report)).hexdigest()


def key_id(key: bytes) -> str:
    """A short public name of a key: 16 hex digits of an HMAC of a fixed label under it.

    >>> key_id(b"k1") != key_id(b"k2"), len(key_id(b"k1"))
    (True, 16)
    """
    return hmac.new(key, b"medaug-gate-key-id", hashlib.sha256).hexdigest()[:16]


def sign(report: Mapping[str, Any], key: bytes) -> dict[str, str]:
    """The `signature` entry of a report under `key`: algorithm, key id and HMAC-SHA256 (hex) of its canonical content."""
    mac = hmac.new(key, canonical(report), hashlib.sha256).hexdigest()
    return {"alg": ALG, "key_id": key_id(key), "mac": mac}


def check_signature(report: Mapping[str, Any], key: bytes | None, where: str) -> SignatureStatus:
    """Check a report's signature under `key` (None: no key here, nothing to check it with).

    With a key, an unsigned report, one signed with another key, or one whose HMAC does not
    match its content raises GateSignatureError naming `where` (the report's path). Without
    a key returns "unsigned" or "unverified" and the caller warns (NOT_VERIFIED_NOTE).
    """
    sig = report.get("signature")
    if key is None:
        return "unverified" if sig else "unsigned"
    if not isinstance(sig, dict) or sig.get("alg") != ALG or not isinstance(sig.get("mac"), str):
        raise GateSignatureError(
            f"gate report {where} is not signed and {GATE_KEY_ENV} is set: anyone could have written it; run "
            f"`medaug gate` again with the same {GATE_KEY_ENV}"
        )
    if str(sig.get("key_id")) != key_id(key):
        raise GateSignatureError(
            f"gate report {where} was signed with another key (key id {str(sig.get('key_id'))[:16]}, {GATE_KEY_ENV} here "
            f"has key id {key_id(key)}); set the gate's key, or run `medaug gate` again with this one"
        )
    if not hmac.compare_digest(sig["mac"], sign(report, key)["mac"]):
        raise GateSignatureError(
            f"gate report {where} was changed after the gate signed it (its signature does not match its content); "
            "run `medaug gate` again"
        )
    return "verified"
