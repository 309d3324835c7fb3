"""Label rule, alert hysteresis and cooldown, explanations, checkpoints, and the model contract."""

from __future__ import annotations

import pickle
import random
from datetime import UTC, datetime

import pytest

from streamproc.domain.alerts import retention_action, risk_level, should_alert
from streamproc.domain.churn import (
    CHURN_FEATURES,
    ChurnConfig,
    ModelState,
    churn_inputs,
    grid_points,
    inputs_at,
    known_label,
    mature_labels,
    take_snapshots,
)
from streamproc.domain.churn import SEGMENT_FEATURES as SEGMENT_FEATURES_SET
from streamproc.domain.customer import DAY_MS, CustomerState, FoldConfig, Positioned, apply_events
from streamproc.domain.events import Click, Item, Transaction
from streamproc.domain.model_config import ModelConfig
from streamproc.domain.models import ModelBundle, name_segments

T0 = int(datetime(2026, 1, 5, tzinfo=UTC).timestamp() * 1000)  # a Monday; the weekly grid falls on Thursdays
CFG = ChurnConfig(horizon_days=60, cadence_days=7)
FOLD = FoldConfig()


def buy(i, day, amount=20.0):
    return Transaction(event_id=f"t{i}", customer_id="c", ts=T0 + int(day * DAY_MS), order_id=f"o{i}",
                       type="purchase", amount=amount, currency="EUR",
                       items=[Item(product_id="p", category="c", quantity=1, unit_price=amount)])


def visit(i, day):
    return Click(event_id=f"e{i}", customer_id="c", ts=T0 + int(day * DAY_MS), session_id="s", action="page_view")


def fold(events, state=None, start=0):
    return apply_events(state or CustomerState("c"), [Positioned(e, "x:0", start + i) for i, e in enumerate(events)],
                        FOLD)[0]


def test_snapshots_follow_a_fixed_event_time_grid_and_stop_for_long_silent_customers():
    state = fold([buy(0, 0)])
    points = grid_points(T0 - 1, T0 + 400 * DAY_MS, CFG)
    assert all(p % (7 * DAY_MS) == 0 for p in points)
    taken = take_snapshots(state, T0 + 400 * DAY_MS, CFG)
    instants = [p for p, _ in taken]
    assert instants == [p for p in points if p > T0 and p - state.last_event_ts <= 3 * 60 * DAY_MS]
    assert take_snapshots(state, T0 + 400 * DAY_MS, CFG) == []  # each instant once


def test_snapshot_inputs_only_see_events_before_the_instant():
    early = fold([buy(0, 0), visit(1, 3)])
    point = grid_points(T0 + 4 * DAY_MS, T0 + 20 * DAY_MS, CFG)[0]
    before = inputs_at(early, point)
    later = fold([buy(2, (point - T0) / DAY_MS + 2, 500.0)], state=fold([buy(0, 0), visit(1, 3)]), start=10)
    assert inputs_at(later, point) == before  # a purchase after the instant changes nothing


def test_label_rule_return_before_the_horizon_is_not_churn():
    state = fold([buy(0, 0)])
    state.pending = [p for p, _ in take_snapshots(state, T0 + 30 * DAY_MS, CFG)]
    first = state.pending[0]
    assert known_label(state, first, T0 + 30 * DAY_MS, CFG) is None  # nothing known yet
    state = fold([buy(1, (first - T0) / DAY_MS + 20)], state=state, start=5)
    # the return was within 60 days of the snapshot: retained, known at once ...
    assert known_label(state, first, T0 + 31 * DAY_MS, CFG) == 0
    # ... and released for learning with the churned ones, once the horizon has passed (no censoring bias)
    assert mature_labels(state, T0 + 31 * DAY_MS, CFG) == []
    assert (first, 0) in mature_labels(state, first + 60 * DAY_MS, CFG)


def test_label_rule_silence_past_the_horizon_is_churn_and_only_then():
    state = fold([buy(0, 0)])
    state.pending = [p for p, _ in take_snapshots(state, T0 + 5 * DAY_MS, CFG)]
    first = state.pending[0]
    assert len(state.pending) == 1
    assert mature_labels(state, first + 60 * DAY_MS - 1, CFG) == []
    assert mature_labels(state, first + 60 * DAY_MS, CFG) == [(first, 1)]
    assert state.pending == []


