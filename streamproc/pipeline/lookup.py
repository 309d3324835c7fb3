"""One customer's full picture, for the HTTP endpoint and `streamproc customer show`.

Features are recomputed from the stored state as of the stream's current watermark (never the wall
clock), so a silent customer's recency and windows are exact even between two inactivity sweeps.
"""

from __future__ import annotations

from typing import Any

import orjson

from streamproc.config import churn_config, fold_config
from streamproc.domain.churn import inputs_at
from streamproc.domain.customer import CustomerState
from streamproc.domain.features import clv, features, retention_per_period
from streamproc.domain.rfm import rfm_scores
from streamproc.partitioning import customer_partition
from streamproc.ports import CustomerRef, FeatureStore, ModelStore
from streamproc.settings import Settings


async def locate(store: FeatureStore, settings: Settings, customer_id: str) -> CustomerRef:
    """Where the customer with this (raw) id is stored: their input partition by the producers' partitioner, and
    the stored id (their pseudonym when ids are pseudonymised). Before any worker laid the store out, the
    declared partition count stands in (an erasure is recorded all the same)."""
    return CustomerRef(customer_partition(customer_id, await store.layout_partitions()),
                       settings.customer_key(customer_id))


async def lookup(
    store: FeatureStore, models: ModelStore, settings: Settings, customer: CustomerRef
) -> dict[str, Any] | None:
    blob = await store.state_blob(customer)
    if blob is None:
        return None
    state = CustomerState.from_dict(orjson.loads(blob))
    cfg = fold_config(settings)
    marks = await store.load_watermarks()
    watermark = max(marks.values()) - cfg.allowed_lateness_ms if marks else state.max_ts
    as_of = max(watermark, state.max_ts)
    out: dict[str, Any] = {
        "features": features(state, as_of, cfg), "stored_features": await store.features(customer),
    }
    model = await store.model_outputs(customer) or {}
    summary = await models.summary() or {}
    segment = model.get("segment")
    profiles = summary.get("segments", {})
    out["segment"] = None if segment is None else {"id": segment, **profiles.get(str(segment), {})}
    if out["segment"]:
        out["segment"].pop("scaled", None)
    churn_p = model.get("churn_p")
    # CLV as alerts give it: the churn probability is the retention term (the configured one before any score)
    retention = retention_per_period(churn_p, churn_config(settings).horizon_days, cfg)
    predictive = round(clv(state, as_of, cfg, retention)[0], 2)
    out["features"]["clv"] = predictive
    out["features"]["clv_retention_per_period"] = round(retention, 4)
    out["churn"] = {
        "probability": churn_p, "model_version": model.get("model_version"),
        "value_at_risk": None if churn_p is None else round(churn_p * predictive, 2),
        "last_alert_ts": model.get("last_alert_ts"), "open_alert": (model.get("open") or [None])[0],
        "pending_snapshots": len(state.pending),
    }
    now = inputs_at(state, as_of + 1, exact=True)
    out["rfm"] = None if now is None else rfm_scores(summary.get("rfm", {}).get("edge_buckets"), now)
    out["last_recommendation"] = model.get("rec")  # {id, ts, trigger, items}: the full record is on its topic
    return out
