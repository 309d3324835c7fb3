"""A real Prometheus scraping a real worker: every dashboard query and alert rule evaluates, every panel has data."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from streamproc.demo import processed_total
from streamproc.producer import EventProducer
from streamproc.settings import Settings
from streamproc.simulate import SimulationConfig, Simulator
from tests.unit.test_dashboards import load_dashboards, panel_targets

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES_GLOB = ROOT / "prometheus" / "rules" / "*.yml"
# what Grafana would put in for its interval variables; 30 s holds many samples at a 1 s scrape interval
GRAFANA_INTERVALS = re.compile(r"\$\{?__(?:rate_interval|interval|range)(?:_s|_ms)?\}?")
WINDOW = "30s"
EXPECTED_ALERTS = {"StreamprocConsumerLagGrowing", "StreamprocDeadLetterRateHigh", "StreamprocNoEventsProcessed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, base_url: str, log_path: Path) -> None:
        self.base_url = base_url
        self.log_path = log_path

    def get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry {"status": "error", "error": ...}
            return json.loads(exc.read())

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@pytest.fixture
def prometheus(topics: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Prometheus]:
    """The Debian `prometheus` binary on a free loopback port, scraping the test's worker every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    port = free_port()
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_GLOB)],
        "scrape_configs": [{"job_name": "streamproc-worker",
                            "static_configs": [{"targets": [f"127.0.0.1:{topics.web_port}"]}]}],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    request.addfinalizer(stop)  # registered before anything else can fail
    prom = Prometheus(f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, "prometheus exited\n" + prom.log_tail()
        try:
            with urllib.request.urlopen(f"{prom.base_url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "prometheus never became ready\n" + prom.log_tail()
        time.sleep(0.2)
    yield prom


def grafana_to_promql(expr: str) -> str:
    out = GRAFANA_INTERVALS.sub(WINDOW, expr)
    assert "$" not in out, f"unknown Grafana variable in {expr!r}"
    return out


def dashboard_queries() -> dict[str, str]:
    queries = {}
    for name, board in load_dashboards().items():
        for panel, target in panel_targets(board):
            queries[f"{name} / {panel['title']} / {target['refId']}"] = grafana_to_promql(target["expr"])
    return queries


def send_traffic(settings: Settings) -> int:
    """Simulated traffic with malformed and duplicate records, then a few events later than the watermark."""
    sim = Simulator(SimulationConfig(customers=150, days=60, seed=11, bad_fraction=0.01, duplicate_fraction=0.02))
    producer = EventProducer(settings)
    sent = 0
    for topic, key, payload in sim.payloads():
        producer.send(topic, key, payload)
        sent += 1
    assert sim.bad_events and sim.duplicate_events
    # an hour after the simulation's start, when each partition is already ~2 months ahead (allowed lateness: 1 h)
    late_ts = sim.cfg.start_ms + 3_600_000
    for i, truth in enumerate(sim.truth()[:12]):
        cid = truth.customer_id
        producer.send("clicks", cid.encode(), orjson.dumps({
            "event_id": f"{cid}-late{i}", "customer_id": cid, "ts": late_ts + i, "session_id": f"{cid}-late",
            "action": "page_view",
        }))
        sent += 1
    producer.close()
    return sent


def test_every_dashboard_query_and_alert_rule_evaluates_with_data(topics, worker_factory, prometheus):
    queries = dashboard_queries()
    assert len(queries) >= 30
    sent = send_traffic(topics)
    worker = worker_factory().start()
    worker.wait_processed(sent, timeout=45)

    # the lag gauges come every 5 s and the population gauges every 10 s: poll until every query has series
    deadline = time.monotonic() + 40
    while True:
        results = {key: prometheus.query(expr) for key, expr in queries.items()}
        errors = {key: r.get("error") for key, r in results.items() if r.get("status") != "success"}
        assert not errors, f"queries rejected by Prometheus: {json.dumps(errors, indent=2)}"
        empty = sorted(key for key, r in results.items() if not r["data"]["result"])
        rules = [rule for group in prometheus.get("/api/v1/rules")["data"]["groups"] for rule in group["rules"]]
        unevaluated = [rule["name"] for rule in rules if rule["health"] != "ok"]
        if (not empty and rules and not unevaluated) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not empty, (
        "dashboard queries without any series:\n" + "\n".join(f"  {key}: {queries[key]}" for key in empty)
        + f"\nseries the worker exposes: {sorted({key.split('{')[0] for key in worker.metrics()})}"
    )

    # the alert rules Prometheus loaded from prometheus/rules/ evaluate (no alert is expected to fire here)
    assert {rule["name"] for rule in rules} >= EXPECTED_ALERTS, rules
    bad = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not bad, f"alert rules failing in Prometheus: {bad}\n{prometheus.log_tail()}"
    for rule in rules:
        result = prometheus.query(rule["query"])
        assert result["status"] == "success", f"{rule['name']}: {result.get('error')}"

    # Prometheus saw what the worker counted
    scraped = prometheus.query("sum(streamproc_events_processed_total)")["data"]["result"]
    assert float(scraped[0]["value"][1]) == processed_total(worker.metrics()) >= sent
    late = prometheus.query('sum(streamproc_late_events_total{policy="apply"})')["data"]["result"]
    assert float(late[0]["value"][1]) >= 1
