"""A partition's alert queue: alert decisions wait in the store, saved atomically with the state of the customer they
are about, until the sweep has visited every customer live at their instant (its pass reaches the instant); then
the day closes (``domain.alerts.close_days``): the alerts within the day's budget per value tier, in order of value
at risk, go to the outbox in the same atomic write that moves the sweep mark, and the rest are counted."""

from __future__ import annotations

import orjson

from streamproc.contracts.outputs import AlertCleared, ChurnAlert, Recommendation, record_of
from streamproc.domain.alerts import Queued, close_days
from streamproc.metrics import Metrics
from streamproc.pipeline.records import BatchResult
from streamproc.ports import AlertClose, FeatureStore

CLEARED = "cleared:"


def queued_alert(queue: dict[str, bytes], alert: ChurnAlert, win_back: Recommendation | None) -> None:
    queue[alert.alert_id] = orjson.dumps({
        "d": alert.ts, "k": "alert", "c": alert.customer_id, "a": alert.alert_id, "t": alert.value_tier,
        "v": alert.value_at_risk, "o": {"alert": alert, "rec": win_back}})


def queued_cleared(queue: dict[str, bytes], cleared: AlertCleared) -> None:
    queue[CLEARED + cleared.alert_id] = orjson.dumps({
        "d": cleared.ts, "k": "cleared", "c": cleared.customer_id, "a": cleared.alert_id, "t": "", "v": 0.0,
        "o": cleared})


def decoded(name: str, blob: bytes) -> Queued:
    data = orjson.loads(blob)
    return Queued(name, int(data["d"]), data["k"], data["c"], data["a"], data["t"], float(data["v"]), data["o"])


def outbox_name(target: int) -> str:
    """The outbox entry a closing parks its outputs in (one per pass: the pass's target)."""
    return f"alerts@{target}"


async def close_alert_days(store: FeatureStore, partition: int, target: int, budgets: dict[str, int] | None,
                           metrics: Metrics) -> BatchResult:
    """Close the partition's alert days up to ``target`` and move its sweep mark there, in one atomic write; the
    result holds what to send (parked in the outbox under ``outbox_name(target)``). Re-run after a crash before the
    write, it decides the same: the queue and the sent alerts are what they were."""
    raw = await store.alert_queue(partition)
    queued = [decoded(name, blob) for name, blob in raw.items()]
    customers = sorted({q.customer_id for q in queued if q.day <= target})
    closing = close_days(queued, target, budgets, await store.open_sent_alerts(partition, customers),
                         await store.suppressed(customers))
    result = BatchResult()
    for q in closing.send:
        if q.kind == "alert":
            # rebuilt as their classes, so they read like the outputs a batch makes
            result.alerts.append(record_of(ChurnAlert, q.payload["alert"]))
            if q.payload.get("rec"):
                result.recommendations.append(record_of(Recommendation, q.payload["rec"]))
        else:
            result.cleared.append(record_of(AlertCleared, q.payload))
    blob = result.outputs_blob()
    field = outbox_name(target)
    await store.close_alerts(AlertClose(partition, target, closing.done, closing.open_sent, field if blob else None,
                                        blob))
    if blob:
        result.outbox[partition] = [field]
    for tier, n in closing.over_budget.items():
        metrics.alerts_over_budget.labels(tier).inc(n)
    if closing.suppressed:
        metrics.alerts_suppressed.inc(closing.suppressed)
    return result

