"""Models are global: two workers in one group score with the same checkpoint, and the one trainer learns
from the examples of both workers' partitions."""

from __future__ import annotations

import time

import pytest

from streamproc.tools.demo import metric_total as total
from streamproc.tools.demo import processed_total
from streamproc.tools.simulate import SimulationConfig, Simulator
from tests.conftest import free_port, produce

pytestmark = pytest.mark.integration


def test_two_workers_share_one_model(topics, worker_factory):
    settings = topics
    payloads = list(Simulator(SimulationConfig(customers=150, days=120, seed=13)).payloads())
    a = worker_factory(settings, "a").start()
    b_settings = settings.model_copy(update={"web_port": free_port()})
    b = worker_factory(b_settings, "b").start()
    a.wait_ready()
    b.wait_ready()
    time.sleep(8)  # both in the group before traffic, so partitions are split between them
    produce(settings, payloads)

    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        ma, mb = a.metrics(), b.metrics()
        done = processed_total(ma) + processed_total(mb) >= len(payloads)
        sent = total(ma, "streamproc_training_examples_total") + total(mb, "streamproc_training_examples_total")
        learned = total(ma, "streamproc_examples_learned_total") + total(mb, "streamproc_examples_learned_total")
        versions = {ma.get("streamproc_model_version"), mb.get("streamproc_model_version")}
        checkpointed = total(ma, "streamproc_model_checkpoints_total") + total(mb, "streamproc_model_checkpoints_total")
        if done and sent and learned >= sent and len(versions) == 1 and checkpointed and None not in versions:
            break
        time.sleep(1.0)
    # judged on the snapshot that ended the wait: reading again could catch the trainer one checkpoint ahead
    # of the other worker's next poll of the model store (seen in CI: versions 4 and 3)
    # the work was split: each worker processed a share of the events
    assert processed_total(ma) > 0 and processed_total(mb) > 0
    # both sent examples from their own partitions, and one trainer learned all of them
    sent_a = total(ma, "streamproc_training_examples_total")
    sent_b = total(mb, "streamproc_training_examples_total")
    assert sent_a > 0 and sent_b > 0
    learned = total(ma, "streamproc_examples_learned_total") + total(mb, "streamproc_examples_learned_total")
    assert learned >= sent_a + sent_b
    trainers = [m for m in (ma, mb) if total(m, "streamproc_model_checkpoints_total") > 0]
    assert len(trainers) == 1, "exactly one worker owns the training partition"
    # and both score with the same checkpoint version
    assert ma["streamproc_model_version"] == mb["streamproc_model_version"] > 0


def test_models_can_be_bootstrapped_from_a_file_of_history(settings, tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import worker_env

    history = tmp_path / "history.jsonl"
    env = worker_env(settings)
    made = subprocess.run([sys.executable, "-m", "streamproc.cli", "simulate", "--customers", "60", "--days", "150",
                           "--to-file", str(history), "--quiet"], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    trained = subprocess.run([sys.executable, "-m", "streamproc.cli", "models", "train", str(history)], env=env,
                             capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    assert "checkpoint v1 is current" in trained.stdout
    shown = subprocess.run([sys.executable, "-m", "streamproc.cli", "models", "--json"], env=env,
                           capture_output=True, text=True)
    summary = json.loads(shown.stdout)
    assert summary["version"] == 1 and summary["churn_examples"] > 0 and summary["rec_items"] > 0
