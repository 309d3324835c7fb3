"""``make demo``: local Kafka and Redis, topics, one worker, simulated traffic, and what came out."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from streamproc.adapters.redis_clients import sync_redis
from streamproc.adapters.redis_store import RedisFeatureStore
from streamproc.pipeline.lookup import locate
from streamproc.settings import Settings
from streamproc.tools.alerts import format_alert
from streamproc.tools.infra import Infra
from streamproc.tools.producer import EventProducer, paced
from streamproc.tools.simulate import SimulationConfig, Simulator, write_truth
from streamproc.tools.tail import read_topic
from streamproc.tools.treatment import measure_uplift, uplift_lines
from streamproc.topics import ALERTS_TOPIC, apply_topics, delete_topics, load_specs

DEMO_REDIS_DB = 1
DEMO_UPLIFT_REDIS_DB = 2  # the retention loop's ledger (emptied on every demo)


def scrape(port: int) -> dict[str, float]:
    """Sum of each metric family's samples from a worker's /metrics endpoint (by name and labels)."""
    return scrape_url(f"http://127.0.0.1:{port}/metrics")


def scrape_url(url: str) -> dict[str, float]:
    """``scrape`` for any /metrics URL ({} when it does not answer)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode()
    except (OSError, http.client.HTTPException):
        # HTTPException: polling a port nobody listens on yet can connect the socket to itself (TCP self-connect,
        # the source port picked equal to the port asked), and the "response" is the request
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        try:
            out[name_labels] = float(value)
        except ValueError:
            continue
    return out


def metric_total(metrics: dict[str, float], prefix: str) -> float:
    """Sum of the scraped samples whose name (and labels) start with ``prefix``."""
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def processed_total(metrics: dict[str, float]) -> float:
    return metric_total(metrics, "streamproc_events_processed_total")


