"""One bundle of Prometheus metrics, built against an injected registry.

Labels are bounded (topic, reason, outcome, partition); never a customer or product id.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streamproc.contracts.outputs import ClearedBy, ValueTier

# Measured: a batch of 1..2,000 events takes from ~0.5 ms to ~200 ms end to end.
BATCH_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
EVENT_SECONDS_BUCKETS = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.01)
REDIS_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
BATCH_SIZE_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_consumed = Counter(
            "streamproc_events_consumed_total", "Input records consumed, by topic.", ["topic"], registry=r
        )
        self.events_processed = Counter(
            "streamproc_events_processed_total",
            "Input records by outcome: applied, duplicate (same event_id), replayed (below the offset "
            "fence after a restart), erased (customer was forgotten), dead_lettered.",
            ["topic", "outcome"],
            registry=r,
        )
        self.dlq_records = Counter(
            "streamproc_dlq_records_total", "Records sent to the dead-letter topic, by reason.", ["reason"],
            registry=r,
        )
        self.unknown_fields = Counter(
            "streamproc_unknown_fields_total",
            "Events applied with fields their contract does not declare (ignored; STREAMPROC_UNKNOWN_FIELDS=ignore).",
            ["kind"], registry=r,
        )
        self.events_off_partition = Counter(
            "streamproc_events_off_partition_total",
            "Events whose key Kafka's default (murmur2) partitioner sends to another partition than the one they came "
            "on: a producer with another partitioner. Their customer's state is kept, but a lookup by id misses it.",
            registry=r,
        )
        self.late_events = Counter(
            "streamproc_late_events_total", "Events older than the watermark, by policy applied.", ["policy"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "streamproc_batch_processing_seconds", "Time to process one batch end to end.",
            buckets=BATCH_SECONDS_BUCKETS, registry=r,
        )
        self.event_seconds = Histogram(
            "streamproc_event_processing_seconds", "Batch time divided by its size (per-event cost).",
            buckets=EVENT_SECONDS_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "streamproc_batch_size_events", "Events per processed batch.", buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            "streamproc_end_to_end_latency_seconds",
            "From an input record's broker timestamp (produce time) to its features being written.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.redis_seconds = Histogram(
            "streamproc_redis_roundtrip_seconds", "Redis round-trip time, by operation.", ["operation"],
            buckets=REDIS_SECONDS_BUCKETS, registry=r,
        )
        self.redis_errors = Counter(
            "streamproc_redis_errors_total", "Redis errors (each retried with backoff).", registry=r
        )
        self.step_failures = Counter(
            "streamproc_step_failures_total",
            "Failed batch or sweep steps, by error: transient (a lost connection or a timeout, retried as long as it "
            "takes) or other (retried STREAMPROC_STEP_MAX_ATTEMPTS times, then the worker stops).",
            ["error"], registry=r,
        )
        self.fatal_stops = Counter(
            "streamproc_fatal_stops_total", "Times the worker stopped itself after a step failed for good.",
            registry=r,
        )
        self.delivery_failures = Counter(
            "streamproc_output_delivery_failures_total",
            "Emits whose records the broker did not acknowledge (the outputs stay parked and are sent again).",
            registry=r,
        )
        self.input_dropped = Counter(
            "streamproc_input_dropped_records_total",
            "Fetched input records not applied because a rebalance came between fetch and apply (read again from "
            "the committed offset, or from the first of them).", registry=r,
        )
        self.records_produced = Counter(
            "streamproc_records_produced_total", "Output records produced, by topic.", ["topic"], registry=r
        )
        self.cas_conflicts = Counter(
            "streamproc_state_conflicts_total",
            "Customer saves rejected by the version check (another writer won) and retried.", registry=r,
        )
        self.watermark = Gauge(
            "streamproc_watermark_seconds", "Event-time watermark (epoch seconds) of this worker.", registry=r
        )
        self.watermark_delay = Gauge(
            "streamproc_watermark_delay_seconds", "Wall time minus the watermark.", registry=r
        )
        self.consumer_lag = Gauge(
            "streamproc_consumer_lag_records", "Records behind the log end, by input partition.",
            ["topic", "partition"], registry=r,
        )
        self.input_offset = Gauge(
            "streamproc_input_offset", "The last applied offset (or, before one, the committed one), by input "
            "partition: a partition whose offset stands still while its lag grows is stalled.",
            ["topic", "partition"], registry=r,
        )
        self.last_batch = Gauge(
            "streamproc_last_batch_timestamp_seconds", "Wall time when this worker last applied a batch.",
            registry=r,
        )
        self.rebalances = Counter(
            "streamproc_rebalances_total", "Consumer group rebalances seen by this worker.", registry=r
        )
        self.input_held = Gauge(
            "streamproc_input_held_records",
            "Input records held back until the other input topic of their partition catches up (stream-time "
            "alignment).", registry=r,
        )
        self.input_pauses = Counter(
            "streamproc_input_pauses_total",
            "Times an input partition was paused because it ran far ahead of the other input topic.", registry=r,
        )
        self.sweep_customers = Counter(
            "streamproc_sweep_customers_total",
            "Silent customers whose stored features the inactivity sweep refreshed.", registry=r,
        )
        # --- models
        self.model_quality = Gauge(
            "streamproc_model_quality",
            "Prequential churn model quality of predictions made at snapshot time, scored when labels "
            "matured (metric: roc_auc, log_loss, precision, recall; window: overall or rolling).",
            ["metric", "window"], registry=r,
        )
        self.churn_scorer_quality = Gauge(
            "streamproc_churn_scorer_quality",
            "Prequential quality of each churn score on the same matured labels (scorer: served = what workers "
            "served at snapshot time, model, bgnbd, recency; metric: roc_auc, rolling_roc_auc, log_loss, brier, "
            "instant_roc_auc = within the latest snapshot instants).",
            ["scorer", "metric"], registry=r,
        )
        self.churn_served_scorer = Gauge(
            "streamproc_churn_served_scorer",
            "1 for the churn score the checkpoint serves (the best ROC AUC within the latest snapshot instants), 0 for "
            "the others.",
            ["scorer"], registry=r,
        )
        self.overdue_labels = Gauge(
            "streamproc_overdue_labels",
            "Customers with a pending churn label that should have matured by their partition's sweep mark "
            "(a snapshot D matures at the first grid instant a horizon after it; should stay 0).", registry=r,
        )
        self.labels_matured = Gauge(
            "streamproc_model_labels_matured", "Matured churn labels the current model has learned from.",
            registry=r,
        )
        self.label_positive_rate = Gauge(
            "streamproc_model_label_positive_rate", "Share of matured labels that were churn.", registry=r
        )
        self.model_version = Gauge(
            "streamproc_model_version", "Model checkpoint version this worker scores with.", registry=r
        )
        self.checkpoint_age = Gauge(
            "streamproc_model_checkpoint_age_seconds", "Wall time since the current checkpoint was written.",
            registry=r,
        )
        self.drift_detections = Gauge(
            "streamproc_model_drift_detections", "ADWIN drift detections on the churn model's error so far.",
            registry=r,
        )
        self.segment_size = Gauge(
            "streamproc_segment_customers", "Customers by segment (scored customers, all partitions).",
            ["segment"], registry=r,
        )
        self.segment_moves = Counter(
            "streamproc_segment_moves_total", "Customers who changed segment.", registry=r
        )
        self.alerts = Counter(
            "streamproc_churn_alerts_total", "Churn alerts published, by risk level and value tier.",
            ["risk_level", "value_tier"], registry=r,
        )
        self.alert_value_at_risk = Counter(
            "streamproc_churn_alert_value_at_risk_total",
            "Σ probability × CLV of the churn alerts published (currency units), by value tier.", ["value_tier"],
            registry=r,
        )
        self.alerts_over_budget = Counter(
            "streamproc_churn_alerts_over_budget_total",
            "Churn alerts not sent: over their day's budget for the value tier (STREAMPROC_ALERT_DAILY_BUDGET).",
            ["value_tier"], registry=r,
        )
        self.alerts_suppressed = Counter(
            "streamproc_churn_alerts_suppressed_total",
            "Alerts not sent: the customer opted out of retention contact (streamproc customer suppress).", registry=r)
        self.alerts_cleared = Counter(
            "streamproc_churn_alerts_cleared_total",
            "Cleared records published: the customer bought again (purchase) or the risk fell (risk_fell).",
            ["cleared_by"], registry=r,
        )
        # every tier and way of clearing is a series from the start (0): a rate over a series that appears at its
        # first increment misses that increment, and a panel shows "no data" rather than none over budget
        for tier in get_args(ValueTier):
            self.alert_value_at_risk.labels(tier)
            self.alerts_over_budget.labels(tier)
        for how in get_args(ClearedBy):
            self.alerts_cleared.labels(how)
        self.rfm_segment_customers = Gauge(
            "streamproc_rfm_segment_customers",
            "Live buyers per named RFM segment at the snapshot instant the current checkpoint's quintiles come from.",
            ["rfm_segment"], registry=r,
        )
        self.training_examples = Counter(
            "streamproc_training_examples_total", "Examples sent to the trainer, by kind.", ["kind"], registry=r
        )
        self.examples_learned = Counter(
            "streamproc_examples_learned_total", "Examples the trainer learned from, by kind.", ["kind"],
            registry=r,
        )
        self.trainer_active = Gauge(
            "streamproc_trainer_active", "1 while this process's trainer owns the training partition (learns).",
            registry=r,
        )
        self.checkpoints_refused = Counter(
            "streamproc_model_checkpoints_refused_total",
            "Checkpoints refused before unpickling: unsigned, or not matching their signature "
            "(STREAMPROC_MODEL_SIGNING_KEY); the last trusted one stays in use.", registry=r,
        )
        self.checkpoints = Counter(
            "streamproc_model_checkpoints_total", "Model checkpoints written by this worker's trainer.",
            registry=r,
        )
        self.churn_probability = Histogram(
            "streamproc_churn_probability", "Churn probability of scored customers.",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r,
        )
        # --- recommendations
        self.recommendations = Counter(
            "streamproc_recommendations_total",
            "Recommendations published, by trigger (purchase, product_view, add_to_cart, churn_alert).",
            ["trigger"], registry=r,
        )
        self.rec_quality = Gauge(
            "streamproc_recommendation_quality",
            "Online recommendation quality, scored by the trainer on each purchase against the last "
            "recommendation shown before it (metric: hit_rate, precision at k; strategy: streamproc or the "
            "popularity baseline, top-k best sellers at that instant).",
            ["metric", "strategy"], registry=r,
        )
        self.rec_purchases = Gauge(
            "streamproc_recommendation_scored_purchases",
            "Purchases made after a recommendation, scored for hit-rate so far (current checkpoint).", registry=r,
        )

        # --- business
        self.orders = Counter("streamproc_orders_total", "Purchases applied.", registry=r)
        self.revenue = Counter(
            "streamproc_revenue_total", "Purchase amounts applied (currency units, any currency).", registry=r
        )
        self.refunds = Counter("streamproc_refunded_total", "Refund amounts applied (currency units).", registry=r)
        self.customers = Gauge(
            "streamproc_customers", "Customers by lifecycle stage and value tier (all partitions).",
            ["lifecycle_stage", "value_tier"], registry=r,
        )
        self.buyers = Gauge("streamproc_buyers", "Customers with at least one purchase (HyperLogLog).", registry=r)
        self.repeat_purchase_rate = Gauge(
            "streamproc_repeat_purchase_rate", "Buyers with two or more purchases / buyers.", registry=r
        )
        self.cohort_retention = Gauge(
            "streamproc_cohort_retention_ratio",
            "Share of a first-purchase cohort buying again k months later (recent cohorts).",
            ["cohort", "months_after"], registry=r,
        )
        self.customers_erased = Counter(
            "streamproc_customers_erased_total", "Customers erased through the API or CLI.", registry=r
        )


class ForwarderMetrics:
    """``streamproc forward alerts``: what reached the webhook, what was retried, what was parked."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.delivered = Counter("streamproc_forward_delivered_total",
                                 "Alert records the webhook accepted (2xx).", registry=r)
        self.retries = Counter("streamproc_forward_retries_total",
                               "Attempts that failed and were retried (5xx, 408/425/429, timeouts, connection errors).",
                               registry=r)
        self.undeliverable = Counter(
            "streamproc_forward_undeliverable_total",
            "Alert records parked on alerts-undeliverable: rejected (a 4xx), attempts_exhausted, not_json.",
            ["reason"], registry=r)
        for reason in ("rejected", "attempts_exhausted", "not_json"):
            self.undeliverable.labels(reason)
        self.latency = Histogram(
            "streamproc_forward_latency_seconds", "From the first attempt to the 2xx, retries and backoff included.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)


# the one place outside streamproc/runtime/consumer.py that reads a third party's internals: observe_many's
PROMETHEUS_CHECKED_AGAINST = "prometheus_client 0.26.0"
PROMETHEUS_INTERNALS: dict[tuple[str, str], str] = {
    ("prometheus_client.metrics.Histogram", "_upper_bounds"): "read: the bucket bounds",
    ("prometheus_client.metrics.Histogram", "_buckets"): "incremented: the bucket counters",
    ("prometheus_client.metrics.Histogram", "_sum"): "incremented: the sum",
    ("prometheus_client.metrics.Histogram", "_labelnames"): "read: a labelled parent has no buckets of its own",
}


def observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """``histogram.observe`` for each amount, counted into the buckets first, so a batch of records takes one
    increment per bucket it hits instead of a locked increment and a bucket scan per record. Falls back to
    ``observe`` where the client's histogram is not laid out as expected (its bucket counters are private)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if (bounds is None or buckets is None or total is None or len(bounds) != len(buckets)
            or getattr(histogram, "_labelnames", False)):
        for amount in amounts:
            histogram.observe(amount)
        return
    counts: dict[int, int] = {}
    for amount in amounts:
        i = bisect_left(bounds, amount)  # the first bound >= amount (the last bound is +Inf)
        counts[i] = counts.get(i, 0) + 1
    for i, n in counts.items():
        buckets[i].inc(n)
    if amounts:
        total.inc(sum(amounts))
