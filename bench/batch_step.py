"""The batch step alone: `BatchProcessor` fed directly (no Faust, no Kafka), against the real Redis or the
in-memory store, on the records `bench/throughput.py` sends (same simulator, seed and mix).

A first in-memory pass over the same records trains a model bundle, so the measured pass scores with a
trained checkpoint (snapshots, alerts, recommendations) as a worker does in steady state. Records are
spread over 4 partitions by key, in batches of ``--batch``; the inactivity sweep runs after each batch.

Usage: python bench/batch_step.py [--events 100000] [--customers 10000] [--memory] [--profile FILE].
``--profile`` writes cProfile stats of the measured pass and prints the top functions. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine  # noqa: E402

from streamproc.adapters.memory import InMemoryFeatureStore  # noqa: E402
from streamproc.adapters.redis_store import RedisFeatureStore  # noqa: E402
from streamproc.domain.models import ModelBundle  # noqa: E402
from streamproc.pipeline.factory import build_processor  # noqa: E402
from streamproc.pipeline.records import RawRecord  # noqa: E402
from streamproc.ports import FeatureStore  # noqa: E402
from streamproc.service_commands import tune_gc  # noqa: E402
from streamproc.settings import Settings  # noqa: E402
from streamproc.tools.infra import Infra  # noqa: E402
from streamproc.tools.simulate import SimulationConfig, Simulator  # noqa: E402
from streamproc.training.offline import run_offline  # noqa: E402

PARTITIONS = 4
BENCH_DB = 14


def simulated(events: int, customers: int) -> list[tuple[str, bytes, bytes]]:
    sim = Simulator(SimulationConfig(customers=customers, days=180, seed=42))
    out = []
    for payload in sim.payloads():
        out.append(payload)
        if len(out) >= events:
            break
    return out


def as_records(payloads: list[tuple[str, bytes, bytes]]) -> list[RawRecord]:
    offsets: dict[tuple[str, int], int] = {}
    records = []
    for topic, key, value in payloads:
        partition = zlib.crc32(key) % PARTITIONS
        offset = offsets[(topic, partition)] = offsets.get((topic, partition), -1) + 1
        records.append(RawRecord(topic, topic, partition, offset, key, value, None))
    return records


async def measure(records: list[RawRecord], store: FeatureStore, settings: Settings, batch: int,
                  trained: bytes | None, models: bool = True) -> dict[str, float]:
    proc = build_processor(settings.model_copy(update={"models_enabled": models, "sweep_budget": batch}), store)
    if trained is not None:
        proc.bundle = ModelBundle.loads(trained)
    outputs = 0
    started = time.perf_counter()
    cpu_started = time.process_time()
    for i in range(0, len(records), batch):
        result = await proc.process(records[i : i + batch])
        await proc.sweep()
        result.absorb(proc.sweep_outputs)
        outputs += len(result.alerts) + len(result.recommendations) + len(result.examples)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started  # steadier than wall time on a VM whose CPU is shared
    return {"events_per_s": round(len(records) / elapsed), "seconds": round(elapsed, 2),
            "cpu_us_per_event": round(cpu * 1e6 / len(records), 2), "outputs": outputs}


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    settings = Settings()
    payloads = simulated(args.events, args.customers)
    records = as_records(payloads)
    trained = None
    if not args.untrained and not args.models_off:
        bundle, _, _ = await run_offline(payloads, settings, args.batch)
        trained = bundle.dumps()
    store: FeatureStore
    if args.memory:
        store = InMemoryFeatureStore()
    else:
        Infra(settings).up()
        url = settings.redis_url.rsplit("/", 1)[0] + f"/{args.db}"
        redis_store = RedisFeatureStore.from_url(url, **settings.redis_kwargs())
        await redis_store.redis.flushdb()
        store = redis_store
    tune_gc(settings)  # the worker's garbage-collector settings (Python's defaults cost this step ~30 %)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    figures = await measure(records, store, settings, args.batch, trained, models=not args.models_off)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    if isinstance(store, RedisFeatureStore):
        await store.redis.flushdb()
    await store.close()
    return {
        "bench": "batch_step", "events": len(records), "customers": args.customers, "batch": args.batch,
        "store": "memory" if args.memory else "redis", "trained_model": trained is not None,
        "models": not args.models_off, **figures,
        "machine": machine(),
        "date": datetime.now(UTC).date().isoformat(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--memory", action="store_true", help="in-memory store instead of Redis")
    parser.add_argument("--untrained", action="store_true", help="score with no checkpoint")
    parser.add_argument("--models-off", action="store_true",
                        help="the feature engine alone (STREAMPROC_MODELS_ENABLED=false): no scoring or outputs")
    parser.add_argument("--db", type=int, default=BENCH_DB, help="Redis db to use (flushed before and after)")
    parser.add_argument("--profile", default=None, help="write cProfile stats of the measured pass here")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    out = ROOT / "bench" / "results" / "batch_step.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
