"""Random and adversarial payloads on the real input topics: every one is applied or dead-lettered, the
worker stays up, and the dead-letter count equals the count of invalid inputs."""

from __future__ import annotations

import math
import time

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamproc.config import decode_limits
from streamproc.domain.events import Rejection, decode_event
from streamproc.tools.demo import processed_total
from streamproc.tools.tail import read_topic
from tests.conftest import produce, wait_delivered

pytestmark = [pytest.mark.integration, pytest.mark.faults]

NOW = int(time.time() * 1000)
DAY = 86_400_000

ids = st.text(min_size=1, max_size=12)
weird_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\u0000", "\u202e", "\ufeff", "👩‍👩‍👧", "e\u0301", "\U0010ffff", "x" * 300]),
)
timestamps = st.one_of(
    st.integers(NOW - 30 * DAY, NOW),  # plausible
    st.integers(0, 900_000_000_000),  # ancient (before 2000)
    st.integers(NOW + 30 * DAY, NOW + 3000 * DAY),  # far future
    st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "yesterday", ""]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(), st.booleans(),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    weird_text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(weird_text, inner,
                                                                                                  max_size=3),
                           max_leaves=8)
items = st.fixed_dictionaries({
    "product_id": ids, "category": ids, "quantity": st.one_of(st.integers(-2, 20), st.just("1")),
    "unit_price": st.one_of(st.floats(min_value=0, max_value=500, allow_nan=False), st.just(-1.0)),
})
clicks = st.fixed_dictionaries(
    {"event_id": ids, "customer_id": st.sampled_from(["c1", "c2", "c3"]) | ids, "ts": timestamps,
     "session_id": ids, "action": st.sampled_from(["page_view", "product_view", "add_to_cart", "teleport"])},
    optional={"product_id": ids, "category": ids, "query": weird_text, "duration_s": st.floats(),
              "unexpected": json_values},
)
transactions = st.fixed_dictionaries(
    {"event_id": ids, "customer_id": st.sampled_from(["c1", "c2", "c3"]) | ids, "ts": timestamps,
     "order_id": ids, "type": st.sampled_from(["purchase", "refund", "chargeback"]),
     "amount": st.one_of(st.floats(min_value=0, max_value=1e4, allow_nan=False), st.just(-5.0)),
     "currency": st.sampled_from(["EUR", "USD", "eur", "EURO"]), "items": st.lists(items, max_size=4)},
)


def encoded(value: object) -> bytes:
    # orjson refuses NaN/Infinity; write them the way a sloppy producer would
    try:
        return orjson.dumps(value)
    except TypeError:
        return repr(value).encode()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


payloads = st.one_of(
    st.tuples(st.just("clicks"), clicks.map(encoded)),
    st.tuples(st.just("transactions"), transactions.map(encoded)),
    st.tuples(st.sampled_from(["clicks", "transactions"]), st.one_of(
        st.binary(max_size=64),  # random bytes, mostly invalid UTF-8 / JSON
        st.just(b""),
        json_values.map(encoded),
        st.integers(100, 3000).map(nested),  # deep nesting
        st.just(b'{"event_id": "x", "ts": NaN}'),
        st.just(b'{"event_id": "x", "ts": Infinity}'),
        st.tuples(st.sampled_from(["x", "é", "😀"]), st.integers(66_000, 90_000)).map(  # huge
            lambda cn: orjson.dumps({"event_id": cn[0] * cn[1]})),
        st.just(b"\xff\xfe\x00{}"),
    )),
)


def test_fuzzed_payloads_are_applied_or_dead_lettered_and_counted(topics, worker_factory):
    collected: list[tuple[str, bytes]] = []

    @settings(max_examples=400, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(payloads)
    def collect(payload: tuple[str, bytes]) -> None:
        collected.append(payload)

    collect()
    limits = decode_limits(topics)
    produced_at = int(time.time() * 1000)
    expected_invalid = sum(isinstance(decode_event(kind, value, limits, produced_at), Rejection)
                           for kind, value in collected)
    assert 0 < expected_invalid < len(collected), "the fuzz must mix valid and invalid input"

    produce(topics, [(kind, f"k{i % 7}".encode(), value) for i, (kind, value) in enumerate(collected)])
    worker = worker_factory(topics).start()
    metrics = worker.wait_processed(len(collected), timeout=120)
    time.sleep(1)
    assert worker.proc is not None and worker.proc.poll() is None, "the worker must stay up"
    wait_delivered(topics)
    letters = read_topic(topics, "streamproc-dlq", 100_000, 3.0)
    assert len({letter["dlq_id"] for letter in letters}) == expected_invalid
    dead = sum(v for k, v in metrics.items() if k.startswith("streamproc_dlq_records_total"))
    assert dead == expected_invalid
    assert processed_total(metrics) == len(collected)
    assert all(letter["reason"] != "processing_error" for letter in letters), "no valid event may crash the fold"
    assert not any(math.isnan(v) for v in metrics.values())
