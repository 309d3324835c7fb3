"""Recommendations as pure functions: what was bought together, what sells in a segment, what a customer
looked at and did not buy, blended into one ranked list where every item carries its reason.

Two halves, like the churn model:

* :class:`CoPurchaseModel` is global and learned by the single trainer from the baskets workers send on
  the training topic (so adding a worker does not change what it learns). It keeps *forward-decayed*
  counts: an observation at event time ``t`` adds ``2 ** ((t - ref) / halflife)``; reading divides by the
  same factor for "now", so every count fades with the configured half-life without touching all
  entries. Support, confidence and lift are ratios of counts on the same scale. Memory is bounded: when
  pairs exceed ``max_pairs`` the weakest are pruned down to ``prune_to`` of the bound (likewise items and
  the per-segment favourites).
* :func:`recommend` ranks candidates for one customer at one instant from a read-only view of the model
  (:class:`RecIndex`, built once per checkpoint) and the customer's own recent views and purchases.

No Redis, no Kafka, no clock: every instant is event time handed in by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

DAY_MS = 86_400_000

BOUGHT_TOGETHER = "bought_together"
POPULAR_IN_SEGMENT = "popular_in_segment"
VIEWED_NOT_BOUGHT = "viewed_not_bought"
ALL_SEGMENTS = -1  # the population-wide favourites (cold start: no segment yet)
POPULAR_MEMO_SIZE = 4096  # (segment, focus) combinations whose popular_in_segment scores an index keeps


def _memoize(memo: dict[Any, Any], key: Any, value: Any) -> None:
    """Keep ``value`` in one of an index's memos, bounded: past ``POPULAR_MEMO_SIZE`` entries (many distinct
    baskets' category mixes, say) the memo starts over."""
    if len(memo) >= POPULAR_MEMO_SIZE:
        memo.clear()
    memo[key] = value


@dataclass(frozen=True, slots=True)
class RecConfig:
    k: int = 10
    halflife_days: float = 30.0
    max_items: int = 20_000  # items with counts kept by the co-purchase model
    max_pairs: int = 200_000  # item pairs kept
    max_per_segment: int = 200  # favourites kept per segment
    prune_to: float = 0.8  # on overflow, prune down to this fraction of the bound
    min_pair_count: float = 2.0  # decayed co-occurrences below this are not used as rules
    min_lift: float = 1.0  # a rule must beat chance
    neighbours: int = 20  # related items kept per item in the scoring index
    exclude_bought_days: int = 30  # never recommend what the customer bought within this horizon
    viewed_days: int = 14  # views older than this are not "viewed, not bought" candidates
    anchor_purchases: int = 5  # bought_together looks at the items of this many latest purchases
    anchor_damping: float = 0.5  # their rules count (1 + purchases ago) ** -damping
    catalogue_days: int = 90  # an item not sold for this long counts as out of the catalogue
    # blending weights: score = Σ weight(source) × source score in [0, 1]
    weight_bought_together: float = 1.0
    weight_viewed_not_bought: float = 0.8
    weight_popular_in_segment: float = 0.4
    version: str = "blend-v2"

    def weights(self) -> dict[str, float]:
        return {BOUGHT_TOGETHER: self.weight_bought_together, VIEWED_NOT_BOUGHT: self.weight_viewed_not_bought,
                POPULAR_IN_SEGMENT: self.weight_popular_in_segment}


@dataclass(frozen=True, slots=True)
class Rule:
    """An association rule antecedent → consequent, as of some instant."""

    antecedent: str
    consequent: str
    support: float  # share of baskets holding both
    confidence: float  # P(consequent | antecedent)
    lift: float  # confidence / P(consequent)


@dataclass
class HitStats:
    """Online quality: for each purchase after a recommendation, was a bought item among the k shown?
    The popularity baseline (top-k best sellers at that instant) is scored on the same purchases."""

    purchases: int = 0
    hits: int = 0
    items_hit: int = 0  # bought items that were recommended (for precision@k)
    baseline_hits: int = 0
    baseline_items_hit: int = 0
    k: int = 10

    def update(self, bought: set[str], recommended: list[str], popular: list[str]) -> None:
        self.purchases += 1
        shown = set(recommended[: self.k])
        top = set(popular[: self.k])
        self.hits += bool(bought & shown)
        self.items_hit += len(bought & shown)
        self.baseline_hits += bool(bought & top)
        self.baseline_items_hit += len(bought & top)

    def summary(self) -> dict[str, float]:
        n = self.purchases
        return {
            "rec_purchases": n,
            "rec_hit_rate": self.hits / n if n else 0.0,
            "rec_precision": self.items_hit / (n * self.k) if n else 0.0,
            "rec_baseline_hit_rate": self.baseline_hits / n if n else 0.0,
            "rec_baseline_precision": self.baseline_items_hit / (n * self.k) if n else 0.0,
        }


