"""The Bytewax peer: the features-only job (``features_job.py``) as a plain Bytewax dataflow, keyed by customer,
its state in ``stateful_map`` (Bytewax snapshots it with ``--recovery DIR``, its way to exactly-once state; without,
at least once). Bad records are skipped, as in the other peers.

Run: ``.venv-peers/bin/python bench/peers/bytewax_app.py [--recovery DIR]`` with ``STREAMPROC_KAFKA_BOOTSTRAP``,
``STREAMPROC_TOPIC_PREFIX`` and ``STREAMPROC_WEB_PORT`` set (``bench/throughput.py --peer bytewax`` does)."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import orjson
from bytewax.connectors.kafka import KafkaSource, KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.recovery import RecoveryConfig
from bytewax.run import cli_main

sys.path.insert(0, str(Path(__file__).resolve().parent))

from features_job import update
from metrics_endpoint import ProcessedCounter

INPUT_TOPICS = ("clicks", "transactions")  # streamproc.topics.INPUT_TOPICS (the peer runs outside streamproc)
counter = ProcessedCounter()


class _Discard(StatelessSinkPartition[Any]):
    def write_batch(self, items: list[Any]) -> None:
        pass


class Discard(DynamicSink[Any]):
    """The job keeps state only: nothing to write out."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Discard:
        return _Discard()


def decoded(message: KafkaSourceMessage[bytes, bytes]) -> tuple[str, dict[str, Any]] | None:
    """The customer and the event; None for bad input (counted here: the good ones are counted once their state
    is updated)."""
    try:
        event: dict[str, Any] = orjson.loads(message.value)
        if "ts" in event and "event_id" in event:
            return str(event["customer_id"]), event
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    counter.n += 1
    return None


def counted(step_id: str, item: Any) -> None:
    counter.n += 1


def build_flow() -> Dataflow:
    env = os.environ
    prefix = env.get("STREAMPROC_TOPIC_PREFIX", "")
    flow = Dataflow("features")
    # Bytewax assigns the partitions itself (no consumer group) and keeps its offsets in its recovery store
    source = KafkaSource([env.get("STREAMPROC_KAFKA_BOOTSTRAP", "127.0.0.1:19092")],
                         [prefix + t for t in INPUT_TOPICS], tail=True, raise_on_errors=False)
    keyed = op.filter_map("decode", op.input("kafka", flow, source), decoded)
    state = op.stateful_map("features", keyed, lambda s, event: (update(s, event), None))
    op.output("discard", op.inspect("count", state, counted), Discard())
    return flow


if __name__ == "__main__":
    counter.serve(int(os.environ.get("STREAMPROC_WEB_PORT", "6066")))
    recovery = None
    if "--recovery" in sys.argv:
        folder = Path(sys.argv[sys.argv.index("--recovery") + 1])
        recovery = RecoveryConfig(str(folder))
    cli_main(build_flow(), workers_per_process=1, epoch_interval=timedelta(seconds=5), recovery_config=recovery)
