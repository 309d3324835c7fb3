"""Churn snapshots, delayed labels, model inputs, alert hysteresis and explanations: pure functions.

Snapshots are taken on a fixed event-time grid (every ``cadence_days`` from the epoch, at UTC midnight)
for every live customer, so training sees the situations scoring sees, long silences included. A
snapshot at instant D is labelled *churned* if the customer makes no purchase in [D, D + horizon), and
*retained* as soon as such a purchase is known; otherwise it waits (pending, bounded) until the
watermark passes D + horizon. Everything is read from the day buckets of the customer state, so a
snapshot's inputs only depend on events before D, whatever order the events arrived in.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from streamproc.domain.customer import (
    CARTS,
    CLICKS,
    DAY_MS,
    PURCHASES,
    S_CONVERTED,
    S_COUNT,
    S_EVENTS,
    SESSIONS,
    SPEND,
    VIEWS,
    CustomerState,
    FoldConfig,
)
from streamproc.domain.features import session_totals, value_tier


@dataclass(frozen=True, slots=True)
class ChurnConfig:
    horizon_days: int = 60
    cadence_days: int = 7
    silent_horizons: int = 3  # no snapshots once silent this many horizons
    max_pending: int = 12
    label_on: Literal["purchase", "activity"] = "purchase"  # activity: any event counts as not churned
    alert_threshold: float = 0.7
    rearm_threshold: float = 0.5  # hysteresis: below this a customer can be alerted again
    cooldown_days: float = 14.0
    high_risk: float = 0.8
    critical_risk: float = 0.9


CHURN_FEATURES = (
    "log_recency_days", "log_frequency", "log_monetary_avg", "log_tenure_days", "purchase_rate_30d",
    "recency_over_gap", "log_days_since_event", "log_clicks_30d", "log_purchases_30d", "log_sessions_30d",
    "click_trend_30d", "log_gap_mean_days", "gap_cv",
    # BG/NBD's statistics: the baseline scores them (``domain.churn_scorers``), and the classifier learns from them
    "btyd_x", "btyd_t_x", "btyd_T",
)
# What segments are made of: traits that describe how someone shops rather than where they are in their
# lifecycle (recency and totals would move customers between segments as they age): average order value,
# tenure, clicks per session, sessions reaching checkout, and the share of product views per category
# (``view_share:<category>``, one input per category the trainer has seen; see ModelBundle).
SEGMENT_FEATURES = ("log_monetary_avg", "log_tenure_days", "events_per_session", "conversion_rate")
VIEW_SHARE = "view_share:"
# the days of purchases the gap statistics look at: a snapshot's inputs are re-read from the day buckets when its
# label matures, and the buckets keep 60 days before the oldest pending snapshot (FoldConfig.model_history_days)
GAP_DAYS = 60


def inputs_at(state: CustomerState, at: int, exact: bool = False,
              anchor: list[int] | None = None) -> dict[str, float] | None:
    """Model inputs as of instant ``at`` from the day buckets: events on days before the one ``at`` ends
    (for a snapshot at a UTC midnight: strictly before it). Times of the last purchase and event come
    from the buckets too (mid-day), so a snapshot's inputs read later are what they were when taken;
    ``exact`` uses the exact timestamps instead (scoring now). None if nothing happened before ``at``."""
    if state.first_event_ts is None or state.first_event_ts >= at:
        return None
    end_day = -(-at // DAY_MS)  # days >= end_day are after ``at``
    (after_purchases, after_spend, clicks_30, clicks_prev, purchases_30, views_30, carts_30, sessions_30,
     last_purchase_day, last_active_day, purchase_days) = _scan_days(state, end_day)
    if anchor is not None:  # what the buckets said when the snapshot was taken (they may be pruned since)
        last_purchase_day = max(last_purchase_day, anchor[0])
        last_active_day = max(last_active_day, anchor[1])
    purchases = state.purchases - after_purchases
    net_cents = state.spend_cents - state.refund_cents - after_spend
    last_purchase: float | None
    if exact and state.last_purchase_ts is not None and state.last_purchase_ts < at:
        last_purchase = state.last_purchase_ts
    else:
        last_purchase = (last_purchase_day + 0.5) * DAY_MS if last_purchase_day >= 0 else None
    last_event: float
    if exact and state.last_event_ts is not None and state.last_event_ts < at:
        last_event = state.last_event_ts
    else:
        last_event = (last_active_day + 0.5) * DAY_MS if last_active_day >= 0 else state.first_event_ts
    tenure = max((at - state.first_event_ts) / DAY_MS, 0.0)
    recency = max((at - last_purchase) / DAY_MS, 0.0) if last_purchase is not None else tenure
    since_event = max((at - last_event) / DAY_MS, 0.0)
    purchases = max(purchases, 0)
    aov = max(net_cents, 0) / 100 / purchases if purchases else 0.0
    mean_gap = (tenure + 1.0) / (purchases + 1)
    # BG/NBD's sufficient statistics (repeat purchases x, first to last purchase t_x, first purchase to now T)
    first_purchase = state.first_purchase_ts
    bought_before = purchases > 0 and first_purchase is not None and first_purchase < at and last_purchase is not None
    repeat = purchases - 1 if bought_before else 0
    t_x = max((last_purchase - first_purchase) / DAY_MS, 0.0) if bought_before else 0.0  # type: ignore[operator]
    big_t = max((at - first_purchase) / DAY_MS, t_x) if bought_before else 0.0  # type: ignore[operator]
    return {
        "btyd_x": float(repeat),
        "btyd_t_x": t_x,
        "btyd_T": big_t,
        "log_gap_mean_days": math.log1p(t_x / repeat) if repeat else math.log1p(big_t),
        "gap_cv": _gap_cv(purchase_days),
        "log_recency_days": math.log1p(recency),
        "log_frequency": math.log1p(purchases),
        "log_monetary_avg": math.log1p(aov),
        "log_monetary_total": math.log1p(max(net_cents, 0) / 100),
        "log_tenure_days": math.log1p(tenure),
        "purchase_rate_30d": purchases / (tenure + 30.0) * 30.0,
        "recency_over_gap": min(recency / mean_gap, 50.0),
        "log_days_since_event": math.log1p(since_event),
        "log_clicks_30d": math.log1p(clicks_30),
        "log_views_30d": math.log1p(views_30),
        "cart_rate_30d": carts_30 / views_30 if views_30 else 0.0,
        "log_purchases_30d": math.log1p(purchases_30),
        "log_sessions_30d": math.log1p(sessions_30),
        "click_trend_30d": (clicks_30 - clicks_prev) / (clicks_30 + clicks_prev) if clicks_30 + clicks_prev else 0.0,
    }


def _scan_days(
    state: CustomerState, end_day: int,
) -> tuple[int, int, int, int, int, int, int, int, int, int, list[int]]:
    """One pass over the day buckets: what happened on or after ``end_day`` (purchases, spend), in the 30 days
    before it, in the 30 before those (clicks), and the last days with a purchase and with any activity. Open
    sessions are not in the buckets until closed: they count by their start day. Last: the days with a purchase
    in the ``GAP_DAYS`` before ``end_day`` (unordered)."""
    after_purchases = after_spend = 0
    purchase_days: list[int] = []
    clicks_30 = clicks_prev = purchases_30 = views_30 = carts_30 = sessions_30 = 0
    last_purchase_day = last_active_day = -1
    for d, row in state.days.items():
        if d >= end_day:
            after_purchases += row[PURCHASES]
            after_spend += row[SPEND]
            continue
        if row[PURCHASES]:
            if d >= end_day - GAP_DAYS:
                purchase_days.append(d)
            if d > last_purchase_day:
                last_purchase_day = d
        if (row[PURCHASES] or row[CLICKS] or row[SPEND]) and d > last_active_day:
            last_active_day = d
        if d >= end_day - 30:
            clicks_30 += row[CLICKS]
            purchases_30 += row[PURCHASES]
            views_30 += row[VIEWS]
            carts_30 += row[CARTS]
            sessions_30 += row[SESSIONS]
        elif d >= end_day - 60:
            clicks_prev += row[CLICKS]
    for session in state.open_sessions:
        if end_day - 30 <= session[0] // DAY_MS < end_day:
            sessions_30 += 1
    return (after_purchases, after_spend, clicks_30, clicks_prev, purchases_30, views_30, carts_30, sessions_30,
            last_purchase_day, last_active_day, purchase_days)


def _gap_cv(purchase_days: list[int]) -> float:
    """The coefficient of variation of the gaps between a customer's purchase days of the last ``GAP_DAYS`` (0 with
    fewer than two gaps):
    regular buyers have a small one, and their silence past the usual gap says more."""
    if len(purchase_days) < 3:
        return 0.0
    days = sorted(purchase_days)
    gaps = [b - a for a, b in itertools.pairwise(days)]
    mean = sum(gaps) / len(gaps)
    var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
    return math.sqrt(var) / mean if mean else 0.0


def churn_inputs(values: dict[str, float]) -> dict[str, float]:
    return {k: values[k] for k in CHURN_FEATURES}


def segment_inputs(values: dict[str, float], state: CustomerState) -> dict[str, float]:
    """Segmentation inputs: the snapshot's AOV and tenure, plus session habits and category view shares so far."""
    out = {k: values[k] for k in SEGMENT_FEATURES if k in values}
    sessions = session_totals(state)
    n = sessions[S_COUNT]
    out["events_per_session"] = sessions[S_EVENTS] / n if n else 0.0
    out["conversion_rate"] = sessions[S_CONVERTED] / n if n else 0.0
    views = sum(state.cat_views.values())
    for category, count in state.cat_views.items():
        out[VIEW_SHARE + category] = count / views
    return out


