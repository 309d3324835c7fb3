"""Bulk batches from a Faust agent's stream, acked only after the batch is applied.

``Stream.take_events`` acks a batch in a ``finally`` block, so a batch that failed (Redis down) or was
cancelled by a shutdown would still be committed. This reader drains the agent's channel queue in bulk
(``get_nowait`` until empty, then one awaited ``get``) and leaves acking to the caller, who acks only
what was applied. It keeps Faust's bookkeeping: messages are tracked as unacked (so the committed
offset never passes an event in flight); events of a previous consumer generation are passed on for the caller
to drop. (What Faust's stock consumer drops inside its own queues during a rebalance it never hands over.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from faust.types import AppT, EventT, Message, StreamT


async def drain_batches(
    stream: StreamT, max_events: int, linger_s: float = 0.0, idle_s: float | None = None
) -> AsyncIterator[list[EventT]]:
    """Batches of up to ``max_events``. After the first event of a batch, wait up to ``linger_s`` for the
    fetcher to deliver more (Faust hands records over one at a time): fewer, larger batches mean one
    Redis round trip per many events instead of per few, at a bounded cost in latency. With ``idle_s``, an
    empty batch comes after that long without records (for callers that hold records back on a timer)."""
    app = stream.app
    consumer = app.consumer
    queue = stream.channel.queue  # type: ignore[attr-defined]
    acking_topics = app.topics.acking_topics
    on_message_in = stream._on_message_in  # type: ignore[attr-defined]
    loop_time = asyncio.get_running_loop().time
    while not stream.should_stop:
        try:
            first: Any = await (queue.get() if idle_s is None else asyncio.wait_for(queue.get(), idle_s))
        except StopAsyncIteration:  # the channel was closed: the worker is stopping
            return
        except TimeoutError:
            yield []
            continue
        raw: list[Any] = [first]
        if linger_s and queue.qsize() < max_events:
            deadline = loop_time() + linger_s
            while queue.qsize() < max_events and loop_time() < deadline:
                await asyncio.sleep(min(0.005, linger_s))
        try:
            while len(raw) < max_events and not queue.empty():
                raw.append(queue.get_nowait())
        except StopAsyncIteration:
            pass  # closing: process what we have, the next get() ends the loop
        batch: list[EventT] = []
        await app.flow_control.acquire()  # during a rebalance, wait for its end: then the generation decides
        generation = app.consumer_generation_id
        for item in raw:
            if not isinstance(item, EventT):
                continue
            message = item.message
            # fetched before a rebalance: passed on untracked, for the caller to drop (and to hold back what
            # follows it, streamproc/readmission.py); the new owner re-reads it from the committed offset
            if message.generation_id == generation and message.topic in acking_topics and not message.tracked:
                message.tracked = True
                consumer.unacked.add(message)
                on_message_in(message.tp, message.offset, message)
            batch.append(item)
        if batch:
            mark_taken(app, [ev.message for ev in batch])
            yield batch


def mark_taken(app: AppT, messages: list[Message]) -> None:
    """Tell Faust's monitor that a stream took records of these partitions now: its health check ("Stream has not
    started processing TP", logged as an error for every partition with a backlog) reads that time, which a stream
    sets per event and the bulk path would otherwise never set."""
    monitor = app.monitor
    if monitor is not None:
        now = time.monotonic()
        inbound = monitor.stream_inbound_time
        for tp in {m.tp for m in messages}:
            inbound[tp] = now


async def ack_batch(stream: StreamT, batch: list[EventT]) -> None:
    for event in batch:
        await stream.ack(event)
