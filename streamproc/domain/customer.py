"""Per-customer state as a pure fold: ``apply_events(state, events, cfg) -> (state, outcome)``. The readable
features, a pure function of the state and an event-time instant, are in ``domain.features``.

No Redis, no Faust, no clock. Exactly-once effect comes from two guards kept *inside* the state, so
they are saved atomically with it:

* an offset fence per input partition (``offsets``): an event at or below the last applied offset of
  its partition was applied already (a replay after a crash) and is skipped;
* a bounded set of recent event ids (``recent_ids``): the same ``event_id`` arriving again at another
  offset (a producer retry) counts once.

Everything else is a commutative aggregate (sums per UTC day, per month, per category), or is driven
by one input topic alone (sessions come from clicks; the duplicate filter is kept per topic), and every
bounded structure is trimmed event by event. So the stored features depend neither on how records were
batched nor on how the clicks and transactions topics interleave, which Kafka does not fix.
"""

from __future__ import annotations

import binascii
import bisect
import functools
import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, NamedTuple

from streamproc.domain.events import Click, Event, Transaction

DAY_MS = 86_400_000
HOUR_MS = 3_600_000

# day-bucket slots
PURCHASES, SPEND, CLICKS, SESSIONS, VIEWS, CARTS = range(6)
# closed-session aggregate slots
S_COUNT, S_LENGTH_MS, S_EVENTS, S_CONVERTED, S_WITH_CART, S_ABANDONED = range(6)


class Positioned(NamedTuple):
    """An event with where it came from: ``source`` is ``kind:partition``."""

    event: Event
    source: str
    offset: int


@dataclass(frozen=True, slots=True)
class FoldConfig:
    dedup_horizon_ms: int = 7 * DAY_MS
    dedup_max_ids: int = 32
    session_gap_ms: int = 30 * 60_000
    allowed_lateness_ms: int = 3_600_000
    windows_days: tuple[int, ...] = (7, 30, 90)
    max_categories: int = 24
    # lifecycle thresholds (days of event time)
    new_days: int = 30
    at_risk_days: int = 30
    churned_days: int = 90
    # CLV
    clv_period_days: int = 30
    clv_periods: int = 12
    clv_discount_rate: float = 0.01  # per period
    clv_retention_probability: float = 0.8
    # value tiers by net spend
    tier_high: float = 1000.0
    tier_medium: float = 500.0
    # churn snapshots are re-read from the buckets when their label matures: horizon + cadence + 60 days
    model_history_days: int = 130
    # recommendations: recent purchases (exclusions) and views (viewed, not bought) kept per customer
    max_bought_items: int = 50
    max_viewed_items: int = 30

    @property
    def day_horizon(self) -> int:
        """Days of buckets kept behind the newest event: the longest window, 60 for the trend, and enough
        to see a comeback (a silence of churned_days within the last new_days)."""
        needed = max(max(self.windows_days), 60, self.churned_days + self.new_days, self.model_history_days)
        return needed + math.ceil(self.allowed_lateness_ms / DAY_MS) + 1


