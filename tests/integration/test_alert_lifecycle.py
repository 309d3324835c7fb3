"""Alerts a retention team can act on, on the real broker and Redis: a daily budget per value tier that holds on the
topic (what is over it is counted), cleared records that follow the alerts they clear with the days it took, checked
against the events that were sent, reasons in words, and RFM scores and segments (in the alerts and the lookup)."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter, defaultdict

import orjson

from streamproc.contracts.outputs import AlertRecord, validate
from streamproc.domain.alerts import share_of_budget
from streamproc.domain.customer import DAY_MS
from streamproc.domain.rfm import segment_of
from streamproc.settings import Settings
from streamproc.tools.tail import read_topic
from streamproc.topics import load_specs
from tests.conftest import FROZEN_MODEL_ENV, produce, seed_checkpoint, wait_delivered
from tests.integration.test_exactly_once import sim_payloads

BUDGET = {"low": 1, "medium": 1, "high": 1}


def purchase_days(payloads: list[tuple[str, bytes, bytes]]) -> dict[str, list[int]]:
    """Each customer's purchase days, from what was sent (not from what streamproc kept)."""
    days: dict[str, list[int]] = defaultdict(list)
    for topic, _, value in payloads:
        event = orjson.loads(value)
        if topic == "transactions" and event.get("type") == "purchase":
            days[event["customer_id"]].append(event["ts"] // DAY_MS)
    return days


def test_the_daily_budget_holds_per_tier_and_cleared_records_follow_their_alerts(topics, worker_factory):
    settings: Settings = topics
    payloads = [p for p in sim_payloads(customers=300, days=300, seed=41) if p[0] == "transactions"]
    seed_checkpoint(settings, payloads)
    produce(settings, payloads)
    worker = worker_factory(settings)
    worker.extra_env = {**FROZEN_MODEL_ENV, "STREAMPROC_ALERT_DAILY_BUDGET": orjson.dumps(BUDGET).decode()}
    worker.start()
    metrics = worker.wait_processed(len(payloads), timeout=180)
    wait_delivered(settings)
    metrics = worker.metrics() or metrics

    records = [validate(AlertRecord, r) for r in read_topic(settings, "churn-alerts", 10**6, 3.0)]
    alerts = [r for r in records if r.record == "alert"]
    cleared = [r for r in records if r.record == "cleared"]
    assert len(alerts) > 20, len(alerts)

    # the budget: per event-time day and tier, at most each partition's share
    partitions = load_specs()["transactions"].partitions
    shares = share_of_budget(BUDGET, partitions)
    assert shares is not None
    per_day = Counter((a.ts // DAY_MS, a.value_tier) for a in alerts)
    assert max(per_day.values()) <= partitions * max(shares.values()), per_day.most_common(3)
    over = sum(v for k, v in metrics.items() if k.startswith("streamproc_churn_alerts_over_budget_total"))
    assert over > 0, "the budget never bound: the test would not see a broken one"

    # the worker's lookup: RFM scores against the checkpoint's quintiles, the CLV with the churn risk
    some = alerts[0].customer_id
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/customers/{some}") as resp:
        shown = json.loads(resp.read())
    assert shown["rfm"] and shown["rfm"]["segment"] == segment_of(shown["rfm"]["r"], shown["rfm"]["f"]), shown["rfm"]
    assert shown["churn"]["value_at_risk"] is not None

    # each alert: priority = p × CLV, reasons in words with the coded input beside, RFM scores and segment (in a
    # transactions-only shop every alerted customer has bought)
    for a in alerts:
        assert a.rfm is not None and all(1 <= a.rfm[k] <= 5 for k in "rfm"), a.rfm
        assert a.rfm["segment"] == segment_of(a.rfm["r"], a.rfm["f"])
        assert abs(a.value_at_risk - a.probability * a.clv) <= 0.01 + 1e-4 * a.clv, a  # p is rounded to 4 places
        assert a.reasons and all(r["text"] and r["feature"] for r in a.reasons), a.reasons
        assert "=" not in a.reasons[0]["text"]  # words, not "log_tenure_days=2.01"

    # cleared records: each follows an alert that was sent, for the same customer, with the days it took
    sent = {a.alert_id: a for a in alerts}
    bought = purchase_days(payloads)
    by_kind = Counter(c.cleared_by for c in cleared)
    assert by_kind["purchase"] > 0, by_kind
    for c in cleared:
        alert = sent.get(c.alert_id)
        assert alert is not None and alert.customer_id == c.customer_id, c
        assert c.ts > alert.ts
        alert_day = alert.ts // DAY_MS
        if c.cleared_by == "purchase":
            after = [d for d in bought[c.customer_id] if alert_day <= d < c.ts // DAY_MS]
            assert after and c.days == min(after) - alert_day, (c, after)
        else:
            assert c.probability is not None and c.probability < settings.alert_rearm_threshold, c
            assert c.days == (c.ts - alert.ts) // DAY_MS
    assert len({c.alert_id for c in cleared}) == len(cleared)  # each alert clears once
