"""Faults for real: Redis goes away under a running worker, and comes back."""

from __future__ import annotations

import time

import pytest
import redis

from streamproc.adapters.feature_rows import decode_feature_row, feature_names_from, partition_key
from streamproc.tools.demo import processed_total
from streamproc.tools.infra import RedisService
from streamproc.tools.producer import EventProducer
from streamproc.tools.simulate import SimulationConfig, Simulator
from tests.conftest import free_port, produce

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def applied_events(url: str) -> int:
    r = redis.Redis.from_url(url)
    try:
        total = 0
        names_of = feature_names_from(r)
        for key in r.scan_iter("cust:*", count=1000):
            f = decode_feature_row(r.hget(key, "f"), names_of)
            total += f["clicks"] + f["frequency"] + f["refunds"]
        return total
    finally:
        r.close()


def own_redis(settings, state_dir):
    """Settings pointing at a Redis of the test's own (so it can be stopped or locked down without
    disturbing the other tests), and its service handle (not started)."""
    port = free_port()
    own = settings.model_copy(update={"redis_port": port, "redis_url": f"redis://127.0.0.1:{port}/0",
                                      "state_dir": state_dir})
    return own, RedisService(own)


def test_redis_restart_loses_nothing_and_counts_nothing_twice(topics, worker_factory, tmp_path):
    own, service = own_redis(topics, tmp_path / "own")
    service.up()
    try:
        payloads = list(Simulator(SimulationConfig(customers=120, days=60, seed=17)).payloads())
        first, second = payloads[: len(payloads) // 2], payloads[len(payloads) // 2 :]
        producer = EventProducer(own)
        for topic, key, value in first:
            producer.send(topic, key, value)
        producer.flush()
        worker = worker_factory(own).start()
        worker.wait_processed(len(first) // 2)

        service.down()  # graceful: Redis writes its append-only file
        for topic, key, value in second:
            producer.send(topic, key, value)
        producer.close()
        time.sleep(6)  # the worker keeps failing, backing off and not acking
        assert worker.proc is not None and worker.proc.poll() is None, "the worker must stay up"
        errors = worker.metrics().get("streamproc_redis_errors_total", 0)
        assert errors >= 1

        service.up()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if applied_events(own.redis_url) == len(payloads):
                break
            time.sleep(1)
        assert applied_events(own.redis_url) == len(payloads)  # nothing lost, nothing twice
        assert processed_total(worker.metrics()) >= len(payloads)
    finally:
        service.down()


def test_redis_unreachable_at_start_the_worker_waits_then_applies_everything(topics, worker_factory, tmp_path):
    own, service = own_redis(topics, tmp_path / "late")  # not started yet
    try:
        payloads = list(Simulator(SimulationConfig(customers=60, days=30, seed=29)).payloads())
        produce(own, payloads)
        worker = worker_factory(own).start()
        worker.wait_ready()
        time.sleep(5)
        assert worker.proc is not None and worker.proc.poll() is None, "the worker must wait for Redis, not die"
        assert worker.metrics().get("streamproc_redis_errors_total", 0) >= 1
        assert processed_total(worker.metrics()) == 0  # nothing applied, so nothing acked

        service.up()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and applied_events(own.redis_url) < len(payloads):
            time.sleep(1)
        assert applied_events(own.redis_url) == len(payloads)
    finally:
        service.down()


def test_a_password_protected_redis_with_an_acl_user(topics, worker_factory, tmp_path):
    own, service = own_redis(topics, tmp_path / "acl")
    service.up(extra_args=["--requirepass", "admin-pw", "--user", "streamproc", "on", ">worker-pw", "~*", "&*",
                           "+@all"])
    try:
        plain = redis.Redis(port=own.redis_port)
        with pytest.raises(redis.AuthenticationError):
            plain.ping()
        plain.close()
        payloads = list(Simulator(SimulationConfig(customers=20, days=10, seed=3)).payloads())
        produce(own, payloads)
        worker = worker_factory(own)
        worker.extra_env = {"STREAMPROC_REDIS_USERNAME": "streamproc", "STREAMPROC_REDIS_PASSWORD": "worker-pw"}
        worker.start()
        worker.wait_processed(len(payloads))
        authed = f"redis://streamproc:worker-pw@127.0.0.1:{own.redis_port}/0"
        assert applied_events(authed) == len(payloads)
        assert "worker-pw" not in worker.log_tail(1_000_000)
    finally:
        service.down()


def own_kafka(settings, state_dir):
    """Settings pointing at a broker of the test's own (so it can be stopped without disturbing the other
    tests), and its service handle (not started)."""
    from streamproc.tools.infra import KafkaService

    port, controller = free_port(), free_port()
    own = settings.model_copy(update={"kafka_port": port, "kafka_controller_port": controller,
                                      "kafka_bootstrap": f"127.0.0.1:{port}", "kafka_heap": "512m",
                                      "state_dir": state_dir})
    return own, KafkaService(own)


def test_kafka_broker_restart_loses_nothing_and_counts_nothing_twice(settings, worker_factory, tmp_path):
    from streamproc.topics import apply_topics

    own, broker = own_kafka(settings, tmp_path / "own-kafka")
    broker.up()
    try:
        assert apply_topics(own).ok
        payloads = list(Simulator(SimulationConfig(customers=120, days=60, seed=19)).payloads())
        first, second = payloads[: len(payloads) // 2], payloads[len(payloads) // 2 :]
        produce(own, first)
        worker = worker_factory(own).start()
        worker.wait_processed(len(first) // 3, timeout=90)

        broker.down()  # the broker goes away mid-stream
        time.sleep(8)
        assert worker.proc is not None and worker.proc.poll() is None, "the worker must wait, not die"
        broker.up()
        produce(own, second)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and applied_events(own.redis_url) < len(payloads):
            assert worker.proc.poll() is None, worker.log_tail()
            time.sleep(1)
        time.sleep(2)
        assert applied_events(own.redis_url) == len(payloads)  # nothing lost, nothing twice
    finally:
        broker.down()


def test_outputs_parked_by_a_dead_worker_are_sent_without_waiting_for_new_input(topics, worker_factory):
    """A worker can die after its batch's input was committed and before the broker acknowledged the outputs
    (they are confirmed in the background): whoever owns the partition next sends what is parked, also when no
    more input ever comes for it."""
    import orjson

    from streamproc.tools.tail import read_topic

    r = redis.Redis.from_url(topics.redis_url)
    alert = {"alert_id": "parked:1", "customer_id": "parked", "ts": 1, "probability": 0.9, "risk_level": "high",
             "value_tier": "low"}
    rec = {"recommendation_id": "parked:purchase:e1", "customer_id": "parked", "ts": 1, "trigger": "purchase",
           "items": []}
    r.hset(partition_key(2, "outbox"), "parked:7", orjson.dumps({"a": [alert], "s": [], "e": [], "r": [rec], "d": []}))
    worker = worker_factory(topics).start()
    worker.wait_ready()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and r.hlen(partition_key(2, "outbox")):
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
        time.sleep(0.5)
    assert r.hlen(partition_key(2, "outbox")) == 0, worker.log_tail()  # sent, acknowledged, cleared
    assert [a["alert_id"] for a in read_topic(topics, "churn-alerts", 100, 3.0)] == ["parked:1"]
    recs = read_topic(topics, "recommendations", 100, 3.0)
    assert [x["recommendation_id"] for x in recs] == [rec["recommendation_id"]]
    assert processed_total(worker.metrics()) == 0  # no input was needed
