"""streamproc on a Redis Cluster (3 masters with a replica each, started by `streamproc infra up --redis-cluster`):
every customer ends as one uninterrupted worker on one Redis leaves them, through kill -9 of the worker and through
a master's death and its replica's promotion; lookups, erasure and the population figures work on it."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import redis

from streamproc.adapters.feature_rows import partition_key
from streamproc.adapters.redis_clients import sync_redis
from streamproc.partitioning import home_partition
from streamproc.tools.demo import processed_total
from streamproc.tools.infra import Infra
from tests.conftest import redis_snapshot, worker_env
from tests.integration.test_exactly_once import (
    SPREAD_SWEEP,
    against_baseline,
    frozen,
    output_ids,
    sim_payloads,
    wait_equal,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture(scope="module")
def cluster(infra):
    local = Infra(infra).redis_cluster
    local.up()
    yield local
    local.up()  # a node a test killed comes back (as a replica of its promoted one)


@pytest.fixture
def second_on_cluster(env_factory, cluster):
    """``env_factory`` whose second environment keeps its state in the (emptied) Redis Cluster."""
    made = []

    def make():
        env = env_factory()
        made.append(env)
        if len(made) != 2:
            return env
        client = sync_redis(cluster.url)
        try:
            client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
        finally:
            client.close()
        return env.model_copy(update={"redis_url": cluster.url})

    make.made = made  # type: ignore[attr-defined]
    return make


def customers_per_master(url):
    client = sync_redis(url)
    try:
        return {node.port: sum(1 for _ in client.scan_iter("cust:*", count=1000, target_nodes=node))
                for node in client.get_primaries()}
    finally:
        client.close()


def cli(settings, *args):
    out = subprocess.run([sys.executable, "-m", "streamproc.cli", *args], env=worker_env(settings),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_kill_9_on_a_cluster_leaves_every_customer_as_one_uninterrupted_worker_on_one_redis(
        second_on_cluster, worker_factory):
    payloads = sim_payloads(customers=200, days=90, seed=21, duplicate_fraction=0.01)
    clustered, expected, expected_ids = against_baseline(second_on_cluster, worker_factory, payloads)
    assert clustered.redis_url.startswith("redis+cluster://")

    rnd = random.Random(7)
    for _ in range(3):
        worker = frozen(worker_factory(clustered), **SPREAD_SWEEP).start()
        worker.wait_ready()
        target = rnd.randint(300, 2500)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and processed_total(worker.metrics()) < target:
            time.sleep(rnd.uniform(0.0, 0.05))
        worker.stop(signal.SIGKILL)
    frozen(worker_factory(clustered), **SPREAD_SWEEP).start()
    wait_equal(clustered, expected)  # per key: each customer, each partition's census, outbox, indexes; the HLLs
    assert output_ids(clustered) == expected_ids
    # the partitions' keys spread over the three masters
    spread = customers_per_master(clustered.redis_url)
    assert len(spread) == 3 and min(spread.values()) > 0, spread

    # a lookup by id goes to the customer's partition on its shard, and erasure leaves no trace anywhere
    victim = payloads[0][1].decode()
    shown = json.loads(cli(clustered, "customer", "show", victim, "--json"))
    assert shown["stored_features"]["customer_id"] == victim
    assert shown == json.loads(cli(second_on_cluster.made[0], "customer", "show", victim, "--json"))
    cli(clustered, "customer", "forget", victim)
    snapshot = redis_snapshot(clustered)
    assert not [k for k, v in snapshot.items() if victim.encode() in (k.encode() + repr(v).encode())]
    client = sync_redis(clustered.redis_url)
    try:
        assert client.scard(partition_key(home_partition(victim, 4), "erased")) == 1
    finally:
        client.close()
