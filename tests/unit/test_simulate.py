import hashlib
from collections import Counter

import orjson

from streamproc.domain.events import DecodeLimits, Rejection, decode_event
from streamproc.tools.simulate import PERSONAS, SimulationConfig, Simulator


def digest(cfg: SimulationConfig) -> str:
    h = hashlib.sha256()
    for topic, key, payload in Simulator(cfg).payloads():
        h.update(topic.encode() + key + payload)
    return h.hexdigest()


def test_same_seed_same_events_other_seed_other_events():
    cfg = SimulationConfig(customers=60, days=30, seed=3, bad_fraction=0.05, duplicate_fraction=0.05)
    assert digest(cfg) == digest(cfg)
    assert digest(cfg) != digest(SimulationConfig(customers=60, days=30, seed=4))


def test_events_are_valid_in_event_time_order_and_keyed_by_customer():
    sim = Simulator(SimulationConfig(customers=200, days=60, seed=11))
    last = 0
    kinds = Counter()
    for topic, key, payload in sim.payloads():
        ev = decode_event(topic, payload, DecodeLimits(), None)
        assert not isinstance(ev, Rejection), (ev, payload)
        assert ev.customer_id == key.decode()
        assert ev.ts >= last
        last = ev.ts
        kinds[topic] += 1
    share = kinds["transactions"] / sum(kinds.values())
    assert 0.03 < share < 0.15, share


def test_bad_and_duplicate_fractions_are_respected_and_bad_ones_are_rejected():
    cfg = SimulationConfig(customers=150, days=60, seed=5, bad_fraction=0.05, duplicate_fraction=0.03)
    sim = Simulator(cfg)
    rejected = 0
    for topic, _key, payload in sim.payloads():
        if isinstance(decode_event(topic, payload, DecodeLimits(), None), Rejection):
            rejected += 1
    assert rejected == sim.bad_events
    assert abs(sim.bad_events / sim.valid_events - 0.05) < 0.01
    assert abs(sim.duplicate_events / sim.valid_events - 0.03) < 0.01


def test_persona_mix_and_churn_follow_the_parameters():
    sim = Simulator(SimulationConfig(customers=4000, days=180, seed=1))
    truth = sim.truth()
    shares = Counter(t.persona for t in truth)
    for p in PERSONAS:
        assert abs(shares[p.name] / len(truth) - p.share) < 0.03
    # expected churn within the run: hazard-driven, the loyal churn least
    churned = Counter(t.persona for t in truth if t.churn_ts is not None)
    rate = {p.name: churned[p.name] / shares[p.name] for p in PERSONAS}
    assert rate["loyal_high_spender"] < rate["bargain_hunter"] < rate["new_customer"] + 0.2
    assert 0.1 < sum(churned.values()) / len(truth) < 0.6


def test_churned_customers_fall_silent_and_returners_come_back():
    sim = Simulator(SimulationConfig(customers=400, days=180, seed=2))
    last_seen: dict[str, int] = {}
    for _topic, key, payload in sim.payloads():
        last_seen[key.decode()] = orjson.loads(payload)["ts"]
    for t in sim.truth():
        if t.churn_ts is not None and t.return_ts is None and t.customer_id in last_seen:
            assert last_seen[t.customer_id] <= t.churn_ts + 3_600_000 * 2 + 10 * 86_400_000  # refunds trail
        if t.return_ts is not None and t.customer_id in last_seen:
            assert last_seen[t.customer_id] >= t.return_ts