def start_pipeline(env: dict[str, str], log_dir: Path, trainer_port: int | None = None,
                   cwd: Path | None = None) -> list[subprocess.Popen[bytes]]:
    """Start `streamproc worker` (log ``worker.log``); with ``trainer_port``, the production layout: a scoring
    worker and `streamproc trainer` in its own process (``trainer.log``, metrics on that port)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    layout = [("worker", env)]
    if trainer_port is not None:
        layout = [("worker", {**env, "STREAMPROC_TRAINER_ENABLED": "false"}),
                  ("trainer", {**env, "STREAMPROC_TRAINER_METRICS_PORT": str(trainer_port)})]
    procs = []
    for command, command_env in layout:
        with open(log_dir / f"{command}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "streamproc.cli", command], env=command_env,
                                          stdout=log, stderr=subprocess.STDOUT, cwd=cwd))
    return procs


def stop_pipeline(procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_demo(settings: Settings, customers: int, days: int, rate: float, effect: bool = True) -> int:
    print("== 1/5 local infrastructure (real Kafka broker + Redis on loopback)")
    for status in Infra(settings).up():
        print("   " + status.line())
    # the demo has its own topics (prefix "demo.") and Redis db, made fresh on every run
    base_url = settings.redis_url.rsplit("/", 1)[0]
    settings = settings.model_copy(update={
        "topic_prefix": "demo.", "redis_url": f"{base_url}/{DEMO_REDIS_DB}",
        "app_id": f"streamproc-demo-{int(time.time())}",
    })
    print("== 2/5 topics from streamproc/contracts/topics.toml (demo.* topics, recreated)")
    delete_topics(settings, list(load_specs()))
    _flush_redis(settings)
    report = apply_topics(settings)
    print(f"   created {len(report.created)}, unchanged {len(report.unchanged)}")
    if not report.ok:
        print("   " + "\n   ".join(report.mismatched))
        return 2

    run_dir = Path(settings.state_dir) / "demo"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "STREAMPROC_APP_ID": settings.app_id, "STREAMPROC_TOPIC_PREFIX": settings.topic_prefix,
           "STREAMPROC_REDIS_URL": settings.redis_url}
    print("== 3/5 worker (streamproc worker) and trainer (streamproc trainer), logs in .local/demo/")
    trainer_port = settings.web_port + 1
    # the production layout: a scoring worker, and the global trainer in its own process (its own core)
    procs = start_pipeline(env, run_dir, trainer_port)
    try:
        cfg = SimulationConfig(customers=customers, days=days, seed=int(time.time()) % 1000,
                               bad_fraction=0.002, duplicate_fraction=0.01)
        sim = Simulator(cfg)
        print(f"== 4/5 simulated traffic: {customers} customers over {days} days of event time")
        sent, got, transactions = _send_traffic(settings, sim, rate, run_dir)
        print("== 5/5 what came out")
        _report(settings, env, sim, run_dir, trainer_port)
    finally:
        stop_pipeline(procs)
    _uplift(settings, transactions, run_dir, effect)
    return 0 if got >= sent else 1


def _uplift(settings: Settings, transactions: list[dict[str, Any]], run_dir: Path, effect: bool) -> None:
    """The retention loop on the demo's alerts: a simulated team contacts the customers outside the control group,
    contact brings some back by a known lift per action, and `streamproc retention` measures the uplift."""
    print("   --- the retention loop (simulated team, streamproc retention, streamproc interventions report)")
    alerts = read_topic(settings, ALERTS_TOPIC, 10**7, 3.0)
    if not any(a.get("record") == "alert" for a in alerts):
        print("     no alert was sent: nothing to measure")
        return
    run = measure_uplift(settings, alerts, transactions, effect=effect, seed=7, redis_db=DEMO_UPLIFT_REDIS_DB,
                         log_dir=run_dir)
    for line in uplift_lines(run["table"], run["outcomes"], settings.outcome_days, run["true_lift"]):
        print("   " + line)


def _send_traffic(settings: Settings, sim: Simulator, rate: float,
                  run_dir: Path) -> tuple[int, float, list[dict[str, Any]]]:
    """Send the simulated events at ``rate`` a second (0: as fast as possible), showing progress, and wait for the
    worker to process them; returns (sent, processed, the valid transactions sent)."""
    producer = EventProducer(settings)
    sent = 0
    done = threading.Event()

    def progress() -> None:
        while not done.wait(1.0):
            got = processed_total(scrape(settings.web_port))
            sys.stdout.write(f"\r   sent {sent:>9,}   processed {int(got):>9,}")
            sys.stdout.flush()

    ticker = threading.Thread(target=progress, daemon=True)
    ticker.start()
    started = time.monotonic()
    transactions = []
    for topic, key, payload in paced(sim.payloads(), rate):
        producer.send(topic, key, payload)
        sent += 1
        if topic == "transactions":
            try:
                transactions.append(orjson.loads(payload))
            except orjson.JSONDecodeError:
                pass  # a corrupted record the simulator mixed in
    producer.close()
    write_truth(sim, run_dir / "truth")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and processed_total(scrape(settings.web_port)) < sent:
        time.sleep(0.5)
    done.set()
    ticker.join()
    got = processed_total(scrape(settings.web_port))
    elapsed = time.monotonic() - started
    print(f"\r   sent {sent:,}   processed {int(got):,}   in {elapsed:.1f}s ({got / elapsed:,.0f} events/s)")
    return sent, got, [t for t in transactions if isinstance(t, dict) and isinstance(t.get("ts"), int)]


def _report(settings: Settings, env: dict[str, str], sim: Simulator, run_dir: Path, trainer_port: int) -> None:
    """What came out, through the commands a user would run."""
    # the trainer learns the last examples and checkpoints them, then the worker reloads the checkpoint
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        produced = metric_total(scrape(settings.web_port), "streamproc_training_examples_total")
        learned = metric_total(scrape(trainer_port), "streamproc_examples_learned_total")
        if learned >= produced:
            break
        time.sleep(1.0)
    time.sleep(settings.checkpoint_interval_s + settings.model_reload_s + 1)
    metrics = scrape(settings.web_port)
    for name in sorted(metrics):
        if name.startswith(("streamproc_events_processed_total", "streamproc_dlq_records_total",
                            "streamproc_churn_alerts_total", "streamproc_segment_customers{",
                            "streamproc_recommendations_total", "streamproc_recommendation_quality",
                            "streamproc_customers{")):
            print(f"   {name} = {metrics[name]:.4g}")
    print("   --- models (streamproc models)")
    subprocess.run([sys.executable, "-m", "streamproc.cli", "models"], env=env)
    print("   --- churn alerts (streamproc alerts tail), first 5")
    for alert in read_topic(settings, ALERTS_TOPIC, 5, 2.0):
        print("   " + format_alert(alert))
    print("   --- recommendations (streamproc tail recommendations), first 3")
    for rec in read_topic(settings, "recommendations", 3, 2.0):
        items = ", ".join(f"{i['product_id']} ({i['reason']}, {i['score']})" for i in rec["items"][:4])
        print(f"     {rec['customer_id']} after {rec['trigger']}: {items}, ...")
    print("   --- three customers (streamproc customer show ID)")
    _show_customers(settings, RedisFeatureStore, [t.customer_id for t in sim.truth()[:3]])
    print("   --- dead-letter topic (streamproc tail dlq), first 3")
    for rec in read_topic(settings, "streamproc-dlq", 3, 2.0):
        print(f"     {rec['dlq_id']}  {rec['reason']}: {rec['detail'][:90]}")
    print("   --- against the simulator's ground truth (streamproc evaluate)")
    subprocess.run([sys.executable, "-m", "streamproc.cli", "evaluate", "--run", str(run_dir / "truth")], env=env)
    print("   --- the retention team's report (streamproc report)")
    subprocess.run([sys.executable, "-m", "streamproc.cli", "report", "--out", str(run_dir / "report.html"),
                    "--metrics", f"http://127.0.0.1:{settings.web_port}/metrics"], env=env)
    print("\nThe demo's data stays in Redis db 1 and the demo.* topics, e.g.:\n"
          "  STREAMPROC_REDIS_URL=redis://127.0.0.1:16379/1 streamproc customer show c0000001\n"
          "  STREAMPROC_TOPIC_PREFIX=demo. streamproc alerts tail\n"
          "The retention team's pages on it (then open http://127.0.0.1:6080/ui/):\n"
          "  STREAMPROC_REDIS_URL=redis://127.0.0.1:16379/1 STREAMPROC_TOPIC_PREFIX=demo. streamproc ui")


def _show_customers(settings: Settings, store_cls: Any, ids: list[str]) -> None:
    import asyncio

    keys = ("lifecycle_stage", "value_tier", "frequency", "monetary_total", "recency_days", "sessions",
            "conversion_rate", "clv", "top_categories")

    async def show() -> None:
        store = store_cls.from_url(settings.redis_url)
        try:
            for cid in ids:
                where = await locate(store, settings, cid)
                found = await store.features(where) or {}
                model = await store.model_outputs(where) or {}
                brief = {k: found.get(k) for k in keys}
                print(f"   {cid}: {json.dumps(brief)} segment={model.get('segment')} churn_p={model.get('churn_p')}")
        finally:
            await store.close()

    asyncio.run(show())


def _flush_redis(settings: Settings) -> None:

    client = sync_redis(settings.redis_url)
    try:
        client.flushdb()
    finally:
        client.close()
