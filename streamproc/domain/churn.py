"""Churn snapshots, delayed labels and model inputs: pure functions (alerts: ``domain.alerts``).

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
)
from streamproc.domain.features import session_totals


@dataclass(frozen=True, slots=True)
class ChurnConfig:
    horizon_days: int = 60
    cadence_days: int = 7
    alert_cadence_days: int = 1  # the alert grid: a silent customer's rising risk is seen within this much event time
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
     last_purchase_day, last_active_day, purchase_days, spend_30, spend_prev) = _scan_days(state, end_day)
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
    repeat, t_x, big_t = _btyd_statistics(state.first_purchase_ts, last_purchase, purchases, at)
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
        # in plain units, for the reasons an alert gives (``domain.alerts.explain``)
        "recency_days": recency, "tenure_days": tenure, "days_since_event": since_event,
        "purchases": float(purchases), "monetary_avg": aov, "monetary_total": max(net_cents, 0) / 100,
        "spend_30d": spend_30 / 100, "spend_prev_30d": spend_prev / 100,
        "clicks_30d": float(clicks_30), "clicks_prev_30d": float(clicks_prev),
    }


def _btyd_statistics(
    first_purchase: float | None, last_purchase: float | None, purchases: int, at: int,
) -> tuple[int, float, float]:
    """BG/NBD's sufficient statistics: repeat purchases x, first to last purchase t_x, first purchase to now T."""
    if not purchases or first_purchase is None or first_purchase >= at or last_purchase is None:
        return 0, 0.0, 0.0
    t_x = max((last_purchase - first_purchase) / DAY_MS, 0.0)
    return purchases - 1, t_x, max((at - first_purchase) / DAY_MS, t_x)


def _scan_days(
    state: CustomerState, end_day: int,
) -> tuple[int, int, int, int, int, int, int, int, int, int, list[int], int, int]:
    """One pass over the day buckets: what happened on or after ``end_day`` (purchases, spend), in the 30 days
    before it, in the 30 before those (clicks, spend), and the last days with a purchase and with any activity. Open
    sessions are not in the buckets until closed: they count by their start day. Last: the days with a purchase
    in the ``GAP_DAYS`` before ``end_day`` (unordered)."""
    after_purchases = after_spend = 0
    purchase_days: list[int] = []
    clicks_30 = clicks_prev = purchases_30 = views_30 = carts_30 = sessions_30 = spend_30 = spend_prev = 0
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
            spend_30 += row[SPEND]
        elif d >= end_day - 60:
            clicks_prev += row[CLICKS]
            spend_prev += row[SPEND]
    for session in state.open_sessions:
        if end_day - 30 <= session[0] // DAY_MS < end_day:
            sessions_30 += 1
    return (after_purchases, after_spend, clicks_30, clicks_prev, purchases_30, views_30, carts_30, sessions_30,
            last_purchase_day, last_active_day, purchase_days, spend_30, spend_prev)


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
    alert_to: int | None = None  # the last daily alert instant looked at (``domain.alerts``)
    open_alert: list[Any] | None = None  # the latest alert not cleared yet: [alert_id, ts]

    def to_dict(self) -> dict[str, Any]:
        return {"segment": self.segment, "churn_p": self.churn_p, "model_version": self.model_version,
                "armed": self.alert_armed, "last_alert_ts": self.last_alert_ts, "scored": self.scored_at,
                "rec": self.last_rec, "alert_to": self.alert_to, "open": self.open_alert}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ModelState:
        if not data:
            return cls()
        return cls(data.get("segment"), data.get("churn_p"), data.get("model_version"), data.get("armed", True),
                   data.get("last_alert_ts"), data.get("scored", {}), data.get("rec"), data.get("alert_to"),
                   data.get("open"))


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
