"""The readable features of a customer, a pure function of the state the fold keeps and an event-time instant:
``features(state, as_of, cfg)`` (RFM, event-time windows and trends, sessions, category affinity, CLV, value tier,
lifecycle stage). Compiled with the fold (``streamproc.compiled``); the pure-Python source is the reference."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from streamproc.domain.customer import (
    CARTS,
    CLICKS,
    DAY_MS,
    PURCHASES,
    S_ABANDONED,
    S_CONVERTED,
    S_COUNT,
    S_EVENTS,
    S_LENGTH_MS,
    S_WITH_CART,
    SESSIONS,
    SPEND,
    VIEWS,
    CustomerState,
    FoldConfig,
    add_session,
    calendar_month,
)


def lifecycle(state: CustomerState, as_of: int, cfg: FoldConfig) -> tuple[str, int]:
    """(stage, since) on event time: new → active → at_risk → churned → reactivated."""
    first = state.first_event_ts if state.first_event_ts is not None else as_of
    last = state.last_event_ts if state.last_event_ts is not None else as_of
    silent = as_of - last
    if silent >= cfg.churned_days * DAY_MS:
        return "churned", last + cfg.churned_days * DAY_MS
    if silent >= cfg.at_risk_days * DAY_MS:
        return "at_risk", last + cfg.at_risk_days * DAY_MS
    comeback = reactivation(state, as_of, cfg)
    if comeback is not None and as_of - comeback < cfg.new_days * DAY_MS:
        return "reactivated", comeback
    if as_of - first < cfg.new_days * DAY_MS:
        return "new", first
    became_active = first + cfg.new_days * DAY_MS
    if comeback is not None:
        became_active = max(became_active, comeback + cfg.new_days * DAY_MS)
    return "active", became_active


def reactivation(state: CustomerState, as_of: int, cfg: FoldConfig) -> int | None:
    """Start (UTC day) of the latest comeback: an active day after churned_days without activity, found
    in the day buckets, so it does not depend on the order events arrived in."""
    if state.first_event_ts is None or as_of - state.first_event_ts <= cfg.churned_days * DAY_MS:
        return None  # too young to have come back from a churn-length silence
    today = as_of // DAY_MS
    active = sorted(d for d, row in state.days.items() if d <= today and (row[PURCHASES] or row[CLICKS]
                                                                        or row[SPEND]))
    first_day = state.first_event_ts // DAY_MS if state.first_event_ts is not None else None
    for prev, day in zip(reversed(active[:-1]), reversed(active), strict=False):
        if day - prev > cfg.churned_days:
            return day * DAY_MS
        if today - day > cfg.new_days + cfg.churned_days:
            break
    if active and first_day is not None and active[0] - first_day > cfg.churned_days:
        return active[0] * DAY_MS
    return None


def value_tier(net_spend: float, cfg: FoldConfig) -> str:
    if net_spend >= cfg.tier_high:
        return "high"
    if net_spend >= cfg.tier_medium:
        return "medium"
    return "low"


def _add_row(acc: list[int], row: list[int]) -> None:
    acc[0] += row[0]
    acc[1] += row[1]
    acc[2] += row[2]
    acc[3] += row[3]
    acc[4] += row[4]
    acc[5] += row[5]


def window_sums(state: CustomerState, as_of: int, windows: Iterable[int]) -> dict[int, list[int]]:
    """Per window length (days, plus -30 for the 30 days before the last 30): summed day-bucket slots,
    over UTC days in (as_of_day - w, as_of_day]. One pass over the buckets."""
    today = as_of // DAY_MS
    lengths = sorted(set(windows))
    sums = {w: [0, 0, 0, 0, 0, 0] for w in lengths}
    before = sums[-30] = [0, 0, 0, 0, 0, 0]
    targets = [(w, sums[w]) for w in lengths]
    horizon = max(lengths[-1], 60)
    for day, row in state.days.items():
        age = today - day
        if age < 0 or age >= horizon:
            continue
        for w, acc in targets:
            if age < w:
                _add_row(acc, row)
        if 30 <= age < 60:
            _add_row(before, row)
    for sess in state.open_sessions:  # open sessions are not in the buckets yet
        age = today - sess[0] // DAY_MS
        if age < 0:
            continue
        for w, acc in targets:
            if age < w:
                acc[SESSIONS] += 1
        if 30 <= age < 60:
            before[SESSIONS] += 1
    return sums


def _trend(recent: int, before: int) -> float:
    return 0.0 if recent + before == 0 else round((recent - before) / (recent + before), 4)


def session_totals(state: CustomerState) -> list[int]:
    """Closed plus still-open sessions: [count, length ms, clicks, with checkout, with cart, abandoned]."""
    totals = list(state.closed)
    for session in state.open_sessions:
        add_session(totals, session)
    return totals


@functools.lru_cache(maxsize=64)
def _clv_factor(retention: float, discount: float, periods: int) -> float:
    """Σ_{p=1..periods} retention^p / (1 + discount)^p."""
    return sum(retention**p / (1 + discount) ** p for p in range(1, periods + 1))


def retention_per_period(churn_p: float | None, horizon_days: int, cfg: FoldConfig) -> float:
    """The chance a customer is still buying one CLV period from now: from their churn probability over the churn
    horizon where one is known ((1 - p) ^ (period / horizon), so CLV reflects risk), else the configured one."""
    if churn_p is None:
        return cfg.clv_retention_probability
    return float(max(1.0 - churn_p, 0.0) ** (cfg.clv_period_days / horizon_days))


def predictive_clv(aov: float, purchases: float, tenure_days: float, retention: float, cfg: FoldConfig) -> float:
    """The one predictive CLV formula (features, the lookup, alerts): AOV × purchases per period so far ×
    Σ_{p=1..clv_periods} retention^p / (1 + discount)^p, purchases per period counted over at least one period."""
    per_period = purchases / max(tenure_days / cfg.clv_period_days, 1.0)
    return aov * per_period * _clv_factor(retention, cfg.clv_discount_rate, cfg.clv_periods)


def clv(state: CustomerState, as_of: int, cfg: FoldConfig, retention: float | None = None) -> tuple[float, float]:
    """(predictive CLV, discounted CLV of observed history), both in currency units.

    predictive: ``predictive_clv`` with the configured retention (the stored features do not depend on a model;
    the lookup and alerts use the churn probability's, ``retention_per_period``);
    observed = Σ over past calendar months k (k = 0 for the current one) of net revenue_k × (1 + d)^k.
    """
    r = cfg.clv_retention_probability if retention is None else retention
    d = cfg.clv_discount_rate
    net = (state.spend_cents - state.refund_cents) / 100
    aov = net / state.purchases if state.purchases else 0.0
    first = state.first_event_ts if state.first_event_ts is not None else as_of
    predictive = predictive_clv(aov, state.purchases, (as_of - first) / DAY_MS, r, cfg)
    now_month = calendar_month(as_of)
    # in month order: a float sum depends on the order of its terms, the dict's on the order events arrived in
    observed = sum(c / 100 * (1 + d) ** max(now_month - m, 0) for m, c in sorted(state.months.items()))
    return predictive, observed


def _round(value: float, digits: int) -> float:
    """``round(value, digits)``, skipping the (slow, correctly rounded) call for a zero, which it returns as is."""
    return value if value == 0 else round(value, digits)


@functools.lru_cache(maxsize=16)
def _window_names(windows: tuple[int, ...]) -> tuple[tuple[int, str, str, str, str, str, str], ...]:
    """Per window length: (days, the names of its six features)."""
    return tuple((days, f"purchases_{days}d", f"spend_{days}d", f"clicks_{days}d", f"sessions_{days}d",
                  f"product_views_{days}d", f"add_to_carts_{days}d") for days in windows)


def _top_three(view_share: dict[str, float], spend_share: dict[str, float]) -> list[str]:
    """The three categories with the largest mean of view and spend share (ties: by name)."""
    combined = {c: view_share.get(c, 0.0) / 2 + spend_share.get(c, 0.0) / 2 for c in {*view_share, *spend_share}}
    if len(combined) == 1:
        return list(combined)
    return [c for _, c in sorted([(-v, c) for c, v in combined.items()])[:3]]


def features(state: CustomerState, as_of: int, cfg: FoldConfig) -> dict[str, Any]:
    """Every readable feature as of event time ``as_of`` (JSON-ready: numbers, strings, dicts)."""
    net_cents = state.spend_cents - state.refund_cents
    purchases = state.purchases
    last_event_ts = state.last_event_ts
    first_event_ts = state.first_event_ts
    last_purchase_ts = state.last_purchase_ts
    out: dict[str, Any] = {
        "customer_id": state.customer_id,
        "as_of_ts": as_of,
        "frequency": purchases,
        "refunds": state.refunds,
        "clicks": state.clicks,
        "monetary_total": net_cents / 100,
        "monetary_avg": _round(net_cents / purchases / 100, 2) if purchases else 0.0,
        "refund_total": state.refund_cents / 100,
        "last_event_ts": last_event_ts,
        "first_event_ts": first_event_ts,
        "first_purchase_ts": state.first_purchase_ts,
        "last_purchase_ts": last_purchase_ts,
        "days_since_last_event": None if last_event_ts is None else _round(max(as_of - last_event_ts, 0) / DAY_MS, 4),
        "tenure_days": None if first_event_ts is None else _round(max(as_of - first_event_ts, 0) / DAY_MS, 4),
        "recency_days": None if last_purchase_ts is None else _round(max(as_of - last_purchase_ts, 0) / DAY_MS, 4),
    }
    _window_features(out, state, as_of, cfg)
    _session_features(out, state, purchases)
    _category_features(out, state)
    predictive, observed = clv(state, as_of, cfg)
    out["clv"] = _round(predictive, 2)
    out["clv_observed_dcf"] = _round(observed, 2)
    out["value_tier"] = value_tier(net_cents / 100, cfg)
    stage, since = lifecycle(state, as_of, cfg)
    out["lifecycle_stage"] = stage
    out["lifecycle_since_ts"] = since
    return out


def _window_features(out: dict[str, Any], state: CustomerState, as_of: int, cfg: FoldConfig) -> None:
    """Counts and spend per event-time window, and the 30-day trends."""
    sums = window_sums(state, as_of, cfg.windows_days)
    for days, purchases_name, spend_name, clicks_name, sessions_name, views_name, carts_name in _window_names(
            cfg.windows_days):
        row = sums[days]
        out[purchases_name] = row[PURCHASES]
        out[spend_name] = row[SPEND] / 100
        out[clicks_name] = row[CLICKS]
        out[sessions_name] = row[SESSIONS]
        out[views_name] = row[VIEWS]
        out[carts_name] = row[CARTS]
    last30 = sums[30] if 30 in sums else window_sums(state, as_of, (30,))[30]
    before30 = sums[-30]
    out["spend_trend_30d"] = _trend(last30[SPEND], before30[SPEND])
    out["clicks_trend_30d"] = _trend(last30[CLICKS], before30[CLICKS])


def _session_features(out: dict[str, Any], state: CustomerState, purchases: int) -> None:
    s = session_totals(state)
    n = s[S_COUNT]
    out["sessions"] = n
    out["session_length_avg_s"] = _round(s[S_LENGTH_MS] / n / 1000, 2) if n else 0.0
    out["events_per_session_avg"] = _round(s[S_EVENTS] / n, 4) if n else 0.0
    out["conversion_rate"] = _round(s[S_CONVERTED] / n, 4) if n else 0.0  # sessions reaching checkout
    out["purchases_per_session"] = _round(purchases / n, 4) if n else 0.0
    out["cart_abandonment_rate"] = _round(s[S_ABANDONED] / s[S_WITH_CART], 4) if s[S_WITH_CART] else 0.0


def _category_features(out: dict[str, Any], state: CustomerState) -> None:
    """Category affinity: each category's share of views and of net spend, and the top three."""
    cat_views = state.cat_views
    cat_spend = state.cat_spend
    views = sum(cat_views.values())
    spend = sum(v for v in cat_spend.values() if v > 0)
    view_share = {c: _round(v / views, 4) for c, v in sorted(cat_views.items())} if views else {}
    spend_share = {c: _round(v / spend, 4) for c, v in sorted(cat_spend.items()) if v > 0} if spend else {}
    out["category_view_share"] = view_share
    out["category_spend_share"] = spend_share
    out["top_categories"] = _top_three(view_share, spend_share) if view_share or spend_share else []
