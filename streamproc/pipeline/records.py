"""The records a batch step takes and gives: a consumed Kafka record, a step's result (dead letters, outputs,
the outbox entries they were parked in) and the event-time watermarks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import orjson

from streamproc.contracts.outputs import (
    AlertCleared,
    BasketExample,
    ChurnAlert,
    ChurnExample,
    DeadLetter,
    Recommendation,
    SegmentExample,
    SegmentMove,
)
from streamproc.domain.customer import FoldOutcome

Example = SegmentExample | ChurnExample | BasketExample


class ParkedOutput(dict[str, Any]):
    """An output read back from the outbox: the JSON object it was parked as, re-sent unchanged (orjson writes a
    dict subclass as the dict it is), its fields readable as attributes like the record it stands for."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class RawRecord(NamedTuple):
    """One consumed Kafka record, as the agent saw it (a named tuple: one is made per record, and a frozen
    dataclass costs three times as much to build)."""

    topic: str  # physical topic name
    kind: str  # declared input name: "clicks" or "transactions"
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None

    @property
    def source(self) -> str:
        return f"{self.kind}:{self.partition}"


@dataclass
class BatchResult:
    dead_letters: list[DeadLetter] = field(default_factory=list)
    outcome: FoldOutcome = field(default_factory=FoldOutcome)  # (kind, outcome) counts
    alerts: list[ChurnAlert] = field(default_factory=list)
    segment_moves: list[SegmentMove] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)  # for the training topic
    recommendations: list[Recommendation] = field(default_factory=list)
    cleared: list[AlertCleared] = field(default_factory=list)
    outbox: dict[int, list[str]] = field(default_factory=dict)  # outbox entries these outputs were parked in
    # alert decisions waiting for their day to close (``pipeline.alert_queue``): queue entry name -> JSON, saved
    # with the customer's state, sent (or counted over budget) by the sweep that closes the day
    queued: dict[str, bytes] = field(default_factory=dict)

    def absorb(self, other: BatchResult) -> None:
        self.outcome.merge(other.outcome)
        self.dead_letters.extend(other.dead_letters)
        self.alerts.extend(other.alerts)
        self.segment_moves.extend(other.segment_moves)
        self.examples.extend(other.examples)
        self.recommendations.extend(other.recommendations)
        self.cleared.extend(other.cleared)  # (not ``queued``: saved with each customer, never emitted)
        for partition, fields in other.outbox.items():
            self.outbox.setdefault(partition, []).extend(fields)

    def outputs_blob(self) -> bytes:
        """What the outbox keeps of these outputs ("" when there are none)."""
        if not (self.dead_letters or self.alerts or self.segment_moves or self.examples or self.recommendations
                or self.cleared):
            return b""
        return orjson.dumps({"a": self.alerts, "s": self.segment_moves, "e": self.examples,
                             "r": self.recommendations, "d": [d.model_dump(mode="json") for d in self.dead_letters],
                             "c": self.cleared})

    @classmethod
    def from_outbox(cls, blob: bytes) -> BatchResult:
        data = orjson.loads(blob)
        # re-sent as parked, whatever version of streamproc parked them: never rebuilt (a record this version
        # cannot build must not hold its partition's outbox back)
        return cls(dead_letters=[DeadLetter.model_validate(d) for d in data.get("d", [])],
                   alerts=[cast(ChurnAlert, ParkedOutput(a)) for a in data.get("a", [])],
                   segment_moves=[cast(SegmentMove, ParkedOutput(m)) for m in data.get("s", [])],
                   examples=[cast(Example, ParkedOutput(e)) for e in data.get("e", [])],
                   recommendations=[cast(Recommendation, ParkedOutput(r)) for r in data.get("r", [])],
                   cleared=[cast(AlertCleared, ParkedOutput(c)) for c in data.get("c", [])])

    def total(self, outcome: str) -> int:
        return self.outcome.total(outcome) + (len(self.dead_letters) if outcome == "dead_lettered" else 0)

    def reject(self, record: RawRecord, reason: str, detail: str, max_original_bytes: int) -> None:
        self.dead_letters.append(dead_letter(record, reason, detail, max_original_bytes))
        self.outcome.count(record.source, "dead_lettered")


