"""What daily alert freshness costs the inactivity sweep: at every alert-grid instant the sweep visits every live
customer (scored from what was known then), so a daily grid (``STREAMPROC_ALERT_CADENCE_DAYS=1``, the default)
visits the live population seven times as often as the weekly snapshot grid alone.

The batch step and sweep (no Faust, no Kafka) on the real Redis: a warm population (the simulator's history, every
customer live, scored by a checkpoint that has learned matured labels), then event-time days driven by one customer
per partition, alternating a day of the daily grid and a day between instants of the weekly one (``--pairs``
back-to-back pairs). Per day: the sweep's CPU seconds, wall seconds and customers visited. An event-time week costs
seven of the daily grid's days against one such day (its instant) and six between instants of the weekly grid.
Not a test.

Usage: python bench/sweep_freshness.py [--customers 100000] [--days 14] [--pairs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from batch_step import PARTITIONS, as_records  # noqa: E402
from common import machine  # noqa: E402

from streamproc.adapters.redis_store import RedisFeatureStore  # noqa: E402
from streamproc.domain.customer import DAY_MS  # noqa: E402
from streamproc.domain.models import ModelBundle  # noqa: E402
from streamproc.pipeline.factory import build_processor  # noqa: E402
from streamproc.pipeline.records import RawRecord  # noqa: E402
from streamproc.pipeline.step import BatchProcessor  # noqa: E402
from streamproc.service_commands import tune_gc  # noqa: E402
from streamproc.settings import Settings  # noqa: E402
from streamproc.tools.infra import Infra  # noqa: E402
from streamproc.tools.simulate import SimulationConfig, Simulator  # noqa: E402
from streamproc.training.offline import run_offline  # noqa: E402

BENCH_DB = 14


def tick(day_ts: int, keys: dict[int, bytes], offsets: dict[tuple[str, int], int], n: int) -> list[RawRecord]:
    """A page view and a small purchase of one customer per partition at ``day_ts``: moves every partition's
    watermark (both input topics) on to that day without changing who else is live."""
    records = []
    for partition, key in keys.items():
        for topic in ("clicks", "transactions"):
            offset = offsets[(topic, partition)] = offsets.get((topic, partition), -1) + 1
            cid = key.decode()
            if topic == "clicks":
                event = {"event_id": f"tick-{n}-{partition}", "customer_id": cid, "ts": day_ts,
                         "session_id": f"tick-{n}", "action": "page_view"}
            else:
                event = {"event_id": f"tick-t-{n}-{partition}", "customer_id": cid, "ts": day_ts,
                         "order_id": f"tick-{n}-{partition}", "type": "purchase", "amount": 1.0, "currency": "EUR",
                         "items": [{"product_id": "tick", "category": "tick", "quantity": 1, "unit_price": 1.0}]}
            records.append(RawRecord(topic, topic, partition, offset, key, orjson.dumps(event), None))
    return records


async def day(proc: BatchProcessor, day_ts: int, keys: dict[int, bytes], offsets: dict[tuple[str, int], int],
              n: int) -> dict[str, float]:
    """One event-time day: the watermark moves on to ``day_ts``, and the sweep runs until its pass is done. Its
    CPU and wall seconds and the customers it visited."""
    await proc.process(tick(day_ts, keys, offsets, n))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    visited = 0
    while True:
        visited += await proc.sweep()
        if not proc.sweep_pending:
            break
    return {"sweep_cpu_s": round(time.process_time() - cpu0, 2), "sweep_wall_s": round(time.perf_counter() - wall0, 2),
            "visited": visited}


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    settings = Settings()
    sim = Simulator(SimulationConfig(customers=args.customers, days=args.days, seed=42))
    payloads = list(sim.payloads())
    records = as_records(payloads)
    offsets: dict[tuple[str, int], int] = {}
    keys: dict[int, bytes] = {}
    last_ts = 0
    for r in records:
        offsets[(r.topic, r.partition)] = max(offsets.get((r.topic, r.partition), -1), r.offset)
        if r.key is not None:
            keys.setdefault(r.partition, r.key)
    for _, _, value in payloads[-1000:]:
        last_ts = max(last_ts, orjson.loads(value)["ts"])
    assert len(keys) == PARTITIONS
    # a checkpoint that has learned matured labels (a 60-day horizon: a longer history than the measured one)
    history = Simulator(SimulationConfig(customers=args.train_customers, days=180, seed=7)).payloads()
    bundle, _, _ = await run_offline(list(history), settings)
    assert bundle.churn_examples > 0
    trained = bundle.dumps()
    Infra(settings).up()
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{BENCH_DB}"
    store = RedisFeatureStore.from_url(url, **settings.redis_kwargs())
    await store.redis.flushdb()
    tune_gc(settings)

    def processor(cadence: int) -> BatchProcessor:
        proc = build_processor(settings.model_copy(update={"alert_cadence_days": cadence}), store)
        proc.bundle = ModelBundle.loads(trained)
        proc.sweep_budget = None
        return proc

    warm = processor(7)  # the weekly grid while warming: fewer passes to wait for
    started = time.perf_counter()
    for i in range(0, len(records), 2000):
        await warm.process(records[i : i + 2000])
        await warm.sweep()
    while warm.sweep_pending:
        await warm.sweep()
    warm_s = time.perf_counter() - started
    # pairs of days: a day of the daily grid (a pass over every live customer) and, with the weekly grid, a day
    # that is not a grid instant (silence boundaries only); a grid instant costs the daily grid's day with either
    runs: dict[str, list[dict[str, float]]] = {"daily grid: any day": [], "weekly grid: a day between instants": []}
    current = last_ts - last_ts % DAY_MS + DAY_MS
    n = 0
    for _ in range(args.pairs):
        for name, cadence in (("daily grid: any day", 1), ("weekly grid: a day between instants", 7)):
            current += DAY_MS
            proc = processor(cadence)  # a worker started with that setting (marks and state from Redis)
            while cadence == 7 and (current // DAY_MS) % 7 == 0:  # the weekly grid's instant: a pass of its own
                runs.setdefault("weekly grid: its instant", []).append(await day(proc, current, keys, offsets, n))
                current += DAY_MS
                n += 1
            runs[name].append(await day(proc, current, keys, offsets, n))
            n += 1
            print(name, runs[name][-1], flush=True)
    await store.redis.flushdb()
    await store.close()

    def summary(rows: list[dict[str, float]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for k in ("sweep_cpu_s", "sweep_wall_s", "visited"):
            values = [r[k] for r in rows]
            out[k] = {"median": statistics.median(values), "range": [min(values), max(values)]}
        return out

    return {
        "bench": "sweep_freshness", "customers": args.customers, "history_days": args.days, "events": len(records),
        "warm_seconds": round(warm_s, 1), "per_event_time_day": {k: summary(v) for k, v in runs.items()},
        "runs": runs, "machine": machine(), "date": datetime.now(UTC).date().isoformat(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--train-customers", type=int, default=2000)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    out = ROOT / "bench" / "results" / f"sweep-freshness-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["per_event_time_day"], indent=2))


if __name__ == "__main__":
    main()
