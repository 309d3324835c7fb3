"""``streamproc retention`` on the real broker and Redis: alerts, interventions (a few invalid) and purchases, with a
simulated team whose contacts work by a known lift. The ledger is killed with SIGKILL mid-way and restarted; every
alert's outcome equals the pure fold's, per alert; invalid interventions are dead-lettered; and the uplift report
covers the true lift of each action."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import orjson
import redis

from streamproc.runtime.ledger import OUTCOMES_KEY
from streamproc.tools.demo import metric_total, scrape
from streamproc.tools.tail import read_topic
from streamproc.tools.treatment import loop_records, treat
from tests.conftest import ROOT, free_port, produce, worker_env
from tests.unit.test_retention import DAY, T0, outcomes_of, world


def ledger(settings: Any, port: int, log: Any) -> subprocess.Popen[bytes]:
    env = {**worker_env(settings), "STREAMPROC_RETENTION_METRICS_PORT": str(port)}
    return subprocess.Popen([sys.executable, "-m", "streamproc.cli", "retention"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)


def test_outcomes_survive_sigkill_per_alert_and_the_uplift_covers_the_true_lift(topics, tmp_path):
    settings = topics
    alerts, purchases = world(1500, seed=12)
    treatment = treat(alerts, purchases, 30, seed=13)
    expected = {o.alert_id: o.as_dict() for o in outcomes_of(alerts, purchases, treatment)}
    transactions = [{"event_id": f"{cid}-{k}", "customer_id": cid, "ts": t, "order_id": f"{cid}-{k}",
                     "type": "purchase", "amount": 10.0, "currency": "EUR"}
                    for cid, times in purchases.items() for k, t in enumerate(times)]
    records = loop_records(alerts, transactions, treatment, 30)
    # the first part runs 70 days past the first alerts: the outcomes of those older than 40 days are decided in it
    split = next(i for i, (_, _, v) in enumerate(records) if orjson.loads(v)["ts"] >= T0 + 70 * DAY)
    bad = [("interventions", b"c00001", b'{"intervention_id": "x", "customer_id": "c00001"}'),
           ("interventions", b"c00002", b"not json at all")]
    produce(settings, records[:split] + bad)
    client = redis.Redis.from_url(settings.redis_url)
    port = free_port()
    try:
        with open(tmp_path / "ledger.log", "wb") as log:
            proc = ledger(settings, port, log)
            deadline = time.monotonic() + 60
            while client.hlen(OUTCOMES_KEY) < 100 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.hlen(OUTCOMES_KEY) >= 100, "no outcome before the kill: the test would not kill mid-way"
            os.kill(proc.pid, signal.SIGKILL)  # mid-stream, committed or not
            proc.wait(10)
            produce(settings, records[split:])
            proc = ledger(settings, port, log)
            try:
                deadline = time.monotonic() + 120
                while client.hlen(OUTCOMES_KEY) < len(expected) and time.monotonic() < deadline:
                    time.sleep(0.5)
                time.sleep(2.0)
                metrics = scrape(port)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        got = {k.decode(): orjson.loads(v) for k, v in client.hgetall(OUTCOMES_KEY).items()}
    finally:
        client.close()

    assert set(got) == set(expected)
    differing = [a for a in expected if got[a] != expected[a]]
    assert not differing, (len(differing), differing[:3], [(got[a], expected[a]) for a in differing[:1]])
    assert {o["group"] for o in got.values()} == {"treated", "control"}

    dead = [d for d in read_topic(settings, "streamproc-dlq", 100, 2.0) if d["source_topic"] == "interventions"]
    assert sorted(d["reason"] for d in dead) == ["validation", "validation"]
    assert metric_total(metrics, "streamproc_retention_outcomes_total") > 0  # the restarted process decided some

    report = subprocess.run([sys.executable, "-m", "streamproc.cli", "interventions", "report", "--json"],
                            env=worker_env(settings), cwd=ROOT, capture_output=True, timeout=120, check=True)
    rows = {r["key"]: r for r in json.loads(report.stdout)}
    for action, lift in treatment.true_lift.items():
        row = rows[f"action={action}"]
        assert row["lower"] <= lift <= row["upper"], (action, lift, row)
    assert rows["all"]["treated"] + rows["all"]["control"] == len(expected)
    human = subprocess.run([sys.executable, "-m", "streamproc.cli", "interventions", "report"],
                           env=worker_env(settings), cwd=ROOT, capture_output=True, timeout=120, check=True)
    assert "action=20% win-back coupon" in human.stdout.decode()
