"""Throughput benchmark: one worker draining a pre-filled topic, against the raw consumer ceiling.

1. fills fresh `clicks`/`transactions` topics with N simulated events (not timed against the worker);
2. ceiling: a raw aiokafka consumer doing `getmany` + JSON decode over the same records;
3. starts one `streamproc worker` and measures from its first processed event to the last;
4. reports events/s for both, their ratio, the worker's peak RSS and Redis memory per customer.

Usage: python bench/throughput.py [--events 200000] [--customers 20000] [--workers 2]
[--peer naive|quix|quix-eos|bytewax] [--trainer-process] [--intake-floor] [--waits].
``--workers 2`` runs two workers in one group (scaling); ``--peer`` measures a peer on the same records: the naive
Faust agent of ``bench/naive_agent.py`` (one awaited Redis round trip per event), or the features-only job of
``bench/peers/`` in Quix Streams (at least once, or exactly once) or Bytewax (``make bench-peers`` installs them);
``--intake-floor`` a worker whose batch step only counts (``bench/intake_floor.py``), the cost of the runtime
itself. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine  # noqa: E402

from streamproc.settings import Settings  # noqa: E402
from streamproc.tools.demo import processed_total, scrape  # noqa: E402
from streamproc.tools.infra import Infra  # noqa: E402
from streamproc.tools.producer import EventProducer  # noqa: E402
from streamproc.tools.simulate import SimulationConfig, Simulator  # noqa: E402
from streamproc.topics import INPUT_TOPICS, apply_topics, delete_run_topics  # noqa: E402


def fill(settings: Settings, events: int, customers: int) -> int:
    sim = Simulator(SimulationConfig(customers=customers, days=180, seed=42))
    producer = EventProducer(settings)
    sent = 0
    for topic, key, payload in sim.payloads():
        producer.send(topic, key, payload)
        sent += 1
        if sent >= events:
            break
    producer.close()
    return sent


async def ceiling(settings: Settings, expected: int) -> float:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        *(settings.topic(t) for t in INPUT_TOPICS), bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"bench-ceiling-{uuid.uuid4().hex[:6]}", auto_offset_reset="earliest", enable_auto_commit=False,
    )
    await consumer.start()
    got = 0
    started = None
    try:
        while got < expected:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for records in batch.values():
                if started is None:
                    started = time.perf_counter()
                for rec in records:
                    orjson.loads(rec.value)
                    got += 1
    finally:
        await consumer.stop()
    return got / (time.perf_counter() - (started or time.perf_counter()))


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (all its threads) so far; 0 if it is gone or unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def idle_cpu_seconds() -> float:
    """CPU seconds the whole machine spent idle (all cores) since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / os.sysconf("SC_CLK_TCK")  # idle, iowait


def steady_rate(progress: list[tuple[float, float]], expected: int, low: float = 0.25,
                high: float = 0.9) -> float | None:
    """Events/s over the middle of a run, from the sample where ``low`` of the events were processed to the one
    where ``high`` were: without the start (with two workers, the group's rebalance when the second one joins,
    a pause of seconds that a long-running group pays once) and the end (one worker done before the other).
    None when a run is too short for two samples between them."""
    start = next((t, n) for t, n in progress if n >= low * expected)
    end = next((t, n) for t, n in progress if n >= high * expected)
    return (end[1] - start[1]) / (end[0] - start[0]) if end[0] > start[0] else None


# the peers a user would pick instead (bench/peers/), each in the virtualenv `make bench-peers` makes
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
PEERS = {
    "naive": ("naive Faust agent (bench/naive_agent.py)",
              [sys.executable, str(ROOT / "bench" / "naive_agent.py"), "worker", "-l", "warn"]),
    "quix": ("Quix Streams, at least once (bench/peers/quix_app.py)",
             [str(PEERS_PYTHON), str(ROOT / "bench" / "peers" / "quix_app.py")]),
    "quix-eos": ("Quix Streams, exactly once (bench/peers/quix_app.py --exactly-once)",
                 [str(PEERS_PYTHON), str(ROOT / "bench" / "peers" / "quix_app.py"), "--exactly-once"]),
    "bytewax": ("Bytewax (bench/peers/bytewax_app.py)",
                [str(PEERS_PYTHON), str(ROOT / "bench" / "peers" / "bytewax_app.py")]),
}


