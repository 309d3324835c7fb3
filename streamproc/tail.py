"""Read a topic from the beginning and print its records (for people; tests use kafka-python directly)."""

from __future__ import annotations

import json

from kafka import KafkaConsumer

from streamproc.settings import Settings
from streamproc.topics import kafka_security_kwargs, load_specs


def read_topic(settings: Settings, topic: str, max_records: int, idle_timeout_s: float) -> list[dict]:
    """Every record of a declared topic (decoded JSON values), oldest first, up to ``max_records``."""
    consumer = KafkaConsumer(
        settings.topic(topic),
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=int(idle_timeout_s * 1000),
        **kafka_security_kwargs(settings),
    )
    out: list[dict] = []
    try:
        for record in consumer:
            try:
                out.append(json.loads(record.value))
            except ValueError:
                out.append({"_raw": repr(record.value[:200])})
            if len(out) >= max_records:
                break
    finally:
        consumer.close()
    return out


def tail_topic(settings: Settings, topic: str, max_records: int, idle_timeout_s: float, as_json: bool) -> int:
    if topic == "dlq":
        topic = "streamproc-dlq"
    if topic not in load_specs():
        print(f"unknown topic {topic!r}")
        return 2
    for value in read_topic(settings, topic, max_records, idle_timeout_s):
        if as_json:
            print(json.dumps(value, sort_keys=True))
        elif "reason" in value and "dlq_id" in value:
            print(f"[dlq] {value['dlq_id']}  {value['reason']}: {value['detail']}")
        else:
            print(json.dumps(value, sort_keys=True))
    return 0
