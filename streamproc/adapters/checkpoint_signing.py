"""Trusted model checkpoints: a checkpoint is a pickle, and unpickling runs code, so a worker must not load bytes
that anyone with write access to Redis could have planted. With ``STREAMPROC_MODEL_SIGNING_KEY`` every checkpoint
is stored as ``spck1`` + HMAC-SHA256(key, version || pickle) + pickle, and verified before it is unpickled. The
version is inside the MAC, so a genuine checkpoint copied under another version number is refused too (that would
be a silent rollback)."""

from __future__ import annotations

import hashlib
import hmac

from streamproc.ports import UntrustedCheckpoint
from streamproc.settings import Settings

MAGIC = b"spck1"
_MAC_BYTES = 32


def _mac(key: bytes, version: int, payload: bytes) -> bytes:
    return hmac.new(key, version.to_bytes(8, "big") + payload, hashlib.sha256).digest()


def signing_key(settings: Settings) -> bytes | None:
    key = settings.model_signing_key
    return None if key is None else key.get_secret_value().encode()


def sign(key: bytes, version: int, payload: bytes) -> bytes:
    return MAGIC + _mac(key, version, payload) + payload


def verified_payload(key: bytes | None, version: int, blob: bytes) -> bytes:
    """The pickle inside a stored checkpoint, once its signature is checked; raises ``UntrustedCheckpoint`` (before
    anything is unpickled) for an unsigned or tampered one. Without a key nothing can be checked: both forms load."""
    signed = blob.startswith(MAGIC)
    payload = blob[len(MAGIC) + _MAC_BYTES:] if signed else blob
    if key is None:
        return payload
    if not signed:
        raise UntrustedCheckpoint(f"checkpoint v{version} is not signed")
    if not hmac.compare_digest(blob[len(MAGIC):len(MAGIC) + _MAC_BYTES], _mac(key, version, payload)):
        raise UntrustedCheckpoint(f"checkpoint v{version} does not match its signature (tampered, or another key)")
    return payload