def test_a_late_purchase_inside_the_horizon_still_makes_the_label_retained():
    state = fold([buy(0, 0)])
    state.pending = [p for p, _ in take_snapshots(state, T0 + 5 * DAY_MS, CFG)]
    first = state.pending[0]
    # the purchase happened before the horizon ended but arrives after (a late event): still "not churned"
    state = fold([buy(1, (first - T0) / DAY_MS + 59)], state=state, start=5)
    assert mature_labels(state, first + 90 * DAY_MS, CFG) == [(first, 0)]


def test_label_on_activity_counts_any_event():
    cfg = ChurnConfig(label_on="activity")
    state = fold([buy(0, 0)])
    state.pending = [p for p, _ in take_snapshots(state, T0 + 5 * DAY_MS, cfg)]
    first = state.pending[0]
    state = fold([visit(1, (first - T0) / DAY_MS + 5)], state=state, start=5)
    assert mature_labels(state, first + 90 * DAY_MS, cfg) == [(first, 0)]


def test_alert_hysteresis_and_cooldown():
    cfg = ChurnConfig(alert_threshold=0.7, rearm_threshold=0.5, cooldown_days=14)
    m = ModelState()
    assert should_alert(m, 0.75, T0, cfg)
    assert not should_alert(m, 0.9, T0 + DAY_MS, cfg)  # still high: no storm
    assert not should_alert(m, 0.6, T0 + 2 * DAY_MS, cfg)  # between thresholds: not re-armed
    assert not should_alert(m, 0.8, T0 + 3 * DAY_MS, cfg)
    assert not should_alert(m, 0.4, T0 + 4 * DAY_MS, cfg)  # recovered: re-armed
    assert not should_alert(m, 0.8, T0 + 5 * DAY_MS, cfg)  # but within the cooldown
    assert not should_alert(m, 0.4, T0 + 6 * DAY_MS, cfg)
    assert should_alert(m, 0.8, T0 + 20 * DAY_MS, cfg)  # re-armed and past the cooldown


def test_risk_levels_and_actions_by_value_tier():
    assert [risk_level(p, CFG) for p in (0.71, 0.85, 0.95)] == ["medium", "high", "critical"]
    assert "personal call" in retention_action("high", "critical")
    assert "coupon" in retention_action("medium", "high")
    assert "email" in retention_action("low", "high")
    custom = {"low": {"high": "sms"}}
    assert retention_action("low", "high", custom) == "sms"


def synthetic(n, seed):
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        churner = rnd.random() < 0.3
        x = {k: rnd.gauss(0, 1) for k in CHURN_FEATURES}
        x["log_recency_days"] += 2.0 if churner else 0.0
        x["log_frequency"] -= 1.5 if churner else 0.0
        rows.append((x, int(churner)))
    return rows


@pytest.mark.parametrize("classifier", ["logreg", "hat", "arf"])
def test_every_selectable_classifier_meets_the_contract(classifier):
    cfg = ModelConfig(classifier=classifier, seed=3)
    a, b = ModelBundle(cfg), ModelBundle(cfg)
    for x, y in synthetic(600, 1):
        a.learn_churn(x, y, None)
        b.learn_churn(x, y, None)
    probe = synthetic(1, 9)[0][0]
    # same seed, same data: same model
    assert a.churn_probability(probe) == pytest.approx(b.churn_probability(probe))
    # pickle round trip keeps every prediction
    again = ModelBundle.loads(a.dumps())
    assert again.churn_probability(probe) == pytest.approx(a.churn_probability(probe))
    # unseen and missing features do not break scoring
    odd = {**{k: v for k, v in probe.items() if k != "log_frequency"}, "brand_new_feature": 3.0}
    assert 0.0 <= a.churn_probability(odd) <= 1.0
    # it learned something: churners score higher than loyal customers on average
    test = synthetic(300, 2)
    pos = [a.churn_probability(x) for x, y in test if y]
    neg = [a.churn_probability(x) for x, y in test if not y]
    assert sum(pos) / len(pos) > sum(neg) / len(neg)
    assert a.prequential is not None and a.prequential.n == 600


