"""Topic declarations and generated schemas stay in step with the code."""

import shutil
import subprocess

import pytest

from streamproc.schemas import MESSAGE_MODELS, stale_schemas
from streamproc.settings import PROJECT_ROOT, Settings
from streamproc.topics import INPUT_TOPICS, SCHEMAS_DIR, load_specs


def test_schemas_in_topics_folder_are_not_stale():
    assert stale_schemas(SCHEMAS_DIR) == [], "run `make schemas` and commit streamproc/contracts/schemas/"


def test_stale_schema_is_detected(tmp_path):
    from streamproc.schemas import write_schemas

    write_schemas(tmp_path)
    path = tmp_path / "click.schema.json"
    path.write_text(path.read_text().replace("session_id", "session"))
    assert stale_schemas(tmp_path) == ["click"]


def test_every_declared_topic_has_a_known_schema_and_sane_config():
    specs = load_specs()
    for name in ("clicks", "transactions", "churn-alerts", "recommendations", "streamproc-dlq"):
        assert name in specs
    for spec in specs.values():
        assert spec.schema in MESSAGE_MODELS
        assert spec.partitions >= 1 and spec.replication >= 1 and spec.retention_ms > 0
        assert spec.cleanup_policy in {"delete", "compact", "compact,delete"}
    # a customer's clicks and transactions must share a partition number
    assert len({specs[t].partitions for t in INPUT_TOPICS}) == 1


def test_settings_from_environment_and_masking(monkeypatch):
    monkeypatch.setenv("STREAMPROC_KAFKA_BOOTSTRAP", "broker:9092")
    monkeypatch.setenv("STREAMPROC_REDIS_URL", "redis://user:hunter2@redis:6379/0")
    monkeypatch.setenv("STREAMPROC_REDIS_PASSWORD", "s3cret")
    s = Settings()
    assert s.kafka_bootstrap == "broker:9092"
    shown = str(s.masked())
    assert "hunter2" not in shown and "s3cret" not in shown
    assert s.redis_password is not None and s.redis_password.get_secret_value() == "s3cret"


@pytest.mark.skipif(shutil.which("docker-compose") is None and shutil.which("docker") is None,
                    reason="no docker compose client on this machine")
def test_docker_compose_file_is_valid():
    if shutil.which("docker-compose"):
        cmd = ["docker-compose", "-f", "docker-compose.yml", "config", "-q"]
    else:
        cmd = ["docker", "compose", "-f", "docker-compose.yml", "config", "-q"]
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_training_records_hold_versioned_batches_and_earlier_forms_still_read():
    import orjson
    from pydantic import ValidationError

    from streamproc.contracts.outputs import TrainingBatch, validate
    from streamproc.training.trainer import training_examples

    examples = [{"kind": "segment", "id": "d:1", "ts": 1, "x": {"a": 1.0}},
                {"kind": "basket", "id": "d:e1", "ts": 2, "items": [["p", "c", 1]], "amount": 3.0}]
    record = {"schema_version": 1, "examples": examples}
    assert training_examples(orjson.dumps(record)) == examples
    assert training_examples(orjson.dumps(examples)) == examples  # the earlier forms: an array, one example
    assert training_examples(orjson.dumps(examples[0])) == [examples[0]]
    assert training_examples(b'[{"kind": "seg') == []  # undecodable: skipped, not raised
    assert len(validate(TrainingBatch, record).examples) == 2
    with pytest.raises(ValidationError):  # no customer ids on this topic
        validate(TrainingBatch, {"schema_version": 1, "examples": [{**examples[0], "customer_id": "c1"}]})


def test_the_trainer_learns_every_example_of_a_record_once_and_counts_them():
    from types import SimpleNamespace

    import orjson

    from streamproc.adapters.memory import InMemoryModelStore
    from streamproc.config import model_config
    from streamproc.domain.churn import SEGMENT_FEATURES
    from streamproc.domain.models import ModelBundle
    from streamproc.metrics import Metrics
    from streamproc.training.trainer import Trainer

    settings = Settings(_env_file=None)
    trainer = Trainer(settings, InMemoryModelStore(), Metrics(), model_config(settings))
    trainer.bundle = ModelBundle(model_config(settings))

    def segment(i: int) -> dict:
        return {"kind": "segment", "id": f"d:{i}", "ts": i, "x": dict.fromkeys(SEGMENT_FEATURES, float(i))}

    records = [SimpleNamespace(offset=0, value=orjson.dumps([segment(i) for i in range(7)])),
               SimpleNamespace(offset=1, value=orjson.dumps(segment(7))),  # a record of the earlier form
               SimpleNamespace(offset=2, value=b"not json")]
    assert trainer.learn_records(records) == 8
    assert trainer.bundle.segment_examples == 8 and trainer.bundle.training_offset == 2
    assert trainer.learn_records(records) == 0  # already in the checkpoint: nothing twice
    assert trainer.bundle.segment_examples == 8
