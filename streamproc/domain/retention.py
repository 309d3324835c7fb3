"""The retention loop, pure: what the team did (``Intervention``), what became of each alert (``Outcome``), and the
uplift of contacting over the control group.

A customer's ledger (``CustomerLedger``) folds three streams keyed by customer id: the alerts sent, the
interventions recorded, and the purchases. An alert's outcome is decided once the event-time watermark has passed
``outcome_days`` after the alert: did the customer buy within that window, and for how much. Purchases are kept for
that window after the watermark, so an alert that reaches the ledger after the purchases following it (the alerts
topic trails the transactions it is made from) still sees them. Everything is keyed (alert id, intervention id,
purchase event id), so a redelivered record changes nothing: at-least-once in, exactly-once effect.

Uplift compares, per recommended action and per value tier, the retention rate of the *treated* (alerted, not in the
control group, contacted) with the *control* group (alerted, held out, not contacted), with a 95 % interval by
Newcombe's hybrid score method (Newcombe 1998, method 10: Wilson intervals of each rate, combined).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from streamproc.domain.events import Id, parse_event_time

DAY_MS = 86_400_000
Z_95 = 1.959963984540054
DECIDED_KEPT = 200  # alert ids with an outcome, per customer: a redelivered alert finds its outcome already decided


class Intervention(BaseModel):
    """What the retention team did about a customer (input topic ``interventions``)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    intervention_id: Id
    customer_id: Id
    alert_id: Id | None = Field(default=None, description="The alert acted on (None: the customer's latest alert)")
    action: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    channel: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    ts: int = Field(description="When it was done (event time): RFC 3339 with an offset, or epoch milliseconds")
    cost: float = Field(default=0.0, ge=0, le=1e7, allow_inf_nan=False)

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, value: object) -> int:
        return parse_event_time(value)


def decode_intervention(payload: bytes | None, max_bytes: int = 16 * 1024) -> Intervention | str:
    """An intervention, or why the payload is not one (dead-lettered with that reason)."""
    if not payload:
        return "empty_payload"
    if len(payload) > max_bytes:
        return "payload_too_large"
    try:
        return Intervention.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        return f"validation: {'.'.join(str(p) for p in first['loc']) or '(root)'}: {first['msg']}"[:300]


@dataclass(frozen=True)
class Outcome:
    """What became of one alert, ``outcome_days`` after it."""

    alert_id: str
    customer_id: str
    ts: int  # the alert instant
    control: bool
    action: str  # the action the alert recommended
    value_tier: str
    contacted: bool
    contact_actions: tuple[str, ...]
    cost: float
    bought: bool
    revenue: float

    @property
    def group(self) -> Literal["treated", "control", "not_contacted", "control_contacted"]:
        if self.control:
            return "control_contacted" if self.contacted else "control"
        return "treated" if self.contacted else "not_contacted"

    def as_dict(self) -> dict[str, Any]:
        return {"alert_id": self.alert_id, "customer_id": self.customer_id, "ts": self.ts, "control": self.control,
                "action": self.action, "value_tier": self.value_tier, "contacted": self.contacted,
                "contact_actions": list(self.contact_actions), "cost": self.cost, "bought": self.bought,
                "revenue": self.revenue, "group": self.group}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Outcome:
        return cls(d["alert_id"], d["customer_id"], d["ts"], d["control"], d["action"], d["value_tier"],
                   d["contacted"], tuple(d["contact_actions"]), d["cost"], d["bought"], d["revenue"])