@pytest.mark.parametrize("segmenter", ["kmeans", "streamkmeans"])
def test_segmenters_round_trip_and_keep_ids_in_range(segmenter):
    bundle = ModelBundle(ModelConfig(segmenter=segmenter, n_segments=4))
    rnd = random.Random(4)
    from streamproc.domain.churn import SEGMENT_FEATURES

    for _ in range(500):
        centre = rnd.choice([0.0, 3.0])
        bundle.learn_segment({k: centre + rnd.gauss(0, 0.3) for k in SEGMENT_FEATURES})
    probe = {k: 3.0 for k in SEGMENT_FEATURES}
    seg = bundle.segment(probe)
    assert seg is not None and 0 <= seg < 4
    assert ModelBundle.loads(bundle.dumps()).segment(probe) == seg
    profiles = bundle.segment_profiles()
    assert len({p["name"] for p in profiles.values()}) == len(profiles)


def test_fast_segment_assignment_agrees_with_river_and_follows_learning():
    from streamproc.domain.churn import SEGMENT_FEATURES

    bundle = ModelBundle(ModelConfig(n_segments=5))
    rnd = random.Random(11)
    share = "category_view_share."

    def example() -> dict[str, float]:
        x = {k: rnd.choice([0.0, 2.0, 5.0]) + rnd.gauss(0, 1.0) for k in SEGMENT_FEATURES}
        x.update({f"{share}{c}": rnd.random() for c in rnd.sample("abcdefg", 3)})
        return x

    for round_ in range(3):
        for _ in range(400):
            bundle.learn_segment(example())
        probes = [example() for _ in range(300)] + [{}]
        river = [int(bundle.segmenter.predict_one(bundle.segment_vector(x))) for x in probes]
        fast = [bundle.segment(x) for x in probes]
        assert fast == river, f"round {round_}"
        assert len(set(fast)) > 1
        assert bundle.__dict__["_segment_fast"][1] is not None  # the fast form was used, not the fallback
    # a checkpoint does not carry the cache, and the loaded copy answers the same
    clone = ModelBundle.loads(bundle.dumps())
    assert "_segment_fast" not in clone.__dict__
    assert [clone.segment(x) for x in probes] == fast
    # a centre lacking one of the inputs: River's answer (the fast form steps aside)
    kmeans = bundle.segmenter[list(bundle.segmenter.steps)[-1]]
    del kmeans.centers[0][next(iter(SEGMENT_FEATURES))]
    bundle.__dict__.pop("_segment_fast")
    assert bundle.segment(probes[0]) is not None and bundle.__dict__["_segment_fast"][1] is None


def test_linear_contributions_are_weight_times_scaled_value():
    bundle = ModelBundle(ModelConfig())
    for x, y in synthetic(400, 5):
        bundle.learn_churn(x, y, None)
    x = synthetic(1, 6)[0][0]
    contrib = bundle.contributions(x)
    assert bundle.scorers is not None
    stacked = bundle.scorers.stacked(x)  # what the classifier sees: x with the baselines' scores
    assert {"bgnbd_logit", "recency_logit"} <= set(contrib) and "btyd_x" not in contrib
    scaled = bundle.classifier["StandardScaler"].transform_one(stacked)
    weights = bundle.classifier["LogisticRegression"].weights
    for k in stacked:
        assert contrib[k] == pytest.approx(weights[k] * scaled[k])


def test_checkpoints_keep_versions_and_roll_back():
    import asyncio

    from streamproc.adapters.memory import InMemoryModelStore

    async def run():
        store = InMemoryModelStore()
        bundle = ModelBundle(ModelConfig())
        for x, y in synthetic(50, 7):
            bundle.learn_churn(x, y, None)
        v1 = await store.save(bundle, keep=2)
        for x, y in synthetic(50, 8):
            bundle.learn_churn(x, y, None)
        v2 = await store.save(bundle, keep=2)
        v3 = await store.save(bundle, keep=2)
        assert (v1, v2, v3) == (1, 2, 3) and await store.versions() == [2, 3]
        await store.set_current(2)
        assert (await store.load()).churn_examples == 100 and await store.current_version() == 2
        with pytest.raises(KeyError):
            await store.set_current(1)

    asyncio.run(run())


