"""Topic → worker → Redis → DLQ on the real broker and Redis, with a real worker process."""

import base64
import itertools

import orjson
import pytest
import redis

from streamproc.adapters.feature_rows import read_features, stored_customer_key
from streamproc.tools.demo import processed_total
from streamproc.tools.tail import read_topic
from tests.conftest import produce, wait_delivered

pytestmark = pytest.mark.integration
T0 = 1_767_261_600_000


def click(i, cid, ts=T0, action="product_view"):
    return {"event_id": f"{cid}-e{i}", "customer_id": cid, "ts": ts + i * 1000, "session_id": f"{cid}-s",
            "action": action, "product_id": "p1", "category": "books"}


def purchase(i, cid, amount, kind="purchase"):
    return {"event_id": f"{cid}-t{i}", "customer_id": cid, "ts": T0 + i * 1000, "order_id": f"{cid}-o{i}",
            "type": kind, "amount": amount, "currency": "EUR",
            "items": [{"product_id": "p1", "category": "books", "quantity": 1, "unit_price": amount}]}


BAD = {  # reason -> (topic, payload)
    "invalid_json": ("clicks", b'{"event_id": "x",'),
    "empty_payload": ("clicks", b""),
    "not_an_object": ("transactions", b"[1,2,3]"),
    "validation": ("transactions", orjson.dumps({**purchase(99, "bad", 10.0), "amount": -3})),
    "payload_too_large": ("clicks", orjson.dumps({**click(98, "bad"), "query": "q" * 70_000})),
    "future_timestamp": ("clicks", orjson.dumps({**click(97, "bad"), "ts": 4_102_444_800_000})),
    "absurd_timestamp": ("clicks", orjson.dumps({**click(96, "bad"), "ts": 5})),
}


@pytest.mark.parametrize("fast_consumer", ["true", "false"], ids=["bulk-delivery", "stock-consumer"])
def test_valid_events_land_in_redis_and_bad_ones_in_the_dlq(topics, worker_factory, fast_consumer):
    settings = topics
    valid = []
    for c in range(20):
        cid = f"cust{c}"
        valid += [("clicks", cid.encode(), orjson.dumps(click(i, cid))) for i in range(5)]
        valid += [("transactions", cid.encode(), orjson.dumps(purchase(1, cid, 10.0 + c)))]
    valid.append(("transactions", b"cust0", orjson.dumps(purchase(2, "cust0", 4.0, "refund"))))
    # a producer retry: the same event again at a new offset
    valid.append(("clicks", b"cust1", orjson.dumps(click(0, "cust1"))))
    bad = [(topic, b"bad", payload) for topic, payload in BAD.values()]
    produce(settings, valid + bad)

    worker = worker_factory()
    worker.extra_env["STREAMPROC_FAST_CONSUMER"] = fast_consumer  # both input paths meet the same contract
    worker.start()
    metrics = worker.wait_processed(len(valid) + len(bad))
    assert metrics['streamproc_events_processed_total{outcome="duplicate",topic="clicks"}'] == 1
    delivery = "bulk (streamproc://)" if fast_consumer == "true" else "Faust's stock consumer"
    assert f"input delivery: {delivery}" in worker.log_tail(200_000)

    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)

    def feats(cid):
        return read_features(r, cid)

    f0 = feats("cust0")
    assert f0["clicks"] == 5 and f0["frequency"] == 1 and f0["refunds"] == 1
    assert f0["monetary_total"] == 6.0
    assert feats("cust1")["clicks"] == 5
    assert feats("cust19")["monetary_total"] == 29.0
    assert not r.exists(stored_customer_key(r, "bad"))

    wait_delivered(settings)
    letters = read_topic(settings, "streamproc-dlq", 100, 5.0)
    by_reason = {d["reason"]: d for d in letters}
    assert sorted(by_reason) == sorted(BAD)
    for reason, (topic, payload) in BAD.items():
        letter = by_reason[reason]
        assert letter["source_topic"] == settings.topic(topic)
        assert base64.b64decode(letter["value_b64"] or "") == payload, reason
        assert letter["detail"]
    for reason in BAD:
        assert metrics[f'streamproc_dlq_records_total{{reason="{reason}"}}'] == 1

    # the HTTP lookup serves the same features
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/customers/cust0") as resp:
        assert json.loads(resp.read())["features"]["frequency"] == 1

    # erasure through the API
    req = urllib.request.Request(f"http://127.0.0.1:{settings.web_port}/customers/cust19", method="DELETE")
    with urllib.request.urlopen(req) as resp:
        assert json.loads(resp.read()) == {"erased": True}
    assert not r.exists(stored_customer_key(r, "cust19"))
    assert worker.metrics()["streamproc_customers_erased_total"] == 1


