"""The customer fold and its features, pinned on hand-made events."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc.domain.customer import (
    DAY_MS,
    CustomerState,
    FoldConfig,
    Positioned,
    apply_events,
    calendar_month,
    month_label,
)
from streamproc.domain.events import Click, Item, Transaction
from streamproc.domain.features import clv, features, lifecycle

CFG = FoldConfig(dedup_horizon_ms=10**12, dedup_max_ids=10_000)
MIN = 60_000
T0 = int(datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp() * 1000)


def at(day: float, minute: float = 0) -> int:
    return int(T0 + day * DAY_MS + minute * MIN)


def click(i, ts, action="page_view", category=None, product=None):
    return Click(event_id=f"e{i}", customer_id="c1", ts=ts, session_id="s", action=action,
                 category=category, product_id=product)


def txn(i, ts, amount, kind="purchase", category="books", qty=1):
    return Transaction(event_id=f"t{i}", customer_id="c1", ts=ts, order_id=f"o{i}", type=kind, amount=amount,
                       currency="EUR",
                       items=[Item(product_id="p", category=category, quantity=qty, unit_price=amount / qty)])


def fold(events, cfg=CFG, source="clicks:0", state=None):
    positioned = [Positioned(ev, source, i) for i, ev in enumerate(events)]
    return apply_events(state or CustomerState("c1"), positioned, cfg)


def test_rfm_with_refunds_netted():
    state, out = fold([txn(1, at(0), 40.0), txn(2, at(10), 60.0), txn(3, at(12), 15.0, "refund"),
                       click(4, at(-3))])
    assert out.total("applied") == 4
    f = features(state, at(20), CFG)
    assert f["frequency"] == 2 and f["refunds"] == 1
    assert f["monetary_total"] == 85.0  # 40 + 60 - 15
    assert f["monetary_avg"] == 42.5  # net spend / purchases
    assert f["refund_total"] == 15.0
    assert f["recency_days"] == 10  # last purchase at day 10, as of day 20
    assert f["days_since_last_event"] == 8  # the refund at day 12 is activity
    assert f["first_purchase_ts"] == at(0) and f["last_purchase_ts"] == at(10)
    assert f["first_event_ts"] == at(-3) and f["tenure_days"] == 23


def test_rolling_windows_and_trend_on_event_time():
    events = [txn(1, at(-50), 100.0), txn(2, at(-20), 30.0), txn(3, at(-5), 20.0),
              click(4, at(-5), "product_view", "books"), click(5, at(-1), "add_to_cart"),
              click(6, at(-100))]
    state, _ = fold(events)
    f = features(state, at(0), CFG)
    assert (f["purchases_7d"], f["spend_7d"]) == (1, 20.0)
    assert (f["purchases_30d"], f["spend_30d"]) == (2, 50.0)
    assert (f["purchases_90d"], f["spend_90d"]) == (3, 150.0)
    assert f["clicks_7d"] == 2 and f["clicks_90d"] == 2  # the click at day -100 is outside 90 days
    assert f["product_views_7d"] == 1 and f["add_to_carts_7d"] == 1
    # last 30 days spent 50, the 30 before spent 100: (50 - 100) / (50 + 100)
    assert f["spend_trend_30d"] == -0.3333
    # the same state seen 60 days later: everything has aged out of the 7- and 30-day windows
    later = features(state, at(60), CFG)
    assert later["purchases_7d"] == 0 and later["spend_30d"] == 0 and later["purchases_90d"] == 2


def test_sessions_from_an_inactivity_gap_including_one_across_midnight():
    midnight = int(datetime(2026, 3, 11, 0, 0, tzinfo=UTC).timestamp() * 1000)
    events = [
        # session 1 crosses midnight: 23:50 → 00:15, cart and purchase
        click(1, midnight - 10 * MIN), click(2, midnight + 5 * MIN, "add_to_cart"),
        click(3, midnight + 15 * MIN, "checkout"),
        # session 2 an hour later: add to cart, no purchase (abandoned)
        click(4, midnight + 80 * MIN), click(5, midnight + 90 * MIN, "add_to_cart"),
        # session 3 the next day: a single page view
        click(6, midnight + DAY_MS),
    ]
    state, _ = fold([*events[:3], txn(7, midnight + 16 * MIN, 25.0), *events[3:]])
    f = features(state, midnight + 2 * DAY_MS, CFG)
    assert f["sessions"] == 3
    # sessions come from clicks: lengths 25 min (23:50 → 00:15), 10 min, 0 → mean 700 s
    assert f["session_length_avg_s"] == 700
    assert f["events_per_session_avg"] == 2  # (3 + 2 + 1) clicks / 3
    assert f["conversion_rate"] == 0.3333  # one session reached checkout
    assert f["purchases_per_session"] == 0.3333
    assert f["cart_abandonment_rate"] == 0.5  # 2 sessions with a cart, one bought
    assert f["sessions_7d"] == 3
    # the session that crossed midnight counts on the day it started
    assert state.days[(midnight - 10 * MIN) // DAY_MS][3] == 1


def test_a_gap_bridged_by_a_late_event_merges_two_sessions():
    cfg = FoldConfig(session_gap_ms=30 * MIN, allowed_lateness_ms=60 * MIN)
    a, _ = fold([click(1, at(0)), click(2, at(0, 50)), click(3, at(0, 25))], cfg)  # 25 arrives last
    assert features(a, at(1), cfg)["sessions"] == 1
    b, _ = fold([click(1, at(0)), click(2, at(0, 50))], cfg)
    assert features(b, at(1), cfg)["sessions"] == 2


def test_category_affinity():
    events = [click(1, at(0), "product_view", "books"), click(2, at(0, 1), "product_view", "books"),
              click(3, at(0, 2), "product_view", "toys"), click(4, at(0, 3), "product_view", "home"),
              txn(5, at(0, 4), 30.0, category="toys"), txn(6, at(0, 5), 10.0, category="home")]
    state, _ = fold(events)
    f = features(state, at(1), CFG)
    assert f["category_view_share"] == {"books": 0.5, "toys": 0.25, "home": 0.25}
    assert f["category_spend_share"] == {"toys": 0.75, "home": 0.25}
    # combined share: toys (0.125 + 0.375) > home (0.125 + 0.125) = books (0.25 + 0); ties by name
    assert f["top_categories"] == ["toys", "books", "home"]


def test_clv_formula_and_value_tier():
    cfg = FoldConfig(clv_period_days=30, clv_periods=2, clv_discount_rate=0.1, clv_retention_probability=0.5)
    state, _ = fold([txn(1, at(0), 600.0), txn(2, at(30), 600.0), click(3, at(0))], cfg)
    predictive, observed = clv(state, at(60), cfg)
    aov, per_period = 600.0, 2 / 2.0  # 2 purchases over a 60-day tenure = 2 periods
    expected = aov * per_period * (0.5 / 1.1 + 0.25 / 1.21)
    assert predictive == pytest.approx(expected)
    months = sorted(state.months)
    now = calendar_month(at(60))
    assert observed == pytest.approx(sum(600.0 * 1.1 ** (now - m) for m in months))
    f = features(state, at(60), cfg)
    assert f["value_tier"] == "high" and f["clv"] == round(expected, 2)
    assert features(fold([txn(1, at(0), 700.0)])[0], at(1), CFG)["value_tier"] == "medium"
    assert features(fold([txn(1, at(0), 70.0)])[0], at(1), CFG)["value_tier"] == "low"


def test_lifecycle_state_machine_on_event_time():
    cfg = FoldConfig(new_days=30, at_risk_days=30, churned_days=90)
    state, _ = fold([click(1, at(0)), click(2, at(40))], cfg)
    assert lifecycle(state, at(10), cfg) == ("new", at(0))
    assert lifecycle(state, at(45), cfg) == ("active", at(30))
    assert lifecycle(state, at(75), cfg) == ("at_risk", at(70))
    assert lifecycle(state, at(200), cfg) == ("churned", at(130))
    back, _ = fold([click(3, at(200))], cfg, source="clicks:1", state=state)
    comeback_day = at(200) // DAY_MS * DAY_MS  # comebacks are found in the day buckets
    assert lifecycle(back, at(205), cfg) == ("reactivated", comeback_day)
    back, _ = fold([click(4, at(225))], cfg, source="clicks:2", state=back)
    assert lifecycle(back, at(240), cfg) == ("active", comeback_day + 30 * DAY_MS)


def test_same_event_id_counts_once_even_at_another_offset():
    ev = txn(1, at(0), 10.0)
    state, out = fold([ev, ev, ev])
    assert state.purchases == 1 and out.total("duplicate") == 2


def test_offset_fence_skips_what_was_applied_before_a_crash():
    events = [Positioned(click(i, at(0, i)), "clicks:0", i) for i in range(5)]
    state, _ = apply_events(CustomerState("c1"), events[:3], CFG)
    state, out = apply_events(state, events, CFG)  # the crashed batch is delivered again in full
    assert state.clicks == 5
    assert out.total("replayed") == 3 and out.total("applied") == 2
    assert state.offsets == {"clicks:0": 4}


def test_fences_are_per_partition():
    state, _ = apply_events(CustomerState("c1"), [Positioned(click(1, at(0)), "clicks:0", 10)], CFG)
    state, out = apply_events(state, [Positioned(txn(2, at(0), 5.0), "transactions:0", 0)], CFG)
    assert out.total("applied") == 1 and state.purchases == 1


def test_recent_ids_are_bounded_and_keep_the_newest():
    hour = 60 * MIN
    cfg = FoldConfig(dedup_horizon_ms=10 * hour, dedup_max_ids=3)
    state, _ = fold([click(i, T0 + i * hour) for i in range(20)], cfg)
    assert len(flat_ids(state)) == 3
    assert sorted(flat_ids(state).values()) == [(T0 + i * hour) // hour for i in (17, 18, 19)]
    # within the horizon and the bound, a duplicate is still caught
    _, out = fold([click(19, T0 + 19 * hour)], cfg, source="clicks:9", state=state)
    assert out.total("duplicate") == 1


def test_old_day_buckets_are_pruned():
    state, _ = fold([click(1, at(0)), click(2, at(400))])
    assert min(state.days) >= at(400) // DAY_MS - CFG.day_horizon
    assert state.clicks == 2


def test_state_round_trips_through_its_dict():
    state, _ = fold([click(1, at(0)), txn(2, at(0, 5), 9.5), click(3, at(3), "product_view", "toys")])
    assert CustomerState.from_dict(state.to_dict()) == state
    assert CustomerState.from_dict(orjson.loads(orjson.dumps(state.to_dict()))) == state
    assert month_label(calendar_month(at(0))) == "2026-03"


def test_state_blobs_of_the_earlier_form_still_load():
    """Before parallel arrays, blobs kept day and month buckets under string keys and grouped ids by hour."""
    state, _ = fold([click(1, at(0)), click(2, at(0, 2)), txn(3, at(1), 9.5), click(4, at(3), "product_view", "toys")])
    grouped: dict[str, str] = {}
    for sid, hour in sorted(flat_ids(state).items()):
        grouped[str(hour)] = grouped.get(str(hour), "") + sid
    earlier = {**state.to_dict(), "r": grouped, "d": {str(k): v for k, v in sorted(state.days.items())},
               "m": {str(k): v for k, v in sorted(state.months.items())}}
    loaded = CustomerState.from_dict(orjson.loads(orjson.dumps(earlier)))
    assert loaded == state
    assert len(flat_ids(loaded)) == 4 and len(loaded.days) == 3


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["page_view", "product_view", "add_to_cart", "purchase", "refund"]),
                  st.integers(0, 120 * 24 * 60), st.integers(0, 50_000), st.sampled_from(["a", "b", "c"])),
        min_size=1, max_size=40,
    ),
    st.randoms(use_true_random=False),
)
def test_features_do_not_depend_on_arrival_order_within_the_allowed_lateness(spec, rnd: random.Random):
    cfg = FoldConfig(allowed_lateness_ms=60 * MIN, session_gap_ms=30 * MIN)
    events = []
    for i, (kind, minute, cents_, cat) in enumerate(spec):
        ts = T0 + minute * MIN
        if kind in ("purchase", "refund"):
            events.append(txn(i, ts, cents_ / 100, kind, category=cat))
        else:
            events.append(click(i, ts, kind, category=cat))
    in_order = sorted(events, key=lambda e: e.ts)
    # arrival = event time + a delay of up to the allowed lateness: never later than the watermark allows
    shuffled = sorted(events, key=lambda e: e.ts + rnd.randint(0, cfg.allowed_lateness_ms))
    a, _ = fold(in_order, cfg)
    b, _ = fold(shuffled, cfg)
    as_of = max(e.ts for e in events) + DAY_MS
    assert features(a, as_of, cfg) == features(b, as_of, cfg)


def flat_ids(state: CustomerState) -> dict[str, int]:
    return {k: h for ids in state.recent_ids.values() for k, h in ids.items()}


def _reference_recent_ids(arrivals: list[tuple[str, int]], horizon_h: int, limit: int) -> dict[str, int]:
    """The dedup set's contract, written the slow way: after each new id, drop this topic's ids more than the
    horizon behind its newest, then its oldest (ties: the smallest id) beyond the limit."""
    ids: dict[str, int] = {}
    for key, hour in arrivals:
        if key in ids:
            continue
        ids[key] = hour
        newest = max(h for k, h in ids.items() if k[0] == key[0])
        ids = {k: h for k, h in ids.items() if k[0] != key[0] or h >= newest - horizon_h}
        same = sorted((h, k) for k, h in ids.items() if k[0] == key[0])
        for _, k in same[: max(len(same) - limit, 0)]:
            del ids[k]
    return ids


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ct"), st.integers(0, 12), st.integers(0, 40)), max_size=60),
       st.integers(1, 6), st.integers(1, 20))
def test_recent_ids_match_their_reference_model(arrivals, limit, horizon_h):
    from streamproc.domain.customer import HOUR_MS, _remember

    cfg = FoldConfig(dedup_horizon_ms=horizon_h * HOUR_MS, dedup_max_ids=limit)
    state = CustomerState("c1")
    keyed = [(f"{topic}{n:08d}", hour) for topic, n, hour in arrivals]
    for i, (key, hour) in enumerate(keyed):
        before = _reference_recent_ids(keyed[:i], horizon_h, limit)
        fresh = _remember(state, "clicks" if key[0] == "c" else "transactions", key[1:], hour * HOUR_MS, cfg)
        assert fresh == (key not in before)  # a duplicate exactly when the id is still remembered
        assert flat_ids(state) == _reference_recent_ids(keyed[: i + 1], horizon_h, limit)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 600), st.sampled_from(["page_view", "add_to_cart", "checkout"])),
                min_size=1, max_size=30))
def test_sessions_match_a_rebuild_from_the_click_times(clicks):
    """Open plus closed sessions equal the sessions rebuilt from all click times at once (gap-split)."""
    gap = 30
    cfg = FoldConfig(session_gap_ms=gap * MIN, allowed_lateness_ms=10**12, dedup_max_ids=10_000)
    state, _ = fold([click(i, T0 + m * MIN, action) for i, (m, action) in enumerate(clicks)], cfg)
    expected: list[list[int]] = []
    for m, action in sorted(clicks):
        ts = T0 + m * MIN
        cart, checkout = int(action == "add_to_cart"), int(action == "checkout")
        if expected and ts - expected[-1][1] <= gap * MIN:
            last = expected[-1]
            last[1], last[2] = ts, last[2] + 1
            last[3], last[4] = max(last[3], cart), max(last[4], checkout)
        else:
            expected.append([ts, ts, 1, cart, checkout])
    assert sorted(s[:5] for s in state.open_sessions) == expected


def test_observed_clv_does_not_depend_on_the_order_months_were_first_seen():
    # three months at discount factor 1: 0.1 + 0.2 + 0.3 is 0.6000000000000001 in this order and 0.6 in reverse
    cfg = FoldConfig()
    as_of = 1_767_225_600_000  # 2026-01-01
    month = calendar_month(as_of)
    forward, backward = CustomerState("c"), CustomerState("c")
    forward.months = {month: 10, month + 1: 20, month + 2: 30}
    backward.months = {month + 2: 30, month + 1: 20, month: 10}
    assert clv(forward, as_of, cfg) == clv(backward, as_of, cfg)
