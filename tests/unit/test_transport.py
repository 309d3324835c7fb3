"""The bulk inbox between the streamproc:// consumer and the worker (no broker needed)."""

from __future__ import annotations

import asyncio

from faust.types import TP, Message

from streamproc.runtime.consumer import BulkInbox


def messages(topic: str, offsets: range) -> list[Message]:
    return [Message(topic, 0, offset, 0.0, 0, None, None, b"v", None, tp=TP(topic, 0)) for offset in offsets]


async def test_take_hands_over_fetches_in_order_and_splits_at_the_limit():
    inbox = BulkInbox(["clicks"], capacity=100)
    await inbox.put(messages("clicks", range(0, 5)))
    await inbox.put(messages("clicks", range(5, 8)))
    assert inbox.size == 8
    first = inbox.take(6)
    assert [m.offset for m in first] == [0, 1, 2, 3, 4, 5]
    assert inbox.size == 2
    assert [m.offset for m in inbox.take(10)] == [6, 7]
    assert inbox.take(10) == [] and inbox.size == 0


async def test_wait_returns_when_something_arrives_or_times_out():
    inbox = BulkInbox(["clicks"], capacity=10)
    assert await inbox.wait(0.01) is False

    async def later() -> None:
        await asyncio.sleep(0.01)
        await inbox.put(messages("clicks", range(1)))

    task = asyncio.create_task(later())
    assert await inbox.wait(1.0) is True
    await task
    inbox.take(1)
    assert await inbox.wait(0.01) is False  # emptied: waiting again blocks


async def test_a_full_inbox_holds_the_consumer_back_until_the_reader_takes():
    inbox = BulkInbox(["clicks"], capacity=4)
    await inbox.put(messages("clicks", range(0, 4)))
    blocked = asyncio.create_task(inbox.put(messages("clicks", range(4, 6))))
    await asyncio.sleep(0.02)
    assert not blocked.done() and inbox.size == 4  # the consumer waits, so it stops fetching
    assert len(inbox.take(3)) == 3
    await asyncio.wait_for(blocked, 1.0)
    assert [m.offset for m in inbox.take(10)] == [3, 4, 5]


async def test_a_clean_stop_waits_for_outputs_still_being_confirmed(monkeypatch):
    import streamproc.pipeline.outbox as outbox_module
    from streamproc.runtime.app import Worker
    from streamproc.settings import Settings

    worker = Worker(Settings(_env_file=None))
    confirmed = []

    async def confirm(delay, name):
        await asyncio.sleep(delay)
        confirmed.append(name)

    worker.outbox.unconfirmed.extend([asyncio.ensure_future(confirm(0.05, "slow")),
                               asyncio.ensure_future(confirm(0.0, "fast"))])
    await worker.app.on_before_shutdown.send()  # what Faust sends once the consumer has stopped
    assert confirmed == ["fast", "slow"]

    monkeypatch.setattr(outbox_module, "SHUTDOWN_CONFIRM_S", 0.01)  # bounded: a stuck delivery does not hang a stop
    stuck = asyncio.ensure_future(confirm(60, "stuck"))
    worker.outbox.unconfirmed.append(stuck)
    await worker.app.on_before_shutdown.send()
    assert not stuck.done()
    stuck.cancel()
