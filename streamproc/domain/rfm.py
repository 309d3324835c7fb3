"""RFM scores and named RFM segments, the common language of CRM teams.

* **Scores** 1-5 for recency (days since the last purchase: 5 = most recent), frequency (purchases) and monetary
  (net spend), against the quintiles of the live buyers: the customers who had bought by a snapshot instant and
  were live there (every one of them is snapshotted at that instant, so the snapshot examples of one instant are
  the population). Ties share a score: a value scores one more than the number of quintile edges it exceeds
  (recency: one less), so with most buyers at one purchase, they all score F = 1.
* **The population's quintiles** are kept by the trainer as quantile sketches (``QuantileSketch``: a histogram
  over logarithmic buckets of relative width ``RELATIVE_ACCURACY``, DDSketch's mapping; mergeable, bounded by the
  range of the values, not their number) per snapshot instant, and published with each checkpoint
  (``RfmPopulation.edges``): those of the newest complete instant. An instant is complete once examples of two
  later instants arrived (a partition may run a snapshot cadence ahead of another).
* **Segments** by the rule table ``SEGMENT_RULES`` on the R and F scores (the usual R x F grid; M ranks within a
  segment): every (R, F) pair has exactly one name.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

RELATIVE_ACCURACY = 0.001  # two values within 0.1 % of each other may share a bucket
_GAMMA_LOG = math.log((1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY))
ZERO_BUCKET = -(10**9)  # values <= 0 (no spend yet)
QUINTILES = (0.2, 0.4, 0.6, 0.8)
DIMENSIONS = ("recency", "frequency", "monetary")
INSTANTS_KEPT = 3  # instants collected at once: the oldest is complete when a third one starts

# name, R scores, F scores (inclusive ranges); covers the 5 x 5 grid once (tests/unit/test_rfm.py)
SEGMENT_RULES: tuple[tuple[str, tuple[int, int], tuple[int, int]], ...] = (
    ("Champions", (5, 5), (4, 5)),
    ("Loyal", (3, 4), (4, 5)),
    ("Potential loyalists", (4, 5), (2, 3)),
    ("New customers", (5, 5), (1, 1)),
    ("Promising", (4, 4), (1, 1)),
    ("Need attention", (3, 3), (3, 3)),
    ("About to sleep", (3, 3), (1, 2)),
    ("Cannot lose them", (1, 2), (5, 5)),
    ("At risk", (1, 2), (3, 4)),
    ("Hibernating", (2, 2), (1, 2)),
    ("Lost", (1, 1), (1, 2)),
)
SEGMENT_NAMES = tuple(name for name, _, _ in SEGMENT_RULES)


def bucket(value: float) -> int:
    """The sketch bucket of ``value``: equal values share one, and the order of buckets is the order of values."""
    if value <= 0:
        return ZERO_BUCKET
    return math.ceil(math.log(value) / _GAMMA_LOG)


@dataclass
class QuantileSketch:
    """Counts per logarithmic bucket (``bucket``)."""

    counts: dict[int, int] = field(default_factory=dict)
    n: int = 0

    def add(self, value: float) -> None:
        key = bucket(value)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.n += 1

    def quantile_buckets(self, qs: tuple[float, ...]) -> list[int]:
        """The bucket of each quantile q: that of the smallest value v with at least q x n values <= v (the
        inverted CDF, so a quantile is a value of the population)."""
        out: list[int] = []
        seen = 0
        wanted = iter(qs)
        q = next(wanted, None)
        for key in sorted(self.counts):
            seen += self.counts[key]
            while q is not None and seen >= math.ceil(q * self.n - 1e-9):  # (0.6 x 1000 is 600.0000000000001)
                out.append(key)
                q = next(wanted, None)
        return out


@dataclass(frozen=True, slots=True)
class RfmScore:
    recency: int
    frequency: int
    monetary: int
    segment: str

    def as_dict(self) -> dict[str, Any]:
        return {"r": self.recency, "f": self.frequency, "m": self.monetary, "segment": self.segment}


def segment_of(r: int, f: int) -> str:
    for name, (r_lo, r_hi), (f_lo, f_hi) in SEGMENT_RULES:
        if r_lo <= r <= r_hi and f_lo <= f <= f_hi:
            return name
    raise ValueError(f"no RFM segment for R={r} F={f}")


def score(edges: dict[str, list[int]], recency_days: float, purchases: float, monetary: float) -> RfmScore:
    """A buyer's scores against quintile edges (buckets), and their segment."""
    r = 5 - bisect_left(edges["recency"], bucket(recency_days))
    f = 1 + bisect_left(edges["frequency"], bucket(purchases))
    m = 1 + bisect_left(edges["monetary"], bucket(monetary))
    return RfmScore(r, f, m, segment_of(r, f))


