"""``streamproc retention``: the retention ledger. Joins the alerts sent, the interventions the team recorded and the
customers' purchases (``domain.retention``), decides each alert's outcome ``STREAMPROC_OUTCOME_DAYS`` after it, and
keeps the outcomes in Redis for ``streamproc interventions report`` and the uplift metrics.

A process of its own, one consumer group over three topics keyed by customer id. A fetched batch is folded per
customer, and the ledgers, the outcomes decided and the watermarks are written in one MULTI; the offsets are
committed after it. Every effect is keyed (alert id, intervention id, purchase event id), so a batch replayed after a
crash writes the same: exactly-once effect. Interventions that are not valid are dead-lettered like other inputs.

Time: the outcome window closes on the *transactions* watermark, the slowest of the partitions that carried data,
minus the allowed lateness. Purchases are kept back to the oldest alert that may still come (the alerts topic trails
the transactions it is made from: by a day live, by the whole history in a replay of a backlog).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import defaultdict
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry, Counter, Gauge

from streamproc.adapters.redis_clients import sync_redis
from streamproc.contracts.outputs import DeadLetter
from streamproc.domain.retention import DAY_MS, CustomerLedger, Outcome, decode_intervention, uplift_table
from streamproc.settings import Settings
from streamproc.topics import ALERTS_TOPIC, DLQ_TOPIC, INTERVENTIONS_TOPIC, kafka_security_kwargs

log = logging.getLogger(__name__)

# every ledger key carries one hash tag: the ledger's transaction (MULTI/EXEC) then stays in one Redis Cluster slot.
# One slot is enough: the ledger holds alerted customers only, written by one process
LEDGER_PREFIX = "sp:{ledger}:c:"  # + customer id: the customer's ledger (JSON)
OPEN_KEY = "sp:{ledger}:open"  # customer -> their oldest open alert's time
OUTCOMES_KEY = "sp:{ledger}:outcomes"  # alert id -> outcome (JSON)
MARKS_KEY = "sp:{ledger}:marks"  # "transactions:<p>" / "churn-alerts:<p>" -> newest event time seen
UPLIFT_REFRESH_S = 5.0  # the uplift gauges are recomputed from every outcome at most this often
LEDGER_KEEP_DAYS = 120  # purchases kept behind the watermark at least, for alerts that trail the transactions


class LedgerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.outcomes = Counter("streamproc_retention_outcomes_total",
                                "Alert outcomes decided, by group (treated, control, not_contacted, "
                                "control_contacted).", ["group"], registry=r)
        self.interventions = Counter("streamproc_retention_interventions_total", "Interventions recorded.",
                                     registry=r)
        self.dead_letters = Counter("streamproc_retention_dead_letters_total",
                                    "Intervention records dead-lettered, by reason.", ["reason"], registry=r)
        self.uplift = Gauge("streamproc_retention_uplift",
                            "Retention rate of treated minus control (points/100) and its 95 % Newcombe interval, by "
                            "breakdown (all, action=..., tier=...).", ["breakdown", "bound"], registry=r)
        self.rate = Gauge("streamproc_retention_rate", "Share of alerted customers who bought within the outcome "
                                                       "window, by group.", ["group"], registry=r)
        self.cost_per_retained = Gauge("streamproc_retention_cost_per_retained",
                                       "Intervention cost over the customers retained because of contact.",
                                       ["breakdown"], registry=r)
        for group in ("treated", "control", "not_contacted", "control_contacted"):
            self.outcomes.labels(group)


def read_outcomes(client: Any) -> list[Outcome]:
    return [Outcome.from_dict(orjson.loads(v)) for _, v in client.hscan_iter(OUTCOMES_KEY, count=1000)]


class RetentionLedger:
    def __init__(self, settings: Settings, metrics: LedgerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.stopping = threading.Event()
        self.redis = sync_redis(settings.redis_url, **settings.redis_kwargs())
        security = kafka_security_kwargs(settings)
        self.topics = {settings.topic(t): t for t in ("transactions", ALERTS_TOPIC, INTERVENTIONS_TOPIC)}
        self.consumer = KafkaConsumer(
            *self.topics, bootstrap_servers=settings.kafka_bootstrap, group_id=f"{settings.app_id}-retention",
            enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=5000,
            client_id="streamproc-retention", session_timeout_ms=int(settings.kafka_session_timeout_s * 1000),
            heartbeat_interval_ms=int(settings.kafka_heartbeat_interval_s * 1000), **security)
        self.producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                      client_id="streamproc-retention", **security)
        stored: dict[bytes, bytes] = self.redis.hgetall(MARKS_KEY)  # type: ignore[assignment]
        self.marks: dict[str, int] = {k.decode(): int(v) for k, v in stored.items()}
        self.window = settings.outcome_days * DAY_MS
        self.lateness = int(settings.allowed_lateness_s * 1000)
        self.carrying: set[str] = set()  # "<topic>:<partition>" with records on the broker
        self.caught_up: set[str] = set()  # interventions partitions read to their end
        self.decided_to = 0

    def run(self) -> None:
        refreshed = 0.0
        try:
            while not self.stopping.is_set():
                batches = self.consumer.poll(timeout_ms=500)
                self.survey()
                records = [(self.topics[tp.topic], tp.partition, r) for tp, rs in batches.items() for r in rs]
                if records:
                    self.apply(records)
                    self.consumer.commit()
                if time.monotonic() - refreshed > UPLIFT_REFRESH_S:
                    self.publish_uplift()
                    refreshed = time.monotonic()
        finally:
            self.producer.close(timeout=10)
            self.consumer.close()
            self.redis.close()

    def survey(self) -> None:
        """Which assigned partitions carry records (on the broker, read or not), and which interventions partitions
        this ledger has read to their end."""
        assigned = list(self.consumer.assignment())
        if not assigned:
            return
        ends = self.consumer.end_offsets(assigned)
        begins = self.consumer.beginning_offsets(assigned)
        self.carrying = {f"{self.topics[tp.topic]}:{tp.partition}" for tp in assigned if ends[tp] > begins[tp]}
        self.caught_up = {f"{INTERVENTIONS_TOPIC}:{tp.partition}" for tp in assigned
                          if self.topics[tp.topic] == INTERVENTIONS_TOPIC and self.consumer.position(tp) >= ends[tp]}

    def _slowest(self, kind: str) -> int | None:
        """The newest event time of the slowest partition of ``kind`` that carries records (0: not read yet)."""
        keys = {k for k in self.carrying | set(self.marks) if k.startswith(f"{kind}:")}
        return min(self.marks.get(k, 0) for k in keys) if keys else None

    def watermark(self) -> int | None:
        """Where outcomes are decided: the transactions watermark (the slowest partition that carries records, minus
        the allowed lateness), held back by any interventions partition not read to its end (a contact recorded
        for an alert must be in before its outcome is). Never moves back."""
        transactions = self._slowest("transactions")
        if transactions is None:
            return None
        found = transactions - self.lateness
        behind = [self.marks.get(k, 0) for k in self.carrying
                  if k.startswith(f"{INTERVENTIONS_TOPIC}:") and k not in self.caught_up]
        if behind:
            found = min(found, min(behind) - self.lateness)
        self.decided_to = max(self.decided_to, found)
        return self.decided_to

    def keep_from(self, watermark: int) -> int:
        """Purchases before this can join no alert still to come: never less than ``LEDGER_KEEP_DAYS`` behind the
        watermark, and back to the slowest alerts partition that carries records (0 until it is read), less a day
        (alerts of one instant arrive over its day)."""
        floor = watermark - max(self.window, LEDGER_KEEP_DAYS * DAY_MS)
        alerts = self._slowest(ALERTS_TOPIC)
        return floor if alerts is None else min(floor, alerts - DAY_MS)

    def apply(self, records: list[tuple[str, int, Any]]) -> None:
        by_customer: dict[str, list[tuple[str, Any]]] = defaultdict(list)
        dead: list[DeadLetter] = []
        for kind, partition, record in records:
            self._apply_record(kind, partition, record, by_customer, dead)
        watermark = self.watermark()
        customers = sorted(by_customer)
        stored = self.redis.mget([LEDGER_PREFIX + c for c in customers]) if customers else []
        ledgers = {c: CustomerLedger.from_dict(orjson.loads(b)) if b else CustomerLedger()
                   for c, b in zip(customers, stored, strict=True)}
        # customers with nothing new may have alerts due too: those with an open alert are listed in the open set
        due: list[str] = []
        if watermark is not None:
            found: list[bytes] = self.redis.zrangebyscore(  # type: ignore[assignment]
                OPEN_KEY, 0, watermark - self.window)
            due = [c.decode() for c in found]
        for c, blob in zip(due, self.redis.mget([LEDGER_PREFIX + c for c in due]) if due else [], strict=True):
            if c not in ledgers and blob:
                ledgers[c] = CustomerLedger.from_dict(orjson.loads(blob))
        for cid, items in by_customer.items():
            for what, value in items:
                if what == "alert":
                    ledgers[cid].add_alert(value)
                elif what == "intervention":
                    ledgers[cid].add_intervention(value)
                else:
                    ledgers[cid].add_purchase(*value)
        outcomes: list[Outcome] = []
        pipe = self.redis.pipeline(transaction=True)
        for cid, ledger in ledgers.items():
            if watermark is not None:
                outcomes += ledger.decide(cid, watermark, self.settings.outcome_days, self.keep_from(watermark))
            if ledger.empty():
                pipe.delete(LEDGER_PREFIX + cid)
            else:
                pipe.set(LEDGER_PREFIX + cid, orjson.dumps(ledger.to_dict()))
            oldest = min((a["ts"] for a in ledger.alerts.values()), default=None)
            if oldest is None:
                pipe.zrem(OPEN_KEY, cid)
            else:
                pipe.zadd(OPEN_KEY, {cid: oldest})
        for o in outcomes:
            pipe.hset(OUTCOMES_KEY, o.alert_id, orjson.dumps(o.as_dict()))
        if self.marks:
            pipe.hset(MARKS_KEY, mapping=dict(self.marks.items()))
        pipe.execute()
        for o in outcomes:
            self.metrics.outcomes.labels(o.group).inc()
        for letter in dead:
            self.producer.send(self.settings.topic(DLQ_TOPIC), value=letter.model_dump_json().encode())
        if dead:
            self.producer.flush(30)

    def _apply_record(self, kind: str, partition: int, record: Any,
                      by_customer: dict[str, list[tuple[str, Any]]], dead: list[DeadLetter]) -> None:
        if kind == INTERVENTIONS_TOPIC:
            found = decode_intervention(record.value)
            if isinstance(found, str):
                reason = found.split(":")[0]
                self.metrics.dead_letters.labels(reason).inc()
                dead.append(DeadLetter.of_bytes(
                    f"{kind}:{partition}:{record.offset}", reason, found, kind, record.key, record.value,
                    self.settings.dead_letter_max_original_bytes, partition, record.offset, record.timestamp))
                return
            self.metrics.interventions.inc()
            mark = f"{kind}:{partition}"
            self.marks[mark] = max(self.marks.get(mark, 0), found.ts)
            by_customer[self.settings.customer_key(found.customer_id)].append(("intervention", found))
            return
        try:
            value = json.loads(record.value)
        except (TypeError, ValueError):
            return  # not ours to dead-letter: the worker does for transactions, and alerts are ours to trust
        if not isinstance(value, dict) or "customer_id" not in value or not isinstance(value.get("ts"), int):
            return
        mark = f"{kind}:{partition}"
        self.marks[mark] = max(self.marks.get(mark, 0), int(value["ts"]))
        cid = str(value["customer_id"])
        if kind == ALERTS_TOPIC:
            if value.get("record", "alert") == "alert":
                by_customer[cid].append(("alert", value))
        elif value.get("type") == "purchase" and "event_id" in value:
            amount = float(value.get("amount", 0.0))
            by_customer[self.settings.customer_key(cid)].append(("purchase", (str(value["event_id"]),
                                                                                int(value["ts"]), amount)))

    def publish_uplift(self) -> None:
        outcomes = read_outcomes(self.redis)
        if not outcomes:
            return
        for group in ("treated", "control", "not_contacted"):
            members = [o for o in outcomes if o.group == group]
            if members:
                self.metrics.rate.labels(group).set(sum(o.bought for o in members) / len(members))
        for row in uplift_table(outcomes):
            if row.uplift is None:
                continue
            for bound, value in (("estimate", row.uplift), ("lower", row.lower), ("upper", row.upper)):
                self.metrics.uplift.labels(row.key, bound).set(value or 0.0)
            # no customer retained because of contact (yet): every unit spent was for nothing, at any scale
            self.metrics.cost_per_retained.labels(row.key).set(
                row.cost_per_retained if row.cost_per_retained is not None else math.inf)


def run_ledger(settings: Settings) -> None:
    import signal

    from prometheus_client import start_http_server

    metrics = LedgerMetrics()
    if settings.retention_metrics_port is not None:
        start_http_server(settings.retention_metrics_port, addr=settings.web_host, registry=metrics.registry)
    ledger = RetentionLedger(settings, metrics)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: ledger.stopping.set())
    log.info("retention ledger on %s", ", ".join(sorted(ledger.topics)))
    ledger.run()
