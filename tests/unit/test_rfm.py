"""RFM scores from the trainer's quantile sketches against exact quintiles, the segment rule table, and the
publication rule (an instant is published once two later ones have started)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from streamproc.domain.rfm import (
    QUINTILES,
    SEGMENT_NAMES,
    RfmPopulation,
    score,
    segment_of,
)

DAY = 86_400_000
# the stated tolerance: at most this share of customers score differently from the exact quintiles, by one at most
# (a value within RELATIVE_ACCURACY of a quintile edge may share its bucket)
MAX_MISMATCH_SHARE = 0.01


def population(n: int, seed: int) -> list[tuple[float, float, float]]:
    """Buyers as the snapshots see them: recency on the half-day grid, purchase counts with most at one (ties),
    spend log-normal per order."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        purchases = 1 + int(rnd.expovariate(0.6))
        recency = int(rnd.uniform(0, 180)) + 0.5
        spend = round(sum(rnd.lognormvariate(3.5, 0.8) for _ in range(purchases)), 2)
        out.append((recency, float(purchases), spend))
    return out


def exact_edges(values: list[float]) -> list[float]:
    """Exact quintiles by the inverted CDF: the smallest value with at least q x n values at or below it."""
    ordered = sorted(values)
    return [ordered[math.ceil(q * len(ordered) - 1e-9) - 1] for q in QUINTILES]


def exact_score(edges: list[float], value: float, higher_is_better: bool) -> int:
    exceeded = sum(1 for e in edges if value > e)
    return 1 + exceeded if higher_is_better else 5 - exceeded


def published(buyers: list[tuple[float, float, float]]) -> RfmPopulation:
    rfm = RfmPopulation()
    for instant in (DAY * 7, DAY * 14, DAY * 21):  # the first is complete when the third starts
        for r, f, m in buyers:
            rfm.learn(instant, r, f, m)
    return rfm


@pytest.mark.parametrize("seed", [1, 2])
def test_scores_match_exact_quintiles_within_the_stated_tolerance(seed):
    buyers = population(20_000, seed)
    rfm = published(buyers)
    assert rfm.edges is not None and rfm.edges_at == DAY * 7 and rfm.buyers == len(buyers)
    exact = {name: exact_edges([b[i] for b in buyers]) for i, name in enumerate(("recency", "frequency", "monetary"))}
    mismatches: Counter[str] = Counter()
    for r, f, m in buyers:
        got = score(rfm.edges, r, f, m)
        want = (exact_score(exact["recency"], r, False), exact_score(exact["frequency"], f, True),
                exact_score(exact["monetary"], m, True))
        for name, g, w in zip(("recency", "frequency", "monetary"), (got.recency, got.frequency, got.monetary), want,
                              strict=True):
            assert abs(g - w) <= 1, (name, r, f, m, g, w)
            mismatches[name] += g != w
    assert all(v <= MAX_MISMATCH_SHARE * len(buyers) for v in mismatches.values()), mismatches
    # quintiles: each score holds about a fifth of the buyers where values do not tie (monetary)
    shares = Counter(score(rfm.edges, r, f, m).monetary for r, f, m in buyers)
    assert all(0.18 < shares[s] / len(buyers) < 0.22 for s in range(1, 6)), shares


def test_ties_share_a_score():
    # 60 % of buyers bought once: the first three frequency edges are all one purchase, and every one of them
    # scores F = 1 (none is split between scores by arrival order)
    buyers = [(10.5, 1.0, 50.0)] * 600 + [(10.5, float(2 + i % 5), 50.0) for i in range(400)]
    rfm = published(buyers)
    assert rfm.edges is not None
    assert {score(rfm.edges, *b).frequency for b in buyers[:600]} == {1}
    assert score(rfm.edges, 10.5, 6.0, 50.0).frequency == 5


def test_every_r_and_f_pair_has_exactly_one_segment_name():
    from streamproc.domain.rfm import SEGMENT_RULES

    for r in range(1, 6):
        for f in range(1, 6):
            names = [n for n, (rl, rh), (fl, fh) in SEGMENT_RULES if rl <= r <= rh and fl <= f <= fh]
            assert len(names) == 1, (r, f, names)
    assert segment_of(5, 5) == "Champions" and segment_of(1, 5) == "Cannot lose them"
    assert segment_of(1, 1) == "Lost" and segment_of(2, 1) == "Hibernating" and segment_of(2, 3) == "At risk"
    assert set(SEGMENT_NAMES) >= {"Champions", "Loyal", "Potential loyalists", "At risk", "Cannot lose them",
                                  "Hibernating", "Lost"}


def test_an_instant_is_published_once_two_later_ones_started_and_older_examples_are_ignored():
    rfm = RfmPopulation()
    rfm.learn(DAY * 7, 1.5, 1, 10.0)
    rfm.learn(DAY * 14, 2.5, 2, 20.0)
    assert rfm.edges is None  # a partition may still be a cadence behind
    rfm.learn(DAY * 21, 3.5, 3, 30.0)
    assert rfm.edges_at == DAY * 7 and rfm.buyers == 1
    rfm.learn(DAY * 28, 4.5, 4, 40.0)
    assert rfm.edges_at == DAY * 14
    rfm.learn(DAY * 7, 100.5, 9, 999.0)  # older than the published instant: not counted anywhere
    assert rfm.buyers == 1 and set(rfm.collecting) == {DAY * 21, DAY * 28}
    assert rfm.segment_counts == {}  # learned before any edges were published: nothing to score against
    rfm.learn(DAY * 35, 5.5, 5, 50.0)
    assert rfm.edges_at == DAY * 21 and sum(rfm.segment_counts.values()) == 1  # scored against instant 7's edges


def test_a_lagging_sweep_s_late_buyers_of_the_published_instant_still_shape_its_quintiles():
    """A backlog: the active buyers of later instants come first, the silent ones of an instant later. The
    published edges end as the exact quintiles of the instant's whole population (within the sketch's tolerance)."""
    buyers = population(5_000, 3)
    rfm = RfmPopulation()
    for instant in (7, 14, 21):
        for b in buyers[:10]:  # the active few of each instant
            rfm.learn(DAY * instant, *b)
    assert rfm.edges_at == DAY * 7 and rfm.buyers == 10
    for b in buyers[10:]:  # the sweep catches up on instant 7
        rfm.learn(DAY * 7, *b)
    assert rfm.buyers >= len(buyers) / 1.011
    edges = rfm.edge_values()
    for i, name in enumerate(("recency", "frequency", "monetary")):
        want = exact_edges([b[i] for b in buyers])
        got = edges[name]
        assert got == pytest.approx(want, rel=0.01, abs=0.01), name


def test_the_segment_counts_come_from_the_edges_in_force():
    buyers = population(3_000, 5)
    rfm = RfmPopulation()
    for instant in (7, 14, 21, 28, 35):
        for b in buyers:
            rfm.learn(DAY * instant, *b)
    edges = rfm.edges
    assert edges is not None and rfm.edges_at == DAY * 21  # its examples were scored against instant 7's edges
    expected = Counter(score(edges, *b).segment for b in buyers)  # the same population at each instant
    assert rfm.segment_counts == dict(expected)