@dataclass
class CustomerState:
    customer_id: str
    offsets: dict[str, int] = field(default_factory=dict)
    # per input topic (its first letter): stored event id (the letter + short_event_id) -> event time in hours
    recent_ids: dict[str, dict[str, int]] = field(default_factory=dict)
    clicks: int = 0
    purchases: int = 0
    refunds: int = 0
    spend_cents: int = 0  # gross purchases
    refund_cents: int = 0
    first_event_ts: int | None = None
    last_event_ts: int | None = None
    first_purchase_ts: int | None = None
    last_purchase_ts: int | None = None
    days: dict[int, list[int]] = field(default_factory=dict)  # UTC day -> [purchases, cents, clicks, ...]
    months: dict[int, int] = field(default_factory=dict)  # calendar month (UTC) -> net cents
    # [start, end, clicks, cart, checkout, recommended]; recommended: a view-triggered recommendation went out
    open_sessions: list[list[int]] = field(default_factory=list)
    closed: list[int] = field(default_factory=lambda: [0] * 6)
    cat_views: dict[str, int] = field(default_factory=dict)
    cat_spend: dict[str, int] = field(default_factory=dict)
    max_ts: int = 0  # newest event time of this customer (drives pruning of day buckets)
    max_click_ts: int = 0  # newest click (drives session closing: sessions come from clicks only)
    # churn labels: the last snapshot instant and the snapshots whose label is still unknown
    snapshot_ts: int = 0
    pending: list[int] = field(default_factory=list)
    # the last UTC day with an event before ``snapshot_ts`` (-1: none known): the silence test of later grid
    # instants needs it once that day's bucket is pruned
    pre_day: int = -1
    # pending snapshot D -> [last purchase day, last active day] before D, as read when D was taken (the buckets
    # holding them may be pruned before D's label matures)
    anchors: dict[int, list[int]] = field(default_factory=dict)
    bought: dict[str, int] = field(default_factory=dict)  # product -> newest purchase time
    # product -> [newest view time, category, views since it entered the list]
    viewed: dict[str, list[Any]] = field(default_factory=dict)

    # --- serialisation (the adapter stores this dict as one compact blob). Keyed tables go out as parallel
    # arrays in key order, which C code packs and unpacks (``dict(zip(...))``, a regex split): a per-key Python
    # loop here costs as much as a customer's fold. Blobs of the earlier form (string-keyed dicts, ids grouped
    # by hour) still load.
    def to_dict(self) -> dict[str, Any]:
        id_keys: list[str] = []
        hours: list[int] = []
        for letter in sorted(self.recent_ids):  # every id starts with its topic's letter: this is key order
            ids = self.recent_ids[letter]
            keys = sorted(ids)
            id_keys += keys
            hours += map(ids.__getitem__, keys)
        day_keys = sorted(self.days)
        month_keys = sorted(self.months)
        return {
            "id": self.customer_id, "o": self.offsets, "r": ["".join(id_keys), hours],
            "n": [self.clicks, self.purchases, self.refunds, self.spend_cents, self.refund_cents],
            "t": [self.first_event_ts, self.last_event_ts, self.first_purchase_ts, self.last_purchase_ts,
                  self.max_ts, self.max_click_ts],
            "d": [day_keys, [self.days[k] for k in day_keys]],
            "m": [month_keys, [self.months[k] for k in month_keys]],
            "s": sorted(self.open_sessions), "sc": self.closed,
            "cv": self.cat_views, "cs": self.cat_spend,
            "ch": self.snapshot_ts, "pd": self.pending, "pa": self.pre_day,
            "pk": [[k, *v] for k, v in sorted(self.anchors.items())], "b": self.bought, "v": self.viewed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CustomerState:
        n = data["n"]
        t = data["t"]
        ids, days, months = data["r"], data["d"], data["m"]
        return cls(
            customer_id=data["id"], offsets=data["o"],
            recent_ids=_by_topic(_ID_CHUNKS(ids[0]), ids[1]) if type(ids) is list else _ungroup_ids(ids),
            clicks=n[0], purchases=n[1], refunds=n[2], spend_cents=n[3], refund_cents=n[4],
            first_event_ts=t[0], last_event_ts=t[1], first_purchase_ts=t[2], last_purchase_ts=t[3],
            max_ts=t[4], max_click_ts=t[5],
            days=_int_keyed(days), months=_int_keyed(months),
            open_sessions=data["s"], closed=data["sc"], cat_views=data["cv"], cat_spend=data["cs"],
            snapshot_ts=data.get("ch", 0), pending=data.get("pd", []), pre_day=data.get("pa", -1),
            anchors={a[0]: list(a[1:]) for a in data.get("pk", [])}, bought=data.get("b", {}),
            viewed=data.get("v", {}),
        )


def _int_keyed(stored: list[list[Any]] | dict[str, Any]) -> dict[int, Any]:
    """A stored table with integer keys: [keys, values], or a {"key": value} dict (the earlier blob form)."""
    if isinstance(stored, list):
        return dict(zip(stored[0], stored[1], strict=True))
    return {int(k): v for k, v in stored.items()}


# a stored id is 9 characters: the topic's letter and an 8-character digest (short_event_id)
_ID_CHUNKS = re.compile(".{9}", re.DOTALL).findall


def _by_topic(keys: list[str], hours: list[int]) -> dict[str, dict[str, int]]:
    """Sorted stored ids and their hours, split by topic letter (each topic's ids are one run of the keys)."""
    out: dict[str, dict[str, int]] = {}
    start, n = 0, len(keys)
    while start < n:
        letter = keys[start][0]
        end = bisect.bisect_left(keys, chr(ord(letter) + 1), start)
        out[letter] = dict(zip(keys[start:end], hours[start:end], strict=True))
        start = end
    return out


def _ungroup_ids(grouped: dict[str, str]) -> dict[str, dict[str, int]]:
    """The recent ids of an earlier blob form: {hour: concatenated 9-char ids}."""
    flat = sorted((ids[i : i + 9], int(hour)) for hour, ids in grouped.items() for i in range(0, len(ids), 9))
    return _by_topic([k for k, _ in flat], [h for _, h in flat])


class Trigger(NamedTuple):
    ts: int
    kind: str  # "purchase", "product_view" or "add_to_cart"
    event_id: str
    items: tuple[str, ...]  # products bought, or the product looked at
    categories: tuple[str, ...] = ()
    quantities: tuple[int, ...] = ()
    amount: float = 0.0  # order total of a purchase


@dataclass
class FoldOutcome:
    """Counts by (input kind, outcome); outcome is applied, duplicate or replayed (at or below the
    partition's fence: applied before a crash)."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    orders: int = 0  # purchases applied
    revenue_cents: int = 0  # purchase amounts applied
    refund_cents: int = 0
    # moments that call for a recommendation, in fold order: a purchase, or the first product view or
    # add-to-cart of a session
    triggers: list[Trigger] = field(default_factory=list)

    def count(self, source: str, outcome: str, n: int = 1) -> None:
        key = (source.partition(":")[0], outcome)
        self.counts[key] = self.counts.get(key, 0) + n

    def total(self, outcome: str) -> int:
        return sum(n for (_, o), n in self.counts.items() if o == outcome)

    def merge(self, other: FoldOutcome) -> None:
        counts = self.counts
        for key, n in other.counts.items():
            counts[key] = counts.get(key, 0) + n
        self.orders += other.orders
        self.revenue_cents += other.revenue_cents
        self.refund_cents += other.refund_cents
        self.triggers.extend(other.triggers)


def short_event_id(event_id: str) -> str:
    """An 8-char digest of an event id (48 bits): enough to deduplicate within one customer, small in Redis."""
    return binascii.b2a_base64(hashlib.blake2b(event_id.encode(), digest_size=6).digest(), newline=False).decode()


def calendar_month(ts: int) -> int:
    """Months since 1970-01 (UTC) of an epoch-millisecond instant."""
    return _month_of_day(ts // DAY_MS)


@functools.lru_cache(maxsize=4096)
def _month_of_day(day: int) -> int:
    d = datetime.fromtimestamp(day * 86_400, tz=UTC)
    return (d.year - 1970) * 12 + d.month - 1


def month_label(month: int) -> str:
    return f"{1970 + month // 12:04d}-{month % 12 + 1:02d}"


def cents(amount: float) -> int:
    return round(amount * 100)


def _bucket(state: CustomerState, ts: int) -> list[int]:
    day = ts // DAY_MS
    row = state.days.get(day)
    if row is None:
        row = state.days[day] = [0, 0, 0, 0, 0, 0]
    return row


def _touch_session(state: CustomerState, ts: int, cart: int, checkout: int, cfg: FoldConfig) -> list[int]:
    """Add a click at ``ts`` to the open sessions, merging sessions the gap now bridges; returns its session."""
    gap = cfg.session_gap_ms
    sessions = state.open_sessions
    hit = [s for s in sessions if s[0] - gap <= ts <= s[1] + gap]
    if not hit:
        fresh = [ts, ts, 1, cart, checkout, 0]
        sessions.append(fresh)
        return fresh
    if len(hit) == 1:  # the usual case: extend one session in place (the list's order is not state)
        s = hit[0]
        if ts < s[0]:
            s[0] = ts
        elif ts > s[1]:
            s[1] = ts
        s[2] += 1
        if cart > s[3]:
            s[3] = cart
        if checkout > s[4]:
            s[4] = checkout
        if len(s) < 6:
            s.append(0)
        return s
    merged = [min(ts, *(s[0] for s in hit)), max(ts, *(s[1] for s in hit)), 1 + sum(s[2] for s in hit),
              max(cart, *(s[3] for s in hit)), max(checkout, *(s[4] for s in hit)),
              max(s[5] if len(s) > 5 else 0 for s in hit)]
    state.open_sessions = [s for s in sessions if all(s is not h for h in hit)] + [merged]
    return merged


def _close_sessions(state: CustomerState, cfg: FoldConfig) -> None:
    """Close sessions no on-time click can extend any more, folding them into the aggregates."""
    horizon = state.max_click_ts - cfg.session_gap_ms - cfg.allowed_lateness_ms
    for s in state.open_sessions:
        if s[1] < horizon:
            break
    else:
        return  # none to close (the usual case)
    keep = []
    for s in state.open_sessions:
        if s[1] < horizon:
            add_session(state.closed, s)
            _bucket(state, s[0])[SESSIONS] += 1
        else:
            keep.append(s)
    state.open_sessions = keep


def add_session(totals: list[int], session: list[int]) -> None:
    """Fold one session [start, end, clicks, cart, checkout] into the aggregate slots."""
    start, end, clicks, cart, checkout = session[:5]
    totals[S_COUNT] += 1
    totals[S_LENGTH_MS] += end - start
    totals[S_EVENTS] += clicks
    totals[S_CONVERTED] += checkout
    totals[S_WITH_CART] += cart
    totals[S_ABANDONED] += 1 if cart and not checkout else 0


def _cap(counts: dict[str, int], limit: int) -> None:
    """Keep at most ``limit`` entries, dropping the smallest (ties: the last name) one at a time."""
    while len(counts) > limit:
        del counts[min(counts, key=lambda k: (counts[k], [-ord(ch) for ch in k]))]


def _remember(state: CustomerState, kind: str, sid: str, ts: int, cfg: FoldConfig) -> bool:
    """Record an event id in its topic's recent set; False if it was already there (a duplicate). The set keeps
    the ids within the dedup horizon behind its newest, at most ``dedup_max_ids`` (the oldest go first; ties:
    the smallest id)."""
    letter = kind[0]
    key = letter + sid
    ids = state.recent_ids.get(letter)
    if ids is None:
        ids = state.recent_ids[letter] = {}
    elif key in ids:
        return False
    ids[key] = ts // HOUR_MS
    horizon = max(ids.values()) - cfg.dedup_horizon_ms // HOUR_MS
    if min(ids.values()) < horizon:
        for k in [k for k, h in ids.items() if h < horizon]:
            del ids[k]
    excess = len(ids) - cfg.dedup_max_ids
    if excess == 1:  # the usual case at the cap: drop the oldest
        del ids[min(zip(ids.values(), ids.keys(), strict=True))[1]]
    elif excess > 1:
        for _, k in sorted(zip(ids.values(), ids.keys(), strict=True))[:excess]:
            del ids[k]
    return True


def prune_days(state: CustomerState, cfg: FoldConfig) -> None:
    oldest_day = state.max_ts // DAY_MS - cfg.day_horizon
    if state.days and min(state.days) < oldest_day:
        state.days = {d: row for d, row in state.days.items() if d >= oldest_day}


def _keep_newest(table: dict[str, Any], limit: int, ts_of: Any) -> None:
    """Drop the oldest entries beyond ``limit`` (ties: the smallest key), so the result is order-free."""
    while len(table) > limit:
        del table[min((ts_of(v), k) for k, v in table.items())[1]]


def _apply_one(state: CustomerState, event: Event, cfg: FoldConfig) -> Trigger | None:
    """Apply one event; returns the recommendation trigger it is, if any."""
    ts = event.ts
    if state.first_event_ts is None or ts < state.first_event_ts:
        state.first_event_ts = ts
    if state.last_event_ts is None or ts > state.last_event_ts:
        state.last_event_ts = ts
    if ts > state.max_ts:
        state.max_ts = ts
    row = _bucket(state, ts)
    if isinstance(event, Click):
        return _apply_click(state, event, row, cfg)
    assert isinstance(event, Transaction)
    return _apply_transaction(state, event, row, cfg)


def _apply_click(state: CustomerState, event: Click, row: list[int], cfg: FoldConfig) -> Trigger | None:
    """A click: its day's counts, category views, the session it belongs to, the products viewed; a product view
    or add-to-cart is a recommendation trigger once per session."""
    ts = event.ts
    action = event.action
    category = event.category
    product_id = event.product_id
    state.clicks += 1
    row[CLICKS] += 1
    if action == "product_view":
        row[VIEWS] += 1
        if category:
            cat_views = state.cat_views
            cat_views[category] = cat_views.get(category, 0) + 1
            if len(cat_views) > cfg.max_categories:
                _cap(cat_views, cfg.max_categories)
    elif action == "add_to_cart":
        row[CARTS] += 1
    if ts > state.max_click_ts:
        state.max_click_ts = ts
    _close_sessions(state, cfg)
    session = _touch_session(state, ts, 1 if action == "add_to_cart" else 0, 1 if action == "checkout" else 0, cfg)
    if product_id is None or (action != "product_view" and action != "add_to_cart"):
        return None
    viewed = state.viewed
    seen = viewed.get(product_id)
    viewed[product_id] = [max(ts, seen[0]) if seen else ts, category,
                          (seen[2] if seen and len(seen) > 2 else 0) + 1]
    if len(viewed) > cfg.max_viewed_items:
        _keep_newest(viewed, cfg.max_viewed_items, itemgetter(0))
    if len(session) > 5 and session[5]:
        return None  # this session had its recommendation
    session[5] = 1
    return Trigger(ts, action, event.event_id, (product_id,), (category,) if category else ())


def _apply_transaction(state: CustomerState, event: Transaction, row: list[int], cfg: FoldConfig) -> Trigger | None:
    """A purchase (a recommendation trigger) or a refund: spend per day, month and category, products bought."""
    ts = event.ts
    amount = cents(event.amount)
    month = calendar_month(ts)
    cat_spend = state.cat_spend
    if event.type == "purchase":
        state.purchases += 1
        state.spend_cents += amount
        row[PURCHASES] += 1
        row[SPEND] += amount
        state.months[month] = state.months.get(month, 0) + amount
        if state.last_purchase_ts is None or ts > state.last_purchase_ts:
            state.last_purchase_ts = ts
        if state.first_purchase_ts is None or ts < state.first_purchase_ts:
            state.first_purchase_ts = ts
        bought = state.bought
        items = event.items
        for item in items:
            line = cents(item.unit_price * item.quantity)
            cat_spend[item.category] = cat_spend.get(item.category, 0) + line
            bought[item.product_id] = max(ts, bought.get(item.product_id, ts))
        _cap(cat_spend, cfg.max_categories)
        _keep_newest(bought, cfg.max_bought_items, int)
        return Trigger(ts, "purchase", event.event_id, tuple([i.product_id for i in items]),
                       tuple([i.category for i in items]), tuple([i.quantity for i in items]), event.amount)
    state.refunds += 1
    state.refund_cents += amount
    row[SPEND] -= amount
    state.months[month] = state.months.get(month, 0) - amount
    for item in event.items:
        line = cents(item.unit_price * item.quantity)
        cat_spend[item.category] = cat_spend.get(item.category, 0) - line
    _cap(cat_spend, cfg.max_categories)
    return None


def apply_events(
    state: CustomerState, events: Iterable[Positioned], cfg: FoldConfig, prune: bool = True
) -> tuple[CustomerState, FoldOutcome]:
    """Fold a customer's events (in arrival order) into their state. Mutates and returns ``state``. With
    ``prune=False`` old day buckets stay until ``prune_days`` (the churn bookkeeping reads them first)."""
    outcome = FoldOutcome()
    triggers = outcome.triggers
    offsets = state.offsets
    counts: dict[tuple[str, str], int] = {}  # (source, outcome): summed by input kind at the end
    for event, source, offset in events:
        if offset <= offsets.get(source, -1):
            counts[(source, "replayed")] = counts.get((source, "replayed"), 0) + 1
            continue
        offsets[source] = offset
        if not _remember(state, source, short_event_id(event.event_id), event.ts, cfg):
            counts[(source, "duplicate")] = counts.get((source, "duplicate"), 0) + 1
            continue
        trigger = _apply_one(state, event, cfg)
        if trigger is not None:
            triggers.append(trigger)
        counts[(source, "applied")] = counts.get((source, "applied"), 0) + 1
        if isinstance(event, Transaction):
            if event.type == "purchase":
                outcome.orders += 1
                outcome.revenue_cents += cents(event.amount)
            else:
                outcome.refund_cents += cents(event.amount)
    for (source, result), n in counts.items():
        outcome.count(source, result, n)
    if prune:
        prune_days(state, cfg)
    return state, outcome



# --------------------------------------------------------------------------------------------------
# Features: a pure function of (state, as_of). as_of is event time, never the wall clock.
