"""Fixtures: the real Kafka broker and Redis (started through streamproc.tools.infra), isolated per test by a
unique topic prefix, consumer group and Redis database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import orjson
import pytest

from streamproc.adapters.redis_clients import sync_redis
from streamproc.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
_redis_dbs = iter(range(2, 14))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def infra(base_settings: Settings) -> Iterator[Settings]:
    """Start (or reuse) the local broker and Redis once per session."""
    from streamproc.tools.infra import Infra

    Infra(base_settings).up()
    yield base_settings


def _kept_up(local: Any) -> Iterator:
    """A local cluster, started once; a node a test killed is started again at the end."""
    local.up()
    yield local
    local.up()


@pytest.fixture(scope="session")
def redis_cluster(infra: Settings) -> Iterator:
    """The local Redis Cluster (3 masters, 3 replicas)."""
    from streamproc.tools.infra import Infra

    yield from _kept_up(Infra(infra).redis_cluster)


@pytest.fixture(scope="session")
def kafka_cluster(infra: Settings) -> Iterator:
    """The local 3-broker Kafka cluster."""
    from streamproc.tools.infra import Infra

    yield from _kept_up(Infra(infra).kafka_cluster)


def on_redis_cluster(settings: Settings, cluster: object) -> Settings:
    """``settings`` with their state in the Redis Cluster, emptied first (a cluster has one database)."""
    import redis

    url = cluster.url  # type: ignore[attr-defined]
    client = sync_redis(url)
    try:
        client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    finally:
        client.close()
    return settings.model_copy(update={"redis_url": url})


def isolated(infra: Settings, state_dir: Path) -> Settings:
    """Settings of an isolated environment: own topics, consumer group, Redis db and web port."""

    global _redis_dbs
    try:
        db = next(_redis_dbs)
    except StopIteration:
        _redis_dbs = iter(range(2, 14))
        db = next(_redis_dbs)
    base_url = infra.redis_url.rsplit("/", 1)[0]
    tag = uuid.uuid4().hex[:8]
    s = infra.model_copy(update={
        "topic_prefix": f"t{tag}.",
        "app_id": f"streamproc-test-{tag}",
        "redis_url": f"{base_url}/{db}",
        "web_port": free_port(),
        "state_dir": state_dir / tag,
    })
    client = sync_redis(s.redis_url)
    client.flushdb()
    client.close()
    return s


@pytest.fixture
def settings(infra: Settings, tmp_path: Path) -> Settings:
    return isolated(infra, tmp_path)


@pytest.fixture
def env_factory(infra: Settings, tmp_path: Path):
    """More isolated environments in one test, topics applied."""
    from streamproc.topics import apply_topics, delete_run_topics

    made: list[Settings] = []

    def make() -> Settings:
        s = isolated(infra, tmp_path)
        report = apply_topics(s)
        assert report.ok, report.mismatched
        made.append(s)
        return s

    yield make
    for s in made:
        delete_run_topics(s)


# Left out, in the model outputs `m`: what depends on when a checkpoint was written (the model version a customer was
# scored with, the probability, the probabilities of pending snapshots) and what reads the customer's state as it is
# when a step runs rather than as of an event-time instant, so that it depends on how far the other input topic had
# been read (the segment, re-assigned from session habits and category views so far, with the census key that holds
# it, and the last recommendation's items, ranked with the top categories so far). The alert state (armed, last
# alert) and the instants scored are compared. Write counts (_v) are left out too; checkpoints are not compared.
MODEL_DEPENDENT_KEYS = ("sp:{model}:",)


def model_outputs(raw: bytes) -> dict[str, object]:
    """A customer's model outputs without the parts that depend on checkpoint timing or on input interleaving."""
    outputs = orjson.loads(raw)
    for name in ("model_version", "churn_p", "segment"):
        outputs.pop(name, None)
    if outputs.get("rec"):
        outputs["rec"] = {k: v for k, v in outputs["rec"].items() if k != "items"}  # which trigger, not the items
    outputs["scored"] = sorted(outputs.get("scored", {}))  # the instants scored, not the scores
    return outputs


def redis_snapshot(settings: Settings) -> dict[str, object]:
    """Everything streamproc keeps in a Redis db that must be identical across replays."""

    r = sync_redis(settings.redis_url)
    out: dict[str, object] = {}
    try:
        for key in sorted(r.scan_iter(count=1000)):
            kind = r.type(key)
            name = key.decode()
            if name.startswith(MODEL_DEPENDENT_KEYS):
                continue
            if name.startswith("sp:{p") and name.endswith(":census"):
                # customers by stage|tier (the segment part is left out, above)
                census = out.setdefault("census by stage and tier", {})
                assert isinstance(census, dict)
                for k, v in r.hgetall(key).items():
                    stage_tier = k.decode().rsplit("|", 1)[0]
                    census[stage_tier] = census.get(stage_tier, 0) + int(v)
                    if not census[stage_tier]:
                        del census[stage_tier]
                continue
            if kind == b"hash":
                row = r.hgetall(key)
                row.pop(b"_v", None)
                row.pop(b"k", None)  # the census key, with the segment
                if b"m" in row:
                    row[b"m"] = model_outputs(row[b"m"])
                out[name] = row
            elif kind == b"zset":
                out[name] = r.zrange(key, 0, -1, withscores=True)
            elif kind == b"set":
                out[name] = sorted(r.smembers(key))
            elif kind == b"string" and name.startswith(("sp:agg:", "sp:cohort:")):
                out[name] = r.pfcount(key)
            else:
                out[name] = r.dump(key)
    finally:
        r.close()
    return out


