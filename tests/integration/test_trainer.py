"""The global trainer on the real broker and Redis: standalone trainers, one of them killed with SIGKILL while
it holds learning that is not checkpointed yet, the other taking over; the final checkpoint must be the model
that learned every training record exactly once, in order."""

from __future__ import annotations

import time

import pytest
import redis

from streamproc.adapters.model_store import RedisModelStore
from streamproc.config import model_config
from streamproc.contracts.outputs import example_of
from streamproc.domain.models import ModelBundle
from streamproc.tools.demo import metric_total
from streamproc.tools.simulate import SimulationConfig, Simulator
from streamproc.tools.tail import read_training_examples
from streamproc.training.offline import learn
from tests.conftest import FROZEN_MODEL_ENV, WorkerProcess, free_port, produce

pytestmark = pytest.mark.integration


def checkpoint(settings) -> ModelBundle | None:
    import asyncio

    import redis.asyncio as aioredis

    async def load() -> ModelBundle | None:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            return await RedisModelStore(client).load()
        finally:
            await client.aclose()

    return asyncio.run(load())


def wait_for(predicate, timeout: float, what: str, *procs: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(p.log_tail(2000) for p in procs))


def test_a_killed_trainer_is_replaced_and_every_example_is_learned_exactly_once(topics, tmp_path):
    settings = topics
    payloads = list(Simulator(SimulationConfig(customers=250, days=150, seed=21)).payloads())
    parts = [payloads[i * len(payloads) // 4:(i + 1) * len(payloads) // 4] for i in range(4)]

    worker = WorkerProcess(settings, tmp_path / "worker.log")
    worker.extra_env.update(FROZEN_MODEL_ENV)  # scoring only: the trainers below are the only learners
    trainers = {}
    for name in ("a", "b"):
        trainers[name] = WorkerProcess(settings.model_copy(update={"web_port": free_port()}),
                                       tmp_path / f"trainer-{name}.log", command="trainer")
    procs = (worker, *trainers.values())
    try:
        worker.start()
        trainers["a"].start()
        time.sleep(3)  # a joins the trainer group first and owns the partition
        trainers["b"].start()
        worker.wait_ready()

        def metric(name: str, prefix: str) -> float:
            return metric_total(trainers[name].metrics(), prefix)  # nothing while it is not serving (yet)

        def owner() -> str | None:
            active = [n for n in trainers if metric(n, "streamproc_trainer_active") == 1]
            assert len(active) <= 1, "two trainers learn at once"
            return active[0] if active else None

        killed = 0
        sent = 0
        for part in parts[:3]:
            produce(settings, part)
            sent += len(part)
            wait_for(lambda: owner() is not None, 60, "a trainer to own the partition", *procs)
            first = owner()
            assert first is not None
            # kill the owner once it has learned from this part, before or after its checkpoint (every second)
            wait_for(lambda f=first: metric(f, "streamproc_examples_learned_total") > 0, 60,
                     "the owner to learn", *procs)
            time.sleep(0.4)
            trainers[first].stop(9)
            killed += 1
            trainers[first].start()  # back as a standby member: the other one takes the partition over
        produce(settings, parts[3])
        sent += len(parts[3])
        worker.wait_processed(sent, timeout=120)

        examples, n_records = read_training_examples(settings)
        assert len(examples) > 1000 and n_records > 1
        wait_for(lambda: (checkpoint(settings) or ModelBundle(model_config(settings))).training_offset
                 == n_records - 1, 90, "a checkpoint of the whole training topic", *procs)
    finally:
        for proc in procs:
            proc.stop(9)

    assert killed == 3
    final = checkpoint(settings)
    assert final is not None
    # the same examples, learned once each in topic order, by one process that never crashed
    reference = ModelBundle(model_config(settings))
    for example in examples:
        learn(reference, example_of(example))
    assert final.churn_examples == reference.churn_examples > 0
    assert final.segment_examples == reference.segment_examples > 0
    assert final.class_counts == reference.class_counts
    assert final.prequential is not None and reference.prequential is not None
    assert final.prequential.n == reference.prequential.n
    assert final.recs is not None and reference.recs is not None
    assert final.recs.summary() == pytest.approx(reference.recs.summary())
    probes = [e["x"] for e in examples if e["kind"] == "churn"][:50]
    assert [final.churn_probability(x) for x in probes] == pytest.approx(
        [reference.churn_probability(x) for x in probes], abs=1e-9)
    # the fence holds the newest checkpointed offset
    client = redis.Redis.from_url(settings.redis_url)
    assert int(client.get("sp:{model}:offset")) == n_records - 1
