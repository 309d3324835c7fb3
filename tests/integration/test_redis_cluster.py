"""streamproc on a Redis Cluster (3 masters with a replica each, started by `streamproc infra up --redis-cluster`):
every customer ends as one uninterrupted worker on one Redis leaves them, through kill -9 of the worker and through
a master's death and its replica's promotion; lookups, erasure and the population figures work on it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from streamproc.adapters.feature_rows import partition_key
from streamproc.adapters.redis_clients import sync_redis
from streamproc.partitioning import home_partition
from streamproc.tools.demo import processed_total
from tests.conftest import on_redis_cluster, produce, redis_snapshot, worker_env
from tests.integration.test_exactly_once import (
    SPREAD_SWEEP,
    baseline_run,
    frozen,
    output_ids,
    sim_payloads,
    wait_equal,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.cluster]


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
        env_factory, worker_factory, redis_cluster):
    payloads = sim_payloads(customers=200, days=90, seed=21, duplicate_fraction=0.01)
    baseline, clustered = env_factory(), on_redis_cluster(env_factory(), redis_cluster)
    expected, expected_ids = baseline_run(baseline, clustered, worker_factory, payloads)
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
    # as in redis_snapshot: which recommendation was made, not its items (the basket rules learn in input order)
    assert without_rec_items(shown) == without_rec_items(json.loads(cli(baseline, "customer", "show", victim,
                                                                        "--json")))
    cli(clustered, "customer", "forget", victim)
    snapshot = redis_snapshot(clustered)
    assert not [k for k, v in snapshot.items() if victim.encode() in (k.encode() + repr(v).encode())]
    client = sync_redis(clustered.redis_url)
    try:
        assert client.scard(partition_key(home_partition(victim, 4), "erased")) == 1
    finally:
        client.close()


def without_rec_items(shown):
    rec = shown.get("last_recommendation") or {}
    return {**shown, "last_recommendation": {k: v for k, v in rec.items() if k != "items"}}


def failed_over(cluster, dead_port):
    """Every surviving node has marked the dead master as failed, and another node serves its slots."""
    for node in cluster.nodes:
        if node.port == dead_port:
            continue
        out = subprocess.run(["redis-cli", "-p", str(node.port), "cluster", "nodes"], capture_output=True, text=True)
        dead = [line.split() for line in out.stdout.splitlines() if f":{dead_port}@" in line]
        if not dead or "fail" not in dead[0][2] or len(dead[0]) > 8:  # fields 9+ are slot ranges
            return False
    return all(cluster.info(node.port).get("cluster_state") == "ok" for node in cluster.nodes if node.port != dead_port)


def replica_of(cluster, master_port):
    """The local cluster node that replicates the master on ``master_port``."""
    ask = ["redis-cli", "-p", str(master_port), "cluster"]
    master_id = subprocess.run([*ask, "myid"], capture_output=True, text=True).stdout.strip()
    nodes = subprocess.run([*ask, "nodes"], capture_output=True, text=True).stdout.splitlines()
    port = next(int(line.split()[1].split("@")[0].rsplit(":", 1)[1]) for line in nodes
                if f"slave {master_id}" in line)
    return next(node for node in cluster.nodes if node.port == port)


@pytest.mark.parametrize("wait_replicas", [1])
def test_a_master_killed_behind_its_stalled_replica_loses_nothing_when_saves_wait_for_it(
        env_factory, worker_factory, redis_cluster, wait_replicas):
    """The worst moment for a failover: the replica has fallen behind (stopped with SIGSTOP, its link cut) while the
    worker writes half the stream to its master, then the master dies (SIGKILL) and the stale replica is promoted.
    With ``STREAMPROC_REDIS_WAIT_REPLICAS=1`` the saves the replica never got were never acknowledged to Kafka
    (their WAIT fell short and the batches were retried), so after the failover they are read and applied again:
    every customer ends as one worker on one Redis leaves them. Run with ``wait_replicas`` 0, the same test fails:
    the saves the master acknowledged alone are lost with it, and so are their events."""
    payloads = sim_payloads(customers=200, days=90, seed=22)
    baseline, clustered = env_factory(), on_redis_cluster(env_factory(), redis_cluster)
    expected, expected_ids = baseline_run(baseline, clustered, worker_factory, payloads, fill=False)
    half = len(payloads) // 2
    produce(clustered, payloads[:half])
    worker = frozen(worker_factory(clustered), STREAMPROC_REDIS_WAIT_REPLICAS=str(wait_replicas),
                    STREAMPROC_REDIS_WAIT_TIMEOUT_MS="300").start()
    worker.wait_processed(half, timeout=120)

    client = sync_redis(clustered.redis_url)
    try:
        masters = {client.get_node_from_key(partition_key(p, "census")).port for p in range(4)}
    finally:
        client.close()
    victim = next(node for node in redis_cluster.nodes if node.port in masters)
    stalled = replica_of(redis_cluster, victim.port)
    victim_pid, stalled_pid = victim.owned_pid(), stalled.owned_pid()
    assert victim_pid is not None and stalled_pid is not None, "the test stops nodes streamproc started"
    os.kill(stalled_pid, signal.SIGSTOP)
    try:
        # and its link to the master is cut (what the master sent before stays in the stopped replica's socket)
        subprocess.run(["redis-cli", "-p", str(victim.port), "client", "kill", "type", "replica"], check=True,
                       capture_output=True)
        produce(clustered, payloads[half:])  # the second half is written to the master alone
        time.sleep(3)
        os.kill(victim_pid, signal.SIGKILL)
    finally:
        os.kill(stalled_pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not failed_over(redis_cluster, victim.port):
        time.sleep(0.5)
    assert failed_over(redis_cluster, victim.port), "no replica was promoted"
    # the dead node is restarted (as an orchestrator would) and rejoins as the new master's replica: until then
    # the saves on that master wait for a replica they do not have
    redis_cluster.up()

    wait_equal(clustered, expected, timeout=180)
    assert output_ids(clustered) == expected_ids
    errors = sum(v for k, v in worker.metrics().items() if k.startswith("streamproc_redis_errors_total"))
    assert errors > 0, "the worker never met the failure: the test would prove nothing"