def test_restarting_the_worker_does_not_reprocess_committed_events(topics, worker_factory):
    settings = topics
    first = [("clicks", f"c{c}".encode(), orjson.dumps(click(i, f"c{c}"))) for c in range(10) for i in range(10)]
    produce(settings, first)
    worker = worker_factory().start()
    worker.wait_processed(len(first))
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    def clicks(c):
        return read_features(r, f"c{c}")["clicks"]

    before = {c: clicks(c) for c in range(10)}
    assert set(before.values()) == {10}
    import time

    time.sleep(2.5)  # let an offset commit happen (broker_commit_interval = 1 s)
    worker.stop()  # graceful: commits

    second = [("clicks", b"c0", orjson.dumps(click(100 + i, "c0"))) for i in range(3)]
    produce(settings, second)
    again = worker_factory().start()
    metrics = again.wait_processed(len(second))
    time.sleep(1.0)
    metrics = again.metrics()
    # only the new events were consumed: nothing was re-read, so nothing was even replayed
    assert processed_total(metrics) == len(second)
    assert metrics['streamproc_events_processed_total{outcome="applied",topic="clicks"}'] == 3
    assert read_features(r, "c0")["clicks"] == 13
    # nobody else's counts moved (the sweep may refresh time-driven features, never counts)
    assert {c: clicks(c) for c in range(1, 10)} == {c: before[c] for c in range(1, 10)}


def test_the_lookup_endpoint_can_require_a_bearer_token(topics, worker_factory):
    import json
    import urllib.error
    import urllib.request

    from pydantic import SecretStr

    settings = topics.model_copy(update={"http_token": SecretStr("s3cret-token")})
    produce(settings, [("clicks", b"c1", orjson.dumps(click(0, "c1")))])
    worker = worker_factory(settings)
    worker.extra_env = {"STREAMPROC_HTTP_TOKEN": "s3cret-token"}
    worker.start()
    worker.wait_processed(1)
    url = f"http://127.0.0.1:{settings.web_port}/customers/c1"
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(url)
    assert denied.value.code == 401
    wrong = urllib.request.Request(url, headers={"Authorization": "Bearer nope"})
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(wrong)
    ok = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret-token"})
    with urllib.request.urlopen(ok) as resp:
        assert json.loads(resp.read())["features"]["clicks"] == 1
    assert "s3cret-token" not in worker.log_tail(100_000)


def test_a_worker_started_before_its_topics_exist_waits_for_them(settings, tmp_path):
    import time

    from streamproc.topics import apply_topics
    from tests.conftest import WorkerProcess

    worker = WorkerProcess(settings, tmp_path / "worker.log").start()  # a fresh prefix: no topics yet
    try:
        time.sleep(4)
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
        assert "waiting for topics" in worker.log_tail(10**7)
        assert apply_topics(settings).ok
        produce(settings, [("clicks", b"c1", orjson.dumps(click(i, "c1"))) for i in range(5)])
        worker.wait_processed(5, timeout=90)
        client = redis.Redis.from_url(settings.redis_url)
        assert client.exists(stored_customer_key(client, "c1"))
    finally:
        worker.stop(9)


def test_a_backlog_drained_in_bulk_raises_no_stream_health_errors(topics, worker_factory):
    """Faust's health check logs "Stream has not started processing TP" for a partition with a backlog that no
    stream took records of; the bulk reader bypasses the stream, so it reports what it takes. With a 2 s timeout
    the check runs during the drain (it logged such errors before the reader reported)."""
    from streamproc.tools.simulate import SimulationConfig, Simulator

    payloads = list(itertools.islice(Simulator(SimulationConfig(customers=5000, days=90, seed=3)).payloads(), 60_000))
    produce(topics, payloads)
    worker = worker_factory()
    worker.extra_env = {"STREAMPROC_STREAM_PROCESSING_TIMEOUT_S": "2"}
    worker.start()
    assert len(payloads) == 60_000  # a backlog of ~10 s: long enough for the 2 s check to run while it drains
    worker.wait_processed(len(payloads), timeout=300)
    log = worker.log_path.read_text(errors="replace")
    assert "Stream has not started processing" not in log
