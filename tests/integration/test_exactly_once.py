"""Replays, kill -9 and erasure on the real broker and Redis, with real worker processes."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter

import orjson
import pytest
import redis

from streamproc.adapters.feature_rows import customer_key, stored_partitions
from streamproc.partitioning import home_partition
from streamproc.tools.demo import processed_total
from streamproc.tools.simulate import SimulationConfig, Simulator
from streamproc.tools.tail import read_topic, read_training_examples
from tests.conftest import (
    FROZEN_MODEL_ENV,
    free_port,
    produce,
    redis_snapshot,
    seed_checkpoint,
    wait_delivered,
    worker_env,
)

pytestmark = pytest.mark.integration


def sim_payloads(customers=150, days=70, seed=9, **kw):
    return list(Simulator(SimulationConfig(customers=customers, days=days, seed=seed, **kw)).payloads())


def run_to_end(worker_factory, settings, count, **env):
    worker = frozen(worker_factory(settings), **env).start()
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
    extra = [k for k in got if k not in expected]
    differing = [k for k in expected if k in got and got[k] != expected[k]]
    fields = sorted({f for k in differing if isinstance(expected[k], dict) and isinstance(got[k], dict)
                     for f in expected[k] if expected[k].get(f) != got[k].get(f)}, key=str)
    shown = {}
    for k in differing[:3]:
        if isinstance(expected[k], dict) and isinstance(got[k], dict):
            shown[k] = {f: (got[k].get(f), expected[k].get(f)) for f in fields if got[k].get(f) != expected[k].get(f)}
    raise AssertionError(f"state differs: {len(missing)} keys missing, {len(extra)} extra {extra[:3]}, "
                         f"{len(differing)} differ (fields {fields}), "
                         f"e.g. {(missing + differing)[:5]}; got vs expected: {shown!r:.3000}")


def test_replaying_a_file_is_deterministic_and_equals_producing_directly(env_factory, worker_factory, tmp_path):
    payloads = sim_payloads(duplicate_fraction=0.02)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(p + b"\n" for _, _, p in payloads))

    states = []
    for how in ("replay", "replay", "direct"):
        env = env_factory()
        seed_checkpoint(env, payloads)  # one frozen model: the model outputs are compared too
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
    assert any(isinstance(v, dict) and v.get(b"m", {}).get("scored") for v in states[0].values())


def settle(settings, timeout=120.0):
    """The Redis snapshot once a worker that has applied the whole input is done: the sweep caught up (the sweep mark
    is stored and nothing changes for 5 s)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        now = redis_snapshot(settings)
        if now == last and any(key.endswith(":sweep") for key in now):
            return now
        last = now
        time.sleep(5)
    raise AssertionError("the worker never settled")


def churn_bookkeeping(snapshot):
    """Per customer: pending snapshots, the last snapshot instant, its last active day and the anchors."""
    out = {}
    for key, row in snapshot.items():
        if key.startswith("cust:") and b"_s" in row:
            state = orjson.loads(row[b"_s"])
            out[key] = (state.get("ch"), state.get("pd"), state.get("pa"), state.get("pk"))
    return out


def training_data(settings):
    """The churn and segment examples on the training topic: (kind, customer digest : instant, label)."""
    examples, _ = read_training_examples(settings)
    return Counter((e["kind"], e["id"], e.get("label")) for e in examples if e["kind"] in ("churn", "segment"))


