"""The metrics bundle's bulk histogram observation counts exactly what one ``observe`` per amount would."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from streamproc.metrics import Metrics, observe_many


def _samples(registry: CollectorRegistry, name: str) -> dict[str, float]:
    return {f"{s.name}{sorted(s.labels.items())}": s.value for m in registry.collect() if m.name == name
            for s in m.samples if not s.name.endswith("_created")}


@pytest.mark.parametrize("seed", range(5))
def test_observe_many_matches_observe_one_by_one(seed: int) -> None:
    rng = random.Random(seed)
    buckets = Metrics().end_to_end._upper_bounds[:-1]
    # on the bounds themselves (le is inclusive), between them, beyond the last, and zero
    amounts = [rng.choice([*buckets, 0.0, 100.0, rng.uniform(0, 40), rng.uniform(0, 0.3)]) for _ in range(500)]
    one, many = CollectorRegistry(), CollectorRegistry()
    single = Histogram("lat_seconds", "x", buckets=buckets, registry=one)
    bulk = Histogram("lat_seconds", "x", buckets=buckets, registry=many)
    for amount in amounts:
        single.observe(amount)
    observe_many(bulk, amounts[:200])
    observe_many(bulk, [])
    observe_many(bulk, amounts[200:])
    expected, got = _samples(one, "lat_seconds"), _samples(many, "lat_seconds")
    assert expected.keys() == got.keys() and len(expected) == len(buckets) + 3  # buckets, +Inf, count, sum
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert got["lat_seconds_count[]"] == 500


def test_observe_many_on_a_labelled_histogram_behaves_like_observe() -> None:
    labelled = Histogram("by_topic_seconds", "x", ["topic"], registry=CollectorRegistry())
    with pytest.raises(ValueError):  # a labelled parent is not observable: the same error as observe()
        observe_many(labelled, [0.1])
