import random

from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc.domain.customer import CustomerState, FoldConfig, Positioned, apply_events, features
from streamproc.domain.events import Click, Item, Transaction

CFG = FoldConfig(dedup_horizon_ms=10**12, dedup_max_ids=10_000)
T0 = 1_767_261_600_000


def click(i, ts=T0, action="page_view"):
    return Click(event_id=f"e{i}", customer_id="c1", ts=ts, session_id="s", action=action)


def purchase(i, amount, ts=T0, kind="purchase"):
    return Transaction(event_id=f"t{i}", customer_id="c1", ts=ts, order_id=f"o{i}", type=kind, amount=amount,
                       currency="EUR", items=[Item(product_id="p", category="c", quantity=1, unit_price=amount)])


def pos(events, source="clicks:0", start=0):
    return [Positioned(ev, source, start + i) for i, ev in enumerate(events)]


def test_counts_spend_and_times():
    state, out = apply_events(
        CustomerState("c1"),
        pos([click(1, T0 + 5), purchase(2, 40.0, T0 + 10), purchase(3, 15.0, T0 + 20, "refund"),
             click(4, T0 - 50, "add_to_cart")]),
        CFG,
    )
    assert out.total("applied") == 4
    f = features(state)
    assert f["clicks"] == "2" and f["purchases"] == "1" and f["refunds"] == "1"
    assert f["monetary_total"] == "25.00"  # refunds netted
    assert f["first_event_ts"] == str(T0 - 50) and f["last_event_ts"] == str(T0 + 20)
    assert state.clicks_by_action == {"page_view": 1, "add_to_cart": 1}


def test_same_event_id_counts_once_even_at_another_offset():
    ev = purchase(1, 10.0)
    state, out = apply_events(CustomerState("c1"), pos([ev, ev, ev]), CFG)
    assert state.purchases == 1 and out.total("duplicate") == 2


def test_offset_fence_skips_what_was_applied_before_a_crash():
    events = pos([click(i) for i in range(5)])
    state, _ = apply_events(CustomerState("c1"), events[:3], CFG)
    # the crashed worker's batch is delivered again in full
    state, out = apply_events(state, events, CFG)
    assert state.clicks == 5
    assert out.total("replayed") == 3 and out.total("applied") == 2
    assert state.offsets == {"clicks:0": 4}


def test_fences_are_per_partition():
    state, _ = apply_events(CustomerState("c1"), pos([click(1)], "clicks:0", start=10), CFG)
    state, out = apply_events(state, pos([purchase(2, 5.0)], "transactions:0", start=0), CFG)
    assert out.total("applied") == 1 and state.purchases == 1


def test_recent_ids_are_bounded_and_keep_the_newest():
    cfg = FoldConfig(dedup_horizon_ms=100, dedup_max_ids=3)
    state, _ = apply_events(CustomerState("c1"), pos([click(i, T0 + i * 10) for i in range(20)]), cfg)
    assert len(state.recent_ids) == 3
    assert max(state.recent_ids.values()) == T0 + 190


def test_state_round_trips_through_its_dict():
    state, _ = apply_events(CustomerState("c1"), pos([click(1), purchase(2, 9.5)]), CFG)
    assert CustomerState.from_dict(state.to_dict()) == state


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["click", "purchase", "refund"]), st.integers(0, 10**7),
                       st.floats(0, 500, allow_nan=False)), min_size=1, max_size=30),
    st.randoms(use_true_random=False),
)
def test_features_do_not_depend_on_arrival_order(spec, rnd: random.Random):
    events = []
    for i, (kind, dt, amount) in enumerate(spec):
        events.append(click(i, T0 + dt) if kind == "click" else purchase(i, round(amount, 2), T0 + dt, kind))
    shuffled = list(events)
    rnd.shuffle(shuffled)
    a, _ = apply_events(CustomerState("c1"), pos(events), CFG)
    b, _ = apply_events(CustomerState("c1"), pos(shuffled), CFG)
    assert features(a) == features(b)
