"""The roles' grants (streamproc/security.py): least privilege as declared, the README's copy current, and a refusal
said in one line (streamproc/access.py)."""

from __future__ import annotations

import logging
import re

import redis
from kafka import errors as kafka_errors

from streamproc.access import RefusalLog, explain
from streamproc.security import kafka_acl_commands, kafka_grants, redis_acl_file, redis_acl_rules
from streamproc.settings import PROJECT_ROOT, Settings
from streamproc.topics import INPUT_TOPICS, load_specs


def grants_of(settings: Settings, principal: str) -> set[tuple[str, str, str]]:
    return {(g.resource, g.name, g.operation) for g in kafka_grants(settings) if g.principal == principal}


def test_a_worker_reads_only_inputs_and_writes_only_outputs():
    worker = grants_of(Settings(), "worker")
    declared = load_specs()
    on_declared = {(n, op) for kind, n, op in worker if kind == "TOPIC" and n in declared}
    assert {n for n, op in on_declared if op == "READ"} == set(INPUT_TOPICS)
    assert {n for n, op in on_declared if op == "WRITE"} == {
        n for n, spec in declared.items() if spec.role in ("output", "internal")} - {"alerts-undeliverable"}
    assert not {op for _, op in on_declared} & {"CREATE", "ALTER_CONFIGS", "DESCRIBE_CONFIGS", "DELETE"}


def test_the_trainer_reads_its_topic_and_nothing_else():
    assert grants_of(Settings(), "trainer") == {("TOPIC", "streamproc-training", "READ"),
                                                ("TOPIC", "streamproc-training", "DESCRIBE"),
                                                ("GROUP", "streamproc-trainer", "READ")}


def test_names_follow_the_topic_prefix_and_the_app_id():
    s = Settings(topic_prefix="eu.", app_id="shop")
    worker = grants_of(s, "worker")
    assert ("TOPIC", "eu.clicks", "READ") in worker and ("GROUP", "shop", "READ") in worker
    assert not any(name == "clicks" for _, name, _ in worker)


def test_the_readme_lists_the_grants_in_force():
    readme = (PROJECT_ROOT / "README.md").read_text()
    block = readme.split("The exact grants", 1)[1].split("```\n", 2)[1]
    expected = kafka_acl_commands(kafka_grants(Settings()))
    assert [line for line in block.splitlines() if line.startswith("kafka-acls")] == expected
    rules = {m.group(1): m.group(2) for m in re.finditer(r"^user (\w+) on >\{password\} (.*)$", block, re.M)}
    assert rules == redis_acl_rules()


def test_the_acl_file_turns_the_default_user_off_and_keeps_models_read_only_for_workers():
    text = redis_acl_file({"worker": "w", "trainer": "t", "reader": "r", "admin": "a"})
    assert text.splitlines()[0].startswith("user default off")
    worker = next(line for line in text.splitlines() if line.startswith("user worker on >w "))
    assert "%R~sp:{model}:*" in worker and "~sp:*" not in worker.split()
    reader = next(line for line in text.splitlines() if line.startswith("user reader on >r "))
    assert "+@write" not in reader and all(p.startswith("%R~") for p in reader.split() if "~" in p)


def test_a_refused_connection_is_explained_from_what_the_client_logged():
    refusals = RefusalLog()
    record = logging.LogRecord(
        "kafka.net.connection", logging.ERROR, __file__, 1,
        "<KafkaConnection node_id=bootstrap-0>: Connection lost: [Error 58] SaslAuthenticationFailedError: "
        "SaslAuthenticationFailedError: Authentication failed during authentication due to invalid credentials "
        "with SASL mechanism SCRAM-SHA-512 (backoff 0.47 secs)", None, None)
    refusals.emit(record)
    assert refusals.reason == ("SaslAuthenticationFailedError: Authentication failed during authentication due to "
                               "invalid credentials with SASL mechanism SCRAM-SHA-512")
    refusals.emit(logging.LogRecord("kafka", logging.WARNING, __file__, 1, "Bootstrap bootstrap-0 not ready", None,
                                    None))
    assert refusals.reason is not None and refusals.reason.startswith("SaslAuthenticationFailedError")


def test_explain_names_the_user_and_the_fix_and_ignores_other_errors():
    s = Settings(redis_username="reader", kafka_sasl_username="trainer")
    assert "Redis refused user reader" in explain(redis.exceptions.NoPermissionError("no 'del'"), s)
    assert "Kafka refused user trainer" in explain(kafka_errors.TopicAuthorizationFailedError(), s)
    assert explain(redis.exceptions.ConnectionError("Connection refused"), s) is None
    assert explain(ValueError("bad"), s) is None
