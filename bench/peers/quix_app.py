"""The Quix Streams peer: the features-only job (``features_job.py``) as a plain Quix Streams application, its
per-customer state in Quix's RocksDB store, with Kafka transactions (``--exactly-once``) or at least once.

Quix keeps a store per input topic, so a customer's state has a clicks half and a transactions half, as a Quix
user would write it; the job's features only need each half. Bad records are skipped (decoded in the step, as a
user would, rather than failing the application).

Run: ``.venv-peers/bin/python bench/peers/quix_app.py`` with ``STREAMPROC_KAFKA_BOOTSTRAP``,
``STREAMPROC_TOPIC_PREFIX``, ``STREAMPROC_APP_ID``, ``STREAMPROC_WEB_PORT`` and ``STREAMPROC_STATE_DIR`` set
(``bench/throughput.py --peer quix`` does)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import orjson
from quixstreams import Application
from quixstreams.state import State

sys.path.insert(0, str(Path(__file__).resolve().parent))

from features_job import update
from metrics_endpoint import ProcessedCounter

INPUT_TOPICS = ("clicks", "transactions")  # streamproc.topics.INPUT_TOPICS (the peer runs outside streamproc)


def main() -> None:
    env = os.environ
    prefix = env.get("STREAMPROC_TOPIC_PREFIX", "")
    counter = ProcessedCounter()
    counter.serve(int(env.get("STREAMPROC_WEB_PORT", "6066")))
    guarantee = "exactly-once" if "--exactly-once" in sys.argv else "at-least-once"
    app = Application(
        broker_address=env.get("STREAMPROC_KAFKA_BOOTSTRAP", "127.0.0.1:19092"),
        consumer_group=f"{env.get('STREAMPROC_APP_ID', 'streamproc')}-quix", auto_offset_reset="earliest",
        state_dir=str(Path(env.get("STREAMPROC_STATE_DIR", ".local")) / "quix-state"),
        processing_guarantee=guarantee, loglevel="WARNING", use_changelog_topics=True,
    )

    def step(value: bytes, state: State) -> None:
        counter.n += 1
        try:
            event: dict[str, Any] = orjson.loads(value)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict) or "ts" not in event or "event_id" not in event:
            return  # bad input
        state.set("s", update(state.get("s"), event))

    for name in INPUT_TOPICS:
        topic = app.topic(prefix + name, value_deserializer="bytes", key_deserializer="str")
        app.dataframe(topic).update(step, stateful=True)
    app.run()


if __name__ == "__main__":
    main()
