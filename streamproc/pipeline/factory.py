"""The one way to build the batch step: the worker, the offline trainer (``streamproc models train``) and the
benchmarks all get it here, so every setting that shapes what the step computes reaches each of them."""

from __future__ import annotations

from streamproc.config import churn_config, control_group, decode_limits, fold_config
from streamproc.domain.alerts import share_of_budget
from streamproc.metrics import Metrics
from streamproc.pipeline.step import BatchProcessor
from streamproc.ports import FeatureStore
from streamproc.settings import Settings
from streamproc.topics import load_specs


def build_processor(settings: Settings, store: FeatureStore, metrics: Metrics | None = None) -> BatchProcessor:
    """The batch step as ``settings`` configure it, on ``store``."""
    return BatchProcessor(
        store,
        metrics if metrics is not None else Metrics(),
        decode_limits(settings),
        fold_config(settings),
        late_policy=settings.late_event_policy,
        expire_after_days=settings.expire_after_days,
        sweep_interval_ms=int(settings.sweep_interval_s * 1000),
        churn=churn_config(settings),
        max_source_skew_ms=None if settings.max_source_skew_s is None else int(settings.max_source_skew_s * 1000),
        action_table=settings.retention_actions,
        models_enabled=settings.models_enabled,
        pseudonymize=settings.customer_key if settings.pseudonymize_key else None,
        excluded_products=frozenset(settings.rec_excluded_products),
        sweep_budget=settings.sweep_budget,
        fault_event_id=settings.fault_inject_event_id,
        control=control_group(settings),
        alert_budgets=share_of_budget(settings.alert_daily_budget, load_specs()["transactions"].partitions),
    )