@pytest.mark.faults
def test_churn_training_data_does_not_depend_on_batching_sweep_budget_or_kill_9(env_factory, worker_factory):
    """A transactions-only shop with default settings (the silent clicks topic does not hold time back), the same
    history three times: default batches; batches of 50 with a sweep budget of 10 customers; and default batches
    killed with SIGKILL at random points. Every customer's churn bookkeeping, the whole Redis state with the model
    outputs, and the training examples by (customer, instant, label) are the same."""
    payloads = [p for p in sim_payloads(customers=250, days=300, seed=41) if p[0] == "transactions"]
    defaults: dict[str, str] = {}  # no STREAMPROC_MAX_SOURCE_SKEW_S
    envs = {name: env_factory() for name in ("default", "small", "killed")}
    for settings in envs.values():
        seed_checkpoint(settings, payloads)
        produce(settings, payloads)
    runs = {}
    worker = run_to_end(worker_factory, envs["default"], len(payloads), **defaults)
    expected_state = settle(envs["default"])
    wait_delivered(envs["default"])
    runs["default"] = (expected_state, training_data(envs["default"]))
    worker.stop()

    small = {**defaults, "STREAMPROC_BATCH_MAX_EVENTS": "50", "STREAMPROC_SWEEP_BUDGET": "10"}
    worker = run_to_end(worker_factory, envs["small"], len(payloads), **small)
    wait_equal(envs["small"], expected_state, timeout=180)
    wait_delivered(envs["small"])
    runs["small"] = (redis_snapshot(envs["small"]), training_data(envs["small"]))
    worker.stop()

    rnd = random.Random(41)
    for _ in range(3):
        worker = frozen(worker_factory(envs["killed"]), **defaults).start()
        worker.wait_ready()
        target = processed_total(worker.metrics()) + rnd.randint(200, 1500)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and processed_total(worker.metrics()) < target:
            time.sleep(rnd.uniform(0.0, 0.05))
        worker.stop(signal.SIGKILL)
    frozen(worker_factory(envs["killed"]), **defaults).start()
    wait_equal(envs["killed"], expected_state, timeout=180)
    wait_delivered(envs["killed"])
    runs["killed"] = (redis_snapshot(envs["killed"]), training_data(envs["killed"]))

    expected_state, expected_examples = runs["default"]
    books = churn_bookkeeping(expected_state)
    assert sum(1 for _, pending, _, _ in books.values() if pending) > 50
    labels = Counter(label for kind, _, label in expected_examples if kind == "churn")
    assert labels[0] > 100 and labels[1] > 100, labels
    for name in ("small", "killed"):
        state, examples = runs[name]
        differing = [k for k in books if churn_bookkeeping(state).get(k) != books[k]]
        assert not differing, (name, len(differing), differing[:3])
        assert state == expected_state, name
        if name == "killed":  # outputs are at-least-once: a killed worker's examples may be sent again
            examples = Counter(dict.fromkeys(examples, 1))
        assert examples == expected_examples, (name, len(examples - expected_examples),
                                               len(expected_examples - examples))


def output_ids(settings):
    """Alert and recommendation ids on the output topics (deduplicated: outputs are at-least-once), once the
    broker has every output saved."""
    wait_delivered(settings)
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
    return (disturbed, *baseline_run(baseline, disturbed, worker_factory, payloads, fill))


def baseline_run(baseline, disturbed, worker_factory, payloads, fill=True):
    """``against_baseline`` for two given environments: both seeded with one frozen model, ``payloads`` processed
    by one uninterrupted worker in ``baseline`` (and produced into ``disturbed`` too unless ``fill`` is false).
    Returns the baseline's Redis snapshot and output ids."""
    for env in (baseline, disturbed):
        seed_checkpoint(env, payloads)
    produce(baseline, payloads)
    if fill:
        produce(disturbed, payloads)
    frozen(worker_factory(baseline)).start().wait_processed(len(payloads), timeout=120)
    time.sleep(1)
    return redis_snapshot(baseline), output_ids(baseline)


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
    (streamproc/pipeline/readmission.py): the end state must be the one an uninterrupted worker leaves, with every
    record applied (none stranded behind a dropped one). Both input paths: Faust's stock consumer drops what its own
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
    victim_key = customer_key(home_partition(victim, stored_partitions(r)), settings.customer_key(victim))
    assert r.exists(victim_key)
    # lookups and erasure take the raw id and map it the same way
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/customers/{victim}") as resp:
        assert json.loads(resp.read())["features"]["customer_id"] == settings.customer_key(victim)
    env = {**worker_env(settings), "STREAMPROC_PSEUDONYMIZE_KEY": "pepper"}
    out = subprocess.run([sys.executable, "-m", "streamproc.cli", "customer", "forget", victim], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not r.exists(victim_key)
    r.close()