def score_values(edges: dict[str, list[int]] | None, values: dict[str, float]) -> RfmScore | None:
    """The scores of a customer from their churn inputs (``churn.inputs_at``): None before the first purchase or
    before any edges were published."""
    if not edges or values["purchases"] < 1:
        return None
    return score(edges, values["recency_days"], values["purchases"], values["monetary_total"])


def rfm_scores(edges: dict[str, list[int]] | None, values: dict[str, float]) -> dict[str, Any] | None:
    """``score_values`` as the record field (``contracts.outputs.RfmScores``)."""
    found = score_values(edges, values)
    return None if found is None else found.as_dict()


@dataclass
class RfmPopulation:
    """What the trainer keeps (and a checkpoint carries): sketches of the instants being collected, the published
    quintile edges, and the buyers per segment at the instant they come from (scored against the edges in force
    when each example was learned)."""

    collecting: dict[int, dict[str, QuantileSketch]] = field(default_factory=dict)
    segment_tally: dict[int, Counter[str]] = field(default_factory=dict)
    edges: dict[str, list[int]] | None = None
    edges_at: int = 0  # the snapshot instant the edges are the quintiles of
    buyers: int = 0  # how many buyers that instant had
    segment_counts: dict[str, int] = field(default_factory=dict)
    # the published instant's sketches and tally, still growing: a sweep that lags behind the events (a backlog)
    # sends an instant's silent buyers after later instants have started, so "two later instants started" does
    # not mean complete. Its late buyers refresh the edges (when the population grew by 1 %)
    published: dict[str, QuantileSketch] | None = None
    published_tally: Counter[str] = field(default_factory=Counter)

    def learn(self, instant: int, recency_days: float, purchases: float, monetary: float) -> None:
        """One live buyer at a snapshot instant (``SegmentExample.rfm``)."""
        if instant < self.edges_at:
            return  # older than the published instant: no longer counted
        if instant == self.edges_at:
            self._late(recency_days, purchases, monetary)
            return
        sketches = self.collecting.get(instant)
        if sketches is None:
            older = [t for t in self.collecting if t < instant]
            if len(self.collecting) >= INSTANTS_KEPT - 1 and older:
                self._publish(min(older))  # complete: examples of two later instants have come
            sketches = self.collecting[instant] = {d: QuantileSketch() for d in DIMENSIONS}
            self.segment_tally[instant] = Counter()
        for name, value in zip(DIMENSIONS, (recency_days, purchases, monetary), strict=True):
            sketches[name].add(value)
        if self.edges is not None:
            self.segment_tally[instant][score(self.edges, recency_days, purchases, monetary).segment] += 1

    def _late(self, recency_days: float, purchases: float, monetary: float) -> None:
        if self.published is None:  # a checkpoint from before late buyers were counted
            return
        for name, value in zip(DIMENSIONS, (recency_days, purchases, monetary), strict=True):
            self.published[name].add(value)
        if self.edges is not None:
            self.published_tally[score(self.edges, recency_days, purchases, monetary).segment] += 1
        if self.published["recency"].n >= 1.01 * self.buyers + 1:
            self._set_edges()

    def _set_edges(self) -> None:
        assert self.published is not None
        self.edges = {name: sketch.quantile_buckets(QUINTILES) for name, sketch in self.published.items()}
        self.buyers = self.published["recency"].n
        if self.published_tally:
            self.segment_counts = dict(self.published_tally)

    def _publish(self, instant: int) -> None:
        self.published = self.collecting.pop(instant)
        self.published_tally = self.segment_tally.pop(instant)
        self.edges_at = instant
        self._set_edges()
        for older in [t for t in self.collecting if t <= instant]:
            del self.collecting[older]
            self.segment_tally.pop(older, None)

    def summary(self) -> dict[str, object]:
        """For the checkpoint's summary: the lookup scores with ``edge_buckets``, people read ``edges``."""
        return {"instant": self.edges_at, "buyers": self.buyers, "edge_buckets": self.edges,
                "edges": self.edge_values(), "segments": self.segment_counts}

    def edge_values(self) -> dict[str, list[float]]:
        """The published edges as values (each bucket's upper bound), for people: ``streamproc models``."""
        if self.edges is None:
            return {}
        return {name: [0.0 if b == ZERO_BUCKET else round(math.exp(b * _GAMMA_LOG), 2) for b in buckets]
                for name, buckets in self.edges.items()}
