"""A checkpoint planted in Redis by anyone who can write to it is never loaded by a worker that verifies
signatures (STREAMPROC_MODEL_SIGNING_KEY): it is refused loudly and counted, and scoring goes on with the last
trusted checkpoint."""

from __future__ import annotations

import pickle
import time

import pytest
from pydantic import SecretStr

from streamproc.adapters.redis_clients import sync_redis
from streamproc.tools.simulate import SimulationConfig, Simulator
from tests.conftest import FROZEN_MODEL_ENV, produce, seed_checkpoint
from tests.unit.test_checkpoint_signing import Planted

pytestmark = pytest.mark.integration


def test_a_planted_checkpoint_is_refused_and_the_trusted_one_keeps_scoring(topics, worker_factory, tmp_path):
    settings = topics.model_copy(update={"model_signing_key": SecretStr("a-signing-key-of-some-length")})
    payloads = list(Simulator(SimulationConfig(customers=40, days=30, seed=5)).payloads())
    trusted = seed_checkpoint(settings, payloads)  # signed with the key
    worker = worker_factory(settings)
    worker.extra_env = {**FROZEN_MODEL_ENV, "STREAMPROC_MODEL_SIGNING_KEY": "a-signing-key-of-some-length",
                        "STREAMPROC_MODEL_RELOAD_S": "0.5"}
    worker.start()
    produce(settings, payloads[: len(payloads) // 2])
    worker.wait_processed(len(payloads) // 2)
    assert worker.metrics().get("streamproc_model_version") == trusted

    marker = tmp_path / "planted-ran"
    client = sync_redis(settings.redis_url)
    try:  # what an attacker with write access to Redis can do: a new version, made current
        client.set(f"sp:{{model}}:v:{trusted + 1}", pickle.dumps(Planted(str(marker))))
        client.set("sp:{model}:current", trusted + 1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not worker.metrics().get("streamproc_model_checkpoints_refused_total"):
            time.sleep(0.5)
        produce(settings, payloads[len(payloads) // 2 :])
        worker.wait_processed(len(payloads))
        metrics = worker.metrics()
        assert metrics.get("streamproc_model_checkpoints_refused_total") == 1, worker.log_tail()
        assert metrics.get("streamproc_model_version") == trusted  # still scoring with the trusted checkpoint
        assert not marker.exists(), "the planted pickle ran"
        assert f"checkpoint v{trusted + 1} is not signed: refused" in worker.log_tail(100_000)
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        client.close()
