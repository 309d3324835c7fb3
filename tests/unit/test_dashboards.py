"""Grafana dashboards and Prometheus alert rules stay valid and in step with the worker's metrics (no services)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamproc.metrics import ForwarderMetrics, Metrics
from streamproc.runtime.ledger import LedgerMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = ROOT / "grafana" / "dashboards"
DASHBOARDS = sorted(DASHBOARDS_DIR.glob("*.json"))
RULES = ROOT / "prometheus" / "rules" / "streamproc.yml"
RULE_TESTS = ROOT / "prometheus" / "tests" / "streamproc_rules_test.yml"
DOCKER_CONFIG = ROOT / "prometheus" / "prometheus.docker.yml"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"timeseries", "stat", "bargauge"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",)}
ALERTS = ("StreamprocConsumerLagGrowing", "StreamprocDeadLetterRateHigh", "StreamprocNoEventsProcessed",
          "StreamprocWorkerStalled", "StreamprocRedisErrors", "StreamprocChurnModelAucLow",
          "StreamprocModelCheckpointStale", "StreamprocChurnModelDrift")
# PromQL words that look like metric names but are not (binary operators, modifiers)
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "inf", "nan", "atan2"}


# --------------------------------------------------------------------------- helpers (used by the integration test)


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARDS}


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (good enough for our dashboards and rules, not a full parser)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors, subqueries
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", " ", expr)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_KEYWORDS:
            continue  # a function or aggregation, or an operator
        names.add(word)
    return names


# series of the exporters docker-compose.yml runs beside the workers (not run here: their rules are proven by the
# promtool unit tests on synthetic series, and every query using them falls back to the workers' own series)
EXPORTER_SERIES = {"kafka_consumergroup_lag": "kafka-exporter"}


def exported_names() -> set[str]:
    """Every series name streamproc's processes can expose: the worker's metric bundle, the retention ledger's and
    the alert forwarder's (labelled families included, even if unused), and the compose stack's exporters'."""
    names = set(EXPORTER_SERIES)
    for bundle in (Metrics(), LedgerMetrics(), ForwarderMetrics()):
        for family in bundle.registry.collect():
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def rule_expressions() -> dict[str, str]:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(RULES.read_text())
    return {rule.get("alert") or rule["record"]: rule["expr"] for group in doc["groups"] for rule in group["rules"]}


# --------------------------------------------------------------------------- dashboards


def test_both_dashboards_exist():
    assert {p.name for p in DASHBOARDS} >= {"pipeline-health.json", "customers-and-churn.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_grafana_11_json_with_a_datasource_variable(path):
    board = json.loads(path.read_text())
    assert board["schemaVersion"] == 39
    assert board["uid"] and len(board["uid"]) <= 40
    assert board["title"].startswith("streamproc / ")
    assert board.get("id") is None, "provisioned dashboards must not carry a database id"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"


def test_dashboard_uids_and_titles_are_unique():
    boards = load_dashboards().values()
    assert len({b["uid"] for b in boards}) == len(boards)
    assert len({b["title"] for b in boards}) == len(boards)


def _datasource_refs(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield f"{path}.{key}", value
            yield from _datasource_refs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _datasource_refs(value, f"{path}[{i}]")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_and_target_uses_the_datasource_variable(path):
    board = json.loads(path.read_text())
    for panel in all_panels(board):
        if panel["type"] == "row":
            assert "targets" not in panel, panel["title"]
            continue
        assert panel.get("datasource") == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, f"{panel['title']} {target['refId']}"
    # nothing anywhere (annotations, variables, links...) names a datasource other than through the variable
    for where, ref in _datasource_refs(board):
        assert ref == DATASOURCE, f"{where}: {ref!r}"
    text = path.read_text()
    assert '"uid": "prometheus"' not in text


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_have_unique_ids_known_types_and_do_not_overlap(path):
    board = json.loads(path.read_text())
    panels = list(all_panels(board))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel["type"] in PANEL_TYPES | {"row"}, panel["type"]
        assert panel["title"]
        pos = panel["gridPos"]
        assert pos["w"] >= 1 and pos["h"] >= 1 and pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] != "row":
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
            assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_dashboards_cover_the_requested_signals():
    exprs = {name: " ".join(t["expr"] for _, t in panel_targets(b)) for name, b in load_dashboards().items()}
    pipeline, customers = exprs["pipeline-health.json"], exprs["customers-and-churn.json"]
    for needle in ("streamproc_events_consumed_total", "streamproc_events_processed_total",
                   "histogram_quantile(0.5, sum by (le) (rate(streamproc_batch_processing_seconds_bucket",
                   "histogram_quantile(0.95, sum by (le) (rate(streamproc_event_processing_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(streamproc_batch_processing_seconds_bucket",
                   "streamproc_consumer_lag_records", "streamproc_dlq_records_total", "streamproc_late_events_total",
                   'outcome="duplicate"', "streamproc_watermark_seconds", "streamproc_watermark_delay_seconds",
                   "streamproc_redis_roundtrip_seconds_bucket", "streamproc_redis_errors_total",
                   "streamproc_records_produced_total", "streamproc_rebalances_total",
                   "streamproc_state_conflicts_total", "streamproc_sweep_customers_total"):
        assert needle in pipeline, needle
    for needle in ("sum by (lifecycle_stage)", "sum by (value_tier)", "streamproc_orders_total",
                   "streamproc_revenue_total", "streamproc_refunded_total", "streamproc_buyers",
                   "streamproc_repeat_purchase_rate", "streamproc_cohort_retention_ratio",
                   # segments
                   "max by (segment) (streamproc_segment_customers)", "rate(streamproc_segment_moves_total",
                   # churn risk and alerts
                   "sum by (risk_level) (rate(streamproc_churn_alerts_total",
                   "sum by (value_tier) (rate(streamproc_churn_alerts_total",
                   "sum by (le) (increase(streamproc_churn_probability_bucket",
                   "histogram_quantile(0.9, sum by (le) (rate(streamproc_churn_probability_bucket",
                   # model quality
                   'streamproc_model_quality{metric="roc_auc", window="rolling"}',
                   # the served churn score next to its baselines
                   'streamproc_churn_scorer_quality{metric="rolling_roc_auc"}',
                   'streamproc_churn_scorer_quality{metric="log_loss"}',
                   'streamproc_model_quality{metric=~"precision|recall"}', "streamproc_model_labels_matured",
                   "streamproc_model_label_positive_rate", "streamproc_model_version",
                   "streamproc_model_checkpoint_age_seconds", "streamproc_model_drift_detections",
                   "rate(streamproc_training_examples_total", "rate(streamproc_examples_learned_total",
                   "rate(streamproc_model_checkpoints_total"):
        assert needle in customers, needle


def test_customers_dashboard_rows():
    board = load_dashboards()["customers-and-churn.json"]
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Customers", "Orders and revenue", "Buyers and retention", "Segments", "Churn risk and alerts",
                    "Model quality", "Recommendations", "Retention uplift"]


