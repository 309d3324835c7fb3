"""``streamproc alerts tail`` and ``streamproc alerts export``: churn alerts for people and campaign tools.

``tail`` is a member of a consumer group (``--group``; default ``<app id>-alerts-tail``): it resumes where the group
left off, committing what it printed, and ``--from-start`` replays the topic. ``--min-risk`` and ``--tier`` keep
the alerts at or above a level. A ``cleared`` record is shown without filters, or when this run showed its alert.

``export`` writes the alerts of an event-time period to one CSV or JSON lines file, one row per alert id (the topic
is at least once: a re-sent alert appears once).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, get_args

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from streamproc.contracts.outputs import RiskLevel, ValueTier
from streamproc.settings import Settings
from streamproc.tools.instants import parse_instant
from streamproc.tools.tail import read_topic
from streamproc.topics import ALERTS_TOPIC, kafka_security_kwargs

RISK_ORDER: tuple[str, ...] = get_args(RiskLevel)  # lowest first
TIER_ORDER: tuple[str, ...] = get_args(ValueTier)
EXPORT_COLUMNS = ("alert_id", "customer_id", "date", "risk_level", "probability", "value_tier", "value_at_risk", "clv",
                  "action", "segment", "lifecycle_stage", "rfm_segment", "reasons", "recommended_items",
                  "model_version", "scored_by")


def format_alert(alert: dict[str, Any]) -> str:
    """One readable line: an alert (priority, who, why in words, what to do) or the clearing of one."""
    if alert.get("record") == "cleared":
        how = "bought again" if alert["cleared_by"] == "purchase" else "risk fell below the re-arm threshold"
        return f"[CLEARED ] {alert['customer_id']}  {how} after {alert['days']} days  (alert {alert['alert_id']})"
    reasons = "; ".join(r.get("text") or f"{r['feature']}={r['value']}" for r in alert.get("reasons", []))
    rfm = alert.get("rfm")
    rfm_text = f"rfm={rfm['r']}{rfm['f']}{rfm['m']} {rfm['segment']}  " if rfm else ""
    return (f"[{alert['risk_level'].upper():<8}] {alert['customer_id']}  p={alert['probability']:.2f}  "
            f"value at risk={alert.get('value_at_risk')}  clv={alert.get('clv')}  tier={alert['value_tier']}  "
            f"segment={alert.get('segment') or '-'}  stage={alert.get('lifecycle_stage')}  {rfm_text}"
            f"→ {alert['action']}  (why: {reasons})")


def at_least(value: str, minimum: str | None, order: tuple[str, ...]) -> bool:
    return minimum is None or (value in order and order.index(value) >= order.index(minimum))


class AlertFilter:
    """``--min-risk`` and ``--tier``, each "at least"; cleared records follow the alerts shown."""

    def __init__(self, min_risk: str | None, min_tier: str | None) -> None:
        self.min_risk = min_risk
        self.min_tier = min_tier
        self.shown: set[str] = set()

    def keep(self, record: dict[str, Any]) -> bool:
        if record.get("record") == "cleared":
            return (self.min_risk is None and self.min_tier is None) or record.get("alert_id") in self.shown
        if not (at_least(record.get("risk_level", ""), self.min_risk, RISK_ORDER)
                and at_least(record.get("value_tier", ""), self.min_tier, TIER_ORDER)):
            return False
        self.shown.add(str(record.get("alert_id")))
        return True


class _FromStart(ConsumerRebalanceListener):
    """Seeks every partition first assigned to the beginning: ``--from-start``."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self.consumer = consumer
        self.done: set[TopicPartition] = set()

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        fresh = [tp for tp in assigned if tp not in self.done]
        if fresh:
            self.consumer.seek_to_beginning(*fresh)
            self.done.update(fresh)


def follow_alerts(settings: Settings, min_risk: str | None, min_tier: str | None, as_json: bool,
                  idle_timeout_s: float | None, max_records: int | None, group: str | None = None,
                  from_start: bool = False, out: TextIO | None = None) -> int:
    """Print churn alerts as they arrive, resuming where the group left off; commits what it printed."""
    out = out or sys.stdout
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group or f"{settings.app_id}-alerts-tail",
        auto_offset_reset="earliest", enable_auto_commit=False, client_id="streamproc-alerts-tail",
        **kafka_security_kwargs(settings))
    if from_start:
        consumer.subscribe([settings.topic(ALERTS_TOPIC)], listener=_FromStart(consumer))
    else:
        consumer.subscribe([settings.topic(ALERTS_TOPIC)])
    keep = AlertFilter(min_risk, min_tier)
    shown = 0
    read: dict[TopicPartition, OffsetAndMetadata] = {}
    idle_ms = 0.0
    try:
        while max_records is None or shown < max_records:
            batches = consumer.poll(timeout_ms=500)
            idle_ms = 0.0 if batches else idle_ms + 500
            if idle_timeout_s is not None and idle_ms >= idle_timeout_s * 1000:
                break
            for tp, records in batches.items():
                for record in records:
                    if max_records is not None and shown >= max_records:
                        break
                    read[tp] = OffsetAndMetadata(record.offset + 1, "", -1)
                    alert = json.loads(record.value)
                    if keep.keep(alert):
                        out.write((json.dumps(alert, sort_keys=True) if as_json else format_alert(alert)) + "\n")
                        out.flush()
                        shown += 1
            if read:
                consumer.commit(dict(read))
                read.clear()
    except KeyboardInterrupt:
        pass
    finally:
        if read:
            consumer.commit(dict(read))
        consumer.close()
    return 0


def export_rows(records: Iterable[dict[str, Any]], since_ms: int, until_ms: int) -> list[dict[str, Any]]:
    """The alerts (not the cleared records) with ``since_ms <= ts < until_ms``, once per alert id, in time order."""
    seen: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("record", "alert") == "alert" and since_ms <= r.get("ts", -1) < until_ms:
            seen.setdefault(r["alert_id"], r)
    return sorted(seen.values(), key=lambda r: (r["ts"], r["alert_id"]))


def csv_row(alert: dict[str, Any]) -> dict[str, Any]:
    rfm = alert.get("rfm") or {}
    return {
        **{k: alert.get(k) for k in EXPORT_COLUMNS},
        "date": datetime.fromtimestamp(alert["ts"] / 1000, UTC).date().isoformat(),
        "rfm_segment": rfm.get("segment"),
        "reasons": "; ".join(r.get("text", "") for r in alert.get("reasons", [])),
        "recommended_items": " ".join(i["product_id"] for i in alert.get("recommended_items", [])),
    }


def export_alerts(settings: Settings, since: str, until: str, fmt: str, path: Path | None) -> int:
    rows = export_rows(read_topic(settings, ALERTS_TOPIC, 10**9, 5.0), parse_instant(since), parse_instant(until))
    if path is None:
        write_export(rows, fmt, sys.stdout)
    else:
        with open(path, "w", newline="") as fh:
            write_export(rows, fmt, fh)
    print(f"exported {len(rows)} alerts", file=sys.stderr)
    return 0


def write_export(rows: list[dict[str, Any]], fmt: str, fh: TextIO) -> None:
    if fmt == "csv":
        writer = csv.DictWriter(fh, fieldnames=EXPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_row(r) for r in rows)
    else:
        for r in rows:
            fh.write(json.dumps(r, sort_keys=True) + "\n")
