"""What a Redis Cluster and WAIT cost the batch step's saves: one Redis, the 3-master cluster, and the cluster
with ``STREAMPROC_REDIS_WAIT_REPLICAS=1`` (a save acknowledged only once a replica has it).

Customers with real state (a simulated history folded by the pipeline, ~1.5 KiB of state each) are saved again
and again through ``RedisFeatureStore.save`` in chunks of 150 customers over 4 input partitions, as the batch
step saves them (one script call per partition, the calls of a chunk in flight together). The figure is the time
per customer save. Configurations run in back-to-back rounds (one Redis, cluster, cluster with WAIT, repeated), so
the machine's drift touches each alike; the report is the median and range over the rounds.

    .venv/bin/python bench/redis_cluster.py [--customers 3000] [--rounds 5]

Needs `streamproc infra up --redis-cluster`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamproc.adapters.redis_clients import sync_redis  # noqa: E402
from streamproc.adapters.redis_store import RedisFeatureStore  # noqa: E402
from streamproc.domain.customer import CustomerState  # noqa: E402
from streamproc.partitioning import home_partition  # noqa: E402
from streamproc.ports import Update  # noqa: E402
from streamproc.settings import Settings  # noqa: E402
from streamproc.tools.infra import Infra  # noqa: E402
from streamproc.tools.simulate import SimulationConfig, Simulator  # noqa: E402
from streamproc.training.offline import run_offline  # noqa: E402

PARTITIONS = 4
CHUNK = 150  # customers per save call of the batch step (pipeline/store_calls.py SAVE_CHUNK)


async def customers(count: int) -> list[tuple[CustomerState, dict]]:
    payloads = list(Simulator(SimulationConfig(customers=count, days=90, seed=3)).payloads())
    _, _, store = await run_offline(payloads, Settings(models_enabled=False))
    return [(CustomerState.from_dict(orjson.loads(blob)), orjson.loads(feats))
            for _, blob, feats in store.rows.values()]


async def one_round(url: str, wait: int, population: list[tuple[CustomerState, dict]], saves: int) -> float:
    """Seconds per customer save, over ``saves`` saves of every customer."""
    client = sync_redis(url)
    client.flushall() if not url.startswith("redis+cluster") else client.flushall(target_nodes="primaries")
    client.close()
    store = RedisFeatureStore.from_url(url)
    store.replicas.wanted = wait
    await store.claim_layout(PARTITIONS)
    ups = [(state, feats, home_partition(state.customer_id, PARTITIONS)) for state, feats in population]
    started = time.perf_counter()
    for version in range(saves):
        for i in range(0, len(ups), CHUNK):
            chunk = [Update(s.customer_id, version, s, f, partition=p) for s, f, p in ups[i : i + CHUNK]]
            result = await store.save(chunk)
            assert not result.failed
    elapsed = time.perf_counter() - started
    await store.close()
    return elapsed / (saves * len(ups))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"redis-cluster-{date.today()}.json")
    args = parser.parse_args()
    infra = Infra(Settings())
    infra.up(redis_cluster=True)
    single = Settings().redis_url.rsplit("/", 1)[0] + "/15"
    configs = {"one Redis": (single, 0), "cluster": (infra.redis_cluster.url, 0),
               "cluster, WAIT 1 replica": (infra.redis_cluster.url, 1)}
    population = asyncio.run(customers(args.customers))
    state_bytes = statistics.mean(len(orjson.dumps(s.to_dict())) for s, _ in population)
    runs: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (url, wait) in configs.items():
            runs[name].append(asyncio.run(one_round(url, wait, population, args.saves)) * 1e6)
    report = {
        "date": str(date.today()), "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
        f"cores, Python {platform.python_version()}", "customers": len(population),
        "state_bytes_mean": round(state_bytes), "chunk": CHUNK, "partitions": PARTITIONS,
        "us_per_customer_save": {name: {"median": round(statistics.median(v), 1), "min": round(min(v), 1),
                                        "max": round(max(v), 1), "rounds": [round(x, 1) for x in v]}
                                 for name, v in runs.items()},
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, figures in report["us_per_customer_save"].items():
        print(f"{name:<26} {figures['median']:>7} µs per customer save (range {figures['min']}–{figures['max']})")


if __name__ == "__main__":
    main()