# ---------------------------------------------------------------- snapshots and labels
@dataclass
class ModelState:
    """What the models said about a customer: depends on which checkpoint scored, so it is kept apart from
    the (replay-deterministic) features and state."""

    segment: int | None = None
    churn_p: float | None = None
    model_version: int | None = None
    alert_armed: bool = True
    last_alert_ts: int | None = None
    scored_at: dict[str, list[Any]] = field(default_factory=dict)  # snapshot D -> [p, version]
    last_rec: dict[str, Any] | None = None  # the latest recommendation: {id, ts, trigger, items}

    def to_dict(self) -> dict[str, Any]:
        return {"segment": self.segment, "churn_p": self.churn_p, "model_version": self.model_version,
                "armed": self.alert_armed, "last_alert_ts": self.last_alert_ts, "scored": self.scored_at,
                "rec": self.last_rec}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ModelState:
        if not data:
            return cls()
        return cls(data.get("segment"), data.get("churn_p"), data.get("model_version"), data.get("armed", True),
                   data.get("last_alert_ts"), data.get("scored", {}), data.get("rec"))


# pending snapshots are instants D in state.pending; their inputs are re-read from the buckets when the
# label matures (they only depend on events before D)


def grid_points(after: int, upto: int, cfg: ChurnConfig) -> list[int]:
    """Snapshot instants in (after, upto]: UTC midnights every cadence_days from the epoch."""
    step = cfg.cadence_days * DAY_MS
    first = (after // step + 1) * step
    return list(range(first, upto + 1, step))


def last_days_before(state: CustomerState, point: int) -> tuple[int, int]:
    """The last UTC day with a purchase, and with any event, strictly before instant ``point`` (a UTC midnight): -1
    where none. From the events alone, whatever arrived after (the purchase that ends a long silence, say): the day
    buckets, the newest event time, and the last active day kept with the last snapshot (``pre_day``: its bucket
    may be pruned since)."""
    end_day = -(-point // DAY_MS)
    last_purchase, last_active = -1, state.pre_day
    for d, row in state.days.items():
        if d < end_day:
            if row[PURCHASES] and d > last_purchase:
                last_purchase = d
            if (row[PURCHASES] or row[CLICKS] or row[SPEND]) and d > last_active:
                last_active = d
    last = state.last_event_ts
    if last is not None and last < point:
        last_active = max(last_active, last // DAY_MS)
    return last_purchase, last_active


def take_snapshots(state: CustomerState, upto: int, cfg: ChurnConfig) -> list[tuple[int, dict[str, float]]]:
    """Snapshots due up to instant ``upto`` (a watermark) that were not taken yet: (D, all inputs).

    A grid instant D gets a snapshot iff the customer had an event before D and was silent at most
    ``silent_horizons`` horizons at D, judged on events before D only (day granularity, which is the same test
    as on exact times since D is a midnight and the cut-off whole days). ``snapshot_ts`` is the last snapshot
    taken, not the last instant looked at: a silent instant leaves no trace, so the state does not depend on how
    far (or how often) the customer was visited past the silence cut-off."""
    taken: list[tuple[int, dict[str, float]]] = []
    start = state.snapshot_ts if state.snapshot_ts else (state.first_event_ts or upto) - 1
    silent_days = cfg.silent_horizons * cfg.horizon_days
    for point in grid_points(start, upto, cfg):
        if state.first_event_ts is None or state.first_event_ts >= point:
            continue
        last_purchase_day, last_active_day = last_days_before(state, point)
        if last_active_day < 0 or point // DAY_MS - last_active_day > silent_days:
            continue
        values = inputs_at(state, point)
        if values is None:
            continue
        state.snapshot_ts = point
        state.pre_day = last_active_day
        state.anchors[point] = [last_purchase_day, last_active_day]
        taken.append((point, values))
    return taken


def maturity_span(cfg: ChurnConfig) -> int:
    """From a snapshot instant to the grid instant its label matures at (the first one horizon or more later)."""
    step = cfg.cadence_days * DAY_MS
    return -(-cfg.horizon_days * DAY_MS // step) * step


def _bought_in(state: CustomerState, lo: int, hi: int, cfg: ChurnConfig) -> bool:
    slots = (PURCHASES,) if cfg.label_on == "purchase" else (PURCHASES, CLICKS, SPEND)
    lo_day, hi_day = lo // DAY_MS, hi // DAY_MS
    return any(any(row[s] for s in slots) for d, row in state.days.items() if lo_day <= d < hi_day)


def known_label(state: CustomerState, point: int, watermark: int, cfg: ChurnConfig) -> int | None:
    """The label of the snapshot at ``point`` if it is known yet: 0 as soon as a purchase in
    [point, point + horizon) is known, 1 once the watermark passed point + horizon without one."""
    horizon = cfg.horizon_days * DAY_MS
    if _bought_in(state, point, point + horizon, cfg):
        return 0
    if watermark >= point + horizon:
        return 1
    return None


def mature_labels(state: CustomerState, watermark: int, cfg: ChurnConfig) -> list[tuple[int, int]]:
    """Pending snapshots released for learning: (D, label) with 1 = churned. Removes them.

    A "retained" label is often known early (the customer came back), but examples of both classes are
    released when the watermark passes D + horizon: releasing the retained ones early feeds the model
    negatives from recent snapshots and positives only from old ones (right-censoring), and it learns
    "long tenure means retained" instead of the behaviour (measured on the simulator: churn ROC AUC 0.29
    against the ground truth with early release)."""
    horizon = cfg.horizon_days * DAY_MS
    done: list[tuple[int, int]] = []
    keep = []
    for point in state.pending:
        if watermark >= point + horizon:
            label = known_label(state, point, watermark, cfg)
            done.append((point, 1 if label is None else label))
        else:
            keep.append(point)
    state.pending = keep[-cfg.max_pending :]
    # the anchors of matured snapshots stay for the caller to read their inputs (it pops them)
    matured = {point for point, _ in done}
    state.anchors = {k: v for k, v in state.anchors.items() if k in matured or k in state.pending}
    return done


# ---------------------------------------------------------------- alerts


def risk_level(p: float, cfg: ChurnConfig) -> str:
    if p >= cfg.critical_risk:
        return "critical"
    if p >= cfg.high_risk:
        return "high"
    return "medium"


DEFAULT_ACTIONS: dict[str, dict[str, str]] = {
    "high": {"critical": "personal call from an account manager", "high": "VIP offer with a personal note",
             "medium": "exclusive early access offer"},
    "medium": {"critical": "20% win-back coupon", "high": "10% coupon", "medium": "free shipping on next order"},
    "low": {"critical": "win-back email with coupon", "high": "reminder email", "medium": "newsletter nudge"},
}


def retention_action(tier: str, level: str, table: dict[str, dict[str, str]] | None = None) -> str:
    return (table or DEFAULT_ACTIONS).get(tier, DEFAULT_ACTIONS["low"]).get(level, "reminder email")


def should_alert(state: ModelState, p: float, at: int, cfg: ChurnConfig) -> bool:
    """Hysteresis and cooldown: alert once when p crosses the threshold; re-arm below the lower one."""
    if p < cfg.rearm_threshold:
        state.alert_armed = True
        return False
    if p < cfg.alert_threshold or not state.alert_armed:
        return False
    if state.last_alert_ts is not None and at - state.last_alert_ts < cfg.cooldown_days * DAY_MS:
        return False
    state.alert_armed = False
    state.last_alert_ts = at
    return True


def profile_at(values: dict[str, float], fold: FoldConfig) -> dict[str, Any]:
    """Value tier, predictive CLV and lifecycle stage as of a snapshot, from its inputs alone (which only
    depend on events before the snapshot instant), so an alert reads the same however events were batched."""
    net = math.expm1(values["log_monetary_total"])
    aov = math.expm1(values["log_monetary_avg"])
    per_period = values["purchase_rate_30d"] * fold.clv_period_days / 30.0
    r, d = fold.clv_retention_probability, fold.clv_discount_rate
    clv = sum(aov * per_period * r**p / (1 + d) ** p for p in range(1, fold.clv_periods + 1))
    silent = math.expm1(values["log_days_since_event"])
    tenure = math.expm1(values["log_tenure_days"])
    if silent >= fold.churned_days:
        stage = "churned"
    elif silent >= fold.at_risk_days:
        stage = "at_risk"
    elif tenure < fold.new_days:
        stage = "new"
    else:
        stage = "active"
    return {"value_tier": value_tier(net, fold), "clv": round(clv, 2), "lifecycle_stage": stage}


def top_reasons(contributions: dict[str, float], values: dict[str, float], n: int = 3) -> list[dict[str, Any]]:
    """The features that pushed the score up most (largest positive contribution first)."""
    ranked = sorted(contributions.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [{"feature": k, "value": round(values.get(k, 0.0), 4), "contribution": round(c, 4)} for k, c in ranked]
