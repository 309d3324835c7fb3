"""The pipeline's fingerprint: a fixed simulated history through the in-process batch step and trainer
(``run_offline``: the worker's step, an in-memory store, a checkpoint every few batches), digested.

A refactoring must leave the digest unchanged; a change of behaviour changes it, and the commit that changes it
says why and updates ``FINGERPRINT`` (``python -m tests.unit.test_fingerprint`` prints the new value, and the
part digests that tell which kind of output moved). pytest runs it under a random hash seed: a result that
depends on the iteration order of a set of strings fails here (River's KMeans did, ``SeededKMeans``)."""

from __future__ import annotations

import asyncio
import hashlib

import orjson

from streamproc.pipeline.records import BatchResult
from streamproc.settings import Settings
from streamproc.tools.simulate import SimulationConfig, Simulator
from streamproc.training.offline import run_offline

HISTORY = SimulationConfig(customers=800, days=200, seed=2026, bad_fraction=0.01, duplicate_fraction=0.01)
FINGERPRINT = "a5a72b64e9e4143b3abfb9b0ebcb9c1c1eaeabddafb2ffb46643335d6080ff70"


def _digest(items: list[bytes]) -> str:
    h = hashlib.sha256()
    for item in sorted(items):  # sorted: the parts are compared as sets of records, whatever their order
        h.update(len(item).to_bytes(8, "big"))
        h.update(item)
    return h.hexdigest()


def _canonical(record: object) -> bytes:
    """The record as JSON with its keys sorted at every level (orjson sorts a dict's, not a dataclass's: the
    record is read back as dicts first)."""
    return orjson.dumps(orjson.loads(orjson.dumps(record)), option=orjson.OPT_SORT_KEYS)


async def fingerprint_parts() -> dict[str, str]:
    payloads = list(Simulator(HISTORY).payloads())
    outputs = BatchResult()
    bundle, _, store = await run_offline(payloads, Settings(), batch=1000, on_result=outputs.absorb)
    return {
        "state blobs": _digest([cid.encode() + b"\0" + blob for cid, (_, blob, _) in store.rows.items()]),
        "feature rows": _digest([cid.encode() + b"\0" + row for cid, (_, _, row) in store.rows.items()]),
        "alerts": _digest([_canonical(a) for a in outputs.alerts]),
        "recommendations": _digest([_canonical(r) for r in outputs.recommendations]),
        "segment moves": _digest([_canonical(m) for m in outputs.segment_moves]),
        "training examples": _digest([_canonical(e) for e in outputs.examples]),
        "dead letters": _digest([_canonical(d.model_dump(mode="json")) for d in outputs.dead_letters]),
        "model": hashlib.sha256(bundle.dumps()).hexdigest(),
    }


def combined(parts: dict[str, str]) -> str:
    return hashlib.sha256(_canonical(parts)).hexdigest()


async def test_the_pipeline_computes_what_it_computed_when_the_fingerprint_was_committed() -> None:
    parts = await fingerprint_parts()
    assert combined(parts) == FINGERPRINT, parts


if __name__ == "__main__":
    found = asyncio.run(fingerprint_parts())
    for name, value in found.items():
        print(f"{name:<18} {value}")
    print(f"FINGERPRINT = {combined(found)!r}")
