"""streamproc on a replicated Kafka cluster (3 KRaft nodes, `streamproc infra up --kafka-brokers 3`): topics with
replication factor 3 and min.insync.replicas=2, outputs produced idempotently with acks=all. A broker killed with
SIGKILL mid-stream and started again later costs nothing: every event is applied once and every output is there."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from streamproc.tools.demo import processed_total
from streamproc.tools.tail import read_topic
from streamproc.topics import admin_client, apply_topics, delete_run_topics
from tests.conftest import free_port, on_redis_cluster, produce
from tests.integration.test_exactly_once import (
    SPREAD_SWEEP,
    baseline_run,
    frozen,
    output_ids,
    sim_payloads,
    wait_equal,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.cluster]


def test_a_broker_killed_mid_stream_and_restarted_loses_and_doubles_nothing(env_factory, worker_factory,
                                                                           kafka_cluster):
    payloads = sim_payloads(customers=200, days=90, seed=24)
    baseline = env_factory()
    replicated = env_factory().model_copy(update={"kafka_bootstrap": kafka_cluster.bootstrap, "topic_replication": 3})
    report = apply_topics(replicated)
    assert report.ok and report.created, report.mismatched
    try:
        admin = admin_client(replicated)
        try:
            (described,) = admin.describe_topics([replicated.topic("churn-alerts")])
        finally:
            admin.close()
        assert {len(p["replica_nodes"]) for p in described["partitions"]} == {3}

        expected, expected_ids = baseline_run(baseline, replicated, worker_factory, payloads)

        worker = frozen(worker_factory(replicated, "replicated")).start()
        worker.wait_ready()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and processed_total(worker.metrics()) < 1500:
            time.sleep(0.01)
        pid = kafka_cluster.nodes[0].owned_pid()
        assert pid is not None, "the test kills a broker streamproc started"
        os.kill(pid, signal.SIGKILL)
        time.sleep(10)  # the stream goes on with two brokers (min.insync.replicas=2)
        kafka_cluster.up()  # and the third comes back

        wait_equal(replicated, expected, timeout=180)
        assert output_ids(replicated) == expected_ids
        # outputs are at-least-once with stable ids: a copy sent again (from the outbox, after a delivery failed)
        # must be the same record, never a second decision
        copies: dict[str, list[dict]] = {}
        for alert in read_topic(replicated, "churn-alerts", 10_000_000, 3.0):
            copies.setdefault(alert["alert_id"], []).append(alert)
        assert all(all(copy == same[0] for copy in same) for same in copies.values())
        print(f"copies per alert after the broker kill: {dict(Counter(len(same) for same in copies.values()))}")
    finally:
        delete_run_topics(replicated)


def owns_partitions(worker) -> bool:
    return any(k.startswith("streamproc_consumer_lag_records{") for k in worker.metrics())


def test_workers_grown_from_one_to_three_and_back_leave_every_customer_as_one_worker_does(
        env_factory, worker_factory, kafka_cluster, redis_cluster):
    """Elastic workers on both clusters at once: the group grows from 1 to 3 workers mid-stream and shrinks back to
    1, each change while records arrive; Redis state and the output ids equal one uninterrupted worker's (on one
    broker and one Redis)."""
    payloads = sim_payloads(customers=200, days=90, seed=25)
    # 6 input partitions: Faust's assignor fills members up to ceil(partitions / members), so with the declared 4
    # one of three members could be left without any
    base = env_factory()
    baseline = base.model_copy(update={"topic_prefix": f"{base.topic_prefix}six."})
    assert apply_topics(baseline, partitions_override=6).ok
    scaled = on_redis_cluster(env_factory().model_copy(
        update={"kafka_bootstrap": kafka_cluster.bootstrap, "topic_replication": 3}), redis_cluster)
    assert apply_topics(scaled, partitions_override=6).ok
    try:
        expected, expected_ids = baseline_run(baseline, scaled, worker_factory, payloads, fill=False)

        parts = [payloads[k * len(payloads) // 3 : (k + 1) * len(payloads) // 3] for k in range(3)]
        first = frozen(worker_factory(scaled, "first"), **SPREAD_SWEEP).start()
        first.wait_ready()
        produce(scaled, parts[0])
        guests = [frozen(worker_factory(scaled.model_copy(update={"web_port": free_port()}), f"guest{i}"),
                         **SPREAD_SWEEP).start() for i in range(2)]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all(owns_partitions(g) for g in guests):
            time.sleep(0.2)
        assert all(owns_partitions(g) for g in guests), "the group never grew to three members with partitions"
        produce(scaled, parts[1])
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and min(processed_total(g.metrics()) for g in guests) < 100:
            time.sleep(0.05)
        for guest in guests:  # back to one, while the last part arrives
            guest.stop()
        produce(scaled, parts[2])
        wait_equal(scaled, expected, timeout=180)
        assert output_ids(scaled) == expected_ids
        assert first.metrics().get("streamproc_rebalances_total", 0) >= 2
    finally:
        delete_run_topics(scaled)
        delete_run_topics(baseline)
