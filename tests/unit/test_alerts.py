"""Alerts a person can act on: reasons in words, one CLV formula, priority, the daily budget, the clearing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from streamproc.domain.alerts import (
    ControlGroup,
    Queued,
    alert_instants,
    clearing,
    close_days,
    explain,
    profile_at,
    share_of_budget,
)
from streamproc.domain.churn import ChurnConfig, ModelState, inputs_at
from streamproc.domain.customer import DAY_MS, CustomerState, FoldConfig, Positioned, apply_events
from streamproc.domain.events import Click, Item, Transaction
from streamproc.domain.features import clv, retention_per_period

T0 = int(datetime(2026, 1, 5, tzinfo=UTC).timestamp() * 1000)  # a UTC midnight
FOLD = FoldConfig()
CFG = ChurnConfig()


def buy(i: int, day: float, amount: float = 100.0) -> Transaction:
    return Transaction(event_id=f"t{i}", customer_id="c", ts=T0 + int(day * DAY_MS), order_id=f"o{i}",
                       type="purchase", amount=amount, currency="EUR",
                       items=[Item(product_id="p", category="c", quantity=1, unit_price=amount)])


def visit(i: int, day: float) -> Click:
    return Click(event_id=f"e{i}", customer_id="c", ts=T0 + int(day * DAY_MS), session_id=f"s{i}",
                 action="page_view")


def fold(events: list, state: CustomerState | None = None, start: int = 0) -> CustomerState:
    return apply_events(state or CustomerState("c"), [Positioned(e, "x:0", start + i) for i, e in enumerate(events)],
                        FOLD)[0]


def test_the_alert_grid_is_every_utc_midnight():
    points = alert_instants(T0 - 1, T0 + 3 * DAY_MS, CFG)
    assert points == [T0, T0 + DAY_MS, T0 + 2 * DAY_MS, T0 + 3 * DAY_MS]
    assert alert_instants(T0, T0 + DAY_MS - 1, CFG) == []


def test_reasons_say_the_silence_in_days_against_the_customers_own_gap():
    # purchases every 28 days, then silence: 84 days after the last one
    state = fold([buy(i, 28 * i) for i in range(4)])
    at = T0 + (84 + 84) * DAY_MS
    reasons = explain(inputs_at(state, at))
    first = reasons[0]
    assert first["code"] == "overdue"
    assert "no purchase for 84 days, 3.0× this customer's usual 28-day gap" in first["text"], first["text"]
    assert first["feature"] == "recency_over_gap"
    assert first["value"] == pytest.approx(inputs_at(state, at)["recency_over_gap"], abs=1e-4)


def test_reasons_say_a_fall_in_spend_and_browsing():
    # 400 spent 31-60 days before the instant, 100 in the last 30; 10 clicks then, 2 now
    events = [buy(0, 2, 200), buy(1, 3, 200), buy(2, 40, 100)]
    events += [visit(10 + i, 2.5 + i) for i in range(10)] + [visit(30 + i, 35 + i) for i in range(2)]
    state = fold(events)
    at = T0 + 61 * DAY_MS
    codes = {r["code"]: r for r in explain(inputs_at(state, at), n=5)}
    assert "spend in the last 30 days down 75 % on the 30 before" in codes["spend_down"]["text"].replace("%", " %")
    assert "browsing in the last 30 days down 80" in codes["browsing_down"]["text"]


def test_a_single_purchase_and_no_purchase_are_said_as_such():
    assert explain(inputs_at(fold([buy(0, 0)]), T0 + 7 * DAY_MS))[0]["text"] == "one purchase only, 7 days ago"
    assert explain(inputs_at(fold([visit(0, 0)]), T0 + 10 * DAY_MS))[0]["code"] == "never_bought"


def test_the_alert_and_the_lookup_give_the_same_clv_with_the_churn_risk_as_retention():
    # the case: 3 orders of 100 over 60 days
    state = fold([buy(0, 0), buy(1, 30), buy(2, 60)])
    at = T0 + 61 * DAY_MS
    p = 0.8
    alert = profile_at(inputs_at(state, at, exact=True), p, FOLD, CFG)
    retention = retention_per_period(p, CFG.horizon_days, FOLD)
    lookup_clv = round(clv(state, at, FOLD, retention)[0], 2)
    assert alert.clv == pytest.approx(lookup_clv, abs=0.02)
    assert alert.value_at_risk == pytest.approx(p * alert.clv, abs=0.01)
    # risk lowers it: p = 0.8 over a 60-day horizon keeps (0.2)^(1/2) of customers a month
    assert retention == pytest.approx(0.2 ** 0.5)
    assert alert.clv < round(clv(state, at, FOLD)[0], 2)


def q(name: str, day: int, tier: str, priority: float, kind: str = "alert", customer: str | None = None,
      alert_id: str | None = None) -> Queued:
    return Queued(name, day, kind, customer or name, alert_id or name, tier, priority, {"id": name})


def test_the_budget_sends_the_highest_value_at_risk_per_tier_and_day_and_counts_the_rest():
    queued = [q("a", T0, "high", 10.0), q("b", T0, "high", 50.0), q("c", T0, "high", 30.0),
              q("d", T0, "low", 1.0), q("e", T0 + DAY_MS, "high", 5.0), q("later", T0 + 2 * DAY_MS, "high", 99.0)]
    closing = close_days(queued, T0 + DAY_MS, {"high": 2}, {})
    assert [x.name for x in closing.send] == ["b", "c", "d", "e"]  # low has no budget: all of it
    assert closing.over_budget == {"high": 1}
    assert "later" not in closing.done and set(closing.done) == {"a", "b", "c", "d", "e"}
    # the same queue in another order closes the same
    again = close_days(list(reversed(queued)), T0 + DAY_MS, {"high": 2}, {})
    assert [x.name for x in again.send] == [x.name for x in closing.send]


def test_a_cleared_record_is_sent_only_for_an_alert_that_was_sent():
    queued = [q("x:1", T0, "high", 10.0, customer="x"), q("y:1", T0, "high", 5.0, customer="y"),
              q("cleared:x:1", T0 + 3 * DAY_MS, "", 0.0, kind="cleared", customer="x", alert_id="x:1"),
              q("cleared:y:1", T0 + 3 * DAY_MS, "", 0.0, kind="cleared", customer="y", alert_id="y:1")]
    closing = close_days(queued, T0 + 3 * DAY_MS, {"high": 1}, {})
    assert [x.name for x in closing.send] == ["x:1", "cleared:x:1"]
    assert closing.open_sent == {"x": None}
    # a clearing whose alert was sent in an earlier closing
    later = close_days(queued[2:3], T0 + 3 * DAY_MS, None, {"x": "x:1"})
    assert [x.name for x in later.send] == ["cleared:x:1"]


def test_opted_out_customers_alerts_are_counted_not_sent_and_take_no_budget():
    queued = [q("a", T0, "high", 50.0), q("b", T0, "high", 30.0), q("c", T0, "high", 10.0)]
    closing = close_days(queued, T0, {"high": 1}, {}, suppressed={"a"})
    assert [x.name for x in closing.send] == ["b"]  # the budget goes to the next in priority, not to a
    assert closing.suppressed == 1 and closing.over_budget == {"high": 1}
    assert set(closing.done) == {"a", "b", "c"} and closing.open_sent == {"b": "b"}


def test_the_control_group_is_a_keyed_share_per_customer_and_month():
    group = ControlGroup(b"k", 0.1)
    ids = [f"c{i:05d}" for i in range(20_000)]
    march = datetime(2026, 3, 1, tzinfo=UTC).timestamp() * 1000
    held = [cid for cid in ids if group.holds(cid, int(march))]
    assert abs(len(held) / len(ids) - 0.1) < 0.01  # 10 % within 1 point (binomial sd 0.2 points)
    # the same month says the same whatever the day; another month, or another key, holds out others
    assert held == [cid for cid in ids if group.holds(cid, int(march) + 30 * DAY_MS)]
    april = int(march) + 31 * DAY_MS
    assert held != [cid for cid in ids if group.holds(cid, april)]
    assert held != [cid for cid in ids if ControlGroup(b"other", 0.1).holds(cid, int(march))]
    assert not any(ControlGroup(b"k", 0.0).holds(cid, int(march)) for cid in ids[:1000])
    assert all(ControlGroup(b"k", 1.0).holds(cid, int(march)) for cid in ids[:1000])


def test_the_budget_is_shared_over_partitions_rounding_up():
    assert share_of_budget({"high": 10, "low": 0}, 4) == {"high": 3, "low": 0}
    assert share_of_budget(None, 4) is None


def test_an_alert_clears_when_the_customer_buys_again_with_the_days_it_took():
    state = fold([buy(0, 0)])
    m = ModelState(open_alert=["c:1", T0 + 70 * DAY_MS])
    assert clearing(state, m, 0.9, T0 + 80 * DAY_MS, CFG) is None
    state = fold([buy(1, 75.3)], state, start=1)
    assert clearing(state, m, 0.9, T0 + 81 * DAY_MS, CFG) == ("purchase", 5)
    assert m.open_alert is None


def test_an_alert_clears_when_the_risk_falls_below_the_rearm_threshold():
    m = ModelState(open_alert=["c:1", T0])
    state = fold([buy(0, -10)])
    assert clearing(state, m, CFG.rearm_threshold + 0.01, T0 + 3 * DAY_MS, CFG) is None
    assert clearing(state, m, CFG.rearm_threshold - 0.01, T0 + 4 * DAY_MS, CFG) == ("risk_fell", 4)


def test_the_alert_grid_leaves_no_trace_past_the_silence_cut_off():
    """Visited once at the end, or also part-way through a long silence: the same alert bookkeeping (the sweep
    visits live customers only, so how far a silent one was looked at depends on batching)."""
    import orjson

    from streamproc.metrics import Metrics
    from streamproc.pipeline.model_step import ModelStep
    from streamproc.pipeline.records import BatchResult

    history = [buy(i, 20 * i) for i in range(4)]
    end = T0 + 500 * DAY_MS
    step = ModelStep(FOLD, CFG, Metrics(), None, frozenset())
    once = step.churn_step("c", fold(history), None, end, BatchResult()).mstate
    state = fold(history)
    blob = None
    for watermark in (T0 + 90 * DAY_MS, T0 + 300 * DAY_MS, end):
        blob = orjson.dumps(step.churn_step("c", state, blob, watermark, BatchResult()).mstate.to_dict())
    twice = ModelState.from_dict(orjson.loads(blob))
    silent_days = CFG.silent_horizons * CFG.horizon_days
    assert once.alert_to is not None and once.alert_to < T0 + (60 + silent_days + 2) * DAY_MS
    assert twice.alert_to == once.alert_to
