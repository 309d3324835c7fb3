"""The peers of ``bench/peers/`` do the same work as streamproc's feature path: on one simulated history (with
duplicates and bad records), the job every peer runs (``bench/peers/features_job.py``) gives each customer the same
purchases, net spend and sessions as streamproc's own fold."""

from __future__ import annotations

import sys

import orjson

from streamproc.adapters.memory import InMemoryFeatureStore
from streamproc.domain.customer import FoldConfig
from streamproc.domain.events import DecodeLimits
from streamproc.metrics import Metrics
from streamproc.pipeline.records import RawRecord
from streamproc.pipeline.step import BatchProcessor
from streamproc.ports import CustomerRef
from streamproc.settings import PROJECT_ROOT
from streamproc.tools.simulate import SimulationConfig, Simulator

sys.path.insert(0, str(PROJECT_ROOT / "bench" / "peers"))

from features_job import update

COMPARED = ("frequency", "monetary_total", "sessions")


async def test_the_peer_job_computes_what_streamproc_computes():
    payloads = list(Simulator(SimulationConfig(customers=60, days=120, seed=8, duplicate_fraction=0.03)).payloads())
    store = InMemoryFeatureStore()
    processor = BatchProcessor(store, Metrics(), DecodeLimits(), FoldConfig(allowed_lateness_ms=10 * 86_400_000))
    records = [RawRecord(topic, topic, 0, offset, key, value, _stamp(value))
               for offset, (topic, key, value) in enumerate(payloads)]
    for start in range(0, len(records), 500):
        await processor.process(records[start:start + 500])

    peer: dict[str, dict] = {}
    for _, _, value in payloads:
        try:
            event = orjson.loads(value)
            cid = event["customer_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        if "ts" not in event or "event_id" not in event:
            continue  # bad input, skipped by every peer
        peer[cid] = update(peer.get(cid), event)

    assert len(peer) >= 50
    compared = 0
    for cid, state in peer.items():
        ours = await store.features(CustomerRef(0, cid))
        assert ours is not None, cid
        theirs = {"frequency": state["frequency"], "monetary_total": round(state["monetary_total"], 2),
                  "sessions": state["sessions"]}
        assert {k: ours[k] for k in COMPARED} == theirs, cid
        compared += state["frequency"] > 0
    assert compared >= 30, "too few buyers for the comparison to mean much"


def _stamp(value: bytes) -> int:
    try:
        return int(orjson.loads(value)["ts"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1_767_225_600_000
