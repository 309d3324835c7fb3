"""Nothing a producer sends, and no failure downstream, stops a partition: on the real broker and Redis, each bad
record or refused output is dead-lettered and a valid event sent after it is applied within a bounded time; a
failure nothing can be isolated from stops the worker with a clear error and a non-zero exit."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import orjson
import pytest
import redis
from jsonschema import Draft202012Validator, FormatChecker
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from streamproc.adapters.feature_rows import read_features
from streamproc.contracts.outputs import OUTPUT_SCHEMA_VERSION
from streamproc.runtime.app import FATAL_EXIT_CODE
from streamproc.tools.demo import metric_total
from streamproc.tools.simulate import SimulationConfig, Simulator
from streamproc.tools.tail import read_topic
from streamproc.topics import SCHEMAS_DIR, load_specs
from tests.conftest import FROZEN_MODEL_ENV, produce, seed_checkpoint, wait_delivered
from tests.integration.test_faults import own_redis

pytestmark = pytest.mark.integration

T0 = 1_767_261_600_000
BOUND_S = 60.0  # a valid event sent after a bad one is applied within this long
BROKER_MAX_VALUE = 1_048_000  # the broker's message.max.bytes (1,048,588) less a record batch's overhead


def click(cid: str, i: int, **over: object) -> bytes:
    return orjson.dumps({"event_id": f"{cid}-c{i}", "customer_id": cid, "ts": T0 + i * 1000, "session_id": "s",
                         "action": "product_view", "product_id": "p1", "category": "books", **over})


def purchase(cid: str, i: int, **over: object) -> bytes:
    return orjson.dumps({"event_id": f"{cid}-t{i}", "customer_id": cid, "ts": T0 + i * 1000, "order_id": f"o{i}",
                         "type": "purchase", "amount": 10.0, "currency": "EUR",
                         "items": [{"product_id": "p1", "category": "books", "quantity": 1, "unit_price": 10.0}],
                         **over})


def wait_features(settings, cid: str, done, timeout: float = BOUND_S) -> dict:
    """The customer's stored features once ``done(features)`` holds (fails after ``timeout``)."""
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout
    feats: dict | None = None
    try:
        while time.monotonic() < deadline:
            feats = read_features(r, cid)
            if feats is not None and done(feats):
                return feats
            time.sleep(0.3)
    finally:
        r.close()
    raise AssertionError(f"{cid}: not applied within {timeout}s (features: {feats})")


def letters(settings, **match: object) -> list[dict]:
    return [d for d in read_topic(settings, "streamproc-dlq", 10_000, 3.0)
            if all(d.get(k) == v for k, v in match.items())]


def test_a_record_at_the_broker_maximum_size_on_each_input_is_dead_lettered_and_the_partition_goes_on(
        topics, worker_factory):
    settings = topics
    worker = worker_factory().start()
    worker.wait_ready()
    huge = {"clicks": b'{"query": "' + b"q" * (BROKER_MAX_VALUE - 14) + b'"}',
            "transactions": b"\xff" * BROKER_MAX_VALUE}  # not even UTF-8
    produce(settings, [("clicks", b"big", huge["clicks"]), ("transactions", b"big", huge["transactions"])])
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline and metric_total(worker.metrics(), "streamproc_events_consumed_total") < 2:
        time.sleep(0.2)
    # then valid events of the same customer (same partitions), in later batches: a batch stuck on the huge
    # records' dead letters (as before the fix: the letter was over the producer's limit, retried forever) would
    # hold them back
    produce(settings, [("clicks", b"big", click("big", 1)), ("transactions", b"big", purchase("big", 2))])
    wait_features(settings, "big", lambda f: f["clicks"] == 1 and f["frequency"] == 1)

    by_topic = {d["source_topic"]: d for d in letters(settings, reason="payload_too_large")}
    assert sorted(by_topic) == sorted(settings.topic(t) for t in huge)
    for topic, value in huge.items():
        letter = by_topic[settings.topic(topic)]
        # bounded: no copy of the bytes, but what finds and checks the original on its input topic
        assert letter["value_b64"] is None and letter["value_size"] == len(value)
        assert letter["value_sha256"] == hashlib.sha256(value).hexdigest()
        assert letter["offset"] is not None and letter["partition"] is not None
        assert base64.b64decode(letter["key_b64"]) == b"big"
        assert 0 < len(letter["value_preview"]) <= 1000
        assert len(orjson.dumps(letter)) < 20_000
    assert by_topic[settings.topic("clicks")]["value_preview"].startswith('{"query": "qqq')
    assert worker.metrics()['streamproc_dlq_records_total{reason="payload_too_large"}'] == 2