def dead_letter(record: RawRecord, reason: str, detail: str, max_original_bytes: int) -> DeadLetter:
    return DeadLetter.of_bytes(
        f"{record.topic}:{record.partition}:{record.offset}", reason, detail, record.topic, record.key, record.value,
        max_original_bytes, partition=record.partition, offset=record.offset,
        record_timestamp_ms=record.timestamp_ms,
    )


class Watermarks:
    """Per input partition: the largest event time seen, and the watermark that trails it.

    Advanced event by event (replayed events included), so lateness decisions depend only on each
    partition's content, not on how records were batched or on the wall clock.
    """

    def __init__(self, allowed_lateness_ms: int, kinds: tuple[str, ...] = ("clicks", "transactions"),
                 max_skew_ms: int | None = None) -> None:
        self.lateness = allowed_lateness_ms
        self.max_skew = max_skew_ms
        self.kinds = kinds
        self.max_ts: dict[str, int] = {}
        self.partition_marks: dict[int, int] = {}
        # sources ("kind:partition") known to carry no record at all: they do not hold their partition's time back
        # (a transactions-only shop's clicks topic); told by the worker, which asks the broker (``silent_sources``)
        self.silent: frozenset[str] = frozenset()

    def watermark(self, source: str) -> int | None:
        top = self.max_ts.get(source)
        return None if top is None else top - self.lateness

    def observe(self, source: str, ts: int) -> bool:
        """Record an event time; True if the event was late (older than the watermark before it)."""
        top = self.max_ts.get(source)
        late = top is not None and ts < top - self.lateness
        if top is None or ts > top:
            self.max_ts[source] = ts
        return late

    def copy(self) -> Watermarks:
        twin = Watermarks(self.lateness, self.kinds, self.max_skew)
        twin.max_ts = dict(self.max_ts)
        twin.partition_marks = dict(self.partition_marks)
        twin.silent = self.silent
        return twin

    def overall(self) -> int | None:
        """The worker's watermark: the largest event time it has seen, minus the allowed lateness."""
        return max(self.max_ts.values()) - self.lateness if self.max_ts else None

    def by_partition(self) -> dict[int, int]:
        """Watermark per input partition number, a function of the data alone (never of the wall clock, so
        a replay, a crash or a hand-over to another worker ends in the same place): the slowest of its input
        topics (clicks, transactions) minus the allowed lateness, so time-driven work (sweep, snapshots,
        labels) waits for every topic that has data, and nothing until each has been heard from. A topic
        partition that carries no record at all (``silent``: nothing on the broker, nothing ever read) does not
        count, so a shop that publishes only transactions gets its snapshots, labels and alerts by default; a
        replay reads a topic that has records as one that counts, so it decides as the first run did. With
        ``max_skew`` set, a topic more than that far behind the other (or never heard from) holds the partition
        back by at most that much: liveness for a topic that speaks rarely, at the price of determinism for
        replays whose topics drift further apart than that. Never moves backwards (a topic that starts speaking
        late holds time where it is until it catches up)."""
        tops: dict[int, dict[str, int]] = {}
        for source, top in self.max_ts.items():
            kind, _, number = source.rpartition(":")
            tops.setdefault(int(number), {})[kind] = top
        silent = self.silent
        out: dict[int, int] = {}
        for partition, by_kind in tops.items():
            counted = [k for k in self.kinds if k in by_kind or f"{k}:{partition}" not in silent]
            heard = [by_kind[k] for k in counted if k in by_kind]
            candidates = [min(heard) - self.lateness] if len(heard) == len(counted) else []
            if self.max_skew is not None:
                candidates.append(max(by_kind.values()) - self.lateness - self.max_skew)
            previous = self.partition_marks.get(partition)
            if previous is not None:
                candidates.append(previous)
            if candidates:
                out[partition] = self.partition_marks[partition] = max(candidates)
        return out