@dataclass
class CoPurchaseModel:
    cfg: RecConfig = field(default_factory=RecConfig)
    ref_ts: int | None = None  # forward-decay landmark (event time)
    baskets: float = 0.0
    items: dict[str, float] = field(default_factory=dict)  # item -> decayed baskets holding it
    pairs: dict[tuple[str, str], float] = field(default_factory=dict)  # (a, b), a < b -> decayed co-occurrences
    segments: dict[int, dict[str, float]] = field(default_factory=dict)  # segment -> item -> decayed units sold
    category: dict[str, str] = field(default_factory=dict)  # item -> category
    last_sold: dict[str, int] = field(default_factory=dict)  # item -> newest purchase time
    now: int = 0  # newest basket time learned
    hits: HitStats = field(default_factory=HitStats)

    # ------------------------------------------------------------ decay
    def _weight(self, ts: int) -> float:
        if self.ref_ts is None:
            self.ref_ts = ts
        exponent = (ts - self.ref_ts) / (self.cfg.halflife_days * DAY_MS)
        if exponent > 60:  # rebase before the weights overflow: divide everything by the same factor
            self._rebase(ts)
            exponent = 0.0
        return float(2.0**exponent)

    def _rebase(self, ts: int) -> None:
        assert self.ref_ts is not None
        factor = 2.0 ** ((ts - self.ref_ts) / (self.cfg.halflife_days * DAY_MS))
        self.baskets /= factor
        self.items = {k: v / factor for k, v in self.items.items()}
        self.pairs = {k: v / factor for k, v in self.pairs.items()}
        self.segments = {s: {k: v / factor for k, v in t.items()} for s, t in self.segments.items()}
        self.ref_ts = ts

    def scale(self, ts: int | None = None) -> float:
        """Divide a stored count by this to get its decayed value as of ``ts`` (default: newest basket)."""
        if self.ref_ts is None:
            return 1.0
        at = self.now if ts is None else ts
        return float(2.0 ** ((at - self.ref_ts) / (self.cfg.halflife_days * DAY_MS)))

    # ------------------------------------------------------------ learning (the trainer only)
    def learn_basket(self, ts: int, items: list[tuple[str, str, int]], segment: int | None) -> None:
        """One purchase: (product, category, quantity) lines, and the buyer's segment (None: unknown)."""
        w = self._weight(ts)
        self.now = max(self.now, ts)
        distinct = sorted({pid for pid, _, _ in items})
        self.baskets += w
        for pid, cat, qty in items:
            self.category[pid] = cat
            self.last_sold[pid] = max(self.last_sold.get(pid, ts), ts)
            for seg in (ALL_SEGMENTS, segment):
                if seg is None:
                    continue
                table = self.segments.setdefault(seg, {})
                table[pid] = table.get(pid, 0.0) + w * qty
        for pid in distinct:
            self.items[pid] = self.items.get(pid, 0.0) + w
        for i, a in enumerate(distinct):
            for b in distinct[i + 1 :]:
                self.pairs[(a, b)] = self.pairs.get((a, b), 0.0) + w
        self._bound()

    def _bound(self) -> None:
        cfg = self.cfg
        if len(self.pairs) > cfg.max_pairs:
            self.pairs = _top(self.pairs, int(cfg.max_pairs * cfg.prune_to))
        if len(self.items) > cfg.max_items:
            self.items = _top(self.items, int(cfg.max_items * cfg.prune_to))
            kept = self.items
            self.pairs = {p: v for p, v in self.pairs.items() if p[0] in kept and p[1] in kept}
            self.category = {k: v for k, v in self.category.items() if k in kept}
            self.last_sold = {k: v for k, v in self.last_sold.items() if k in kept}
        for seg, table in self.segments.items():
            if len(table) > cfg.max_per_segment:
                self.segments[seg] = _top(table, int(cfg.max_per_segment * cfg.prune_to))

    # ------------------------------------------------------------ reading
    def rule(self, a: str, b: str) -> Rule | None:
        """The rule a → b from the current counts (None if either item or the pair is unknown)."""
        pair = self.pairs.get((a, b) if a < b else (b, a))
        if not pair or not self.items.get(a) or not self.items.get(b) or not self.baskets:
            return None
        confidence = pair / self.items[a]
        return Rule(a, b, support=pair / self.baskets, confidence=confidence,
                    lift=confidence / (self.items[b] / self.baskets))

    def index(self) -> RecIndex:
        """A read-only scoring view (built once per checkpoint by each worker)."""
        cfg = self.cfg
        scale = self.scale()
        related: dict[str, list[tuple[str, float]]] = {}
        for (a, b), count in self.pairs.items():
            if count / scale < cfg.min_pair_count:
                continue
            for x, y in ((a, b), (b, a)):
                rule = self.rule(x, y)
                if rule is not None and rule.lift > cfg.min_lift:
                    related.setdefault(x, []).append((y, rule.confidence))
        for found in related.values():
            found.sort(key=lambda kv: (-kv[1], kv[0]))
            del found[cfg.neighbours :]
        horizon = cfg.catalogue_days * DAY_MS
        available = frozenset(p for p, sold in self.last_sold.items() if self.now - sold <= horizon)
        favourites: dict[int, list[tuple[str, float]]] = {}
        by_category: dict[int, dict[str, list[tuple[str, float]]]] = {}
        for seg, table in self.segments.items():
            ranked = sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))
            top = ranked[0][1] if ranked else 1.0
            shares = [(pid, count / top) for pid, count in ranked if pid in available]
            favourites[seg] = shares[: max(cfg.k * 5, 50)]
            per_category: dict[str, list[tuple[str, float]]] = {}
            for pid, share in shares:
                found = per_category.setdefault(self.category.get(pid, ""), [])
                if len(found) < cfg.k:
                    found.append((pid, share))
            by_category[seg] = per_category
        return RecIndex(cfg, related, favourites, dict(self.category), dict(self.last_sold), self.now, by_category,
                        available)

    def popular(self, k: int | None = None) -> list[str]:
        """The popularity baseline: the best sellers over the whole population (decayed), top k."""
        table = self.segments.get(ALL_SEGMENTS, {})
        return [pid for pid, _ in sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))[: k or self.cfg.k]]

    def summary(self) -> dict[str, Any]:
        return {"rec_items": len(self.items), "rec_pairs": len(self.pairs), "rec_baskets": round(
            self.baskets / self.scale(), 2), **self.hits.summary()}