def _set_topic_config(settings, topic: str, **configs: str) -> None:
    spec = load_specs()[topic]
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:  # alter_configs replaces the topic's settings: keep the declared ones
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, settings.topic(topic),
                                            configs={**spec.configs(), **configs})])
    finally:
        admin.close()


def test_outputs_the_broker_refuses_are_dead_lettered_and_the_partition_goes_on(topics, worker_factory):
    settings = topics
    history = list(Simulator(SimulationConfig(customers=60, days=30, seed=5)).payloads())
    seed_checkpoint(settings, history)  # a model, so purchases publish recommendations
    _set_topic_config(settings, "recommendations", **{"max.message.bytes": "100"})  # refuses every one
    worker = worker_factory()
    worker.extra_env = dict(FROZEN_MODEL_ENV)
    worker.start()
    produce(settings, [("transactions", b"buyer", purchase("buyer", 1))])
    wait_features(settings, "buyer", lambda f: f["frequency"] == 1)
    produce(settings, [("transactions", b"buyer", purchase("buyer", 2)), ("clicks", b"buyer", click("buyer", 3))])
    wait_features(settings, "buyer", lambda f: f["frequency"] == 2 and f["clicks"] == 1)

    deadline = time.monotonic() + BOUND_S
    rejected: list[dict] = []
    while time.monotonic() < deadline and len(rejected) < 2:
        rejected = letters(settings, reason="output_rejected", source_topic=settings.topic("recommendations"))
    assert {d["dlq_id"] for d in rejected} >= {f"output:{settings.topic('recommendations')}:buyer:purchase:buyer-t1",
                                               f"output:{settings.topic('recommendations')}:buyer:purchase:buyer-t2"}
    letter = rejected[0]
    assert "MessageSizeTooLarge" in letter["detail"] or "RecordTooLarge" in letter["detail"], letter["detail"]
    assert letter["partition"] is None and letter["offset"] is None
    assert orjson.loads(base64.b64decode(letter["value_b64"]))["customer_id"] == "buyer"  # the whole output
    assert read_topic(settings, "recommendations", 100, 1.0) == []
    metrics = worker.metrics()
    assert metrics['streamproc_dlq_records_total{reason="output_rejected"}'] >= 2
    assert worker.proc is not None and worker.proc.poll() is None


def test_an_event_whose_processing_raises_is_dead_lettered_and_the_rest_applied(topics, worker_factory):
    settings = topics
    worker = worker_factory()
    worker.extra_env = {"STREAMPROC_FAULT_INJECT_EVENT_ID": "poison-c2"}  # the test hook: this event's step raises
    worker.start()
    produce(settings, [("clicks", b"poison", click("poison", 1)), ("clicks", b"poison", click("poison", 2)),
                       ("clicks", b"poison", click("poison", 3)), ("clicks", b"other", click("other", 1))])
    # the same customer's events on either side of it are applied; the poison one only dead-lettered
    wait_features(settings, "poison", lambda f: f["clicks"] == 2)
    wait_features(settings, "other", lambda f: f["clicks"] == 1)
    produce(settings, [("clicks", b"poison", click("poison", 4))])
    feats = wait_features(settings, "poison", lambda f: f["clicks"] == 3)
    assert feats["last_event_ts"] == T0 + 4000
    (letter,) = letters(settings, reason="processing_error")
    assert "InjectedFault" in letter["detail"]
    assert orjson.loads(base64.b64decode(letter["value_b64"]))["event_id"] == "poison-c2"
    assert worker.metrics()['streamproc_dlq_records_total{reason="processing_error"}'] == 1


