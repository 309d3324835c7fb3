"""``streamproc forward alerts --url URL``: churn alerts delivered to the retention team's webhook.

A process of its own (never in a worker: a slow or dead receiver must not hold ingest back), a member of its own
consumer group on the alerts topic. Each record is POSTed as its JSON bytes, with

* ``X-Streamproc-Signature: sha256=<hex>``, an HMAC-SHA256 of the body under ``STREAMPROC_WEBHOOK_SECRET``, so the
  receiver can check who sent it and that it was not altered;
* ``Idempotency-Key``: the alert id (``<alert id>:cleared`` for the record that clears it), the same on every
  attempt and every redelivery, so a receiver that saw it already can answer 200 and do nothing.

A 2xx response delivers. 5xx, 408, 425 and 429 responses, timeouts and connection errors are retried with capped
exponential backoff (with jitter derived from the key: deterministic, still spread). Any other response (a 4xx: the
receiver rejects the record itself) or the last of ``--max-attempts`` failures sends the record to the
``alerts-undeliverable`` topic with the last error, and moves on. A partition's offset is committed only after its
record was delivered or parked there: delivery is at least once, and a crash redelivers with the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Literal

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata

from streamproc.contracts.outputs import UndeliverableAlert
from streamproc.metrics import ForwarderMetrics
from streamproc.settings import Settings
from streamproc.topics import ALERTS_TOPIC, UNDELIVERABLE_TOPIC, kafka_security_kwargs

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Streamproc-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
RETRYABLE_STATUS = frozenset({408, 425, 429})
BODY_KEPT = 4096  # bytes of a record kept in its undeliverable record when it is not JSON

Verdict = Literal["delivered", "retry", "reject"]


# ------------------------------------------------------------------ pure
def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str) -> bool:
    """What a receiver does (and the tests): a constant-time comparison."""
    return hmac.compare_digest(signature(secret, body), header)


def verdict(status: int | None) -> Verdict:
    """What a response (None: a timeout or a connection error) means for the record."""
    if status is None or status >= 500 or status in RETRYABLE_STATUS:
        return "retry"
    if 200 <= status < 300:
        return "delivered"
    return "reject"


def backoff_s(key: str, attempt: int, base_s: float, cap_s: float) -> float:
    """The wait after failed attempt ``attempt`` (1, 2, ...): exponential, capped, with "equal jitter" (half fixed,
    half drawn) from a generator seeded by the key and attempt, so a replay waits the same."""
    ceiling = min(cap_s, base_s * 2 ** (attempt - 1))
    return ceiling / 2 + random.Random(f"{key}:{attempt}").uniform(0, ceiling / 2)


def idempotency_key(record: dict[str, Any]) -> str:
    alert_id = str(record.get("alert_id", ""))
    return f"{alert_id}:cleared" if record.get("record") == "cleared" else alert_id


@dataclass(frozen=True)
class Attempt:
    status: int | None
    error: str | None
    seconds: float


# ------------------------------------------------------------------ I/O
def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Attempt:
    """One POST; never raises for what the network or the receiver does."""
    parts = urllib.parse.urlsplit(url)
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    started = time.monotonic()
    conn = conn_cls(parts.hostname or "", parts.port, timeout=timeout_s)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        response.read(65536)
        status = response.status
        return Attempt(status, None if 200 <= status < 300 else f"HTTP {status} {response.reason}",
                       time.monotonic() - started)
    except (OSError, http.client.HTTPException) as exc:  # timeouts, refused or reset connections, bad responses
        return Attempt(None, f"{type(exc).__name__}: {exc}"[:300], time.monotonic() - started)
    finally:
        conn.close()


@dataclass
class ForwardConfig:
    url: str
    secret: bytes
    max_attempts: int
    timeout_s: float
    backoff_base_s: float
    backoff_cap_s: float
    group: str


class AlertForwarder:
    def __init__(self, settings: Settings, cfg: ForwardConfig, metrics: ForwarderMetrics) -> None:
        self.settings = settings
        self.cfg = cfg
        self.metrics = metrics
        self.stopping = threading.Event()
        security = kafka_security_kwargs(settings)
        # a record may take max_attempts x (timeout + backoff) to settle: the group must not evict us meanwhile
        settle_ms = int(cfg.max_attempts * (cfg.timeout_s + cfg.backoff_cap_s) * 1000) + 60_000
        self.consumer = KafkaConsumer(
            settings.topic(ALERTS_TOPIC), bootstrap_servers=settings.kafka_bootstrap, group_id=cfg.group,
            enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=50,
            max_poll_interval_ms=max(settle_ms, 300_000), client_id="streamproc-forwarder",
            session_timeout_ms=int(settings.kafka_session_timeout_s * 1000),
            heartbeat_interval_ms=int(settings.kafka_heartbeat_interval_s * 1000), **security)
        self.producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", retries=10,
                                      client_id="streamproc-forwarder", **security)

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                for tp, records in self.consumer.poll(timeout_ms=500).items():
                    for record in records:
                        if self.stopping.is_set():
                            return  # not committed: redelivered by whoever reads the partition next
                        if not self.settle(record.value):
                            return  # stopped mid-retry: not committed, redelivered after a restart
                        self.consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "", -1)})
        finally:
            self.producer.close(timeout=10)
            self.consumer.close()

    def settle(self, body: bytes) -> bool:
        """Deliver one record, or park it on the undeliverable topic; False if stopped before either."""
        try:
            record = json.loads(body)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            self._park({}, body, 0, f"not a JSON object: {exc}"[:300], None)
            return True
        key = idempotency_key(record)
        headers = {SIGNATURE_HEADER: signature(self.cfg.secret, body), IDEMPOTENCY_HEADER: key}
        started = time.monotonic()
        last = Attempt(None, "never attempted", 0.0)
        for attempt in range(1, self.cfg.max_attempts + 1):
            last = post(self.cfg.url, body, headers, self.cfg.timeout_s)
            outcome = verdict(last.status)
            if outcome == "delivered":
                self.metrics.delivered.inc()
                self.metrics.latency.observe(time.monotonic() - started)
                return True
            if outcome == "reject" or attempt == self.cfg.max_attempts:
                break
            self.metrics.retries.inc()
            if self.stopping.wait(backoff_s(key, attempt, self.cfg.backoff_base_s, self.cfg.backoff_cap_s)):
                return False
        self._park(record, body, attempt, last.error or "", last.status)
        return True

    def _park(self, record: dict[str, Any], body: bytes, attempts: int, error: str, status: int | None) -> None:
        parked = UndeliverableAlert(
            idempotency_key=idempotency_key(record) if record else None, attempts=attempts, last_error=error,
            last_status=status, url=self.cfg.url, alert=record or None,
            raw=None if record else body[:BODY_KEPT].decode("utf-8", "replace"))
        value = parked.model_dump_json().encode()
        key = str(record.get("customer_id", "")).encode() or None
        self.producer.send(self.settings.topic(UNDELIVERABLE_TOPIC), key=key, value=value).get(timeout=30)
        self.metrics.undeliverable.labels("rejected" if status is not None and verdict(status) == "reject"
                                          else "attempts_exhausted" if record else "not_json").inc()
        log.warning("alert undeliverable after %d attempts (%s); parked on %s", attempts, error, UNDELIVERABLE_TOPIC)


def run_forwarder(settings: Settings, url: str | None = None, group: str | None = None) -> None:
    """The forwarder until SIGTERM or SIGINT (a record being retried is left uncommitted: redelivered)."""
    import signal

    from prometheus_client import start_http_server

    target = url or settings.webhook_url
    if not target:
        raise ValueError("no webhook URL: pass --url or set STREAMPROC_WEBHOOK_URL")
    if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
        raise ValueError(f"the webhook URL must be http or https: {target!r}")
    if settings.webhook_secret is None:
        raise ValueError("set STREAMPROC_WEBHOOK_SECRET: every POST is signed with it (X-Streamproc-Signature)")
    cfg = ForwardConfig(
        url=target, secret=settings.webhook_secret.get_secret_value().encode(),
        max_attempts=settings.forward_max_attempts, timeout_s=settings.forward_timeout_s,
        backoff_base_s=settings.forward_backoff_base_s, backoff_cap_s=settings.forward_backoff_cap_s,
        group=group or f"{settings.app_id}-alerts-forwarder")
    metrics = ForwarderMetrics()
    if settings.forward_metrics_port is not None:
        start_http_server(settings.forward_metrics_port, addr=settings.web_host, registry=metrics.registry)
    forwarder = AlertForwarder(settings, cfg, metrics)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: forwarder.stopping.set())
    log.info("forwarding %s to %s (group %s)", settings.topic(ALERTS_TOPIC), urllib.parse.urlsplit(target).netloc,
             cfg.group)
    forwarder.run()
