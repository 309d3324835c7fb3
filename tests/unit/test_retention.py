"""The retention ledger's domain: the intervention contract, each alert's outcome in event time (whatever order the
three streams come in, and however often a record is redelivered), and uplift with Newcombe's interval."""

from __future__ import annotations

import random

import orjson
import pytest

from streamproc.domain.retention import (
    CustomerLedger,
    Intervention,
    Outcome,
    decode_intervention,
    newcombe,
    uplift_table,
    wilson,
)

DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01


def test_interventions_are_strict_and_bad_ones_say_why():
    ok = decode_intervention(orjson.dumps({"intervention_id": "i1", "customer_id": "c1", "alert_id": "c1:5",
                                           "action": "coupon", "channel": "email", "ts": "2026-01-02T10:00:00Z",
                                           "cost": 1.5}))
    assert isinstance(ok, Intervention) and ok.ts == T0 + DAY + 10 * 3600_000 and ok.cost == 1.5
    assert decode_intervention(b"") == "empty_payload"
    assert decode_intervention(b"x" * 20_000) == "payload_too_large"
    for bad in ({"intervention_id": "i1", "customer_id": "c1", "action": "coupon", "channel": "email", "ts": 0,
                 "cost": -1},  # negative cost
                {"intervention_id": "i1", "customer_id": "c1", "action": "coupon", "channel": "email",
                 "ts": "yesterday"},
                {"intervention_id": "i1", "customer_id": "c1", "action": "coupon", "ts": T0},  # no channel
                {"intervention_id": "i1", "customer_id": "c1", "action": "coupon", "channel": "email", "ts": T0,
                 "extra": 1}):  # a field the contract does not have
        found = decode_intervention(orjson.dumps(bad))
        assert isinstance(found, str) and found.startswith("validation"), (bad, found)


def alert(cid: str, day: int, control: bool = False, action: str = "coupon", tier: str = "low") -> dict:
    return {"alert_id": f"{cid}:{day}", "customer_id": cid, "ts": T0 + day * DAY, "control": control,
            "action": action, "value_tier": tier}


def contact(iid: str, cid: str, day: float, alert_id: str | None, action: str = "coupon", cost: float = 2.0):
    return Intervention(intervention_id=iid, customer_id=cid, alert_id=alert_id, action=action, channel="email",
                        ts=int(T0 + day * DAY), cost=cost)


def test_an_alert_s_outcome_is_decided_when_its_window_has_passed():
    ledger = CustomerLedger()
    ledger.add_alert(alert("c", 10))
    ledger.add_intervention(contact("i1", "c", 11, "c:10"))
    ledger.add_purchase("e1", T0 + 25 * DAY, 40.0)
    ledger.add_purchase("e2", T0 + 41 * DAY, 99.0)  # after the 30-day window
    assert ledger.decide("c", T0 + 39 * DAY, 30, T0) == []  # the window is still open
    (o,) = ledger.decide("c", T0 + 40 * DAY, 30, T0)
    assert (o.bought, o.revenue, o.contacted, o.contact_actions, o.cost, o.group) == (
        True, 40.0, True, ("coupon",), 2.0, "treated")
    assert ledger.decide("c", T0 + 90 * DAY, 30, T0 + 60 * DAY) == []  # decided once
    ledger.add_alert(alert("c", 10))  # redelivered: not re-opened
    assert ledger.decide("c", T0 + 90 * DAY, 30, T0 + 60 * DAY) == [] and not ledger.alerts


def test_an_alert_that_comes_after_its_purchases_still_sees_them_and_unnamed_contacts_join_by_window():
    ledger = CustomerLedger()
    ledger.add_purchase("e1", T0 + 12 * DAY, 10.0)
    ledger.add_intervention(contact("i1", "c", 11, None, action="call"))
    ledger.decide("c", T0 + 100 * DAY, 30, keep_from=T0 + 9 * DAY)  # no alert yet: purchases kept back to day 9
    ledger.add_alert(alert("c", 10, control=True))
    (o,) = ledger.decide("c", T0 + 100 * DAY, 30, keep_from=T0 + 9 * DAY)
    assert o.bought and o.revenue == 10.0 and o.contacted and o.group == "control_contacted"


def test_the_outcomes_do_not_depend_on_the_order_or_repetition_of_the_records():
    rnd = random.Random(4)
    records = []
    for c in range(30):
        cid = f"c{c}"
        records.append(("alert", alert(cid, 10 + c % 5, control=c % 3 == 0)))
        if c % 3:
            records.append(("intervention", contact(f"i{c}", cid, 11 + c % 5, f"{cid}:{10 + c % 5}")))
        for k in range(c % 4):
            records.append(("purchase", (f"{cid}-e{k}", T0 + (8 + 9 * k) * DAY, 5.0 * (k + 1))))

    def run(recs: list) -> list[dict]:
        ledgers: dict[str, CustomerLedger] = {}
        for kind, value in recs:
            cid = value["customer_id"] if kind == "alert" else value.customer_id if kind == "intervention" else \
                value[0].split("-")[0]
            ledger = ledgers.setdefault(cid, CustomerLedger())
            if kind == "alert":
                ledger.add_alert(value)
            elif kind == "intervention":
                ledger.add_intervention(value)
            else:
                ledger.add_purchase(*value)
        return sorted((o.as_dict() for cid, ledger in ledgers.items()
                       for o in ledger.decide(cid, T0 + 60 * DAY, 30, T0)), key=lambda d: d["alert_id"])

    expected = run(records)
    assert len(expected) == 30 and {d["group"] for d in expected} == {"treated", "control"}
    shuffled = records + rnd.sample(records, 15)  # redelivered
    rnd.shuffle(shuffled)
    assert run(shuffled) == expected


