"""Per-customer state as a pure fold: ``apply_events(state, events) -> (state, outcome)``.

No Redis, no Faust, no clock. Exactly-once effect comes from two guards kept *inside* the state, so
they are saved atomically with it:

* an offset fence per input partition (``offsets``): an event at or below the last applied offset of
  its partition was applied already (a replay after a crash) and is skipped;
* a bounded set of recent event ids (``recent_ids``): the same ``event_id`` arriving again at another
  offset (a producer retry) counts once.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from streamproc.domain.events import Click, Event, Transaction


@dataclass(frozen=True, slots=True)
class Positioned:
    """An event with where it came from: ``source`` is ``topic:partition``."""

    event: Event
    source: str
    offset: int


@dataclass(frozen=True, slots=True)
class FoldConfig:
    dedup_horizon_ms: int = 7 * 24 * 3600 * 1000
    dedup_max_ids: int = 64


@dataclass
class CustomerState:
    customer_id: str
    offsets: dict[str, int] = field(default_factory=dict)
    recent_ids: dict[str, int] = field(default_factory=dict)  # short id -> event time (ms)
    clicks: int = 0
    clicks_by_action: dict[str, int] = field(default_factory=dict)
    purchases: int = 0
    refunds: int = 0
    spend_total: float = 0.0  # purchases minus refunds
    refund_total: float = 0.0
    first_event_ts: int | None = None
    last_event_ts: int | None = None
    last_purchase_ts: int | None = None
    first_purchase_ts: int | None = None

    # --- serialisation (the adapter stores this dict as one compact blob)
    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.customer_id,
            "o": self.offsets,
            "r": self.recent_ids,
            "c": self.clicks,
            "ca": self.clicks_by_action,
            "p": self.purchases,
            "rf": self.refunds,
            "s": round(self.spend_total, 6),
            "rs": round(self.refund_total, 6),
            "fe": self.first_event_ts,
            "le": self.last_event_ts,
            "lp": self.last_purchase_ts,
            "fp": self.first_purchase_ts,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CustomerState:
        return cls(
            customer_id=data["id"],
            offsets=dict(data.get("o", {})),
            recent_ids=dict(data.get("r", {})),
            clicks=data.get("c", 0),
            clicks_by_action=dict(data.get("ca", {})),
            purchases=data.get("p", 0),
            refunds=data.get("rf", 0),
            spend_total=data.get("s", 0.0),
            refund_total=data.get("rs", 0.0),
            first_event_ts=data.get("fe"),
            last_event_ts=data.get("le"),
            last_purchase_ts=data.get("lp"),
            first_purchase_ts=data.get("fp"),
        )


@dataclass
class FoldOutcome:
    """Counts by (input kind, outcome); outcome is applied, duplicate or replayed (at or below the
    partition's fence: applied before a crash)."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)

    def count(self, source: str, outcome: str) -> None:
        self.counts[(source.partition(":")[0], outcome)] += 1

    def total(self, outcome: str) -> int:
        return sum(n for (_, o), n in self.counts.items() if o == outcome)

    def merge(self, other: FoldOutcome) -> None:
        self.counts.update(other.counts)


def short_event_id(event_id: str) -> str:
    """A 12-hex-char digest of an event id: enough to deduplicate within one customer, small in Redis."""
    return hashlib.blake2b(event_id.encode(), digest_size=6).hexdigest()


def _apply_one(state: CustomerState, event: Event) -> None:
    ts = event.ts
    if state.first_event_ts is None or ts < state.first_event_ts:
        state.first_event_ts = ts
    if state.last_event_ts is None or ts > state.last_event_ts:
        state.last_event_ts = ts
    if isinstance(event, Click):
        state.clicks += 1
        state.clicks_by_action[event.action] = state.clicks_by_action.get(event.action, 0) + 1
    elif isinstance(event, Transaction):
        if event.type == "purchase":
            state.purchases += 1
            state.spend_total += event.amount
            if state.last_purchase_ts is None or ts > state.last_purchase_ts:
                state.last_purchase_ts = ts
            if state.first_purchase_ts is None or ts < state.first_purchase_ts:
                state.first_purchase_ts = ts
        else:
            state.refunds += 1
            state.refund_total += event.amount
            state.spend_total -= event.amount


def _prune_ids(state: CustomerState, cfg: FoldConfig) -> None:
    if not state.recent_ids:
        return
    newest = max(state.recent_ids.values())
    horizon = newest - cfg.dedup_horizon_ms
    kept = sorted(((ts, sid) for sid, ts in state.recent_ids.items() if ts >= horizon), reverse=True)
    state.recent_ids = {sid: ts for ts, sid in kept[: cfg.dedup_max_ids]}


def apply_events(
    state: CustomerState, events: Iterable[Positioned], cfg: FoldConfig
) -> tuple[CustomerState, FoldOutcome]:
    """Fold a customer's events (in arrival order) into their state. Mutates and returns ``state``."""
    outcome = FoldOutcome()
    for item in events:
        fence = state.offsets.get(item.source, -1)
        if item.offset <= fence:
            outcome.count(item.source, "replayed")
            continue
        state.offsets[item.source] = item.offset
        sid = short_event_id(item.event.event_id)
        if sid in state.recent_ids:
            outcome.count(item.source, "duplicate")
            continue
        state.recent_ids[sid] = item.event.ts
        _apply_one(state, item.event)
        outcome.count(item.source, "applied")
    _prune_ids(state, cfg)
    return state, outcome


def features(state: CustomerState) -> dict[str, str]:
    """The customer's readable features, flat strings for a Redis hash (and the lookup)."""
    out: dict[str, str] = {
        "customer_id": state.customer_id,
        "clicks": str(state.clicks),
        "purchases": str(state.purchases),
        "refunds": str(state.refunds),
        "monetary_total": f"{state.spend_total:.2f}",
        "events": str(state.clicks + state.purchases + state.refunds),
    }
    if state.last_event_ts is not None:
        out["last_event_ts"] = str(state.last_event_ts)
    if state.first_event_ts is not None:
        out["first_event_ts"] = str(state.first_event_ts)
    if state.last_purchase_ts is not None:
        out["last_purchase_ts"] = str(state.last_purchase_ts)
    return out
