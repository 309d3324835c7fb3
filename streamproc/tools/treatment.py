"""A simulated retention team with a known effect, to prove that the measured uplift finds it.

Given the alerts a run sent and the history it was made from, the team contacts every alerted customer outside the
control group with the alert's recommended action, one hour of event time after the alert (an ``interventions``
record with the action's channel and cost). Contact works with a configured *lift* per action: among the contacted
customers of an action, those who would not have bought within the outcome window anyway buy once in it with
probability lift / (1 − p0), where p0 is the share of them who bought anyway. The expected retention of the treated
is then p0 + lift, and the control group, held out by the keyed hash, estimates p0: the true uplift is the lift.
``effect=False`` keeps the contacts and drops the extra purchases (the true uplift is 0).

The extra purchases are merged into the history in event-time order, so a ledger reading it sees them where they
belong. Alerts come from the run without treatment: a customer brought back might have had fewer later alerts (a
second-order effect this overlay leaves out).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

DAY_MS = 86_400_000
CONTACT_DELAY_MS = 3_600_000

# percentage points of retention an action adds (the example: +8 for a coupon, +3 for a newsletter)
DEFAULT_LIFTS: tuple[tuple[str, float], ...] = (("coupon", 0.08), ("newsletter", 0.03), ("email", 0.03),
                                                ("call", 0.10), ("offer", 0.05), ("shipping", 0.05),
                                                ("access", 0.05))
DEFAULT_COSTS: tuple[tuple[str, float], ...] = (("coupon", 5.0), ("newsletter", 0.05), ("email", 0.05),
                                                ("call", 25.0), ("offer", 8.0), ("shipping", 4.0), ("access", 1.0))


def by_keyword(table: tuple[tuple[str, float], ...], action: str, default: float) -> float:
    """The first entry whose keyword the action names (``"20% win-back coupon"`` → coupon)."""
    lowered = action.lower()
    return next((value for word, value in table if word in lowered), default)


def channel_of(action: str) -> str:
    lowered = action.lower()
    return "phone" if "call" in lowered else "email"


@dataclass
class Treatment:
    interventions: list[dict[str, Any]] = field(default_factory=list)
    extra_purchases: list[dict[str, Any]] = field(default_factory=list)
    true_lift: dict[str, float] = field(default_factory=dict)  # action -> the lift applied (0 without effect)
    baseline: dict[str, float] = field(default_factory=dict)  # action -> p0 of its contacted customers


def treat(alerts: Iterable[dict[str, Any]], purchases: dict[str, list[int]], outcome_days: int, seed: int,
          effect: bool = True, lifts: tuple[tuple[str, float], ...] = DEFAULT_LIFTS) -> Treatment:
    """``alerts``: the alert records sent; ``purchases``: each customer's purchase times in the history."""
    window = outcome_days * DAY_MS
    rnd = random.Random(seed)
    out = Treatment()
    contacted: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in sorted(alerts, key=lambda a: (a["ts"], a["alert_id"])):
        if a.get("record", "alert") != "alert" or a.get("control"):
            continue
        action = str(a["action"])
        contacted[action].append(a)
        out.interventions.append({
            "intervention_id": f"sim-{a['alert_id']}", "customer_id": a["customer_id"], "alert_id": a["alert_id"],
            "action": action, "channel": channel_of(action), "ts": a["ts"] + CONTACT_DELAY_MS,
            "cost": by_keyword(DEFAULT_COSTS, action, 1.0)})
    for action, group in sorted(contacted.items()):
        def bought_anyway(a: dict[str, Any]) -> bool:
            return any(a["ts"] <= t < a["ts"] + window for t in purchases.get(a["customer_id"], ()))

        anyway = [bought_anyway(a) for a in group]
        p0 = sum(anyway) / len(group)
        lift = by_keyword(lifts, action, 0.05) if effect else 0.0
        out.true_lift[action] = lift
        out.baseline[action] = round(p0, 4)
        convert = min(1.0, lift / (1 - p0)) if p0 < 1 else 0.0
        for a, already in zip(group, anyway, strict=True):
            if already or rnd.random() >= convert:
                continue
            when = a["ts"] + CONTACT_DELAY_MS + int(rnd.uniform(0.1, outcome_days - 1) * DAY_MS)
            out.extra_purchases.append({
                "event_id": f"sim-back-{a['alert_id']}", "customer_id": a["customer_id"], "ts": when,
                "order_id": f"sim-back-{a['alert_id']}", "type": "purchase", "amount": 30.0, "currency": "EUR"})
    return out