# Gauges every worker reports identically (read from Redis: the census, the population, the model summary)
SHARED_GAUGES = ("streamproc_customers", "streamproc_buyers", "streamproc_repeat_purchase_rate",
                 "streamproc_cohort_retention_ratio", "streamproc_segment_customers", "streamproc_model_quality",
                 "streamproc_model_labels_matured", "streamproc_model_label_positive_rate", "streamproc_model_version",
                 "streamproc_model_checkpoint_age_seconds", "streamproc_model_drift_detections",
                 "streamproc_recommendation_quality", "streamproc_recommendation_scored_purchases")


def test_population_gauges_are_not_summed_across_workers():
    """Every worker reports the same census, population and model values: summing them would multiply by the
    workers (in the dashboards and in the alert rules)."""
    exprs = [(f"{name} {panel['title']}", target["expr"])
             for name, board in load_dashboards().items() for panel, target in panel_targets(board)]
    exprs += list(rule_expressions().items())
    assert set(SHARED_GAUGES) <= set().union(*(metric_names(expr) for _, expr in exprs))
    for where, expr in exprs:
        for gauge in SHARED_GAUGES:
            for m in re.finditer(rf"\b{gauge}\b", expr):
                before = expr[: m.start()].rstrip()
                assert re.search(r"max(\s+by\s*\([^)]*\))?\s*\($", before), f"{where}: {expr}"


# --------------------------------------------------------------------------- metric names


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.99, sum by (le, operation) (rate(streamproc_redis_roundtrip_seconds_bucket'
            '{operation="load"}[$__rate_interval]))) / on() group_left sum(foo:bar offset 5m) '
            '> bool 1e3 and absent(streamproc_buyers) or vector(0) unless time() - x[5m:1m]')
    assert metric_names(expr) == {"streamproc_redis_roundtrip_seconds_bucket", "foo:bar", "streamproc_buyers", "x"}


def test_every_metric_used_by_dashboards_is_exported_by_the_worker():
    exported = exported_names()
    assert "streamproc_events_processed_total" in exported and "streamproc_batch_size_events_bucket" in exported
    used: dict[str, set[str]] = {}
    for name, board in load_dashboards().items():
        for panel, target in panel_targets(board):
            for metric in metric_names(target["expr"]):
                used.setdefault(metric, set()).add(f"{name}: {panel['title']}")
    assert len(used) >= 20
    unknown = {m: sorted(where) for m, where in used.items() if m not in exported}
    assert not unknown, f"not exported by any streamproc process: {unknown}"


def test_every_metric_used_by_alert_rules_is_exported_by_the_worker():
    exported = exported_names()
    rules = rule_expressions()
    assert set(ALERTS) <= set(rules)
    unknown = {alert: sorted(metric_names(expr) - exported) for alert, expr in rules.items()
               if metric_names(expr) - exported}
    assert not unknown, f"not exported by streamproc.metrics.Metrics: {unknown}"


# --------------------------------------------------------------------------- promtool


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_promtool_check_rules():
    done = _promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_rule_unit_tests():
    done = _promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_rule_has_a_promtool_unit_test_that_fires_it():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fired = {case["alertname"] for test in doc["tests"] for case in test.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    assert set(rule_expressions()) <= fired, sorted(set(rule_expressions()) - fired)


def test_alertmanager_config_is_valid():
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool is not installed (apt-get install prometheus-alertmanager)")
    done = subprocess.run([amtool, "check-config", str(ROOT / "alertmanager" / "alertmanager.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 receivers" in done.stdout


def test_promtool_check_docker_config_loads_the_rules():
    done = _promtool("check", "config", str(DOCKER_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "streamproc.yml" in done.stdout + done.stderr, "the docker config does not load prometheus/rules/"
