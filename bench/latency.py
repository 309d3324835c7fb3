"""Latency benchmark: offer a fixed event rate to one worker and report end-to-end latency.

Latency is measured by the worker itself, per input record, from the record's broker timestamp
(produce time, set by the producer) to the moment its customer's features were written to Redis
(`streamproc_end_to_end_latency_seconds`), read from /metrics after the run. Quantiles are interpolated
within histogram buckets.

Usage: python bench/latency.py [--rate 5000] [--seconds 60] [--customers 100000]. Not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import isolated_run, machine  # noqa: E402

from streamproc.tools.demo import processed_total, scrape  # noqa: E402
from streamproc.tools.producer import EventProducer  # noqa: E402
from streamproc.tools.simulate import SimulationConfig, Simulator  # noqa: E402
from streamproc.topics import delete_run_topics  # noqa: E402

METRIC = "streamproc_end_to_end_latency_seconds"


def quantiles(metrics: dict[str, float], qs: tuple[float, ...]) -> dict[str, float]:
    buckets = []
    for key, value in metrics.items():
        if key.startswith(METRIC + "_bucket"):
            le = key.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value))
    buckets.sort()
    total = buckets[-1][1]
    out = {}
    for q in qs:
        target = q * total
        prev_le, prev_count = 0.0, 0.0
        for le, count in buckets:
            if count >= target:
                if le == float("inf"):
                    out[f"p{int(q * 100)}"] = prev_le
                else:
                    frac = (target - prev_count) / (count - prev_count) if count > prev_count else 0.0
                    out[f"p{int(q * 100)}"] = prev_le + frac * (le - prev_le)
                break
            prev_le, prev_count = le, count
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--customers", type=int, default=100_000)
    args = parser.parse_args()
    settings, env, tag = isolated_run("lat", 14, 6198)
    r = redis.Redis.from_url(settings.redis_url)
    log = ROOT / ".local" / f"bench-latency-{tag}.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "streamproc.cli", "worker"], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        while not scrape(settings.web_port):
            time.sleep(0.2)
        time.sleep(3)  # group join
        producer = EventProducer(settings, linger_ms=2)
        sim = Simulator(SimulationConfig(customers=args.customers, days=365, seed=11))
        started = time.monotonic()
        sent = 0
        for topic, key, payload in sim.payloads():
            producer.send(topic, key, payload)
            sent += 1
            ahead = sent / args.rate - (time.monotonic() - started)
            if ahead > 0.002:
                time.sleep(ahead)
            if time.monotonic() - started >= args.seconds:
                break
        producer.close()
        achieved = sent / (time.monotonic() - started)
        deadline = time.monotonic() + 120
        while processed_total(scrape(settings.web_port)) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
        metrics = scrape(settings.web_port)
        result = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "machine": machine(),
            "offered_events_per_s": args.rate, "achieved_events_per_s": round(achieved),
            "events": sent, "processed": int(processed_total(metrics)),
            **{k: round(v * 1000, 1) for k, v in quantiles(metrics, (0.5, 0.95, 0.99)).items()},
            "unit": "ms",
        }
        print(json.dumps(result, indent=2))
        (ROOT / "bench" / "results").mkdir(exist_ok=True)
        (ROOT / "bench" / "results" / f"latency-{tag}.json").write_text(json.dumps(result, indent=2))
    finally:
        worker.terminate()
        worker.wait(30)
        r.flushdb()
        delete_run_topics(settings)


if __name__ == "__main__":
    main()
