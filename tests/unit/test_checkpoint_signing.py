"""Checkpoints are pickles, and unpickling runs code: with a signing key, nothing unsigned or tampered is unpickled."""

import os
import pickle

import pytest

from streamproc.adapters.checkpoint_signing import sign, verified_payload
from streamproc.adapters.memory import InMemoryModelStore
from streamproc.config import model_config
from streamproc.domain.models import ModelBundle
from streamproc.ports import UntrustedCheckpoint
from streamproc.settings import Settings

KEY = b"k" * 32


class Planted:
    """What an attacker with write access to Redis would store: unpickling it runs a command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_signed_checkpoint_round_trips_and_any_change_is_refused():
    payload = ModelBundle(model_config(Settings())).dumps()
    blob = sign(KEY, 7, payload)
    assert verified_payload(KEY, 7, blob) == payload
    assert isinstance(ModelBundle.loads(verified_payload(KEY, 7, blob)), ModelBundle)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(UntrustedCheckpoint, match="does not match"):
        verified_payload(KEY, 7, tampered)
    with pytest.raises(UntrustedCheckpoint, match="does not match"):  # a genuine v7 stored as v9: a silent rollback
        verified_payload(KEY, 9, blob)
    with pytest.raises(UntrustedCheckpoint, match="does not match"):
        verified_payload(b"another key", 7, blob)
    with pytest.raises(UntrustedCheckpoint, match="not signed"):
        verified_payload(KEY, 7, payload)
    assert verified_payload(None, 7, blob) == payload  # without a key nothing is checked: both forms load
    assert verified_payload(None, 7, payload) == payload


def test_a_planted_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    evil = pickle.dumps(Planted(str(marker)))
    for blob in (evil, sign(b"the attacker's key", 3, evil), b"spck1" + b"\0" * 32 + evil):
        with pytest.raises(UntrustedCheckpoint):
            ModelBundle.loads(verified_payload(KEY, 3, blob))
    assert not marker.exists()
    pickle.loads(evil)  # the same bytes, unpickled unchecked, do run: the refusal above is what stopped them
    assert marker.exists()


async def test_the_newest_trusted_checkpoint_is_what_is_left_to_serve():
    store = InMemoryModelStore()
    bundle = ModelBundle(model_config(Settings()))
    assert await store.save(bundle, keep=5) == 1
    assert await store.save(bundle, keep=5) == 2
    store.blobs[3] = b"not a checkpoint"
    store.current = 3

    async def refusing(version=None):  # the Redis store raises this for a blob whose signature does not hold
        if (version or store.current) == 3:
            raise UntrustedCheckpoint("checkpoint v3 is not signed")
        return await InMemoryModelStore.load(store, version)

    store.load = refusing  # type: ignore[method-assign]
    trusted = await store.newest_trusted(below=3)
    assert trusted is not None and trusted.version == 2
    assert (await store.newest_trusted()).version == 2  # skipping the refused one