def test_wilson_and_newcombe_match_the_published_examples():
    # Newcombe (1998), "Interval estimation for the difference between independent proportions", Table II
    lo, hi = wilson(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    d, lo, hi = newcombe(56, 70, 48, 80)
    assert (round(d, 4), round(lo, 4), round(hi, 4)) == (0.2, 0.0524, 0.3339)
    d, lo, hi = newcombe(9, 10, 3, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.1705, 0.8090)


def outcome(i: int, group: str, bought: bool, action: str = "coupon", tier: str = "low", revenue: float = 0.0,
            cost: float = 0.0) -> Outcome:
    control = group.startswith("control")
    contacted = group in ("treated", "control_contacted")
    return Outcome(f"a{i}", f"c{i}", T0, control, action, tier, contacted, (action,) if contacted else (), cost,
                   bought, revenue)


def test_the_uplift_table_compares_treated_with_control_per_action_and_tier():
    rows = ([outcome(i, "treated", i < 30, revenue=20.0 if i < 30 else 0.0, cost=1.0) for i in range(100)]
            + [outcome(100 + i, "control", i < 20, revenue=20.0 if i < 20 else 0.0) for i in range(100)]
            + [outcome(200 + i, "not_contacted", True) for i in range(50)]  # in neither group
            + [outcome(300 + i, "treated", True, action="call", tier="high") for i in range(5)])
    table = {r.key: r for r in uplift_table(rows)}
    coupon = table["action=coupon"]
    assert (coupon.treated, coupon.treated_retained, coupon.control, coupon.control_retained) == (100, 30, 100, 20)
    assert coupon.uplift == pytest.approx(0.10) and coupon.lower < 0.10 < coupon.upper
    assert coupon.revenue_per_alerted_treated == 6.0 and coupon.revenue_per_alerted_control == 4.0
    assert coupon.cost_per_retained == pytest.approx(100.0 / 10, abs=0.01)  # 100 spent, 10 more retained
    assert table["action=call"].uplift is None  # no control customer was recommended a call
    assert table["all"].treated == 105 and set(table) == {"all", "action=call", "action=coupon", "tier=high",
                                                           "tier=low"}


def world(n: int, seed: int, share: float = 0.2) -> tuple[list[dict], dict[str, list[int]]]:
    """Alerted customers who buy within 30 days with probability 0.3 on their own."""
    from streamproc.domain.alerts import ControlGroup

    rnd = random.Random(seed)
    group = ControlGroup(b"k", share)
    alerts, purchases = [], {}
    for i in range(n):
        cid = f"c{i:05d}"
        ts = T0 + rnd.randrange(60) * DAY
        action = "20% win-back coupon" if i % 2 else "newsletter nudge"
        alerts.append({"record": "alert", "alert_id": f"{cid}:{ts}", "customer_id": cid, "ts": ts,
                       "control": group.holds(cid, ts), "action": action, "value_tier": "low"})
        purchases[cid] = [ts - 40 * DAY] + ([ts + int(rnd.uniform(0, 29.9) * DAY)] if rnd.random() < 0.3 else [])
    return alerts, purchases


def outcomes_of(alerts: list[dict], purchases: dict[str, list[int]], treatment) -> list[Outcome]:
    ledgers: dict[str, CustomerLedger] = {}
    for a in alerts:
        ledgers.setdefault(a["customer_id"], CustomerLedger()).add_alert(a)
    for it in treatment.interventions:
        ledgers[it["customer_id"]].add_intervention(Intervention.model_validate(it))
    for cid, times in purchases.items():
        for k, t in enumerate(times):
            ledgers[cid].add_purchase(f"{cid}-{k}", t, 10.0)
    for p in treatment.extra_purchases:
        ledgers[p["customer_id"]].add_purchase(p["event_id"], p["ts"], p["amount"])
    return [o for cid, ledger in ledgers.items() for o in ledger.decide(cid, T0 + 200 * DAY, 30, T0 - 100 * DAY)]


@pytest.mark.parametrize("effect", [True, False])
def test_the_measured_uplift_covers_the_simulated_team_s_true_lift(effect):
    from streamproc.tools.treatment import treat

    alerts, purchases = world(20_000, seed=8)
    treatment = treat(alerts, purchases, 30, seed=9, effect=effect)
    assert len(treatment.interventions) == sum(not a["control"] for a in alerts)
    table = {r.key: r for r in uplift_table(outcomes_of(alerts, purchases, treatment))}
    for action, lift in treatment.true_lift.items():
        row = table[f"action={action}"]
        assert lift == (0.08 if "coupon" in action else 0.03) * effect
        assert row.lower <= lift <= row.upper, (action, lift, row)
        assert row.upper - row.lower < 0.08  # informative: 20,000 alerts, a fifth held out
    if effect:  # and it does find an effect where there is one
        assert table["action=20% win-back coupon"].lower > 0