@dataclass
class CustomerLedger:
    """One customer's open alerts, interventions and recent purchases."""

    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)  # alert id -> ts, control, action, tier
    interventions: dict[str, dict[str, Any]] = field(default_factory=dict)  # intervention id -> ts, alert, action..
    purchases: dict[str, tuple[int, float]] = field(default_factory=dict)  # event id -> (ts, amount)
    decided: list[str] = field(default_factory=list)  # alert ids with an outcome: a redelivered alert is not re-opened

    def add_alert(self, alert: dict[str, Any]) -> None:
        alert_id = str(alert["alert_id"])
        if alert_id in self.decided:
            return
        self.alerts[alert_id] = {"ts": int(alert["ts"]), "control": bool(alert.get("control", False)),
                                 "action": str(alert.get("action", "")), "tier": str(alert.get("value_tier", ""))}

    def add_intervention(self, it: Intervention) -> None:
        self.interventions[it.intervention_id] = {"ts": it.ts, "alert_id": it.alert_id, "action": it.action,
                                                  "cost": it.cost}

    def add_purchase(self, event_id: str, ts: int, amount: float) -> None:
        self.purchases[event_id] = (ts, amount)

    def decide(self, customer_id: str, watermark: int, outcome_days: int, keep_from: int) -> list[Outcome]:
        """The outcomes of the alerts whose window the watermark has passed; forgets the purchases before
        ``keep_from`` (no alert still to come can start before it) that no open alert needs."""
        window = outcome_days * DAY_MS
        out = []
        for alert_id in sorted(self.alerts, key=lambda a: (self.alerts[a]["ts"], a)):
            a = self.alerts[alert_id]
            if a["ts"] + window > watermark:
                continue
            start, end = a["ts"], a["ts"] + window
            bought = [amount for ts, amount in self.purchases.values() if start <= ts < end]
            contacts = [i for i in self.interventions.values() if self._acts_on(i, alert_id, start, end)]
            actions = tuple(sorted({i["action"] for i in contacts}))
            cost = round(sum(i["cost"] for i in contacts), 2)
            out.append(Outcome(alert_id, customer_id, a["ts"], a["control"], a["action"], a["tier"], bool(contacts),
                               actions, cost, bool(bought), round(sum(bought), 2)))
        for o in out:
            del self.alerts[o.alert_id]
            self.decided.append(o.alert_id)
        del self.decided[:-DECIDED_KEPT]
        keep = min([keep_from, *(a["ts"] for a in self.alerts.values())])
        self.purchases = {k: v for k, v in self.purchases.items() if v[0] >= keep}
        self.interventions = {k: v for k, v in self.interventions.items() if v["ts"] >= keep - window}
        return out

    def _acts_on(self, it: dict[str, Any], alert_id: str, start: int, end: int) -> bool:
        if it["alert_id"] is not None:
            return bool(it["alert_id"] == alert_id)
        return bool(start <= it["ts"] < end)  # no alert named: the alert whose window it falls in

    def empty(self) -> bool:
        return not (self.alerts or self.interventions or self.purchases)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.alerts, "i": self.interventions, "p": self.purchases, "d": self.decided}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CustomerLedger:
        return cls(d["a"], d["i"], {k: (int(v[0]), float(v[1])) for k, v in d["p"].items()}, list(d["d"]))


# ------------------------------------------------------------------ uplift
def wilson(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(s1: int, n1: int, s2: int, n2: int, z: float = Z_95) -> tuple[float, float, float]:
    """p1 − p2 and its hybrid score interval (Newcombe 1998, method 10)."""
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = wilson(s1, n1, z)
    l2, u2 = wilson(s2, n2, z)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


@dataclass(frozen=True)
class UpliftRow:
    key: str  # "all", "action=<a>" or "tier=<t>"
    treated: int
    treated_retained: int
    control: int
    control_retained: int
    uplift: float | None
    lower: float | None
    upper: float | None
    revenue_per_alerted_treated: float | None
    revenue_per_alerted_control: float | None
    cost: float
    cost_per_retained: float | None  # cost over the customers retained because of the contact (uplift × treated)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def uplift_row(key: str, outcomes: list[Outcome]) -> UpliftRow:
    treated = [o for o in outcomes if o.group == "treated"]
    control = [o for o in outcomes if o.group == "control"]
    st, sc = sum(o.bought for o in treated), sum(o.bought for o in control)
    cost = round(sum(o.cost for o in treated), 2)
    d: float | None = None
    lo: float | None = None
    hi: float | None = None
    per_retained: float | None = None
    if treated and control:
        d, lo, hi = newcombe(st, len(treated), sc, len(control))
        extra = d * len(treated)
        per_retained = round(cost / extra, 2) if extra > 0 else None
    return UpliftRow(
        key, len(treated), st, len(control), sc, None if d is None else round(d, 4),
        None if lo is None else round(lo, 4), None if hi is None else round(hi, 4),
        round(sum(o.revenue for o in treated) / len(treated), 2) if treated else None,
        round(sum(o.revenue for o in control) / len(control), 2) if control else None, cost, per_retained)


def uplift_table(outcomes: Iterable[Outcome]) -> list[UpliftRow]:
    """Overall, per recommended action, per value tier (the control group has the same recommendations)."""
    rows = list(outcomes)
    table = [uplift_row("all", rows)]
    for action in sorted({o.action for o in rows}):
        table.append(uplift_row(f"action={action}", [o for o in rows if o.action == action]))
    for tier in sorted({o.value_tier for o in rows}):
        table.append(uplift_row(f"tier={tier}", [o for o in rows if o.value_tier == tier]))
    return table