def _top(table: dict[Any, float], keep: int) -> dict[Any, float]:
    """The ``keep`` largest entries (ties broken by key, so pruning is deterministic)."""
    return dict(sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))[:keep])


@dataclass(frozen=True)
class RecIndex:
    cfg: RecConfig
    related: dict[str, list[tuple[str, float]]]  # item -> (item, confidence), best first
    favourites: dict[int, list[tuple[str, float]]]  # segment -> (item, share of the top seller), best first
    category: dict[str, str]
    last_sold: dict[str, int]
    now: int
    # segment -> category -> its best sellers (top k), and the items in the catalogue as of ``now``
    by_category: dict[int, dict[str, list[tuple[str, float]]]] = field(default_factory=dict)
    available: frozenset[str] | None = None
    # popular_in_segment's scores per (segment, categories in focus, k): the same for every customer asking
    _popular: dict[tuple[int, frozenset[str], int], dict[str, float]] = field(
        default_factory=dict, compare=False, repr=False)
    # the same candidates by weighted score, best first: [(-weight × score, item)]
    _ranked: dict[tuple[int, frozenset[str], int], list[tuple[float, str]]] = field(
        default_factory=dict, compare=False, repr=False)
    # recommendations for customers with no history of their own (see ``recommend``), per what they depend on
    impersonal: dict[tuple[Any, ...], list[dict[str, Any]]] = field(default_factory=dict, compare=False, repr=False)

    def popular_in_segment(self, segment: int, focus: frozenset[str], k: int) -> dict[str, float]:
        """popular_in_segment's candidates and scores: sales relative to the segment's best seller (its top 2k,
        and the top k of each category in focus, the others halved when there is a focus). Computed once per
        (segment, focus, k) for this index; callers must not modify the result."""
        key = (segment, focus, k)
        found = self._popular.get(key)
        if found is not None:
            return found
        category_of = self.category.get
        favourites = self.favourites.get(segment, [])
        candidates = favourites[: k * 2]
        for category in sorted(focus):  # best sellers of the category in focus
            per_category = self.by_category.get(segment)
            candidates = candidates + (per_category.get(category, []) if per_category is not None else
                                       [f for f in favourites if category_of(f[0]) == category][:k])
        popular: dict[str, float] = {}
        for pid, share in candidates:
            value = share if not focus or category_of(pid) in focus else share * 0.5
            if value > popular.get(pid, 0.0):
                popular[pid] = value
        _memoize(self._popular, key, popular)
        return popular

    def popular_ranked(self, segment: int, focus: frozenset[str], k: int) -> list[tuple[float, str]]:
        """``popular_in_segment``'s candidates with a positive weighted score, as (-weighted score, item) sorted:
        best first, ties by item (the order of the final ranking). Computed once per (segment, focus, k)."""
        key = (segment, focus, k)
        found = self._ranked.get(key)
        if found is None:
            weight = self.cfg.weight_popular_in_segment
            scores = self.popular_in_segment(segment, focus, k)
            found = sorted([(-(weight * share), pid) for pid, share in scores.items() if weight * share > 0.0])
            _memoize(self._ranked, key, found)
        return found

    def in_catalogue(self, pid: str, at: int, excluded: frozenset[str] = frozenset()) -> bool:
        """Sold within catalogue_days of ``at`` and not explicitly withdrawn."""
        sold = self.last_sold.get(pid)
        return pid not in excluded and sold is not None and at - sold <= self.cfg.catalogue_days * DAY_MS


