"""The domain configurations as the settings give them: the one place a setting becomes a domain parameter
(``Settings`` holds each setting's one default; the frozen domain configs take what it says)."""

from __future__ import annotations

from streamproc.domain.alerts import ControlGroup
from streamproc.domain.churn import ChurnConfig
from streamproc.domain.customer import FoldConfig
from streamproc.domain.events import DecodeLimits
from streamproc.domain.model_config import ModelConfig
from streamproc.domain.recommend import RecConfig
from streamproc.settings import Settings


def decode_limits(settings: Settings) -> DecodeLimits:
    return DecodeLimits(
        max_payload_bytes=settings.max_payload_bytes,
        max_items_per_transaction=settings.max_items_per_transaction,
        max_future_skew_ms=int(settings.max_future_skew_s * 1000),
        min_event_time_ms=settings.min_event_time_ms,
        unknown_fields=settings.unknown_fields,
        dead_letter_max_original_bytes=settings.dead_letter_max_original_bytes,
    )


def fold_config(settings: Settings) -> FoldConfig:
    return FoldConfig(
        dedup_horizon_ms=int(settings.dedup_horizon_s * 1000),
        dedup_max_ids=settings.dedup_max_ids,
        session_gap_ms=int(settings.session_gap_s * 1000),
        allowed_lateness_ms=int(settings.allowed_lateness_s * 1000),
        windows_days=tuple(settings.windows_days),
        new_days=settings.lifecycle_new_days,
        at_risk_days=settings.lifecycle_at_risk_days,
        churned_days=settings.lifecycle_churned_days,
        clv_period_days=settings.clv_period_days,
        clv_periods=settings.clv_periods,
        clv_discount_rate=settings.clv_discount_rate,
        clv_retention_probability=settings.clv_retention_probability,
        tier_high=settings.tier_high_spend,
        tier_medium=settings.tier_medium_spend,
    )


def churn_config(settings: Settings) -> ChurnConfig:
    return ChurnConfig(
        horizon_days=settings.churn_horizon_days, cadence_days=settings.snapshot_cadence_days,
        label_on=settings.churn_label_on, alert_threshold=settings.alert_threshold,
        rearm_threshold=settings.alert_rearm_threshold, cooldown_days=settings.alert_cooldown_days,
        high_risk=settings.risk_high, critical_risk=settings.risk_critical,
        alert_cadence_days=settings.alert_cadence_days,
    )


def control_group(settings: Settings) -> ControlGroup:
    key = settings.control_key.get_secret_value() if settings.control_key else settings.app_id
    return ControlGroup(key.encode(), settings.control_share)


def rec_config(settings: Settings) -> RecConfig:
    return RecConfig(
        k=settings.rec_k, halflife_days=settings.rec_halflife_days, max_items=settings.rec_max_items,
        max_pairs=settings.rec_max_pairs, min_pair_count=settings.rec_min_pair_count,
        exclude_bought_days=settings.rec_exclude_bought_days, viewed_days=settings.rec_viewed_days,
        catalogue_days=settings.rec_catalogue_days, weight_bought_together=settings.rec_weight_bought_together,
        weight_viewed_not_bought=settings.rec_weight_viewed_not_bought,
        weight_popular_in_segment=settings.rec_weight_popular_in_segment,
    )


def model_config(settings: Settings) -> ModelConfig:
    return ModelConfig(
        segmenter=settings.segmenter, n_segments=settings.n_segments, kmeans_halflife=settings.kmeans_halflife,
        classifier=settings.classifier, seed=settings.model_seed, alert_threshold=settings.alert_threshold,
        horizon_days=settings.churn_horizon_days, rec=rec_config(settings),
    )
