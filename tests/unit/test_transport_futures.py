"""aiokafka's per-record delivery future, created on the worker's loop without asking asyncio for it."""

from __future__ import annotations

import asyncio
import threading

import aiokafka.util
from aiokafka.producer.message_accumulator import BatchBuilder, MessageBatch
from aiokafka.structs import TopicPartition

from streamproc.runtime.consumer import install_loop_bound_futures


def a_batch() -> MessageBatch:
    return MessageBatch(TopicPartition("t", 0), BatchBuilder(16384, 0), ttl=30, linger_time=0)


def test_record_futures_belong_to_the_loop_of_the_thread_that_produces(monkeypatch):
    original = MessageBatch.append.__defaults__
    try:
        async def on_main_loop() -> None:
            assert install_loop_bound_futures(asyncio.get_running_loop())
            assert install_loop_bound_futures(asyncio.get_running_loop())  # again: still one wrapper deep
            batch = a_batch()
            with monkeypatch.context() as m:  # the loop is not looked up: aiokafka's lookup would raise
                m.setattr(aiokafka.util, "get_running_loop", lambda: 1 / 0)
                future = batch.append(b"k", b"v", None)
            assert future is not None and future.get_loop() is asyncio.get_running_loop()

        asyncio.run(on_main_loop())

        seen: list[bool] = []

        def elsewhere() -> None:  # another thread, its own loop: aiokafka's own lookup
            async def produce() -> None:
                batch = a_batch()
                seen.append(batch.append(b"k", b"v", None).get_loop() is asyncio.get_running_loop())

            asyncio.run(produce())

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert seen == [True]
    finally:
        MessageBatch.append.__defaults__ = original
