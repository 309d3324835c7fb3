"""Read a topic from the beginning and print its records (for people; tests use kafka-python directly)."""

from __future__ import annotations

import json
import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from streamproc.contracts.outputs import examples_of
from streamproc.settings import Settings
from streamproc.topics import kafka_security_kwargs, load_specs


def read_topic(settings: Settings, topic: str, max_records: int, idle_timeout_s: float) -> list[dict]:
    """Every record of a declared topic (decoded JSON values), oldest first, up to ``max_records``: read up to the
    end offsets the topic had when the read began (not until a pause, which on a busy machine can come early).
    ``idle_timeout_s`` bounds a wait in which nothing arrives, and the wait for the topic's metadata."""
    name = settings.topic(topic)
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        group_id=None,
        **kafka_security_kwargs(settings),
    )
    out: list[dict] = []
    try:
        deadline = time.monotonic() + max(idle_timeout_s, 10.0)
        partitions = consumer.partitions_for_topic(name)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            consumer.topics()  # refreshes the metadata
            partitions = consumer.partitions_for_topic(name)
        if not partitions:
            return out
        assigned = [TopicPartition(name, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        ends = consumer.end_offsets(assigned)
        left = {tp for tp in assigned if ends[tp] > 0}
        idle_since = time.monotonic()
        while left and len(out) < max_records:
            batches = consumer.poll(timeout_ms=200, max_records=max_records - len(out))
            for tp, records in batches.items():
                for record in records:
                    if record.offset < ends[tp]:
                        try:
                            out.append(json.loads(record.value))
                        except ValueError:
                            out.append({"_raw": repr(record.value[:200])})
            left = {tp for tp in left if consumer.position(tp) < ends[tp]}
            if batches:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > idle_timeout_s:
                break
    finally:
        consumer.close()
    return out[:max_records]


def read_training_examples(settings: Settings, idle_timeout_s: float = 3.0) -> tuple[list[dict], int]:
    """Every example on the training topic in order (its records hold batches of them), and the record count."""
    records: list[Any] = read_topic(settings, "streamproc-training", 10**8, idle_timeout_s)
    return [e for r in records for e in examples_of(r)], len(records)



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
