"""A streamproc worker that measures where its event loop waits: the wall time the loop's thread spends blocked
in ``epoll``, by what the ingest task was awaiting then (a batch's loads and saves, its side effects, the sweep,
the emit, or the next input). Started by ``bench/throughput.py --waits``; not for production.

Every 2 s it writes ``BENCH_WAITS`` (JSON): seconds measured since the 21st batch step (``BENCH_WAITS_SKIP``: the
start, with its partition assignment, is left out) and, per phase, the share of them the loop sat in ``epoll``.
A py-spy profile without ``--idle`` drops those samples instead of showing them. Also the cyclic garbage
collector's runs and seconds per generation over the whole process.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import os
import selectors
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamproc import cli
from streamproc.adapters import redis_store
from streamproc.pipeline import step, store_calls
from streamproc.runtime import app

OUT = Path(os.environ.get("BENCH_WAITS", "waits.json"))
LOOP_THREAD = threading.get_ident()
blocked: dict[str, float] = {}
awaiting = ["input"]  # what the ingest task awaits now, innermost last
ingest_task: list[asyncio.Task[Any] | None] = [None]
started: list[float] = []
steps = [0]
last_step = [0.0]
blocked_at_last_step: dict[str, float] = {}
SKIP_STEPS = int(os.environ.get("BENCH_WAITS_SKIP", "20"))  # batch steps before measuring starts

_select = selectors.EpollSelector.select


def select(self: selectors.EpollSelector, timeout: float | None = None) -> Any:
    if threading.get_ident() != LOOP_THREAD or not started:
        return _select(self, timeout)
    t0 = time.perf_counter()
    try:
        return _select(self, timeout)
    finally:
        blocked[awaiting[-1]] = blocked.get(awaiting[-1], 0.0) + time.perf_counter() - t0


def phase(cls: type, name: str, label: str, first: bool = False) -> None:
    """While the ingest task awaits ``cls.name``, its waits count as ``label`` (nothing if the code has no such
    method: older versions can be measured too)."""
    original = getattr(cls, name, None)
    if original is None:
        return

    @functools.wraps(original)
    async def measured(*args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        if first and ingest_task[0] is None:
            ingest_task[0] = task
        if first and task is ingest_task[0] and not started:
            steps[0] += 1
            if steps[0] > SKIP_STEPS:  # past the start (partition assignment, the first fetches)
                started.append(time.perf_counter())
        if first and task is ingest_task[0] and started:
            last_step[0] = time.perf_counter()
            blocked_at_last_step.clear()
            blocked_at_last_step.update(blocked)
        if task is not ingest_task[0]:
            return await original(*args, **kwargs)
        awaiting.append(label)
        try:
            return await original(*args, **kwargs)
        finally:
            awaiting.pop()

    setattr(cls, name, measured)


phase(app.Worker, "apply_with_retry", "batch step: other", first=True)
phase(store_calls.StoreCalls, "load_step_save", "batch step: loads and saves")
phase(redis_store.RedisFeatureStore, "load", "batch step: loads and saves")
phase(redis_store.RedisFeatureStore, "save", "batch step: loads and saves")
phase(redis_store.RedisFeatureStore, "after_batch", "batch step: side effects")
phase(step.BatchProcessor, "sweep", "sweep")
phase(app.Worker, "emit", "emit")


gc_runs: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}  # generation -> [collections, seconds]
gc_started = [0.0]


def on_gc(event: str, info: dict[str, int]) -> None:
    """The cyclic collector's runs and time, over the whole process (a pause the loop cannot wait through)."""
    if event == "start":
        gc_started[0] = time.perf_counter()
    else:
        runs = gc_runs[info["generation"]]
        runs[0] += 1
        runs[1] += time.perf_counter() - gc_started[0]


gc.callbacks.append(on_gc)


def report() -> None:
    """Shares of the time from the measured start to the last batch step (after it, a worker that is done before
    the others only waits for input that never comes), and when that step began."""
    while True:
        time.sleep(2)
        if started and last_step[0]:
            elapsed = last_step[0] - started[0]
            ranked = sorted(blocked_at_last_step.items(), key=lambda kv: -kv[1])
            OUT.write_text(json.dumps({
                "seconds": round(elapsed, 1),
                "blocked_share": {label: round(seconds / elapsed, 4) for label, seconds in ranked},
                "blocked_total": round(sum(blocked_at_last_step.values()) / elapsed, 4),
                "gc_collections_and_seconds": {g: [int(n), round(t, 3)] for g, (n, t) in gc_runs.items()},
                "first_step_at": round(started[0], 2), "last_step_at": round(last_step[0], 2),  # perf_counter
            }))


selectors.EpollSelector.select = select  # type: ignore[method-assign,assignment]
threading.Thread(target=report, daemon=True).start()
sys.argv = ["streamproc", "worker"]
cli.main()
