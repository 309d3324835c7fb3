"""Which fetched input records may be applied after a rebalance, so that no record is lost to the offset fence.

A rebalance drops what was fetched before it: a record of an earlier consumer generation is not applied, and the
partition's owner reads it again from the committed offset. The customer state's offset fence (an event at or
below a customer's last applied offset of its partition is a duplicate) then makes one rule absolute: once
offset X of a partition is dropped, no later record of that partition may be applied before X is read again,
or X's events, read again, fall under the fence and are lost. A record fetched under the new generation but
before the rebalance's seek is such a later record.

So a drop opens a *hole* at X: every record of the partition above X is dropped too, until one at or below X
arrives, which proves the partition is being read again from X or before (the rebalance's seek to the committed
offset, or the worker's own seek: :meth:`Readmission.rewinds` lists the partitions to seek back, once per
generation, for a hole no seek has closed; the seek must not race a fetch in flight, or records fetched before
it would move the read position past the hole again, so the consumer runs it between two fetches). Records
come in fetch order per partition, which is what makes an offset at or below X a proof. Pure: no Faust, no
Kafka; the worker feeds it and seeks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

Item = TypeVar("Item")
Partition = Any  # hashable: Faust's TP in the worker


class Readmission:
    def __init__(self) -> None:
        # partition -> [first dropped offset not read again, generation of the last seek asked for it (or None)]
        self.holes: dict[Partition, list[Any]] = {}
        self.dropped = 0  # records dropped so far (stale generation or behind a hole)

    def admit(self, items: list[Item], generation: int, position: Callable[[Item], tuple[Partition, int, int | None]],
              generation_of: Callable[[Item], int | None] | None = None) -> list[Item]:
        """The items that may be applied, in their order; ``position`` gives an item's (partition, offset,
        generation it was fetched in), ``generation_of`` just the generation (a cheaper check for the common
        case). Items of one partition must come in fetch order."""
        holes = self.holes
        if not holes:  # the common case: no hole, so only the generation can drop
            generation_of_item = generation_of or (lambda item: position(item)[2])
            if all(generation_of_item(item) == generation for item in items):
                return items
        admitted: list[Item] = []
        for item in items:
            partition, offset, fetched_in = position(item)
            hole = holes.get(partition)
            if hole is not None and offset <= hole[0]:
                del holes[partition]  # read again from the hole or before: the partition is whole again
                hole = None
            if fetched_in != generation:
                if hole is None:
                    holes[partition] = [offset, None]
                self.dropped += 1
            elif hole is not None:
                self.dropped += 1
            else:
                admitted.append(item)
        return admitted

    def drop(self, partition: Partition, offset: int) -> None:
        """Records of ``partition`` from ``offset`` on were dropped without passing :meth:`admit` (held elsewhere
        through a rebalance)."""
        hole = self.holes.get(partition)
        if hole is None or offset < hole[0]:
            self.holes[partition] = [offset, None]

    def rewinds(self, generation: int, assigned: Iterable[Partition],
                committed: Callable[[Partition], int | None] = lambda partition: None) -> list[tuple[Partition, int]]:
        """Holes to seek back to, each once per generation. A hole of a partition not assigned here is forgotten:
        whoever owns it reads it from the committed offset, and so does this worker if it gets it back. A hole
        below the partition's committed offset moves up to it (everything below was applied by whoever
        committed it; a seek below it would only read that again, or find it deleted by retention)."""
        out: list[tuple[Partition, int]] = []
        holes = self.holes
        if not holes:
            return out
        assigned = set(assigned)
        for partition in [p for p in holes if p not in assigned]:
            del holes[partition]
        for partition, hole in holes.items():
            if hole[1] != generation:
                floor = committed(partition)
                if floor is not None and floor > hole[0]:
                    hole[0] = floor
                hole[1] = generation
                out.append((partition, hole[0]))
        return out

    def seek_failed(self, partition: Partition) -> None:
        """The seek asked for did not happen: ask again next time."""
        hole = self.holes.get(partition)
        if hole is not None:
            hole[1] = None
