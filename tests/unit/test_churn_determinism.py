"""Churn snapshots, labels and training examples are a function of the events alone: the same transactions-only
history through the in-process pipeline with random batch sizes, sweep budgets, sweep steps between batches and
restarts leaves every customer's churn bookkeeping, and emits the churn and segment examples, exactly as one
reference run does; and no label stays pending past its maturity (a customer who never comes back included)."""

from __future__ import annotations

import asyncio
import functools
import random
from collections import Counter
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamproc.adapters.memory import InMemoryFeatureStore
from streamproc.contracts.outputs import ChurnExample, SegmentExample
from streamproc.domain.churn import ChurnConfig, maturity_span
from streamproc.domain.customer import CustomerState, FoldConfig
from streamproc.domain.events import DecodeLimits
from streamproc.metrics import Metrics
from streamproc.pipeline.records import Example, RawRecord
from streamproc.pipeline.step import BatchProcessor
from streamproc.tools.simulate import SimulationConfig, Simulator

CHURN = ChurnConfig()
SKEW_MS = 3_600_000  # transactions only: the silent clicks topic must not hold time back


@functools.cache
def history() -> tuple[RawRecord, ...]:
    """~220 customers over 420 days, transactions only (many go silent for good, some come back)."""
    out = []
    for topic, key, payload in Simulator(SimulationConfig(customers=220, days=420, seed=5)).payloads():
        if topic == "transactions":
            out.append(RawRecord(topic, topic, 0, len(out), key, payload, None))
    return tuple(out)


def processor(store: InMemoryFeatureStore) -> BatchProcessor:
    return BatchProcessor(store, Metrics(), DecodeLimits(), FoldConfig(allowed_lateness_ms=3_600_000), churn=CHURN,
                          max_source_skew_ms=SKEW_MS)


async def run(sizes: list[int], budget: int | None, idle_steps: int, restart_every: int, seed: int) -> tuple[
        InMemoryFeatureStore, list[dict[str, Any]]]:
    """The history in batches of ``sizes`` (cycled), each followed by a sweep step of ``budget`` customers and up
    to ``idle_steps`` more (as the worker's idle timer would); every ``restart_every`` batches (0: never) a new
    processor takes over the store mid-pass after replaying the last batch (a crash before its commit)."""
    rnd = random.Random(seed)
    records = history()
    store = InMemoryFeatureStore()
    proc = processor(store)
    examples: list[Example] = []
    start = batches = 0
    while start < len(records):
        chunk = list(records[start : start + sizes[batches % len(sizes)]])
        examples += (await proc.process(chunk)).examples
        await proc.sweep(budget=budget)
        examples += proc.sweep_outputs.examples
        for _ in range(rnd.randint(0, idle_steps)):
            if proc.sweep_pending:
                await proc.sweep(budget=budget)
                examples += proc.sweep_outputs.examples
        start += len(chunk)
        batches += 1
        if restart_every and batches % restart_every == 0:
            proc = processor(store)
            replayed = await proc.process(chunk)  # fenced: nothing applied twice
            assert replayed.total("applied") == 0
            examples += replayed.examples
    while proc.sweep_pending:  # the end of the input: the idle timer finishes the sweep
        await proc.sweep(budget=budget)
        examples += proc.sweep_outputs.examples
    return store, examples


def bookkeeping(store: InMemoryFeatureStore) -> dict[str, tuple[Any, ...]]:
    out = {}
    for cid, (_, blob, _) in store.rows.items():
        state = CustomerState.from_dict(orjson.loads(blob))
        out[cid] = (state.snapshot_ts, tuple(state.pending), state.pre_day, tuple(sorted(
            (k, tuple(v)) for k, v in state.anchors.items())))
    return out


def example_keys(examples: list[Example]) -> Counter[tuple[Any, ...]]:
    return Counter((e.kind, e.id, e.ts, getattr(e, "label", None), orjson.dumps(e.x, option=orjson.OPT_SORT_KEYS))
                   for e in examples if isinstance(e, ChurnExample | SegmentExample))


@functools.cache
def reference() -> tuple[dict[str, tuple[Any, ...]], Counter[tuple[Any, ...]]]:
    store, examples = asyncio.run(run([2000], None, 0, 0, 0))
    return bookkeeping(store), example_keys(examples)


def test_the_reference_run_matures_every_label_and_leaves_nothing_overdue():
    store, examples = asyncio.run(run([2000], None, 0, 0, 0))
    keys = example_keys(examples)
    labels = Counter(k[3] for k in keys if k[0] == "churn")
    assert labels[0] > 200 and labels[1] > 200, labels  # both classes, the churners' included
    assert max(keys.values()) == 1  # each example once
    mark = store.marks[0]
    overdue = {cid: p for cid, (_, pending, _, _) in bookkeeping(store).items()
               for p in pending if p + maturity_span(CHURN) <= mark}
    assert overdue == {}
    assert asyncio.run(store.overdue_labels(store.marks)) == 0
    # customers who went silent for good (no snapshot for a horizon and more): nothing pending
    books = bookkeeping(store)
    silent = [cid for cid, (ch, _, _, _) in books.items() if ch and mark - ch >= maturity_span(CHURN)]
    assert len(silent) > 20 and all(not books[cid][1] for cid in silent)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(sizes=st.lists(st.integers(40, 3000), min_size=1, max_size=4), budget=st.sampled_from([None, 7, 40, 250]),
       idle_steps=st.integers(0, 3), restart_every=st.sampled_from([0, 3, 11]), seed=st.integers(0, 1000))
def test_batching_sweep_budget_idle_steps_and_restarts_change_nothing(sizes, budget, idle_steps, restart_every,
                                                                       seed):
    expected_books, expected_examples = reference()
    store, examples = asyncio.run(run(sizes, budget, idle_steps, restart_every, seed))
    books = bookkeeping(store)
    differing = [cid for cid in expected_books if books.get(cid) != expected_books[cid]]
    assert not differing, (len(differing), differing[:3], [(books.get(c), expected_books[c]) for c in differing[:2]])
    got = example_keys(examples)
    if restart_every:  # a replayed batch's outputs are sent again (at-least-once): compare what was sent
        got = Counter(dict.fromkeys(got, 1))
    missing, extra = expected_examples - got, got - expected_examples
    assert not missing and not extra, (len(missing), len(extra), list(missing)[:2], list(extra)[:2])
