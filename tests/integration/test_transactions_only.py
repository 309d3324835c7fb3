"""A shop that publishes only transactions, with default settings, on the real broker and Redis: the silent clicks
topic does not hold time back, so snapshots, matured labels, churn scores and alerts all come out."""

from __future__ import annotations

from collections import Counter

import orjson
import redis

from streamproc.contracts.outputs import AlertRecord, validate
from streamproc.tools.tail import read_topic, read_training_examples
from tests.conftest import FROZEN_MODEL_ENV, produce, seed_checkpoint, wait_delivered
from tests.integration.test_exactly_once import sim_payloads


def test_a_transactions_only_shop_gets_snapshots_labels_scores_and_alerts_by_default(topics, worker_factory):
    settings = topics
    payloads = [p for p in sim_payloads(customers=200, days=300, seed=23) if p[0] == "transactions"]
    assert payloads and {p[0] for p in payloads} == {"transactions"}
    # the in-process trainer learns churn from the same history (its silent clicks topic holds nothing back either);
    # an untrained model would score every customer 0.0, below
    seed_checkpoint(settings, payloads)
    produce(settings, payloads)
    worker = worker_factory(settings)
    worker.extra_env = dict(FROZEN_MODEL_ENV)  # no STREAMPROC_MAX_SOURCE_SKEW_S: the defaults
    worker.start()
    worker.wait_processed(len(payloads), timeout=120)
    wait_delivered(settings)

    r = redis.Redis.from_url(settings.redis_url)
    try:
        rows = {key: r.hgetall(key) for key in r.scan_iter("cust:*", count=1000)}
    finally:
        r.close()

    states = [orjson.loads(row[b"_s"]) for row in rows.values() if b"_s" in row]
    assert len(states) >= 150
    snapshotted = [s for s in states if s.get("ch")]  # the last snapshot instant each customer reached
    assert len(snapshotted) > 0.8 * len(states), (len(snapshotted), len(states))

    scored = [orjson.loads(row[b"m"]) for row in rows.values() if b"m" in row]
    probabilities = [m["churn_p"] for m in scored if m.get("churn_p") is not None]
    assert len(probabilities) > 0.8 * len(states)
    assert 0 < min(probabilities) < max(probabilities) < 1  # scores that rank, not a constant

    examples, _ = read_training_examples(settings)
    labels = Counter(e["label"] for e in examples if e["kind"] == "churn")
    assert labels[0] > 20 and labels[1] > 20, labels

    alerts = read_topic(settings, "churn-alerts", 10**6, 3.0)
    assert alerts, "no churn alert for a transactions-only shop"
    records = [validate(AlertRecord, a) for a in alerts]
    assert any(r.record == "alert" for r in records)