@dataclass(frozen=True, slots=True)
class CustomerView:
    """What the recommender needs to know about one customer at one instant."""

    bought: dict[str, int]  # item -> last purchase time
    viewed: dict[str, tuple[int, str | None, int]]  # item -> (last view time, category, views)
    top_categories: list[str]
    segment: int | None


def recommend(
    index: RecIndex, customer: CustomerView, at: int, context: list[str], excluded: frozenset[str] = frozenset(),
    k: int | None = None, sources: tuple[str, ...] = (BOUGHT_TOGETHER, VIEWED_NOT_BOUGHT, POPULAR_IN_SEGMENT),
) -> list[dict[str, Any]]:
    """Up to k items for ``customer`` at event time ``at``: [{product_id, score, reason}], best first.

    ``context`` holds the items that triggered it (the basket just bought, the product just viewed);
    related items of every item of the customer's ``anchor_purchases`` latest purchases are candidates too (the
    2k strongest rules count).
    Each source scores in [0, 1]: bought_together by rule confidence relative to the strongest rule found
    (rules from the context at full strength, from the n-th latest purchase damped by n^-anchor_damping, the
    context counting as the newest);
    viewed_not_bought by interest (1 - 0.5^views) times recency of the last view (halving per week),
    halved outside the customer's top categories; popular_in_segment by sales relative to the segment's
    best seller (its top 2k, and the top k of the trigger's category, the others halved when there is
    one). Scores are blended with the configured weights; an item's reason is the source that contributed
    most. Bought within exclude_bought_days, in the context, or out of the catalogue: never shown.
    """

    cfg = index.cfg
    k = k or cfg.k
    # No purchases and no views but of what they look at now (a first visit, the usual cold start): what the
    # customer gets depends on the context, segment, exclusions and sources alone, so it is computed once per
    # index (the catalogue is fixed per index when it holds the set of available items)
    impersonal_key = None
    if not customer.bought and index.available is not None and all(p in context for p in customer.viewed):
        impersonal_key = (tuple(context), customer.segment if customer.segment in index.favourites else ALL_SEGMENTS,
                          excluded, k, sources)
        known = index.impersonal.get(impersonal_key)
        if known is not None:
            return [dict(item) for item in known]
    # each source scores its candidates (an item's score per source is the best it got from that source), in
    # the fixed blending order: bought_together, viewed_not_bought, popular_in_segment
    scored: list[tuple[str, float, dict[str, float]]] = []
    if BOUGHT_TOGETHER in sources:
        scored.append((BOUGHT_TOGETHER, cfg.weight_bought_together, _bought_together(index, customer, at, context, k)))
    # the categories of what triggered it (the product being looked at) say what the customer is after now
    category_of = index.category.get
    focus: frozenset[str] = frozenset(c for c in map(category_of, context) if c is not None)
    if VIEWED_NOT_BOUGHT in sources:
        scored.append((VIEWED_NOT_BOUGHT, cfg.weight_viewed_not_bought, _viewed_not_bought(cfg, customer, at, focus)))
    popular: list[tuple[float, str]] = []
    if POPULAR_IN_SEGMENT in sources:
        seg = customer.segment if customer.segment in index.favourites else ALL_SEGMENTS
        popular = index.popular_ranked(seg, focus, k)
    # never shown: bought within the horizon, what they are looking at right now (not news to them), withdrawn
    # items, and items out of the catalogue
    horizon = cfg.exclude_bought_days * DAY_MS
    blocked = {pid for pid, ts in customer.bought.items() if at - horizon <= ts <= at}
    blocked.update(context, excluded)
    totals, reasons = _blend(index, at, k, scored, popular, blocked)
    ranked = sorted([(-total, pid) for pid, total in totals.items()])[:k]  # = heapq.nsmallest(k, ...)
    out = [{"product_id": pid, "score": round(-negative, 4), "reason": reasons[pid][1]} for negative, pid in ranked]
    if impersonal_key is not None:
        _memoize(index.impersonal, impersonal_key, [dict(item) for item in out])
    return out


