"""Gauges a worker reports from what it reads: the population (census, buyers, cohorts, overdue labels) and the
current checkpoint's summary. Every worker reports the same totals (use max() across workers)."""

from __future__ import annotations

import logging
import time
from typing import Any

from streamproc.domain.rfm import SEGMENT_NAMES
from streamproc.metrics import Metrics
from streamproc.ports import FeatureStore

log = logging.getLogger("streamproc.worker")


async def report_population(store: FeatureStore, metrics: Metrics, segment_names: dict[int, str]) -> None:
    """Population gauges from Redis: every worker reports the same totals (use max() across workers)."""
    try:
        census = await store.census()
        population = await store.population()
        overdue = await store.overdue_labels(await store.sweep_marks())
    except Exception as exc:  # Redis down: keep the last values, the batch loop reports the error
        log.debug("population gauges not updated: %s", exc)
        return
    metrics.overdue_labels.set(overdue)
    metrics.customers.clear()
    by_stage_tier: dict[tuple[str, str], int] = {}
    by_segment: dict[str, int] = {}
    for key, n in census.items():
        stage, tier, segment = ([*key.split("|"), "", ""])[:3]
        by_stage_tier[(stage, tier)] = by_stage_tier.get((stage, tier), 0) + n
        if segment:
            label = segment_names.get(int(segment), f"segment {segment}")
            by_segment[label] = by_segment.get(label, 0) + n
    for (stage, tier), n in by_stage_tier.items():
        metrics.customers.labels(stage, tier).set(n)
    metrics.segment_size.clear()
    for label, n in by_segment.items():
        metrics.segment_size.labels(label).set(n)
    metrics.buyers.set(population.get("buyers", 0))
    metrics.repeat_purchase_rate.set(population.get("repeat_purchase_rate", 0.0))
    metrics.cohort_retention.clear()
    cohorts = sorted({k.split(":")[1] for k in population if k.startswith("retention:")})[-6:]
    for key, value in population.items():
        if key.startswith("retention:"):
            _, cohort, months = key.split(":")
            if cohort in cohorts and int(months) <= 6:
                metrics.cohort_retention.labels(cohort, months).set(value)


def report_model_summary(metrics: Metrics, summary: dict[str, Any]) -> None:
    """The current checkpoint's quality, labels, drift and recommendation hit-rate, as gauges."""
    for metric in ("roc_auc", "log_loss", "precision", "recall"):
        metrics.model_quality.labels(metric, "overall").set(summary.get(metric, 0.0))
        if f"rolling_{metric}" in summary:
            metrics.model_quality.labels(metric, "rolling").set(summary[f"rolling_{metric}"])
    for metric in ("roc_auc", "rolling_roc_auc", "log_loss"):
        metrics.churn_scorer_quality.labels("served", metric).set(summary.get(metric, 0.0))
    for scorer, quality in summary.get("scorers", {}).items():
        for metric in ("roc_auc", "rolling_roc_auc", "instant_roc_auc", "log_loss", "brier"):
            metrics.churn_scorer_quality.labels(scorer, metric).set(quality.get(metric, 0.0))
        metrics.churn_served_scorer.labels(scorer).set(1 if summary.get("served_by") == scorer else 0)
    metrics.labels_matured.set(summary.get("labels", 0))
    metrics.label_positive_rate.set(summary.get("positive_rate", 0.0))
    metrics.drift_detections.set(summary.get("drift_detections", 0))
    if "rec_hit_rate" in summary:
        for metric in ("hit_rate", "precision"):
            metrics.rec_quality.labels(metric, "streamproc").set(summary[f"rec_{metric}"])
            metrics.rec_quality.labels(metric, "popularity").set(summary[f"rec_baseline_{metric}"])
        metrics.rec_purchases.set(summary.get("rec_purchases", 0))
    rfm_segments = summary.get("rfm", {}).get("segments")
    if rfm_segments:  # every name, 0 where none: a segment that empties shows as empty, not as its last count
        for name in SEGMENT_NAMES:
            metrics.rfm_segment_customers.labels(name).set(rfm_segments.get(name, 0))
    if summary.get("saved_at"):
        metrics.checkpoint_age.set(max(0.0, time.time() - summary["saved_at"]))