def wait_delivered(settings: Settings, timeout: float = 60.0) -> None:
    """Wait until the broker has confirmed every output a worker saved: a save parks its outputs in the outbox
    (``sp:{p<p>}:outbox``) and the worker clears them once the broker acknowledged them. Reading an output topic
    before then can miss the newest."""

    r = sync_redis(settings.redis_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            parked = sum(r.hlen(key) for key in r.scan_iter("sp:{p*}:outbox", count=1000))
            if not parked:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{parked} outputs still parked after {timeout}s")
            time.sleep(0.2)
    finally:
        r.close()


@pytest.fixture
def topics(settings: Settings) -> Iterator[Settings]:
    from streamproc.topics import apply_topics, delete_run_topics

    report = apply_topics(settings, partitions_override=None)
    assert report.ok, report.mismatched
    yield settings
    delete_run_topics(settings)  # the local broker would otherwise keep every test's partitions


def seed_checkpoint(settings: Settings, payloads: list[tuple[str, bytes, bytes]]) -> int:
    """Train a model on ``payloads`` in-process and make it the current checkpoint of ``settings``' Redis.
    With STREAMPROC_TRAINER_ENABLED=false the workers then score with this frozen model, so their alerts and
    recommendations are a function of the events alone (and runs can be compared output for output)."""
    import asyncio

    from streamproc.adapters.checkpoint_signing import signing_key
    from streamproc.adapters.model_store import RedisModelStore
    from streamproc.adapters.redis_store import RedisFeatureStore
    from streamproc.training.offline import run_offline

    async def run() -> int:
        bundle, _, _ = await run_offline(payloads, settings)
        store = RedisFeatureStore.from_url(settings.redis_url)
        try:
            return await RedisModelStore(store.redis, signing_key(settings)).save(bundle, keep=2)
        finally:
            await store.close()

    return asyncio.run(run())


FROZEN_MODEL_ENV = {"STREAMPROC_TRAINER_ENABLED": "false"}


def produce(settings: Settings, records: list[tuple[str, bytes, bytes]]) -> None:
    """Send (topic, key, value) records to the declared topics and wait until the broker has them."""
    from streamproc.tools.producer import EventProducer

    producer = EventProducer(settings)
    for topic, key, value in records:
        producer.send(topic, key, value)
    producer.close()


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPROC_")}
    env.update({
        "STREAMPROC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "STREAMPROC_REDIS_URL": settings.redis_url,
        "STREAMPROC_TOPIC_PREFIX": settings.topic_prefix,
        "STREAMPROC_APP_ID": settings.app_id,
        "STREAMPROC_WEB_PORT": str(settings.web_port),
        "STREAMPROC_STATE_DIR": str(settings.state_dir),
        "STREAMPROC_LOG_LEVEL": "INFO",
        "STREAMPROC_KAFKA_SESSION_TIMEOUT_S": "6",
        "STREAMPROC_KAFKA_HEARTBEAT_INTERVAL_S": "1",
        "STREAMPROC_CHECKPOINT_INTERVAL_S": "1",
        "STREAMPROC_MODEL_RELOAD_S": "1",
    })
    return env


class WorkerProcess:
    """A real `streamproc worker` subprocess (or, with ``command="trainer"``, a `streamproc trainer`, whose
    metrics are served on ``web_port`` too)."""

    def __init__(self, settings: Settings, log_path: Path, command: str = "worker") -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.command = command
        self.extra_env: dict[str, str] = {}
        if command == "trainer":
            self.extra_env["STREAMPROC_TRAINER_METRICS_PORT"] = str(settings.web_port)

    def start(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamproc.cli", self.command],
                env={**worker_env(self.settings), **self.extra_env},
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )
        return self

    def metrics(self) -> dict[str, float]:
        from streamproc.tools.demo import scrape

        return scrape(self.settings.web_port)

    def wait_processed(self, count: int, timeout: float = 60.0) -> dict[str, float]:
        from streamproc.tools.demo import processed_total

        deadline = time.monotonic() + timeout
        last: dict[str, float] = {}
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            last = self.metrics()
            if processed_total(last) >= count:
                return last
            time.sleep(0.2)
        # what the worker said, to tell a worker that consumed nothing from one whose endpoint did not answer
        consumed = {k: v for k, v in last.items() if k.startswith(("streamproc_events_consumed_total",
                                                                   "streamproc_consumer_lag{"))}
        raise AssertionError(f"processed {processed_total(last)} of {count} in {timeout}s (metrics endpoint "
                             f"{'answered' if last else 'did not answer'}; consumed and lag: {consumed})\n"
                             f"{self.log_tail()}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            if self.metrics():
                return
            time.sleep(0.2)
        raise AssertionError("worker web endpoint never came up\n" + self.log_tail())

    def stop(self, sig: int = 15, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@pytest.fixture
def worker_factory(topics: Settings, tmp_path: Path) -> Iterator:
    started: list[WorkerProcess] = []

    def make(settings: Settings | None = None, name: str = "worker") -> WorkerProcess:
        w = WorkerProcess(settings or topics, tmp_path / f"{name}-{len(started)}.log")
        started.append(w)
        return w

    yield make
    for w in started:
        w.stop(9)
