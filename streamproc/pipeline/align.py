"""Stream-time alignment of the co-partitioned input topics, before the batch step.

Faust reads the clicks and the transactions topic independently. Live, records arrive in about the order they
were produced; draining a backlog (a replay, a catch-up after an outage), the two topics drift apart by
however much one fetch of one topic covers, hours of event time in a fast replay. Features, labels and alerts do
not care (order-free folds, an event-time grid), but a recommendation made at a session's first product view
would miss purchases not read yet, and a purchase read early would be scored against an older recommendation.

So, per partition number, records are held and released in record-timestamp order across the topics: a topic
whose queue is empty while the broker holds more of it (it is *behind*) holds the others back, as Kafka Streams
does for the partitions of a task (``max.task.idle.ms``). Holding ends when the trailing topic's records arrive,
when it is caught up, or after ``max_wait_s`` of wall time, and a partition never holds ``hold_limit`` records
or more (the oldest go first); the worker pauses fetching a topic partition that is far ahead
(``should_pause``) so a backlog does not pile up in memory.
Live (nothing behind) a record is released as soon as it arrives.

No Faust and no Kafka here: the worker supplies ``behind`` and the clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from streamproc.pipeline.records import RawRecord

T = TypeVar("T")


class TopicAligner(Generic[T]):
    """Holds ``(record, payload)`` pairs per partition and input kind; ``release`` hands them over in merged
    record-timestamp order (ties: kind name, then arrival)."""

    def __init__(self, kinds: tuple[str, ...], max_wait_s: float = 2.0, hold_limit: int = 10_000,
                 pause_at: int = 1_000) -> None:  # the defaults of the STREAMPROC_ALIGN_* settings
        self.kinds = kinds
        self.max_wait_s = max_wait_s
        self.hold_limit = hold_limit
        self.pause_at = pause_at
        self.queues: dict[int, dict[str, deque[tuple[RawRecord, T]]]] = {}
        self.waiting_since: dict[int, float] = {}  # partition -> when it started holding for a trailing topic

    def push(self, pairs: Iterable[tuple[RawRecord, T]]) -> None:
        for pair in pairs:
            record = pair[0]
            queues = self.queues.get(record.partition)
            if queues is None:
                queues = self.queues[record.partition] = {kind: deque() for kind in self.kinds}
            queue = queues.get(record.kind)
            if queue is None:  # an input kind the aligner was not told about: never held back
                queue = queues[record.kind] = deque()
            queue.append(pair)

    def held(self, partition: int | None = None) -> int:
        parts = self.queues.values() if partition is None else [self.queues.get(partition, {})]
        return sum(len(q) for queues in parts for q in queues.values())

    def release(self, behind: Callable[[str, int], bool], now: float) -> list[tuple[RawRecord, T]]:
        """Everything that may go now. ``behind(kind, partition)``: the broker has records of that topic
        partition this process has not received yet (asked at most once per partition and set of empty topics)."""
        out: list[tuple[RawRecord, T]] = []
        append = out.append
        hold_limit = self.hold_limit
        for partition, queues in self.queues.items():
            nonempty = [kind for kind, q in queues.items() if q]
            held = sum(len(queues[kind]) for kind in nonempty)
            trailing_behind: bool | None = None  # a topic with nothing queued has more on the broker
            while nonempty:
                recheck = False  # the hold decision changes when ``held`` drops below the limit: decide again then
                if len(nonempty) < len(queues):
                    if held < hold_limit:
                        if trailing_behind is None:
                            trailing = [kind for kind, q in queues.items() if not q and kind in self.kinds]
                            trailing_behind = any(behind(kind, partition) for kind in trailing)
                        if trailing_behind:
                            since = self.waiting_since.setdefault(partition, now)
                            if now - since < self.max_wait_s:
                                break  # wait for the trailing topic's records
                    else:
                        recheck = True
                # merged order: the queue whose head has the smallest (timestamp, kind), for as long as it stays
                # below every other head (a run: the other heads do not move meanwhile)
                heads = sorted([(queues[k][0][0].timestamp_ms or 0, k) for k in nonempty])
                kind = heads[0][1]
                bound = heads[1] if len(heads) > 1 else None  # the smallest other head
                queue = queues[kind]
                popleft = queue.popleft
                while True:
                    append(popleft())
                    held -= 1
                    if not queue:
                        nonempty.remove(kind)
                        trailing_behind = None
                        break
                    if recheck and held < hold_limit:
                        break
                    if bound is not None and (queue[0][0].timestamp_ms or 0, kind) > bound:
                        break
            else:  # all released: the next hold starts its own wait
                self.waiting_since.pop(partition, None)
        return out

    def should_pause(self, partition: int, kind: str) -> bool:
        """Far ahead of the other topic: stop fetching it until what is held drains."""
        queue = self.queues.get(partition, {}).get(kind)
        return queue is not None and len(queue) >= self.pause_at

    def clear(self) -> list[tuple[RawRecord, T]]:
        """Drop everything held (partitions moved: their records are re-read from the committed offsets)."""
        dropped = [pair for queues in self.queues.values() for q in queues.values() for pair in q]
        self.queues = {}
        self.waiting_since = {}
        return dropped