async def model_store_contract(store) -> None:
    """What every ModelStore does with versions and fenced (trainer) saves; also run against Redis."""
    from streamproc.ports import StaleCheckpoint

    bundle = ModelBundle(ModelConfig())
    assert await store.save(bundle, keep=3) == 1  # unfenced (a bootstrap): always accepted
    bundle.training_offset = 10
    assert await store.save(bundle, keep=3, fenced=True) == 2
    stale = ModelBundle(ModelConfig())  # a trainer that lost the partition and only got to offset 7
    stale.training_offset = 7
    with pytest.raises(StaleCheckpoint):
        await store.save(stale, keep=3, fenced=True)
    stale.training_offset = 10  # the same offset again is no progress either
    with pytest.raises(StaleCheckpoint):
        await store.save(stale, keep=3, fenced=True)
    assert stale.version == 0 and await store.current_version() == 2
    bundle.training_offset = 11
    assert await store.save(bundle, keep=3, fenced=True) == 3
    loaded = await store.load()
    assert loaded.version == 3 and loaded.training_offset == 11
    await store.set_current(2)  # an operator's rollback does not reset the fence or reuse numbers
    assert await store.save(bundle, keep=3) == 4
    assert await store.versions() == [2, 3, 4]


def test_model_store_contract_in_memory():
    import asyncio

    from streamproc.adapters.memory import InMemoryModelStore

    asyncio.run(model_store_contract(InMemoryModelStore()))


def test_segment_names_are_unique_and_descriptive():
    from streamproc.domain.churn import SEGMENT_FEATURES

    base = dict.fromkeys(SEGMENT_FEATURES, 0.0)
    scaled = {
        0: {**base, "log_monetary_avg": 1.2, "conversion_rate": 1.0},
        1: {**base, "log_monetary_avg": -0.9},
        2: {**base, "log_tenure_days": -1.5, "conversion_rate": -1.0},
        3: dict(base),
    }
    raw = {
        0: {"view_share:electronics": 0.5, "view_share:home": 0.3, "view_share:books": 0.04},
        1: {"view_share:grocery": 0.4, "view_share:fashion": 0.35},
        2: {"view_share:beauty": 0.3, "view_share:fashion": 0.3},
        3: {"view_share:grocery": 0.4, "view_share:fashion": 0.35},
    }
    names = name_segments(scaled, raw)
    assert names == {
        0: "premium decisive electronics & home shoppers",
        1: "budget grocery & fashion shoppers",
        2: "new browsing beauty & fashion shoppers",
        3: "grocery & fashion shoppers",
    }
    raw[3] = raw[1]
    scaled[3] = scaled[1]
    clash = name_segments(scaled, raw)
    assert clash[1] == "budget grocery & fashion shoppers #1" and clash[3] == "budget grocery & fashion shoppers #3"


def test_segment_inputs_take_category_view_shares_and_session_habits():
    from streamproc.domain.churn import segment_inputs

    state = fold([buy(0, 0), visit(1, 2)])
    state.cat_views = {"books": 3, "toys": 1}
    values = inputs_at(state, T0 + 10 * DAY_MS, exact=True)
    x = segment_inputs(values, state)
    assert x["view_share:books"] == 0.75 and x["view_share:toys"] == 0.25
    assert {"log_monetary_avg", "log_tenure_days", "events_per_session", "conversion_rate"} <= set(x)
    bundle = ModelBundle(ModelConfig(n_segments=2))
    for i in range(10):
        bundle.learn_segment({**x, "view_share:books": i / 10})
    # every customer is compared on the same axes: categories they never viewed count as 0
    assert set(bundle.segment_vector({"log_monetary_avg": 1.0})) == {*SEGMENT_FEATURES_SET, "view_share:books",
                                                                  "view_share:toys"}
    assert bundle.segment({"log_monetary_avg": 1.0}) in (0, 1)


def test_churn_inputs_are_the_documented_vector():
    state = fold([buy(0, 0), visit(1, 2)])
    values = inputs_at(state, T0 + 10 * DAY_MS, exact=True)
    assert list(churn_inputs(values)) == list(CHURN_FEATURES)
    assert pickle.loads(pickle.dumps(values)) == values