def fatal_exit_log(worker) -> str:
    """Wait (``BOUND_S``) for a worker to stop with the fatal exit code; its log."""
    assert worker.proc is not None
    try:
        code = worker.proc.wait(BOUND_S)
    except Exception as exc:
        raise AssertionError("the worker kept running:\n" + worker.log_tail()) from exc
    assert code == FATAL_EXIT_CODE, worker.log_tail()
    return worker.log_tail(200_000)


def test_a_failure_nothing_can_be_isolated_from_stops_the_worker_with_a_clear_error(topics, worker_factory, tmp_path):
    """Redis refuses the worker's scripts (an ACL without @scripting): every batch step fails the same way, so the
    worker must not spin on it: a few attempts, then a non-zero exit naming the error."""
    own, service = own_redis(topics, tmp_path / "noscript")
    service.up(extra_args=["--user", "default", "on", "nopass", "~*", "&*", "+@all", "-@scripting"])
    try:
        produce(own, [("clicks", b"c1", click("c1", 1))])
        log = fatal_exit_log(worker_factory(own).start())
        assert "NoPermissionError" in log and "failed 3 times" in log, log[-3000:]
        # three attempts: two retried, the third ends the worker (and nothing is tried after it)
        assert log.count("batch of 1 failed") == 2 and log.count("stopping the worker") == 1
    finally:
        service.down()


def test_every_output_record_of_a_run_honours_its_published_schema(topics, worker_factory):
    """Alerts, recommendations, segment moves, training batches and dead letters, as a run with a model publishes
    them, each validated against its JSON Schema in streamproc/contracts/schemas/."""
    settings = topics
    sim = SimulationConfig(customers=150, days=120, seed=11, bad_fraction=0.02)
    history = list(Simulator(sim).payloads())
    seed_checkpoint(settings, history)
    produce(settings, history)
    worker = worker_factory()
    worker.extra_env = dict(FROZEN_MODEL_ENV)
    worker.start()
    worker.wait_processed(len(history), timeout=180)
    wait_delivered(settings)
    specs = load_specs()
    seen = {}
    for name in ("churn-alerts", "recommendations", "segment-moves", "streamproc-training", "streamproc-dlq"):
        schema = json.loads(Path(SCHEMAS_DIR / f"{specs[name].schema}.schema.json").read_text())
        validator = Draft202012Validator(schema, format_checker=FormatChecker())
        records = read_topic(settings, name, 100_000, 3.0)
        seen[name] = len(records)
        for record in records:
            errors = [e.message for e in validator.iter_errors(record)]
            assert not errors, (name, errors[:3], str(record)[:300])
            assert record["schema_version"] == OUTPUT_SCHEMA_VERSION
    assert all(seen[name] > 0 for name in ("churn-alerts", "recommendations", "streamproc-training",
                                           "streamproc-dlq")), seen


def test_a_worker_refuses_a_redis_laid_out_for_another_partition_count(topics, worker_factory):
    """The partition count is part of the storage layout: against state laid out for 8 input partitions, a worker
    whose topics have 4 stops before applying anything, saying why and how to move."""
    client = redis.Redis.from_url(topics.redis_url)
    try:
        client.hset("sp:layout", mapping={"version": 2, "partitions": 8})
        produce(topics, [("clicks", b"c1", click("c1", 1))])
        log = fatal_exit_log(worker_factory().start())
        assert "laid out for 8 input partitions" in log and "have 4" in log and "Changing the partition count" in log
        assert not list(client.scan_iter("cust:*"))  # nothing was applied
    finally:
        client.close()
