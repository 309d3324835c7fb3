"""Readmission after rebalances, against a model of the consumer: a partition log, fetch positions, seeks that
race with fetches, rebalances, and the customer state's offset fence. Whatever the interleaving, every record is
applied once it is all read (nothing falls under the fence unapplied)."""

from __future__ import annotations

import random

from streamproc.pipeline.readmission import Readmission

LOG_SIZE = 60
PARTITIONS = (0, 1)


def position(item: tuple[int, int, int]) -> tuple[int, int, int]:
    return item


class GenerationOnly:
    """What the worker did before: drop what an earlier generation fetched, and nothing else."""

    holes: dict = {}

    def admit(self, items, generation, position):
        return [i for i in items if position(i)[2] == generation]

    def rewinds(self, generation, assigned):
        return []


def run(admission, seed: int) -> set[tuple[int, int]]:
    """Random interleavings of fetches, conversions (a fetch reaches the worker later, stamped with the generation
    of that moment), rebalances with a late seek to the committed offsets, and batches. Returns the (partition,
    offset) pairs the fence let through."""
    rng = random.Random(seed)
    position_of = dict.fromkeys(PARTITIONS, 0)
    committed = dict.fromkeys(PARTITIONS, 0)
    fence = dict.fromkeys(PARTITIONS, -1)
    applied: set[tuple[int, int]] = set()
    in_flight: list[tuple[int, int]] = []  # fetched by the consumer thread, not yet handed to the worker
    inbox: list[tuple[int, int, int]] = []
    generation, seek_owed = 1, False

    def fetch() -> None:
        p = rng.choice(PARTITIONS)
        n = rng.randint(1, 7)
        start = position_of[p]
        in_flight.extend((p, o) for o in range(start, min(start + n, LOG_SIZE)))
        position_of[p] = min(start + n, LOG_SIZE)

    def hand_over() -> None:
        inbox.extend((p, o, generation) for p, o in in_flight)
        in_flight.clear()

    def seek(p: int, offset: int) -> None:
        position_of[p] = offset
        in_flight[:] = [(q, o) for q, o in in_flight if q != p] if rng.random() < 0.5 else in_flight

    def process() -> None:
        n = rng.randint(1, len(inbox))
        batch, inbox[:] = inbox[:n], inbox[n:]
        for p, o, _ in admission.admit(batch, generation, position):
            if o > fence[p]:
                fence[p] = o
                applied.add((p, o))
            committed[p] = max(committed[p], o + 1)  # acked in order of application
        for p, offset in admission.rewinds(generation, PARTITIONS):
            seek(p, offset)

    for _ in range(400):
        action = rng.random()
        if action < 0.35:
            fetch()
        elif action < 0.6:
            hand_over()
        elif action < 0.85 and inbox and not seek_owed:  # the worker waits for the rebalance to end
            process()
        elif action < 0.9:
            generation, seek_owed = generation + 1, True  # a rebalance: same partitions, a new generation
        elif seek_owed:  # the rebalance's seek to the committed offsets, some time after it began
            for p in PARTITIONS:
                seek(p, committed[p])
            seek_owed = False
    if seek_owed:
        for p in PARTITIONS:
            seek(p, committed[p])
    for _ in range(10_000):  # no more rebalances: read to the end
        if all(position_of[p] == LOG_SIZE for p in PARTITIONS) and not in_flight and not inbox:
            break
        fetch()
        hand_over()
        if inbox:
            process()
    return applied


EVERYTHING = {(p, o) for p in PARTITIONS for o in range(LOG_SIZE)}


def test_every_record_is_applied_whatever_the_rebalances():
    assert [seed for seed in range(500) if run(Readmission(), seed) != EVERYTHING] == []


def test_dropping_only_stale_generations_loses_records_under_the_fence():
    """The model is able to fail: the earlier rule loses records in some interleavings."""
    lost = [seed for seed in range(300) if run(GenerationOnly(), seed) != EVERYTHING]
    assert len(lost) > 10


def test_a_hole_drops_later_records_until_the_partition_is_read_again_from_it():
    r = Readmission()
    assert r.admit([("p", 5, 1), ("p", 6, 2), ("q", 9, 2)], 2, position) == [("q", 9, 2)]
    assert r.admit([("p", 7, 2)], 2, position) == []  # fetched before the seek: above the hole
    assert r.rewinds(2, ["p", "q"]) == [("p", 5)]
    assert r.rewinds(2, ["p", "q"]) == []  # once per generation
    assert r.admit([("p", 4, 2), ("p", 5, 2), ("p", 6, 2)], 2, position) == [("p", 4, 2), ("p", 5, 2), ("p", 6, 2)]
    assert r.holes == {} and r.dropped == 3


def test_a_hole_of_a_partition_owned_elsewhere_is_forgotten():
    r = Readmission()
    r.admit([("p", 5, 1), ("q", 7, 1)], 2, position)
    assert r.rewinds(2, ["q"]) == [("q", 7)]  # p is not assigned here: its owner reads it from the commit
    assert "p" not in r.holes
    assert r.admit([("p", 9, 3)], 3, position) == [("p", 9, 3)]  # back here: read from the commit, not held


def test_a_failed_seek_is_asked_again_and_a_hole_below_the_commit_moves_up_to_it():
    r = Readmission()
    r.admit([("p", 5, 1)], 2, position)
    assert r.rewinds(2, ["p"], committed={"p": 3}.get) == [("p", 5)]
    r.seek_failed("p")
    assert r.rewinds(2, ["p"], committed={"p": 8}.get) == [("p", 8)]  # applied below 8 by whoever committed it
    assert r.admit([("p", 9, 2)], 2, position) == []
    assert r.admit([("p", 8, 2), ("p", 9, 2)], 2, position) == [("p", 8, 2), ("p", 9, 2)]
    assert r.rewinds(3, ["p"]) == []


def test_records_dropped_elsewhere_open_a_hole_at_the_first_of_them():
    r = Readmission()
    r.drop("p", 8)
    r.drop("p", 6)
    r.drop("p", 9)
    assert r.admit([("p", 7, 1)], 1, position) == []
    assert r.rewinds(1, ["p"]) == [("p", 6)]
    assert r.admit([("p", 6, 1), ("p", 7, 1)], 1, position) == [("p", 6, 1), ("p", 7, 1)]
