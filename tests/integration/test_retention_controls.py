"""The control group and opt-outs on the real broker and Redis: alerted customers held out of contact are marked
``control`` by the keyed hash (so a replay marks the same ones), customers who opted out get no alert (counted), and
erasure removes the opt-out record."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson

from streamproc.adapters.redis_store import RedisFeatureStore
from streamproc.contracts.outputs import AlertRecord, validate
from streamproc.domain.alerts import ControlGroup
from streamproc.tools.tail import read_topic
from tests.conftest import FROZEN_MODEL_ENV, ROOT, produce, seed_checkpoint, wait_delivered, worker_env
from tests.integration.test_exactly_once import sim_payloads

KEY = "control-key-for-the-test"
SHARE = 0.3


def test_control_group_is_marked_by_the_keyed_hash_and_opted_out_customers_get_no_alert(topics, worker_factory):
    settings = topics
    payloads = [p for p in sim_payloads(customers=240, days=300, seed=29) if p[0] == "transactions"]
    customers = sorted({orjson.loads(v)["customer_id"] for _, _, v in payloads})
    opted_out = set(customers[::4])
    seed_checkpoint(settings, payloads)

    async def opt_out() -> None:
        store = RedisFeatureStore.from_url(settings.redis_url)
        try:
            for cid in sorted(opted_out)[1:]:
                await store.set_suppressed(cid, True)
        finally:
            await store.close()

    asyncio.run(opt_out())
    first = sorted(opted_out)[0]  # and one through the command a person runs
    env = worker_env(settings)
    cli = [sys.executable, "-m", "streamproc.cli", "customer"]
    subprocess.run([*cli, "suppress", first], env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)

    produce(settings, payloads)
    worker = worker_factory(settings)
    worker.extra_env = {**FROZEN_MODEL_ENV, "STREAMPROC_CONTROL_SHARE": str(SHARE), "STREAMPROC_CONTROL_KEY": KEY}
    worker.start()
    worker.wait_processed(len(payloads), timeout=180)
    wait_delivered(settings)
    metrics = worker.metrics()

    alerts = [a for a in (validate(AlertRecord, r) for r in read_topic(settings, "churn-alerts", 10**6, 3.0))
              if a.record == "alert"]
    assert len(alerts) > 40, len(alerts)
    assert not {a.customer_id for a in alerts} & opted_out, "an opted-out customer was alerted"
    suppressed = sum(v for k, v in metrics.items() if k.startswith("streamproc_churn_alerts_suppressed_total"))
    assert suppressed > 0, "no alert was suppressed: the test would not see suppression broken"

    control = ControlGroup(KEY.encode(), SHARE)
    assert all(a.control == control.holds(a.customer_id, a.ts) for a in alerts)
    held = sum(a.control for a in alerts)
    assert 0 < held < len(alerts)
    assert abs(held / len(alerts) - SHARE) < 0.15, (held, len(alerts))
    # another key holds out other customers: the hash is keyed
    other = ControlGroup(b"another key", SHARE)
    assert [other.holds(a.customer_id, a.ts) for a in alerts] != [a.control for a in alerts]

    # erasure removes the opt-out record with everything else about the customer
    subprocess.run([*cli, "forget", first], env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)

    async def still_suppressed() -> set[str]:
        store = RedisFeatureStore.from_url(settings.redis_url)
        try:
            return await store.suppressed(sorted(opted_out))
        finally:
            await store.close()

    assert asyncio.run(still_suppressed()) == opted_out - {first}
