"""Soak benchmark: a steady offered rate for a long time; worker RSS, Redis memory, lag and latency must stay
flat.

One worker (everything on) reads a fresh pair of input topics while the simulator offers ``--rate``
events/s for ``--minutes``. Every ``--sample-s`` seconds it records the worker's RSS (from /proc), Redis
``used_memory`` and key count, the consumer lag summed over partitions, and the p99 end-to-end latency of
the records processed since the previous sample (from the worker's histogram). Writes every sample to
``bench/results/soak-<tag>.csv`` and a summary (first and last minute, maxima) to ``soak-<tag>.json``.

Usage: python bench/soak.py [--minutes 30] [--rate 2000] [--customers 200000] [--trainer-process]. Not a test:
`make soak`.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import isolated_run, machine  # noqa: E402
from latency import METRIC, quantiles  # noqa: E402

from streamproc.settings import Settings  # noqa: E402
from streamproc.tools.demo import processed_total, scrape, start_pipeline, stop_pipeline  # noqa: E402
from streamproc.tools.producer import EventProducer  # noqa: E402
from streamproc.tools.simulate import SimulationConfig, Simulator  # noqa: E402
from streamproc.topics import delete_run_topics  # noqa: E402

SIMULATION_START = "2023-01-01T00:00:00+00:00"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def window_p99(now: dict[str, float], before: dict[str, float]) -> float | None:
    delta = {k: v - before.get(k, 0.0) for k, v in now.items() if k.startswith(METRIC + "_bucket")}
    if not delta or max(delta.values()) <= 0:
        return None
    return quantiles(delta, (0.99,)).get("p99")


def offer(settings: Settings, customers: int, rate: float, seconds: float, stop: threading.Event,
          sent: list[int], warmup: int = 0, warm: threading.Event | None = None) -> None:
    """Offer ``rate`` events/s for ``seconds``; first ``warmup`` events as fast as possible, then wait for the
    worker to have processed them (``warm`` is set when the timed part starts)."""
    producer = EventProducer(settings)
    # event time starts years back: a long soak runs through months of simulated time, and events later than
    # the broker's clock plus the allowed skew would be dead-lettered as future timestamps
    sim = Simulator(SimulationConfig(customers=customers, days=3650, seed=5, start=SIMULATION_START))
    payloads = iter(sim.payloads())
    for topic, key, payload in itertools.islice(payloads, warmup):
        producer.send(topic, key, payload)
        sent[0] += 1
    producer.flush()
    while warmup and processed_total(scrape(settings.web_port)) < sent[0] and not stop.is_set():
        time.sleep(1.0)
    if warm is not None:
        warm.set()
    started, offset = time.monotonic(), sent[0]
    for topic, key, payload in payloads:
        producer.send(topic, key, payload)
        sent[0] += 1
        ahead = (sent[0] - offset) / rate - (time.monotonic() - started)
        if ahead > 0.002:
            time.sleep(ahead)
        if stop.is_set() or time.monotonic() - started >= seconds:
            break
    producer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--sample-s", type=float, default=30)
    parser.add_argument("--warmup-events", type=int, default=0,
                        help="send this many events first, as fast as possible, and start measuring once they are "
                             "processed (a population with history, as in steady state)")
    parser.add_argument("--trainer-process", action="store_true",
                        help="the production layout: the worker scores only, `streamproc trainer` learns alone")
    args = parser.parse_args()
    settings, env, tag = isolated_run("soak", 14, 6197)
    r = redis.Redis.from_url(settings.redis_url)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    # worker.log (and trainer.log) in .local/bench-soak-<tag>/
    procs = start_pipeline(env, ROOT / ".local" / f"bench-soak-{tag}",
                           settings.web_port + 100 if args.trainer_process else None, cwd=ROOT)
    worker = procs[0]
    stop = threading.Event()
    sent = [0]
    rows: list[dict[str, float | None]] = []

    def check_alive() -> None:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a pipeline process exited: see its log in .local/bench-soak-*/")

    try:
        while not scrape(settings.web_port):
            check_alive()
            time.sleep(0.2)
        time.sleep(3)
        warm = threading.Event()
        producer = threading.Thread(target=offer, args=(settings, args.customers, args.rate, args.minutes * 60, stop,
                                                        sent, args.warmup_events, warm), daemon=True)
        producer.start()
        while not warm.wait(10):
            check_alive()
            print(f"warming up: {sent[0]:,} sent, {processed_total(scrape(settings.web_port)):,.0f} processed",
                  flush=True)
        warmed = sent[0]
        started = time.monotonic()
        before = scrape(settings.web_port)
        while producer.is_alive():
            time.sleep(args.sample_s)
            now = scrape(settings.web_port)
            info = r.info("memory")
            rows.append({
                "minute": round((time.monotonic() - started) / 60, 2),
                "offered": sent[0], "processed": processed_total(now),
                "worker_rss_mb": round(rss_mb(worker.pid), 1),
                "redis_used_mb": round(info["used_memory"] / 2**20, 1),
                "redis_keys": r.dbsize(),
                # the scoring checkpoint's size: the worker holds one loaded copy (two during a reload)
                "checkpoint_kb": round(r.strlen(f"sp:{{model}}:v:{int(r.get('sp:{model}:current') or 0)}") / 1024, 1),
                "lag": sum(v for k, v in now.items() if k.startswith("streamproc_consumer_lag_records")),
                "p99_ms": None if (p := window_p99(now, before)) is None else round(p * 1000, 1),
                # a steady soak dead-letters nothing: anything here means its events stopped counting
                "dead_lettered": sum(v for k, v in now.items() if k.startswith("streamproc_dlq_records_total")),
            })
            print(json.dumps(rows[-1]), flush=True)
            before = now
        with open(results / f"soak-{tag}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        first = [x for x in rows if x["minute"] <= 1.0] or rows[:1]
        last = [x for x in rows if x["minute"] >= rows[-1]["minute"] - 1.0]

        def mean(xs: list[dict[str, float | None]], k: str) -> float | None:
            vals = [float(x[k]) for x in xs if x[k] is not None]  # type: ignore[arg-type]
            return round(sum(vals) / len(vals), 1) if vals else None

        summary = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "machine": machine(),
            "minutes": args.minutes, "offered_rate": args.rate, "customers": args.customers,
            "warmup_events": warmed, "events": sent[0] - warmed,
            "trainer_process": args.trainer_process,
            **{f"{k}_start": mean(first, k) for k in ("worker_rss_mb", "redis_used_mb", "lag", "p99_ms")},
            **{f"{k}_end": mean(last, k) for k in ("worker_rss_mb", "redis_used_mb", "lag", "p99_ms")},
            "worker_rss_mb_max": max(float(x["worker_rss_mb"] or 0) for x in rows),
            "lag_max": max(float(x["lag"] or 0) for x in rows),
            "redis_keys_end": rows[-1]["redis_keys"],
        }
        print(json.dumps(summary, indent=2))
        (results / f"soak-{tag}.json").write_text(json.dumps(summary, indent=2))
    finally:
        stop.set()
        stop_pipeline(procs)
        r.flushdb()
        delete_run_topics(settings)


if __name__ == "__main__":
    main()