def _bought_together(index: RecIndex, customer: CustomerView, at: int, context: list[str], k: int) -> dict[str, float]:
    """Items bought together with the anchors: the context at full strength, then every item of the customer's
    latest purchases, damped by how many purchases ago (the context, when there is one, counts as the newest);
    the 2k strongest, relative to the strongest rule found."""
    cfg = index.cfg
    anchors = dict.fromkeys(context, 1.0)
    if customer.bought:
        bought = sorted([(ts, pid) for pid, ts in customer.bought.items() if ts <= at])
        instants = sorted({ts for ts, _ in bought}, reverse=True)[: cfg.anchor_purchases]
        shift = 1 if context else 0
        damps = {instant: (1 + rank + shift) ** -cfg.anchor_damping for rank, instant in enumerate(instants)}
        for ts, pid in reversed(bought):
            if ts in damps and pid not in anchors:
                anchors[pid] = damps[ts]
    found: dict[str, float] = {}
    get_found = found.get
    related = index.related
    for anchor, damp in anchors.items():
        for pid, confidence in related.get(anchor, ()):
            value = confidence * damp
            if value > get_found(pid, 0.0):
                found[pid] = value
    # the 2k strongest (sorted()[:n] is what heapq.nsmallest returns; the lists are short)
    strongest = sorted([(-v, pid) for pid, v in found.items()])[: k * 2]
    top = -strongest[0][0] if strongest else 1.0
    return {pid: -negative / top for negative, pid in strongest}


def _viewed_not_bought(cfg: RecConfig, customer: CustomerView, at: int, focus: frozenset[str]) -> dict[str, float]:
    """Items viewed within the window: interest (1 - 0.5^views) times the recency of the last view (halving per
    week), halved outside the customer's top categories and the trigger's."""
    tops = set(customer.top_categories) | focus
    window = cfg.viewed_days * DAY_MS
    week = 7 * DAY_MS
    viewed: dict[str, float] = {}
    for pid, (ts, cat, views) in customer.viewed.items():
        age = at - ts
        if 0 <= age <= window:
            interest = 1.0 - 0.5**views  # one view: 0.5, two: 0.75, ...
            viewed[pid] = interest * 0.5 ** (age / week) * (1.0 if cat in tops else 0.5)
    return viewed


def _blend(
    index: RecIndex, at: int, k: int, scored: list[tuple[str, float, dict[str, float]]],
    popular: list[tuple[float, str]], blocked: set[str],
) -> tuple[dict[str, float], dict[str, tuple[float, str]]]:
    """Per candidate, the weighted source scores summed in the fixed source order, and its reason the source that
    contributed most (blocked items and items out of the catalogue left out)."""
    available = index.available
    totals: dict[str, float] = {}
    reasons: dict[str, tuple[float, str]] = {}
    for source, weight, found_by in scored:
        for pid, source_score in found_by.items():
            if pid in blocked or not (pid in available if available is not None else index.in_catalogue(pid, at)):
                continue
            value = weight * source_score
            if value > 0.0:
                if pid in totals:
                    totals[pid] += value
                    if (value, source) > reasons[pid]:
                        reasons[pid] = (value, source)
                else:
                    totals[pid] = value
                    reasons[pid] = (value, source)
    # popular_in_segment comes last: it adds to the candidates the others found, and of the items it alone finds
    # only its k best shown can reach the top k (their total is their popularity score, and ``popular`` is in
    # the order of the ranking), so the rest are not blended
    alone = 0
    for negative, pid in popular:
        if pid in totals:  # a candidate already (so not blocked, and in the catalogue)
            value = -negative
            totals[pid] += value
            if (value, POPULAR_IN_SEGMENT) > reasons[pid]:
                reasons[pid] = (value, POPULAR_IN_SEGMENT)
        elif alone < k and pid not in blocked and (
                pid in available if available is not None else index.in_catalogue(pid, at)):
            totals[pid] = -negative
            reasons[pid] = (-negative, POPULAR_IN_SEGMENT)
            alone += 1
    return totals, reasons


def precision_at_k(bought: set[str], recommended: list[str], k: int) -> float:
    return len(bought & set(recommended[:k])) / k if k else math.nan
