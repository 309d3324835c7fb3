"""What of the consumed input may be applied, and when: the two input topics aligned by record time (a topic far
ahead of the other is held back, and its partitions paused), and nothing fetched before a rebalance, nor after a
record dropped in one, until the partition is read again from there (streamproc/pipeline/readmission.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Container

import faust
from faust.types import TP, EventT, Message

from streamproc.metrics import Metrics
from streamproc.pipeline.align import TopicAligner
from streamproc.pipeline.readmission import Readmission
from streamproc.pipeline.records import RawRecord
from streamproc.runtime.consumer import Consumer as FastConsumer
from streamproc.runtime.consumer import committed_offset
from streamproc.settings import Settings
from streamproc.topics import INPUT_TOPICS

log = logging.getLogger("streamproc.worker")

Pair = tuple[RawRecord, Message | EventT]  # an input record and its Faust handle (acked once applied)


class Intake:
    def __init__(self, settings: Settings, metrics: Metrics, app: faust.App) -> None:
        self.settings = settings
        self.metrics = metrics
        self.app = app
        # input records held back until the other topic of their partition catches up (streamproc/pipeline/align.py)
        # a consumed record's handle: the Message (bulk delivery, streamproc/runtime/consumer.py) or Faust's Event
        self.aligner: TopicAligner[Message | EventT] | None = (
            TopicAligner(tuple(INPUT_TOPICS), settings.align_max_wait_s, settings.align_hold_limit,
                         settings.align_pause_at) if settings.align_inputs else None
        )
        self.received: dict[tuple[str, int], int] = {}  # (topic, partition) -> newest offset handed to the aligner
        self.paused: set[TP] = set()  # input partitions paused because the aligner holds too much of them
        self.readmission = Readmission()  # what may be applied after a rebalance
        self.kind_of = {settings.topic(name): name for name in INPUT_TOPICS}  # physical topic -> declared name

    def to_raw(self, msg: Message) -> RawRecord:
        ts = msg.timestamp
        key = msg.key
        value = msg.value
        return RawRecord(  # topic, kind, partition, offset, key, value, timestamp_ms (positional: one per record)
            msg.topic,
            self.kind_of.get(msg.topic, msg.topic),
            msg.partition,
            msg.offset,
            key if key is None or isinstance(key, bytes) else str(key).encode(),
            value if value is None or isinstance(value, bytes) else bytes(value),
            int(ts * 1000) if ts else None,
        )

    def report_lag(self, last_offsets: dict[tuple[str, int], int]) -> None:
        """Consumer lag and the offset applied, per input partition this worker owns."""
        consumer = self.app.consumer
        for tp in consumer.assignment():
            if tp.topic not in self.kind_of:
                continue
            try:
                high = consumer.highwater(tp)
            except Exception:
                continue
            if high is None:
                continue
            done = last_offsets.get((tp.topic, tp.partition))
            if done is None:  # nothing processed since start: fall back to the committed position
                done = self.committed(tp)
            kind, partition = self.kind_of[tp.topic], str(tp.partition)
            self.metrics.consumer_lag.labels(kind, partition).set(max(0, high - done - 1))
            self.metrics.input_offset.labels(kind, partition).set(done)

    def rebalanced(self) -> None:
        """Held records are re-read from the committed offsets by whoever owns their partitions now (and, if that
        is this worker, no later record of theirs is applied first); a partition this worker paused and still
        owns is resumed (Faust keeps pauses of kept partitions)."""
        if self.aligner is None:
            return
        for partition, queues in self.aligner.queues.items():
            for kind, queue in queues.items():
                if queue:
                    self.readmission.drop(TP(self.settings.topic(kind), partition), queue[0][0].offset)
                    self.metrics.input_dropped.inc(len(queue))
        self.aligner.clear()
        self.received.clear()
        consumer = self.app.consumer
        kept = [tp for tp in self.paused if tp in consumer.assignment()]
        if kept:
            consumer.resume_partitions(kept)
        self.paused.clear()
        self.metrics.input_held.set(0)

    async def readmit(self, pairs: list[Pair]) -> list[Pair]:
        """The records that may be applied: none fetched before the last rebalance, and none of a partition after
        one dropped until the partition is read again from it (streamproc/pipeline/readmission.py); partitions left with
        such a hole are sought back to it."""
        readmission = self.readmission
        generation = self.app.consumer_generation_id
        dropped_before = readmission.dropped
        admitted = readmission.admit(pairs, generation, position_of, generation_of)
        if readmission.dropped > dropped_before:
            log.warning("dropped %d fetched records: fetched before a rebalance, or after one of them (generation %s)",
                        readmission.dropped - dropped_before, generation)
            self.metrics.input_dropped.inc(readmission.dropped - dropped_before)
        if readmission.holes and self.app.flow_control.is_active():
            consumer = self.app.consumer
            rewinds = dict(readmission.rewinds(generation, consumer.assignment(),
                                               lambda tp: committed_offset(consumer, tp)))
            if rewinds:
                log.info("read again from the first dropped record: %s", rewinds)
                if isinstance(consumer, FastConsumer):
                    consumer.rewind(rewinds, readmission.seek_failed)  # before its next fetch
                else:  # Faust's stock consumer: at once, through its consumer thread
                    try:
                        await consumer.seek_wait(rewinds)
                    except Exception as exc:  # revoked meanwhile, say: asked again by the next batch if not
                        log.warning("could not seek back to %r: %r", rewinds, exc)
                        for tp in rewinds:
                            readmission.seek_failed(tp)
        return admitted

    def align(self, pairs: list[tuple[RawRecord, Message | EventT]]) -> list[tuple[RawRecord, Message | EventT]]:
        """Hand the batch to the aligner and take what it releases (``readmit`` then decides what of it may be
        applied after a rebalance); pause topic partitions that run far ahead of the other topic, resume them
        once their held records drain."""
        aligner = self.aligner
        assert aligner is not None
        received = self.received
        for rec, _ in pairs:
            received[(rec.topic, rec.partition)] = rec.offset
        aligner.push(pairs)
        released = aligner.release(self._behind, time.monotonic())
        consumer = self.app.consumer
        for partition, queues in aligner.queues.items():
            for kind, queue in queues.items():
                tp = TP(self.settings.topic(kind), partition)
                if aligner.should_pause(partition, kind):
                    if self.settings.fast_consumer:  # Faust's stock consumer would drop fetched records of it
                        consumer.pause_partitions([tp])  # idempotent: also after Faust resumed it on its own
                        if tp not in self.paused:
                            self.metrics.input_pauses.inc()
                            self.paused.add(tp)
                elif tp in self.paused and len(queue) < aligner.pause_at // 2:
                    consumer.resume_partitions([tp])
                    self.paused.discard(tp)
        self.metrics.input_held.set(aligner.held())
        return released

    def _behind(self, kind: str, partition: int) -> bool:
        """The broker has records of this input partition that this worker has not received yet."""
        topic = self.settings.topic(kind)
        tp = TP(topic, partition)
        consumer = self.app.consumer
        try:
            high = consumer.highwater(tp)
        except Exception:  # not assigned here (any more)
            return False
        if high is None:
            return False
        seen = self.received.get((topic, partition))
        return bool(high - 1 > (seen if seen is not None else self.committed(tp)))

    def silent_sources(self, observed: Container[str]) -> list[str]:
        """The input sources ("kind:partition") of this worker's partitions that carry no record at all: none on
        the broker (the partition's end is at or before the committed position, as far as the last fetch said),
        none received by this worker and none in ``observed`` (the step's watermarks, which include what earlier
        owners saw). Such a topic must not hold time back; one whose end is not known yet still does."""
        consumer = self.app.consumer
        silent = []
        for tp in consumer.assignment():
            kind = self.kind_of.get(tp.topic)
            if kind is None:
                continue
            source = f"{kind}:{tp.partition}"
            if source in observed or (tp.topic, tp.partition) in self.received:
                continue
            try:
                high = consumer.highwater(tp)
            except Exception:  # not assigned here (any more)
                continue
            if high is not None and high - 1 <= self.committed(tp):
                silent.append(source)
        return silent

    def committed(self, tp: TP) -> int:
        """The last offset Faust committed for ``tp`` (-1: none yet)."""
        committed = committed_offset(self.app.consumer, tp)
        return committed if committed is not None else -1


def message_of(handle: Message | EventT) -> Message:
    return handle if isinstance(handle, Message) else handle.message


def position_of(pair: Pair) -> tuple[TP, int, int | None]:
    message = message_of(pair[1])
    return message.tp, message.offset, message.generation_id


def generation_of(pair: Pair) -> int | None:
    return message_of(pair[1]).generation_id
