"""The peer a user would write first: a stock Faust agent that iterates the stream event by event, parses
JSON, and updates each customer's counters in Redis with one awaited call per event (a pipeline of
HINCRBY/HSET sent as one MULTI per event). No validation, no dedup, no windows, no models: far less work
than streamproc does per event, and still the per-event round trips dominate.

Run as ``python bench/naive_agent.py worker`` with STREAMPROC_* settings for the broker, topics and Redis;
``bench/throughput.py --peer`` starts it against the same pre-filled topics and measures it like the worker.
"""

from __future__ import annotations

import sys
from pathlib import Path

import faust
import orjson
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamproc.settings import Settings  # noqa: E402
from streamproc.topics import INPUT_TOPICS  # noqa: E402

settings = Settings()
app = faust.App(f"{settings.app_id}-naive", broker=f"kafka://{settings.kafka_bootstrap}", store="memory://",
                value_serializer="raw", key_serializer="raw", topic_disable_leader=True, topic_allow_declare=False,
                consumer_auto_offset_reset="earliest", web_port=settings.web_port, web_bind="127.0.0.1",
                datadir=str(settings.state_dir / "naive-data"))  # not the working directory
inputs = app.topic(*(settings.topic(t) for t in INPUT_TOPICS), value_serializer="raw", key_serializer="raw")
client = aioredis.from_url(settings.redis_url)
counter = {"n": 0}


@app.agent(inputs)
async def features(stream: faust.StreamT) -> None:
    async for value in stream:
        try:
            event = orjson.loads(value)
            key = f"naive:{event['customer_id']}"
        except Exception:
            continue
        pipe = client.pipeline(transaction=True)
        if "order_id" in event:
            pipe.hincrby(key, "purchases", 1)
            pipe.hincrbyfloat(key, "spend", float(event.get("amount", 0)))
        else:
            pipe.hincrby(key, "clicks", 1)
        pipe.hset(key, "last_ts", event.get("ts", 0))
        await pipe.execute()  # one awaited round trip per event
        counter["n"] += 1


@app.page("/metrics")
async def metrics(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
    body = f'streamproc_events_processed_total{{topic="any",outcome="applied"}} {counter["n"]}\n'
    return web.bytes(body.encode(), content_type="text/plain; version=0.0.4")


if __name__ == "__main__":
    app.main()