def run_worker(settings: Settings, expected: int, log: Path, workers: int = 1, peer: str | None = None,
               trainer_process: bool = False, intake_floor: bool = False, waits: Path | None = None) -> dict[str, Any]:
    """Start ``workers`` processes in one consumer group (streamproc, or a peer) and measure from the first
    processed event to the last, summed over the processes. With ``trainer_process``, the production layout:
    scoring-only workers and `streamproc trainer` in a process of its own."""
    command = (PEERS[peer][1] if peer
               else [sys.executable, str(ROOT / "bench" / "intake_floor.py")] if intake_floor
               else [sys.executable, str(ROOT / "bench" / "waits.py")] if waits is not None
               else [sys.executable, "-m", "streamproc.cli", "worker"])
    spy = None
    procs = []
    ports = [settings.web_port + i for i in range(workers)]
    for i, port in enumerate(ports):
        env = {**os.environ, "STREAMPROC_TOPIC_PREFIX": settings.topic_prefix, "STREAMPROC_APP_ID": settings.app_id,
               "STREAMPROC_REDIS_URL": settings.redis_url, "STREAMPROC_WEB_PORT": str(port),
               "STREAMPROC_LOG_LEVEL": "WARNING", "STREAMPROC_STATE_DIR": str(ROOT / ".local" / f"bench-w{i}")}
        if trainer_process:
            env["STREAMPROC_TRAINER_ENABLED"] = "false"
        if waits is not None:
            env["BENCH_WAITS"] = str(waits.with_suffix(f".{i}.json"))
        with open(log.with_suffix(f".{i}.log"), "wb") as out:
            procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))
    helpers: list[subprocess.Popen[bytes]] = []
    if trainer_process:
        env = {**env, "STREAMPROC_STATE_DIR": str(ROOT / ".local" / "bench-trainer"),
               "STREAMPROC_TRAINER_METRICS_PORT": str(settings.web_port + 100)}
        with open(log.with_suffix(".trainer.log"), "wb") as out:
            helpers.append(subprocess.Popen([sys.executable, "-m", "streamproc.cli", "trainer"], env=env,
                                            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))
    infra = Infra(settings)
    # where the cores go while the worker runs: CPU seconds per process over the measured interval
    roles: dict[str, Callable[[], list[int | None]]] = {
        "redis": lambda: [infra.redis.owned_pid()], "kafka": lambda: [infra.kafka.owned_pid()],
        "workers": lambda: [p.pid for p in procs], "trainer": lambda: [p.pid for p in helpers],
    }
    cpu_at_first: dict[str, float] = {}
    progress: list[tuple[float, float]] = []  # (time, events processed by all workers)
    try:
        first_at = None
        first_count = 0.0
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            done = sum(processed_total(scrape(port)) for port in ports)
            now = time.perf_counter()
            progress.append((now, done))
            if first_at is None and done > 0:
                first_at, first_count = now, done
                cpu_at_first = {role: sum(map(cpu_seconds, pids())) for role, pids in roles.items()}
                cpu_at_first["idle"] = idle_cpu_seconds()
            # BENCH_PYSPY=FILE: profile the first worker for BENCH_PYSPY_SECONDS (10), starting BENCH_PYSPY_AFTER
            # seconds (0) after its first processed event, at most until the run ends; collapsed stacks for
            # bench/profile_summary.py
            # (BENCH_PYSPY_IDLE=1: idle stacks too, to see what it waits for)
            if (spy is None and first_at is not None and os.environ.get("BENCH_PYSPY")
                    and now - first_at >= float(os.environ.get("BENCH_PYSPY_AFTER", "0"))):
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(procs[0].pid), "-d",
                                        os.environ.get("BENCH_PYSPY_SECONDS", "10"), "-r", "100",
                                        "-f", "raw", "-o", os.environ["BENCH_PYSPY"],
                                        *(["--idle"] if os.environ.get("BENCH_PYSPY_IDLE") else [])],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if done >= expected:
                break
            if any(p.poll() is not None for p in procs + helpers):
                raise RuntimeError(f"a worker or the trainer died: see {log}")
            time.sleep(0.25)  # scraping /metrics costs the worker CPU
        else:
            raise RuntimeError("workers did not finish in time")
        assert first_at is not None
        rate = (done - first_count) / (now - first_at)
        cores = {role: round((sum(map(cpu_seconds, pids())) - cpu_at_first[role]) / (now - first_at), 2)
                 for role, pids in roles.items()}
        # cores the machine left idle; the rest (not in the roles above) went to this script's scraping, the
        # kernel's networking and anything else running
        cores["machine_idle"] = round((idle_cpu_seconds() - cpu_at_first["idle"]) / (now - first_at), 2)
        if spy is not None:
            if spy.poll() is None:  # asked for longer than the run: stopped like Ctrl-C, it writes what it has
                spy.send_signal(signal.SIGINT)
            spy.wait(30)
        measured: dict[str, Any] = {"events_per_s": rate, "steady_events_per_s": steady_rate(progress, expected),
                                    "rss_peak_mb": max(rss_peak_mb(p.pid) for p in procs), "cores_busy": cores}
        if waits is not None:
            time.sleep(2.5)  # bench/waits.py writes every 2 s
            measured["event_loop_waits"] = [json.loads(waits.with_suffix(f".{i}.json").read_text())
                                            for i in range(workers)]
        return measured
    finally:
        for p in procs + helpers:
            p.terminate()
        for p in procs + helpers:
            p.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1, help="worker processes in one group (scaling)")
    parser.add_argument("--peer", nargs="?", const="naive", choices=sorted(PEERS),
                        help="measure a peer instead of streamproc (default naive: bench/naive_agent.py)")
    parser.add_argument("--trainer-process", action="store_true",
                        help="the production layout: scoring-only worker(s), `streamproc trainer` learns alone")
    parser.add_argument("--waits", action="store_true",
                        help="run the worker(s) under bench/waits.py: where each event loop waits, by phase")
    parser.add_argument("--intake-floor", action="store_true",
                        help="a worker whose batch step only counts (bench/intake_floor.py): the runtime's cost")
    args = parser.parse_args()
    if args.waits and (args.peer or args.intake_floor):
        parser.error("--waits measures streamproc's own worker: not with --peer or --intake-floor")

    base = Settings()
    Infra(base).up()
    tag = uuid.uuid4().hex[:6]
    settings = base.model_copy(update={
        "topic_prefix": f"bench{tag}.", "app_id": f"bench-{tag}",
        "redis_url": base.redis_url.rsplit("/", 1)[0] + "/14", "web_port": 6199,
    })
    r = redis.Redis.from_url(settings.redis_url)
    r.flushdb()
    apply_topics(settings, partitions_override=args.partitions)
    t0 = time.perf_counter()
    sent = fill(settings, args.events, args.customers)
    produce_rate = sent / (time.perf_counter() - t0)
    ceiling_rate = asyncio.run(ceiling(settings, sent))
    mem_before = int(r.info("memory")["used_memory"])
    log = ROOT / ".local" / f"bench-worker-{tag}.log"
    log.parent.mkdir(exist_ok=True)
    worker = run_worker(settings, sent, log, args.workers, args.peer, args.trainer_process, args.intake_floor,
                        log.with_suffix(".waits") if args.waits else None)
    # the Quix and Bytewax peers keep their state in their own stores, not in Redis
    customers_stored = sum(1 for _ in r.scan_iter("naive:*" if args.peer == "naive" else "cust:*", count=1000))
    mem_after = int(r.info("memory")["used_memory"])
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
        "events": sent,
        "what": PEERS[args.peer][0] if args.peer
        else (f"intake floor (bench/intake_floor.py), {args.workers} worker(s)" if args.intake_floor
              else f"streamproc, {args.workers} worker(s)") + (" + trainer process" if args.trainer_process else ""),
        # STREAMPROC_MODELS_ENABLED=false: the feature path alone (the job the peers do)
        "models_enabled": None if args.peer
        else os.environ.get("STREAMPROC_MODELS_ENABLED", "true").lower() != "false",
        "customers_stored": customers_stored,
        "produce_events_per_s": round(produce_rate),
        "ceiling_events_per_s": round(ceiling_rate),
        "worker_events_per_s": round(worker["events_per_s"]),
        # from 25 % to 90 % of the events (None: too short a run)
        "steady_events_per_s": None if worker["steady_events_per_s"] is None else round(worker["steady_events_per_s"]),
        "worker_vs_ceiling": round(worker["events_per_s"] / ceiling_rate, 3),
        "worker_rss_peak_mb": round(worker["rss_peak_mb"], 1),
        "redis_bytes_per_customer": round((mem_after - mem_before) / max(customers_stored, 1)),
        # CPU seconds per second of the measured interval, per role (the workers summed): where the cores went
        "cores_busy": worker["cores_busy"],
        **({"event_loop_waits": worker["event_loop_waits"]} if args.waits else {}),
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"throughput-{tag}.json").write_text(json.dumps(result, indent=2))
    r.flushdb()
    delete_run_topics(settings)  # a 1,000,000-event run leaves ~1 GB on the local broker otherwise


if __name__ == "__main__":
    main()
