"""``streamproc forward alerts`` against a real local HTTP server on the real broker: a receiver that answers 200,
500 (then 200), slowly, 400, 503 for ever, and not at all. Every POST is signed; every alert is delivered or parked
on ``alerts-undeliverable`` with its last error; after a SIGKILL mid-delivery nothing is lost, and anything
delivered twice carries the same idempotency key and body."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from typing import Any

from streamproc.runtime.forwarder import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, verify
from streamproc.tools.demo import metric_total, scrape
from streamproc.tools.tail import read_topic
from tests.conftest import ROOT, free_port, produce, worker_env

SECRET = "test-webhook-secret"
DAY = 86_400_000


class Receiver(http.server.ThreadingHTTPServer):
    """Answers by the customer id's prefix: ok, flaky (500 twice), slow (the first answer after the forwarder's
    timeout), reject (400), down (503 for ever). Keeps every request."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict[str, Any]] = []
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/alerts"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        record = json.loads(body)
        kind = record["customer_id"].split("-")[0]
        with self.server.lock:
            self.server.seen[record["alert_id"]] += 1
            attempt = self.server.seen[record["alert_id"]]
        status = {"ok": 200, "reject": 400, "down": 503}.get(kind, 200)
        if kind == "flaky" and attempt <= 2:
            status = 500
        if kind == "slow" and attempt == 1:
            time.sleep(2.5)  # past the forwarder's 1 s timeout
        time.sleep(0.05)
        with self.server.lock:
            self.server.requests.append({
                "alert_id": record["alert_id"], "key": self.headers[IDEMPOTENCY_HEADER], "body": body,
                "signed": verify(SECRET.encode(), body, self.headers[SIGNATURE_HEADER] or ""), "status": status,
                "path": self.path})
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def alerts(prefix: str, n: int) -> list[tuple[str, bytes, bytes]]:
    out = []
    for i in range(n):
        cid = f"{prefix}-{i:03d}"
        record = {"record": "alert", "alert_id": f"{cid}:{20 * DAY}", "customer_id": cid, "ts": 20 * DAY,
                  "risk_level": "high", "value_tier": "medium", "probability": 0.8, "action": "coupon"}
        out.append(("churn-alerts", cid.encode(), json.dumps(record).encode()))
    return out


def forwarder(settings: Any, url: str, metrics_port: int, log: Any) -> subprocess.Popen[bytes]:
    env = {**worker_env(settings), "STREAMPROC_WEBHOOK_SECRET": SECRET, "STREAMPROC_FORWARD_MAX_ATTEMPTS": "3",
           "STREAMPROC_FORWARD_TIMEOUT_S": "1", "STREAMPROC_FORWARD_BACKOFF_BASE_S": "0.05",
           "STREAMPROC_FORWARD_BACKOFF_CAP_S": "0.2", "STREAMPROC_FORWARD_METRICS_PORT": str(metrics_port)}
    return subprocess.Popen([sys.executable, "-m", "streamproc.cli", "forward", "alerts", "--url", url], env=env,
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_every_alert_is_delivered_signed_or_parked_and_a_sigkill_loses_nothing(topics, tmp_path):
    settings = topics
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    records = (alerts("ok", 30) + alerts("flaky", 4) + alerts("slow", 2) + alerts("reject", 3) + alerts("down", 3))
    produce(settings, records)
    expected = {json.loads(v)["alert_id"] for _, _, v in records}
    port = free_port()
    with open(tmp_path / "forwarder.log", "wb") as log:
        proc = forwarder(settings, receiver.url, port, log)
        try:
            wait_for(lambda: len(receiver.requests) >= 12, 60, "the first deliveries")
            os.kill(proc.pid, signal.SIGKILL)  # mid-delivery: offsets not yet committed are redelivered
            proc.wait(10)
            proc = forwarder(settings, receiver.url, port, log)
            parked_wanted = {a for a in expected if a.startswith(("reject", "down"))}

            def settled() -> bool:
                delivered = {r["alert_id"] for r in receiver.requests if r["status"] == 200}
                return delivered >= expected - parked_wanted and len(read_topic(
                    settings, "alerts-undeliverable", 1000, 1.0)) >= len(parked_wanted)

            wait_for(settled, 120, "every alert settled")
            time.sleep(1.0)
            metrics = scrape(port)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        receiver.shutdown()

    assert all(r["signed"] for r in receiver.requests), "an unsigned or wrongly signed POST"
    assert {r["path"] for r in receiver.requests} == {"/hooks/alerts"}
    by_alert: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in receiver.requests:
        by_alert[r["alert_id"]].append(r)
    for alert_id, requests in by_alert.items():  # a redelivery is the same record under the same key
        assert {r["key"] for r in requests} == {alert_id}
        assert len({r["body"] for r in requests}) == 1
    delivered = {a for a, rs in by_alert.items() if any(r["status"] == 200 for r in rs)}
    assert delivered == {a for a in expected if not a.startswith(("reject", "down"))}
    assert all(len(by_alert[a]) >= 3 for a in delivered if a.startswith("flaky"))  # two 500s, then 200
    assert all(len(by_alert[a]) >= 2 for a in delivered if a.startswith("slow"))  # the timeout was retried

    parked = {p["idempotency_key"]: p for p in read_topic(settings, "alerts-undeliverable", 1000, 2.0)}
    assert set(parked) == {a for a in expected if a.startswith(("reject", "down"))}
    for key, p in parked.items():
        if key.startswith("reject"):  # a 400 is the receiver refusing the record: not retried
            assert p["attempts"] == 1 and p["last_status"] == 400 and "400" in p["last_error"]
        else:
            assert p["attempts"] == 3 and p["last_status"] == 503
        assert p["alert"]["alert_id"] == key and p["url"] == receiver.url
    # this process's counts (after the restart): at least what it delivered since, and every parked record
    assert metric_total(metrics, "streamproc_forward_delivered_total") >= 1
    assert metric_total(metrics, "streamproc_forward_undeliverable_total") >= 1
    assert metric_total(metrics, "streamproc_forward_retries_total") >= 1


def test_a_receiver_that_is_not_there_gets_every_alert_parked_with_the_connection_error(topics, tmp_path):
    settings = topics
    records = alerts("ok", 4)
    produce(settings, records)
    closed = f"http://127.0.0.1:{free_port()}/nobody"  # nothing listens there
    with open(tmp_path / "forwarder.log", "wb") as log:
        proc = forwarder(settings, closed, free_port(), log)
        try:
            wait_for(lambda: len(read_topic(settings, "alerts-undeliverable", 100, 1.0)) >= 4, 60, "parked alerts")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    parked = read_topic(settings, "alerts-undeliverable", 100, 1.0)
    assert sorted(p["idempotency_key"] for p in parked) == sorted(json.loads(v)["alert_id"] for _, _, v in records)
    assert all(p["attempts"] == 3 and p["last_status"] is None and "Connection" in p["last_error"] for p in parked)
