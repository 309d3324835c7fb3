"""What the retention team's pages show, read from where streamproc keeps it: the alerts topic (folded into an
``AlertBoard``), Redis (read only: customers, the segment census, the model summary, the retention ledger) and the
workers' /metrics. The same gathering serves the live pages and ``streamproc report``."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from streamproc.adapters.redis_clients import sync_redis
from streamproc.domain.alert_board import AlertBoard
from streamproc.domain.retention import CustomerLedger, uplift_table
from streamproc.pipeline.lookup import locate, lookup
from streamproc.ports import FeatureStore, ModelStore
from streamproc.runtime.ledger import LEDGER_PREFIX, read_outcomes
from streamproc.settings import Settings
from streamproc.tools.demo import metric_total, scrape_url

HEALTH_SAMPLES = 60  # the small charts: the last 60 samples (5 minutes at one every 5 s)
TRAITS_PER_SEGMENT = 3


@dataclass
class HealthSample:
    at: float  # wall-clock seconds: this is the operators' view of now, not event time
    processed: float
    lag: float


@dataclass
class Health:
    """The workers' metrics, sampled: a few numbers and two short series (events a second, records behind)."""

    urls: list[str]
    samples: deque[HealthSample] = field(default_factory=lambda: deque(maxlen=HEALTH_SAMPLES))
    latest: dict[str, float] = field(default_factory=dict)

    def sample(self) -> None:
        merged: dict[str, float] = {}
        for url in self.urls:
            for name, value in scrape_url(url).items():
                # counters and lag add up over workers; a gauge (model version, AUC, delay) is the highest one's
                summed = name.split("{")[0].endswith(("_total", "_lag_records"))
                merged[name] = merged.get(name, 0.0) + value if summed else max(merged.get(name, value), value)
        if not merged:
            return
        self.latest = merged
        self.samples.append(HealthSample(time.time(), metric_total(merged, "streamproc_events_processed_total"),
                                         metric_total(merged, "streamproc_consumer_lag_records")))

    def rates(self) -> list[float]:
        pairs = zip(list(self.samples)[:-1], list(self.samples)[1:], strict=False)
        return [max(0.0, (b.processed - a.processed) / (b.at - a.at)) for a, b in pairs if b.at > a.at]

    def numbers(self) -> dict[str, float | None]:
        m = self.latest
        rates = self.rates()
        return {
            "events processed": metric_total(m, "streamproc_events_processed_total") if m else None,
            "events a second": rates[-1] if rates else None,
            "records behind (lag)": metric_total(m, "streamproc_consumer_lag_records") if m else None,
            "event time behind now (s)": m.get("streamproc_watermark_delay_seconds"),
            "model version": m.get("streamproc_model_version"),
            "churn model AUC (recent labels)": m.get('streamproc_model_quality{metric="roc_auc",window="rolling"}'),
            "labels matured": m.get("streamproc_model_labels_matured"),
            "alerts sent": metric_total(m, "streamproc_churn_alerts_total") if m else None,
            "dead letters": metric_total(m, "streamproc_dlq_records_total") if m else None,
        }


def segment_rows(census: dict[str, int], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per segment: customers now (the census), the model's size and spend shares, and its most distinctive traits
    (the centroid's inputs furthest from the average, in their own units)."""
    customers: dict[str, int] = {}
    for key, count in census.items():
        segment = key.rsplit("|", 1)[-1]
        customers[segment] = customers.get(segment, 0) + count
    profiles = summary.get("segments", {}) or {}
    rows = []
    for sid in sorted(set(customers) | set(profiles), key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)):
        profile = profiles.get(sid, {})
        scaled = profile.get("scaled", {}) or {}
        top = sorted(scaled, key=lambda k: -abs(scaled[k]))[:TRAITS_PER_SEGMENT]
        traits = [f"{k.replace('_', ' ')} {'high' if scaled[k] > 0 else 'low'} "
                  f"({profile.get('centroid', {}).get(k, 0.0):.3g})" for k in top]
        rows.append({"id": sid, "name": profile.get("name") or ("no segment yet" if sid in ("", "None") else
                                                                 f"segment {sid}"),
                     "customers": customers.get(sid, 0), "size_share": profile.get("size_share"),
                     "spend_share": profile.get("spend_share"), "traits": traits})
    return [r for r in rows if r["customers"] or r["size_share"]]


class UiData:
    """Reads for the pages. ``store`` and ``models`` are the worker's ports (any Redis user that may read);
    the ledger is read with a plain client."""

    def __init__(self, settings: Settings, store: FeatureStore, models: ModelStore, board: AlertBoard,
                 health: Health) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.board = board
        self.health = health

    def _ledger(self) -> Any:
        return sync_redis(self.settings.redis_url, **self.settings.redis_kwargs())

    async def customer(self, customer_id: str) -> dict[str, Any] | None:
        where = await locate(self.store, self.settings, customer_id)
        found = await lookup(self.store, self.models, self.settings, where)
        if found is None:
            return None
        stored_id = self.settings.customer_key(customer_id)  # what alerts and the ledger carry (a pseudonym or the id)
        found["alerts"] = list(self.board.history.get(stored_id, []))
        found["interventions"] = await asyncio.to_thread(self._interventions, stored_id)
        model = await self.store.model_outputs(where) or {}
        # a snapshot scored before the first model has no probability ([None, None])
        scored = sorted((int(ts), float(v[0])) for ts, v in (model.get("scored") or {}).items()
                        if v and v[0] is not None)
        alerted = [(int(a["ts"]), float(a["probability"])) for a in found["alerts"] if a["record"] == "alert"]
        found["risk_history"] = sorted(set(scored) | set(alerted))
        return found

    def _interventions(self, stored_id: str) -> list[dict[str, Any]]:
        client = self._ledger()
        try:
            raw = client.get(LEDGER_PREFIX + stored_id)
        finally:
            client.close()
        if not raw:
            return []
        ledger = CustomerLedger.from_dict(orjson.loads(raw))
        return sorted(({"id": k, **v} for k, v in ledger.interventions.items()), key=lambda i: i.get("ts", 0))

    async def segments(self) -> list[dict[str, Any]]:
        return segment_rows(await self.store.census(), await self.models.summary() or {})

    async def uplift(self) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            client = self._ledger()
            try:
                outcomes = read_outcomes(client)
            finally:
                client.close()
            return [row.as_dict() for row in uplift_table(outcomes)] if outcomes else []

        return await asyncio.to_thread(read)
