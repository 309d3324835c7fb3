"""Churn alerts a person can act on: pure functions.

* **When**: on a daily event-time grid (UTC midnights, ``ChurnConfig.alert_cadence_days``), every live customer's
  served churn probability is looked at, so a silent customer's rising risk is seen within a day of event time;
  hysteresis and a cooldown (``should_alert``) keep one alert per episode.
* **Why**: reasons in business words and units (``explain``), each with the coded model input it reads.
* **Worth**: CLV with the customer's churn probability as its retention term (``domain.features.predictive_clv``:
  the same formula as the lookup), and the priority p × CLV, the expected value at risk.
* **How many**: a daily budget per value tier, filled in priority order (``close_days``); what is over budget is
  counted, not sent.
* **Until when**: an alert is followed by a ``cleared`` record when the customer buys again or the risk falls below
  the re-arm threshold (``clearing``), with the days it took.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from streamproc.domain.churn import ChurnConfig, ModelState
from streamproc.domain.customer import DAY_MS, PURCHASES, CustomerState, FoldConfig
from streamproc.domain.features import predictive_clv, retention_per_period, value_tier


def alert_instants(after: int, upto: int, cfg: ChurnConfig) -> list[int]:
    """The alert grid's instants in (after, upto]: UTC midnights every ``alert_cadence_days`` from the epoch."""
    step = cfg.alert_cadence_days * DAY_MS
    first = (after // step + 1) * step
    return list(range(first, upto + 1, step))


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


def clearing(state: CustomerState, mstate: ModelState, p: float | None, at: int,
             cfg: ChurnConfig) -> tuple[str, int] | None:
    """Whether the open alert clears at instant ``at``: ("purchase", whole days from the alert's day to the day of
    the first purchase since) or ("risk_fell", days from the alert to ``at``) once p is below the re-arm threshold.
    Read from the day buckets, so it does not depend on how events were batched. Closes the open alert."""
    if mstate.open_alert is None:
        return None
    alert_ts = int(mstate.open_alert[1])
    alert_day, end_day = alert_ts // DAY_MS, at // DAY_MS
    bought = [d for d, row in state.days.items() if alert_day <= d < end_day and row[PURCHASES]]
    if bought:
        mstate.open_alert = None
        return "purchase", min(bought) - alert_day
    if p is not None and p < cfg.rearm_threshold:
        mstate.open_alert = None
        return "risk_fell", (at - alert_ts) // DAY_MS
    return None


@dataclass(frozen=True, slots=True)
class Profile:
    """What an alert says a customer is worth, as of its instant."""

    value_tier: str
    clv: float
    value_at_risk: float  # p × CLV: the priority
    lifecycle_stage: str


def profile_at(values: dict[str, float], p: float, fold: FoldConfig, cfg: ChurnConfig) -> Profile:
    """Value tier, CLV (retention from ``p``) and lifecycle stage as of a snapshot, from its inputs alone (which only
    depend on events before the instant), so an alert reads the same however events were batched."""
    retention = retention_per_period(p, cfg.horizon_days, fold)
    clv = round(predictive_clv(values["monetary_avg"], values["purchases"], values["tenure_days"], retention, fold), 2)
    silent, tenure = values["days_since_event"], values["tenure_days"]
    if silent >= fold.churned_days:
        stage = "churned"
    elif silent >= fold.at_risk_days:
        stage = "at_risk"
    elif tenure < fold.new_days:
        stage = "new"
    else:
        stage = "active"
    return Profile(value_tier(values["monetary_total"], fold), clv, round(p * clv, 2), stage)


# ---------------------------------------------------------------- reasons in business words

SPEND_DROP = 0.25  # a fall in 30-day spend worth telling (a quarter)
BROWSING_DROP = 0.4  # a fall in 30-day clicks worth telling
SILENT_DAYS = 14  # no event at all for this long is worth telling


def _days(d: float) -> str:
    # whole days, counted as a calendar does: a purchase on the 1st is 7 days ago at midnight on the 8th (the
    # snapshot inputs read it from its day bucket, as of mid-day: 6.5)
    n = math.ceil(d - 1e-9)
    return f"{n} day" if n == 1 else f"{n} days"


def explain(values: dict[str, float], n: int = 3) -> list[dict[str, Any]]:
    """Why a customer is at risk, in the words and units a retention team uses, most telling first; each reason keeps
    the coded model input it reads (``feature``, ``value``). From a snapshot's inputs alone."""
    reasons: list[tuple[float, dict[str, Any]]] = []  # (how telling, reason)
    recency, purchases = values["recency_days"], values["purchases"]
    repeat = values["btyd_x"]
    if repeat >= 1:
        usual = values["btyd_t_x"] / repeat
        ratio = recency / usual if usual > 0 else 0.0
        if usual > 0 and ratio >= 1.0:
            text = (f"no purchase for {_days(recency)}, {ratio:.1f}× this customer's usual "
                    f"{round(usual)}-day gap between purchases")
            reasons.append((ratio, _reason("overdue", text, values, "recency_over_gap")))
        else:
            text = f"last purchase {_days(recency)} ago ({int(purchases)} purchases so far)"
            reasons.append((0.5, _reason("last_purchase", text, values, "log_recency_days")))
    elif purchases >= 1:
        text = f"one purchase only, {_days(recency)} ago"
        reasons.append((1.5, _reason("single_purchase", text, values, "log_recency_days")))
    else:
        text = f"no purchase yet, {_days(values['tenure_days'])} after the first visit"
        reasons.append((1.5, _reason("never_bought", text, values, "log_frequency")))
    before, now = values["spend_prev_30d"], values["spend_30d"]
    if before > 0 and now <= before * (1 - SPEND_DROP):
        drop = 1 - now / before
        text = f"spend in the last 30 days down {drop:.0%} on the 30 before ({now:,.2f} after {before:,.2f})"
        reasons.append((1 + drop, _reason("spend_down", text, values, "log_purchases_30d")))
    clicks_before, clicks_now = values["clicks_prev_30d"], values["clicks_30d"]
    if clicks_before > 0 and clicks_now <= clicks_before * (1 - BROWSING_DROP):
        drop = 1 - clicks_now / clicks_before
        text = f"browsing in the last 30 days down {drop:.0%} on the 30 before ({int(clicks_now)} clicks after " \
               f"{int(clicks_before)})"
        reasons.append((0.5 + drop, _reason("browsing_down", text, values, "click_trend_30d")))
    silent = values["days_since_event"]
    if silent >= SILENT_DAYS and silent < recency - 1:  # silent since the last purchase: the first reason says so
        text = f"no visit for {_days(silent)}"
        reasons.append((silent / 30, _reason("no_visit", text, values, "log_days_since_event")))
    reasons.sort(key=lambda r: (-r[0], r[1]["code"]))
    return [r for _, r in reasons[:n]]


def _reason(code: str, text: str, values: dict[str, float], feature: str) -> dict[str, Any]:
    value = values.get(feature, 0.0)
    return {"code": code, "text": text, "feature": feature, "value": round(value, 4) if math.isfinite(value) else 0.0}


# ---------------------------------------------------------------- the daily budget


@dataclass(frozen=True, slots=True)
class Queued:
    """An alert decision waiting for its day to close (``close_days``): an alert, or the clearing of one."""

    name: str  # its name in the queue: the alert id, or "cleared:" + the alert id
    day: int  # the instant it was decided at
    kind: str  # "alert" or "cleared"
    customer_id: str
    alert_id: str
    tier: str
    priority: float  # value at risk (alerts)
    payload: Any  # what is sent if it passes


@dataclass
class Closing:
    """What closing a partition's alert days decides: what to send (in order), what was over budget (per tier), the
    queue entries done with, and the customers whose open sent alert changes (None: none open)."""

    send: list[Queued] = field(default_factory=list)
    over_budget: Counter[str] = field(default_factory=Counter)
    suppressed: int = 0  # alerts of customers opted out of retention contact: not sent
    done: list[str] = field(default_factory=list)
    open_sent: dict[str, str | None] = field(default_factory=dict)


def close_days(queued: list[Queued], upto: int, budgets: dict[str, int] | None,
               open_sent: dict[str, str], suppressed: frozenset[str] | set[str] = frozenset()) -> Closing:
    """Close every alert day up to instant ``upto``: per day and value tier, the alerts with the highest value at risk
    (ties: by alert id) up to the tier's budget (no budget, or a tier without one: all) are sent, the rest counted;
    a ``cleared`` record is sent iff the alert it clears was sent (``open_sent``: customer -> their sent alert not
    cleared yet). Alerts of ``suppressed`` customers (opted out of retention contact) are counted, not sent, and take
    no budget. A function of the queue's content and the opt-outs alone, so a replay (or a re-run after a crash)
    closes the same."""
    out = Closing()
    current = dict(open_sent)
    due = sorted((q for q in queued if q.day <= upto), key=lambda q: (q.day, q.kind != "alert", -q.priority, q.name))
    taken: Counter[tuple[int, str]] = Counter()
    for q in due:
        out.done.append(q.name)
        if q.kind == "alert":
            if q.customer_id in suppressed:
                out.suppressed += 1
                continue
            limit = None if budgets is None else budgets.get(q.tier)
            if limit is not None and taken[q.day, q.tier] >= limit:
                out.over_budget[q.tier] += 1
                continue
            taken[q.day, q.tier] += 1
            current[q.customer_id] = q.alert_id
            out.open_sent[q.customer_id] = q.alert_id
            out.send.append(q)
        elif current.get(q.customer_id) == q.alert_id:
            current[q.customer_id] = None  # type: ignore[assignment]
            out.open_sent[q.customer_id] = None
            out.send.append(q)
    return out


def share_of_budget(budgets: dict[str, int] | None, partitions: int) -> dict[str, int] | None:
    """Each input partition's share of the daily budgets (rounded up: the total sent may exceed a budget by less
    than one alert per partition). Partitions close their days on their own, each in priority order."""
    if budgets is None:
        return None
    return {tier: -(-n // partitions) for tier, n in budgets.items()}


@dataclass(frozen=True)
class ControlGroup:
    """Who is held out of retention contact, to measure what contacting does: a ``share`` of the alerted customers,
    chosen per calendar month (UTC) of the alert by a keyed hash of the customer id and the month. Deterministic, so
    a replay marks the same customers; keyed, so nobody can tell in advance who will be held out."""

    key: bytes
    share: float

    def holds(self, customer_id: str, instant_ms: int) -> bool:
        if self.share <= 0:
            return False
        month = datetime.fromtimestamp(instant_ms / 1000, UTC).strftime("%Y-%m")
        digest = hmac.new(self.key, f"{customer_id}|{month}".encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") < self.share * 2**64


NO_CONTROL_GROUP = ControlGroup(b"", 0.0)  # nobody held out
