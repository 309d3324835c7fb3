"""Churn labels at scale: one long transactions-only history through the in-process pipeline (the worker's batch step
and sweep, an in-memory store) in differently batched runs; reports per run the labels and segment examples emitted,
the pending snapshots left overdue at the end, and digests of every customer's churn bookkeeping and of the examples,
which must be equal across runs. Not a test (tests/unit/test_churn_determinism.py is the small, fast one).

Usage: python bench/label_determinism.py [--customers 100000] [--days 180] [--runs 2000 500/40 app1000/250]
  a run is BATCH (every sweep pass finished after each batch), BATCH/BUDGET (sweep steps of BUDGET customers after
  each batch, the rest at the end) or appBATCH/BUDGET (as the worker: a step after each batch and 0-2 idle steps).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine  # noqa: E402

from streamproc.adapters.memory import InMemoryFeatureStore  # noqa: E402
from streamproc.compiled import status as compiled_status  # noqa: E402
from streamproc.contracts.outputs import ChurnExample, SegmentExample  # noqa: E402
from streamproc.domain.churn import ChurnConfig, maturity_span  # noqa: E402
from streamproc.domain.customer import CustomerState, FoldConfig  # noqa: E402
from streamproc.domain.events import DecodeLimits  # noqa: E402
from streamproc.metrics import Metrics  # noqa: E402
from streamproc.pipeline.records import Example, RawRecord  # noqa: E402
from streamproc.pipeline.step import BatchProcessor  # noqa: E402
from streamproc.tools.simulate import SimulationConfig, Simulator  # noqa: E402

CHURN = ChurnConfig()


def history(customers: int, days: int) -> list[RawRecord]:
    out: list[RawRecord] = []
    for topic, key, payload in Simulator(SimulationConfig(customers=customers, days=days, seed=11)).payloads():
        if topic == "transactions":
            out.append(RawRecord(topic, topic, 0, len(out), key, payload, None))
    return out


async def run(records: list[RawRecord], spec: str) -> dict[str, Any]:
    app = spec.startswith("app")
    size_text, _, budget_text = spec.removeprefix("app").partition("/")
    size, budget = int(size_text), int(budget_text) if budget_text else None
    store = InMemoryFeatureStore()
    proc = BatchProcessor(store, Metrics(), DecodeLimits(), FoldConfig(allowed_lateness_ms=3_600_000), churn=CHURN,
                          max_source_skew_ms=3_600_000)
    rnd = random.Random(7)
    examples: Counter[tuple[Any, ...]] = Counter()
    swept = 0

    def keep(found: list[Example]) -> None:
        store.outboxes.clear()  # delivered, as the worker clears them once the broker has them
        for e in found:
            if isinstance(e, ChurnExample | SegmentExample):
                examples[(e.kind, e.id, e.ts, getattr(e, "label", None))] += 1

    started = time.perf_counter()
    for start in range(0, len(records), size):
        keep((await proc.process(records[start : start + size])).examples)
        for _ in range(1 + (rnd.randint(0, 2) if app else 0)):
            swept += await proc.sweep(budget=budget)
            keep(proc.sweep_outputs.examples)
            if not app and budget is None:
                break
    while proc.sweep_pending:
        swept += await proc.sweep(budget=budget)
        keep(proc.sweep_outputs.examples)
    seconds = time.perf_counter() - started
    mark = store.marks[0]
    books = hashlib.sha256()
    overdue = pending = 0
    for cid in sorted(store.rows):
        state = CustomerState.from_dict(orjson.loads(store.rows[cid][1]))
        books.update(orjson.dumps([cid, state.snapshot_ts, state.pending, state.pre_day,
                                   sorted(state.anchors.items())]))
        pending += len(state.pending)
        overdue += sum(1 for p in state.pending if p + maturity_span(CHURN) <= mark)
    return {
        "run": spec, "seconds": round(seconds, 1), "events": len(records), "customers_stored": len(store.rows),
        "labels": sum(n for k, n in examples.items() if k[0] == "churn"),
        "churned_labels": sum(n for k, n in examples.items() if k[0] == "churn" and k[3] == 1),
        "segment_examples": sum(n for k, n in examples.items() if k[0] == "segment"),
        "repeated_examples": sum(n - 1 for n in examples.values() if n > 1),
        "pending_at_end": pending, "overdue_pending_at_end": overdue,
        "overdue_label_customers": await store.overdue_labels(store.marks), "sweep_visits": swept,
        "bookkeeping_sha256": books.hexdigest()[:16],
        "examples_sha256": hashlib.sha256(orjson.dumps(sorted(examples))).hexdigest()[:16],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--runs", nargs="+", default=["2000", "500/40", "app1000/250"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    records = history(args.customers, args.days)
    results = [asyncio.run(run(records, spec)) for spec in args.runs]
    for r in results:
        print(json.dumps(r))
    same = {k: len({r[k] for r in results}) == 1 for k in ("labels", "bookkeeping_sha256", "examples_sha256")}
    report = {"benchmark": "label_determinism", "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": machine(), "domain_core": compiled_status(), "customers": args.customers, "days": args.days,
              "runs": results, "equal_across_runs": same}
    out = Path(args.out or ROOT / "bench" / "results" / f"label_determinism-{datetime.now(UTC):%Y%m%d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("equal across runs:", same, "->", out)


if __name__ == "__main__":
    main()
