"""Replays, kill -9 and erasure on the real broker and Redis, with real worker processes."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest
import redis

from streamproc.adapters.feature_store import customer_key
from streamproc.demo import processed_total
from streamproc.simulate import SimulationConfig, Simulator
from streamproc.tail import read_topic
from tests.conftest import FROZEN_MODEL_ENV, free_port, produce, redis_snapshot, seed_checkpoint, worker_env

pytestmark = pytest.mark.integration


def sim_payloads(customers=150, days=70, seed=9, **kw):
    return list(Simulator(SimulationConfig(customers=customers, days=days, seed=seed, **kw)).payloads())


def run_to_end(worker_factory, settings, count):
    worker = worker_factory(settings).start()
    worker.wait_processed(count, timeout=120)
    time.sleep(0.5)
    return worker


def wait_equal(settings, expected, timeout=90.0):
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = redis_snapshot(settings)
        if got == expected:
            return got
        time.sleep(0.5)
    missing = [k for k in expected if k not in got]
    differing = [k for k in expected if k in got and got[k] != expected[k]]
    raise AssertionError(f"state differs: {len(missing)} keys missing, {len(differing)} differ, "
                         f"e.g. {(missing + differing)[:5]}")


def test_replaying_a_file_is_deterministic_and_equals_producing_directly(env_factory, worker_factory, tmp_path):
    payloads = sim_payloads(duplicate_fraction=0.02)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(p + b"\n" for _, _, p in payloads))

    states = []
    for how in ("replay", "replay", "direct"):
        env = env_factory()
        if how == "direct":
            produce(env, payloads)
        else:
            out = subprocess.run([sys.executable, "-m", "streamproc.cli", "replay", str(path), "--quiet"],
                                 env=worker_env(env), capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
        run_to_end(worker_factory, env, len(payloads)).stop()
        states.append(redis_snapshot(env))
    assert len([k for k in states[0] if k.startswith("cust:")]) > 120
    assert states[0] == states[1], "two replays of the same file differ"
    assert states[0] == states[2], "a replay differs from producing the same events directly"


def output_ids(settings):
    """Alert and recommendation ids on the output topics (deduplicated: outputs are at-least-once)."""
    alerts = {a["alert_id"] for a in read_topic(settings, "churn-alerts", 10_000_000, 3.0)}
    recs = {r["recommendation_id"] for r in read_topic(settings, "recommendations", 10_000_000, 3.0)}
    return alerts, recs


def frozen(worker, **env):
    worker.extra_env = {**FROZEN_MODEL_ENV, **env}
    return worker


def against_baseline(env_factory, worker_factory, payloads, fill=True):
    """Two environments seeded with one frozen model (outputs then depend on the events alone): a baseline where one
    worker never interrupted processes ``payloads``, and the one the test disturbs (``payloads`` produced into it
    too unless ``fill`` is false). Returns that environment and what the baseline's worker left: the Redis snapshot
    and the output ids."""
    baseline, disturbed = env_factory(), env_factory()
    for env in (baseline, disturbed):
        seed_checkpoint(env, payloads)
    produce(baseline, payloads)
    if fill:
        produce(disturbed, payloads)
    frozen(worker_factory(baseline)).start().wait_processed(len(payloads), timeout=120)
    time.sleep(1)
    return disturbed, redis_snapshot(baseline), output_ids(baseline)


# the crashed runs spread each sweep pass over many batches (at most 40 customers per step), the baselines not
SPREAD_SWEEP = {"STREAMPROC_SWEEP_BUDGET": "40"}


@pytest.mark.faults
@pytest.mark.parametrize("fast_consumer", ["true", "false"], ids=["bulk-delivery", "stock-consumer"])
def test_kill_9_mid_stream_leaves_redis_and_outputs_as_an_uninterrupted_run(env_factory, worker_factory,
                                                                           fast_consumer):
    payloads = sim_payloads(customers=200, days=90, seed=21, duplicate_fraction=0.01)
    crashed, expected, (expected_alerts, expected_recs) = against_baseline(env_factory, worker_factory, payloads)
    assert expected_recs, "the frozen model recommends nothing: the comparison would be empty"

    rnd = random.Random(5)
    kills = 0
    for _ in range(5):
        worker = frozen(worker_factory(crashed), **SPREAD_SWEEP, STREAMPROC_FAST_CONSUMER=fast_consumer).start()
        worker.wait_ready()
        # kill at a random moment: between batches, inside a Redis write, a produce, or a commit
        target = rnd.randint(300, 2500)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if processed_total(worker.metrics()) >= target:
                break
            time.sleep(rnd.uniform(0.0, 0.05))
        worker.stop(signal.SIGKILL)
        kills += 1
    assert kills == 5
    final = frozen(worker_factory(crashed), **SPREAD_SWEEP, STREAMPROC_FAST_CONSUMER=fast_consumer).start()
    wait_equal(crashed, expected)
    alerts, recs = output_ids(crashed)
    assert alerts == expected_alerts
    assert recs == expected_recs
    final.stop()


@pytest.mark.faults
def test_two_workers_one_killed_the_survivor_finishes_as_one_worker_would(env_factory, worker_factory):
    payloads = sim_payloads(customers=200, days=90, seed=23)
    pair, expected, (expected_alerts, expected_recs) = against_baseline(env_factory, worker_factory, payloads)

    survivor = frozen(worker_factory(pair, "survivor"), **SPREAD_SWEEP).start()
    victim = frozen(worker_factory(pair.model_copy(update={"web_port": free_port()}), "victim"), **SPREAD_SWEEP).start()
    survivor.wait_ready()
    victim.wait_ready()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and processed_total(victim.metrics()) < 500:
        time.sleep(0.05)
    assert processed_total(victim.metrics()) >= 500, "the victim never got partitions"
    victim.stop(signal.SIGKILL)  # its partitions move to the survivor after the session timeout
    wait_equal(pair, expected, timeout=120)
    assert output_ids(pair) == (expected_alerts, expected_recs)
    # the survivor owns every input partition now (its lag gauge covers all of them)
    deadline = time.monotonic() + 20
    owned: set[str] = set()
    while time.monotonic() < deadline and len(owned) < 4:
        owned = {k for k in survivor.metrics()
                 if k.startswith("streamproc_consumer_lag_records{") and 'topic="clicks"' in k}
        time.sleep(1)
    assert len(owned) == 4, owned
    survivor.stop()


@pytest.mark.faults
@pytest.mark.parametrize("fast_consumer", ["true", "false"], ids=["bulk-delivery", "stock-consumer"])
def test_members_joining_and_leaving_mid_stream_lose_nothing(env_factory, worker_factory, fast_consumer):
    """Rebalance after rebalance while the input arrives: a second member joins and leaves (cleanly, then by
    kill -9, then cleanly) three times, each time while a new part of the stream is being produced. Every
    rebalance drops what was fetched before it, and what may be applied after it follows the offset fence's rule
    (streamproc/readmission.py): the end state must be the one an uninterrupted worker leaves, with every record
    applied (none stranded behind a dropped one). Both input paths: Faust's stock consumer drops what its own
    queues hold at a rebalance, where the readmission rule never sees it, and must still lose nothing."""
    payloads = sim_payloads(customers=200, days=90, seed=31)
    churned, expected, (expected_alerts, expected_recs) = against_baseline(env_factory, worker_factory, payloads,
                                                                          fill=False)  # produced part by part

    parts = [payloads[k * len(payloads) // 4 : (k + 1) * len(payloads) // 4] for k in range(4)]
    # a rebalance finds records at every stage
    small = {**SPREAD_SWEEP, "STREAMPROC_BATCH_MAX_EVENTS": "50", "STREAMPROC_FAST_CONSUMER": fast_consumer}
    steady = frozen(worker_factory(churned, "steady"), **small).start()
    steady.wait_ready()
    produce(churned, parts[0])
    for round_, sig in enumerate((signal.SIGTERM, signal.SIGKILL, signal.SIGTERM)):
        guest = frozen(worker_factory(churned.model_copy(update={"web_port": free_port()}), f"guest{round_}"),
                       **small).start()
        guest.wait_ready()
        deadline = time.monotonic() + 60  # it owns partitions: its lag gauges appear
        while time.monotonic() < deadline and not any(k.startswith("streamproc_consumer_lag_records{")
                                                      for k in guest.metrics()):
            time.sleep(0.1)
        part = parts[round_ + 1]
        produce(churned, part[: len(part) // 10])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and processed_total(guest.metrics()) < 100:
            time.sleep(0.05)
        assert processed_total(guest.metrics()) >= 100, "the guest never got partitions"
        produce(churned, part[len(part) // 10 :])  # and leave while both members have a backlog
        guest.stop(sig)
    wait_equal(churned, expected, timeout=180)
    assert output_ids(churned) == (expected_alerts, expected_recs)
    assert steady.metrics().get("streamproc_rebalances_total", 0) >= 4
    steady.stop()


def test_forget_erases_every_trace_and_a_replay_does_not_bring_the_customer_back(topics, worker_factory):
    settings = topics
    payloads = sim_payloads(customers=30, days=30, seed=4)
    victim = payloads[0][1].decode()
    produce(settings, payloads)
    worker = worker_factory().start()
    worker.wait_processed(len(payloads))

    out = subprocess.run([sys.executable, "-m", "streamproc.cli", "customer", "forget", victim],
                         env=worker_env(settings), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr

    def traces():
        r = redis.Redis.from_url(settings.redis_url)
        found = []
        for key in r.scan_iter(count=1000):
            kind = r.type(key)
            blob = key + b"".join(
                r.hvals(key) if kind == b"hash" else
                r.zrange(key, 0, -1) if kind == b"zset" else
                list(r.smembers(key)) if kind == b"set" else []
            )
            if victim.encode() in blob:
                found.append(key)
        r.close()
        return found

    assert traces() == []
    # the same events again (a replay): counted as erased, not stored
    produce(settings, [p for p in payloads if p[1].decode() == victim])
    victims = sum(1 for p in payloads if p[1].decode() == victim)
    worker.wait_processed(len(payloads) + victims)
    metrics = worker.metrics()
    erased = sum(v for k, v in metrics.items()
                 if k.startswith("streamproc_events_processed_total") and 'outcome="erased"' in k)
    assert erased == victims
    assert traces() == []


def test_pseudonymised_ids_never_reach_redis_or_alerts_and_erasure_still_works(topics, worker_factory):
    import json
    import urllib.request

    from pydantic import SecretStr

    settings = topics.model_copy(update={"pseudonymize_key": SecretStr("pepper")})
    payloads = sim_payloads(customers=25, days=20, seed=6)
    raw_ids = {p[1].decode() for p in payloads}
    produce(settings, payloads)
    worker = worker_factory(settings)
    worker.extra_env = {"STREAMPROC_PSEUDONYMIZE_KEY": "pepper"}
    worker.start()
    worker.wait_processed(len(payloads))

    r = redis.Redis.from_url(settings.redis_url)
    stored = b"".join(k + b"".join(r.hvals(k)) for k in r.scan_iter("cust:*"))
    assert stored and not any(cid.encode() in stored for cid in raw_ids)
    victim = sorted(raw_ids)[0]
    assert r.exists(customer_key(settings.customer_key(victim)))
    # lookups and erasure take the raw id and map it the same way
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/customers/{victim}") as resp:
        assert json.loads(resp.read())["features"]["customer_id"] == settings.customer_key(victim)
    env = {**worker_env(settings), "STREAMPROC_PSEUDONYMIZE_KEY": "pepper"}
    out = subprocess.run([sys.executable, "-m", "streamproc.cli", "customer", "forget", victim], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not r.exists(customer_key(settings.customer_key(victim)))
    r.close()
