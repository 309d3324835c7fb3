"""The bulk consumer's batch bookkeeping against Faust's own, message by message: the same offsets become
committable, the same messages count as acked, the monitor sees the same numbers."""

from __future__ import annotations

import random

import faust
from faust.sensors.monitor import Monitor
from faust.types import TP, Message

from streamproc.runtime.consumer import Consumer


def an_app() -> faust.App:
    app = faust.App("bulk-ack-test", broker="kafka://localhost:1", broker_consumer="streamproc://localhost:1",
                    stream_wait_empty=False)
    app.topics.acks_enabled_for = lambda topic: topic != "no-acks"  # type: ignore[method-assign]
    if app.monitor not in list(app.sensors):  # as a started app has it
        app.sensors.add(app.monitor)
    return app


def messages(seed: int) -> list[Message]:
    rng = random.Random(seed)
    out = []
    for _ in range(300):
        topic = rng.choice(["clicks", "transactions", "no-acks"])
        out.append(Message(topic, rng.randrange(3), rng.randrange(60), None, None, None, b"v", None, None))
    return out


def bookkeeping(consumer: Consumer, batch: list[Message], monitor: Monitor) -> tuple:
    return ({tp: sorted(v) for tp, v in consumer._acked.items() if v},
            {tp: sorted(v) for tp, v in consumer._acked_index.items() if v},
            consumer._n_acked, [m.acked for m in batch], monitor.messages_active,
            monitor.messages_received_total, dict(monitor.messages_received_by_topic), dict(monitor.tp_read_offsets))


def test_batch_bookkeeping_is_fausts_message_by_message():
    for seed in range(20):
        results = []
        for bulk in (False, True):
            app = an_app()
            consumer = app.consumer
            assert isinstance(consumer, Consumer)
            monitor = app.monitor
            assert consumer._monitor_only() is monitor  # the bulk paths apply
            consumer._committed_offset[TP("clicks", 1)] = 30  # below the commit: never acked again
            batch = messages(seed)
            batch[5].acked = True  # acked already
            if bulk:
                consumer._received(batch)
                half = len(batch) // 2
                acked = consumer.ack_applied(batch[:half]) + consumer.ack_applied(batch[half:])
            else:
                acked = 0
                for m in batch:
                    app.sensors.on_message_in(m.tp, m.offset, m)
                for m in batch:
                    if consumer.ack(m):
                        acked += 1
                        app.sensors.on_message_out(m.tp, m.offset, m)
            results.append((acked, bookkeeping(consumer, batch, monitor)))
        assert results[0] == results[1]
        assert results[0][0] > 0


def test_another_sensor_hears_of_every_message():
    heard: list[tuple[str, int]] = []

    class Sensor(Monitor):
        def on_message_in(self, tp, offset, message):
            heard.append(("in", offset))

        def on_message_out(self, tp, offset, message):
            heard.append(("out", offset))

    app = an_app()
    app.sensors.add(Sensor())
    consumer = app.consumer
    batch = [Message("clicks", 0, o, None, None, None, b"v", None, None) for o in range(4)]
    consumer._received(batch)
    consumer.ack_applied(batch)
    assert heard == [("in", o) for o in range(4)] + [("out", o) for o in range(4)]
