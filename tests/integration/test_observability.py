"""A real Prometheus scraping a real worker: every dashboard query and alert rule evaluates, every panel has data.

The worker runs with short churn horizons and snapshot cadences (environment, as in production) so that churn
labels mature, the models train and checkpoint, and alerts and segment moves happen within a minute of wall time.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from streamproc.settings import Settings
from streamproc.tools.demo import processed_total
from streamproc.tools.producer import EventProducer
from streamproc.tools.simulate import SimulationConfig, Simulator
from streamproc.tools.tail import read_topic
from streamproc.tools.treatment import treat
from tests.conftest import WorkerProcess, worker_env
from tests.unit.test_dashboards import EXPORTER_SERIES, load_dashboards, metric_names, panel_targets

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES_GLOB = ROOT / "prometheus" / "rules" / "*.yml"
# what Grafana would put in for its interval variables: $__range is the time since the traffic started (the
# dashboard's time range), the others 30 s (many samples at a 1 s scrape interval)
GRAFANA_RANGE = re.compile(r"\$\{?__range\}?")
GRAFANA_INTERVALS = re.compile(r"\$\{?__(?:rate_interval|interval)\}?")
WINDOW = "30s"
EXPECTED_ALERTS = {"StreamprocConsumerLagGrowing", "StreamprocDeadLetterRateHigh", "StreamprocNoEventsProcessed",
                   "StreamprocWorkerStalled", "StreamprocRedisErrors", "StreamprocChurnModelAucLow",
                   "StreamprocModelCheckpointStale", "StreamprocChurnModelDrift"}
# Event time runs ~100,000 times faster than wall time here: churn labels mature 14 days after snapshots taken every
# 2 days (production: 60 and 7), the low alert threshold makes alerts happen with a young model, and the trainer
# checkpoints and every worker reloads the model every second.
MODEL_ENV = {
    "STREAMPROC_CHURN_HORIZON_DAYS": "14",
    "STREAMPROC_SNAPSHOT_CADENCE_DAYS": "2",
    "STREAMPROC_ALERT_THRESHOLD": "0.3",
    "STREAMPROC_ALERT_REARM_THRESHOLD": "0.2",
    "STREAMPROC_CHECKPOINT_INTERVAL_S": "1",
    "STREAMPROC_MODEL_RELOAD_S": "1",
}
# Beyond "some series": these must have counted something after this traffic (the model panels are not just zeros)
MUST_BE_POSITIVE = {
    "alert outcomes decided": "sum(streamproc_retention_outcomes_total)",
    "interventions recorded": "sum(streamproc_retention_interventions_total)",
    "churn alerts": "sum(streamproc_churn_alerts_total)",
    "segment moves": "sum(streamproc_segment_moves_total)",
    "customers with a segment": "sum(max by (segment) (streamproc_segment_customers))",
    "churn examples sent": 'sum(streamproc_training_examples_total{kind="churn"})',
    "segment examples sent": 'sum(streamproc_training_examples_total{kind="segment"})',
    "churn examples learned": 'sum(streamproc_examples_learned_total{kind="churn"})',
    "segment examples learned": 'sum(streamproc_examples_learned_total{kind="segment"})',
    "checkpoints": "sum(streamproc_model_checkpoints_total)",
    "model version": "max(streamproc_model_version)",
    "labels matured": "max(streamproc_model_labels_matured)",
    "rolling ROC AUC": 'max(streamproc_model_quality{metric="roc_auc", window="rolling"})',
    "churn probabilities observed": "sum(streamproc_churn_probability_count)",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, base_url: str, log_path: Path) -> None:
        self.base_url = base_url
        self.log_path = log_path
        self.ledger_port = 0

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

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> dict[str, Any]:
        return self.get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)

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
    ledger_port = free_port()  # `streamproc retention` serves its metrics here
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_GLOB)],
        "scrape_configs": [{"job_name": "streamproc-worker",
                            "static_configs": [{"targets": [f"127.0.0.1:{topics.web_port}"]}]},
                           {"job_name": "streamproc-retention",
                            "static_configs": [{"targets": [f"127.0.0.1:{ledger_port}"]}]}],
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
    prom.ledger_port = ledger_port
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


def grafana_to_promql(expr: str, range_s: int) -> str:
    out = GRAFANA_INTERVALS.sub(WINDOW, GRAFANA_RANGE.sub(f"{range_s}s", expr))
    assert "$" not in out, f"unknown Grafana variable in {expr!r}"
    return out


def dashboard_targets() -> dict[str, tuple[str, bool]]:
    """Every panel query: (Grafana expression, instant?) by "dashboard / panel / refId"."""
    targets = {}
    for name, board in load_dashboards().items():
        for panel, target in panel_targets(board):
            targets[f"{name} / {panel['title']} / {target['refId']}"] = (target["expr"], bool(target.get("instant")))
    return targets


def numbers(result: dict[str, Any]) -> list[float]:
    """Every sample value of an instant or range query result (NaN included)."""
    out = []
    for series in result["data"]["result"]:
        samples = series["values"] if "values" in series else [series["value"]]
        out.extend(float(value) for _, value in samples)
    return out


def has_data(result: dict[str, Any]) -> bool:
    """What Grafana would draw: at least one sample that is a number (NaN, e.g. a quantile of nothing, is not)."""
    return any(not math.isnan(v) for v in numbers(result))


def selectors(expr: str) -> set[str]:
    """The series selectors of a PromQL expression (metric name and label matchers), except inside absent()."""
    expr = re.sub(r"absent\([^()]*\)", " ", expr)
    return {m.group(0) for name in metric_names(expr)
            for m in re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])(\{{[^}}]*\}})?", expr)}


class ModelWorker(WorkerProcess):
    """A `streamproc worker` subprocess with extra settings in its environment (WorkerProcess forwards only the
    connection and isolation settings)."""

    def __init__(self, settings: Settings, log_path: Path, extra_env: dict[str, str]) -> None:
        super().__init__(settings, log_path)
        self.extra_env = extra_env

    def value(self, prefix: str) -> float:
        """Sum of the scraped samples whose name and labels start with ``prefix``."""
        return sum(v for k, v in self.metrics().items() if k.startswith(prefix) and "_created" not in k)


@pytest.fixture
def model_worker(topics: Settings, tmp_path: Path) -> Iterator[ModelWorker]:
    worker = ModelWorker(topics, tmp_path / "worker.log", MODEL_ENV)
    yield worker
    worker.stop(9)


def traffic() -> tuple[list[tuple[str, bytes, bytes]], list[tuple[str, bytes, bytes]]]:
    """Simulated traffic (400 customers, 120 days, malformed and duplicate records mixed in) in two parts: the
    first ~100 days, and the rest followed by a few events later than the watermark."""
    sim = Simulator(SimulationConfig(customers=400, days=120, seed=11, bad_fraction=0.01, duplicate_fraction=0.02))
    records = list(sim.payloads())
    assert sim.bad_events and sim.duplicate_events
    split = len(records) * 4 // 5
    first, rest = records[:split], records[split:]
    # an hour after the simulation's start, when each partition is already months ahead (allowed lateness: 1 h)
    late_ts = sim.cfg.start_ms + 3_600_000
    for i, truth in enumerate(sim.truth()[:12]):
        cid = truth.customer_id
        rest.append(("clicks", cid.encode(), orjson.dumps({
            "event_id": f"{cid}-late{i}", "customer_id": cid, "ts": late_ts + i, "session_id": f"{cid}-late",
            "action": "page_view",
        })))
    return first, rest


def send(settings: Settings, records: list[tuple[str, bytes, bytes]]) -> int:
    producer = EventProducer(settings)
    for topic, key, payload in records:
        producer.send(topic, key, payload)
    producer.close()
    return len(records)


def wait_for_trained_model(worker: ModelWorker, timeout: float = 40.0) -> None:
    """Until the model every worker scores with has learned every churn label sent so far (the trainer caught
    up, checkpointed, and the worker reloaded the checkpoint)."""
    deadline = time.monotonic() + timeout
    sent = learned = 0.0
    while time.monotonic() < deadline:
        sent = worker.value('streamproc_training_examples_total{kind="churn"}')
        learned = worker.value("streamproc_model_labels_matured")
        if sent > 0 and learned >= sent:
            return
        time.sleep(0.5)
    raise AssertionError(f"the model learned {learned} of {sent} matured churn labels in {timeout}s\n"
                         + worker.log_tail())


def start_retention_loop(settings: Settings, records: list[tuple[str, bytes, bytes]], port: int, tmp_path: Path,
                         request: pytest.FixtureRequest) -> int:
    """The simulated team's interventions (and one invalid) and the customers it brought back, then `streamproc
    retention` on the same topics; returns the transactions added (the worker processes them too)."""
    alerts = [a for a in read_topic(settings, "churn-alerts", 10**6, 3.0) if a.get("record") == "alert"]
    purchases: dict[str, list[int]] = {}
    for topic, _, value in records:
        try:
            event = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        if topic == "transactions" and isinstance(event, dict) and event.get("type") == "purchase" and \
                isinstance(event.get("ts"), int):
            purchases.setdefault(str(event.get("customer_id")), []).append(event["ts"])
    treatment = treat(alerts, purchases, 30, seed=3)
    assert treatment.interventions
    send(settings, [("interventions", i["customer_id"].encode(), orjson.dumps(i)) for i in treatment.interventions]
         + [("interventions", b"x", b'{"intervention_id": "bad"}')])
    added = send(settings, [("transactions", p["customer_id"].encode(), orjson.dumps(p))
                            for p in treatment.extra_purchases])
    env = {**worker_env(settings), "STREAMPROC_RETENTION_METRICS_PORT": str(port)}
    with open(tmp_path / "retention.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streamproc.cli", "retention"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    request.addfinalizer(lambda: (proc.kill(), proc.wait(10)))
    return added


def test_every_dashboard_query_and_alert_rule_evaluates_with_data(topics, model_worker, prometheus, tmp_path,
                                                                  request):
    targets = dashboard_targets()
    assert len(targets) >= 65
    first, rest = traffic()
    started = time.time()
    sent = send(topics, first)
    worker = model_worker.start()
    worker.wait_processed(sent, timeout=45)
    # the rest is scored by a model that has learned matured labels: churn alerts, segment moves
    wait_for_trained_model(worker)
    sent += send(topics, rest)
    worker.wait_processed(sent, timeout=30)
    # the retention loop: a simulated team acts on the alerts sent, the ledger decides their outcomes
    sent += start_retention_loop(topics, first + rest, prometheus.ledger_port, tmp_path, request)
    worker.wait_processed(sent, timeout=30)

    # lag gauges come every 5 s, population and segment gauges every 10 s: poll until every panel has had data
    # (a panel counts once it has data: an instant query can miss a scrape that timed out while the worker was busy)
    with_data: set[str] = set()
    positive: set[str] = set()
    deadline = time.monotonic() + 40
    while True:
        end = time.time()
        range_s = int(end - started) + 1
        queries = {key: grafana_to_promql(expr, range_s) for key, (expr, _) in targets.items()}
        results = {
            key: prometheus.query(queries[key]) if instant else prometheus.query_range(queries[key], started, end)
            for key, (_, instant) in targets.items()
        }
        errors = {key: r.get("error") for key, r in results.items() if r.get("status") != "success"}
        assert not errors, f"queries rejected by Prometheus: {json.dumps(errors, indent=2)}"
        with_data.update(key for key, r in results.items() if has_data(r))
        counted = {what: numbers(prometheus.query(expr)) for what, expr in MUST_BE_POSITIVE.items()}
        positive.update(what for what, values in counted.items() if any(v > 0 for v in values))
        empty, zero = sorted(set(targets) - with_data), sorted(set(MUST_BE_POSITIVE) - positive)
        rules = [rule for group in prometheus.get("/api/v1/rules")["data"]["groups"] for rule in group["rules"]]
        unevaluated = [rule["name"] for rule in rules if rule["health"] != "ok"]
        if (not empty and not zero and rules and not unevaluated) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    exposed = sorted({key.split("{")[0] for key in worker.metrics()})
    assert not empty and not zero, (
        "dashboard queries without data (no series, or only NaN):\n"
        + "".join(f"  {key}: {queries[key]}\n" for key in empty)
        + "nothing counted for:\n" + "".join(f"  {what}: {MUST_BE_POSITIVE[what]} = {counted[what]}\n" for what in zero)
        + f"series the worker exposes: {exposed}\n{worker.log_tail(1500)}"
    )

    # the alert rules Prometheus loaded from prometheus/rules/ evaluate (none is expected to fire here: they need
    # minutes of their condition, or data from 30 minutes ago), and every series they select exists
    assert {rule["name"] for rule in rules} >= EXPECTED_ALERTS, rules
    bad = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not bad, f"alert rules failing in Prometheus: {bad}\n{prometheus.log_tail()}"
    for rule in rules:
        result = prometheus.query(rule["query"])
        assert result["status"] == "success", f"{rule['name']}: {result.get('error')}"
        for selector in selectors(rule["query"]):
            if selector.split("{")[0] in EXPORTER_SERIES:  # not scraped here (promtool unit tests cover them)
                continue
            assert prometheus.query(selector)["data"]["result"], f"{rule['name']}: no series for {selector}"

    # Prometheus saw what the worker counted
    # (the worker has processed everything, so its count stands still: Prometheus has it after its next scrape)
    counted = processed_total(worker.metrics())
    deadline = time.monotonic() + 10
    while True:
        scraped = prometheus.query("sum(streamproc_events_processed_total)")["data"]["result"]
        if (scraped and float(scraped[0]["value"][1]) == counted) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert float(scraped[0]["value"][1]) == counted >= sent
    late = prometheus.query('sum(streamproc_late_events_total{policy="apply"})')["data"]["result"]
    assert float(late[0]["value"][1]) >= 1
