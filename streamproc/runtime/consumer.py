"""A Faust transport whose consumer hands records to the streams with less per-record machinery.

Faust's ``Consumer._drain_messages`` awaits ``wait_first(callback(message), suspend_flow.wait())`` for
every record: two tasks and an ``asyncio.wait`` each. This consumer awaits the callback directly while
the flow is not suspended and keeps ``wait_first`` only when it is (a rebalance in progress), so group
membership, offsets, gaps and acks stay Faust's own. Registered as the ``streamproc://`` transport
(entry point ``faust.transports``) and used for the consumer only (``broker_consumer``).

Topics an app reads in batches anyway can skip the per-record delivery altogether: with a :class:`BulkInbox`
attached to the app (:func:`attach_inbox`), the consumer hands each fetch of those topics over as one list of
messages, tracked as unacked exactly as Faust tracks what it delivers to a stream. The reader acks each message
through the consumer (``Consumer.ack``) once it is applied, so commits, gaps and rebalances stay Faust's own;
what it skips is the conductor's channel lookup, an ``Event`` per record, the channel queue and the stream's
per-event ack.

With Faust's stock consumer, :func:`drain_batches` reads an agent's stream in bulk instead: it drains the agent's
channel queue (``get_nowait`` until empty, then one awaited ``get``) and leaves acking to the caller, who acks only
what was applied (``Stream.take_events`` acks a batch in a ``finally`` block, so a batch that failed or was
cancelled by a shutdown would be committed). Messages are tracked as unacked as Faust tracks them, so the
committed offset never passes an event in flight; events of a previous consumer generation are passed on for the
caller to drop.

This is the one module that uses Faust's, mode's and aiokafka's internals: each private name is listed in
``THIRD_PARTY_INTERNALS`` with the version it was checked against, and ``tests/unit/test_third_party_internals.py``
fails if an upgrade removes one. Everything else goes through the public functions here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, cast

from aiokafka.producer.message_accumulator import MessageBatch
from aiokafka.util import create_future
from faust.sensors.monitor import Monitor
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, AppT, ConsumerT, EventT, Message, ProducerT, StreamT
from faust.types.tuples import ack_lock
from mode import Service, ServiceT
from mode.utils.futures import notify

YIELD_EVERY = 100  # records delivered one by one between two yields to the event loop, as in Faust's loop

CHECKED_AGAINST = "faust-streaming 0.15.3, mode-streaming 0.7.1, aiokafka 0.14.0"
# (owner, private name): what this module reads, writes or overrides of it
THIRD_PARTY_INTERNALS: dict[tuple[str, str], str] = {
    ("aiokafka.producer.message_accumulator.MessageBatch.append", "_create_future"):
        "a default argument replaced by install_loop_bound_futures",
    ("faust.transport.consumer.Consumer", "_committed_offset"): "read: the last committed offset per partition",
    ("faust.transport.drivers.aiokafka.Producer", "_settings_extra"): "overridden: idempotence and acks=all",
    ("faust.transport.consumer.Consumer", "_acked"): "written by ack_applied, as Consumer.ack does",
    ("faust.transport.consumer.Consumer", "_acked_index"): "written by ack_applied, as Consumer.ack does",
    ("faust.transport.consumer.Consumer", "_n_acked"): "written by ack_applied and the drain loop",
    ("faust.transport.consumer.Consumer", "_waiting_for_ack"): "notified by ack_applied, as Consumer.ack does",
    ("faust.transport.consumer.Consumer", "_on_message_in"): "called for a fetch handed over in bulk",
    ("faust.transport.consumer.Consumer", "_read_offset"): "read and written by the drain loop",
    ("faust.transport.consumer.Consumer", "_commit_every"): "read by the drain loop",
    ("faust.transport.consumer.Consumer", "_add_gap"): "called by the drain loop",
    ("faust.transport.consumer.Consumer", "_drain_messages"): "overridden: the drain loop",
    ("faust.streams.Stream", "_on_message_in"): "called by drain_batches for each message it tracks",
    ("mode.services.Service", "_stopped"): "read by the drain loop (the consumer's and the fetcher's)",
}


def install_loop_bound_futures(loop: asyncio.AbstractEventLoop) -> bool:
    """Make aiokafka's producer create each record's delivery future on ``loop`` without asking asyncio for the
    running loop. On CPython 3.11 every ``asyncio.get_event_loop()`` from C checks the process id with a
    ``getpid()`` system call (fork detection; 3.12 dropped it), and ``MessageBatch.append`` asks once per record
    produced: 2.5 % of a busy worker's time went to that syscall (py-spy ``--native``). Other threads' loops are
    untouched. Returns whether it was installed (False if aiokafka's ``append`` changed shape)."""
    append = MessageBatch.append
    names = append.__code__.co_varnames[: append.__code__.co_argcount]
    defaults = append.__defaults__ or ()
    if "_create_future" not in names:
        return False
    index = names.index("_create_future") - (len(names) - len(defaults))
    if index < 0 or getattr(defaults[index], "__wrapped__", defaults[index]) is not create_future:
        return False
    owner = threading.get_ident()
    on_loop = loop.create_future
    get_ident = threading.get_ident

    def loop_bound_create_future(other: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[Any]:
        if other is None and get_ident() == owner:
            return on_loop()
        return create_future(other)

    loop_bound_create_future.__wrapped__ = create_future  # type: ignore[attr-defined]
    append.__defaults__ = (*defaults[:index], loop_bound_create_future, *defaults[index + 1 :])
    return True


class BulkInbox:
    """Whole fetches of some topics, from the consumer to one reader. Bounded: the consumer waits (and so stops
    fetching) while ``capacity`` messages are waiting, as it waits on a full stream buffer."""

    def __init__(self, topics: Iterable[str], capacity: int) -> None:
        self.topics = frozenset(topics)
        self.capacity = capacity
        self._fetches: deque[list[Message]] = deque()
        self.size = 0
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    async def put(self, messages: list[Message]) -> None:
        while self.size >= self.capacity:
            self._room.clear()
            await self._room.wait()
        self._fetches.append(messages)
        self.size += len(messages)
        self._arrived.set()

    def take(self, limit: int) -> list[Message]:
        """Up to ``limit`` waiting messages, in arrival order (never blocks)."""
        out: list[Message] = []
        fetches = self._fetches
        while fetches and len(out) < limit:
            head = fetches[0]
            room = limit - len(out)
            if len(head) <= room:
                out.extend(fetches.popleft())
            else:
                out.extend(head[:room])
                fetches[0] = head[room:]
        self.size -= len(out)
        if not fetches:
            self._arrived.clear()
        if self.size < self.capacity:
            self._room.set()
        return out

    async def wait(self, timeout: float | None = None) -> bool:
        """Until something is waiting (True) or ``timeout`` seconds passed (False)."""
        if self._fetches:
            return True
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True


_INBOXES: dict[int, BulkInbox] = {}  # id(app) -> its inbox (an app lives as long as its process)


def attach_inbox(app: AppT, inbox: BulkInbox) -> None:
    """Deliver ``inbox.topics`` to ``inbox`` in bulk (only the ``streamproc://`` consumer does)."""
    _INBOXES[id(app)] = inbox


def inbox_of(app: AppT) -> BulkInbox | None:
    return _INBOXES.get(id(app))


def committed_offset(consumer: ConsumerT, tp: TP) -> int | None:
    """The last offset Faust committed for ``tp`` (None: none yet)."""
    committed: dict[TP, int | None] = getattr(consumer, "_committed_offset", {})
    return committed.get(tp)


def sensors_told_in_bulk(consumer: ConsumerT) -> bool:
    """Whether the consumer tells the sensors about whole fetches and batches (the app's monitor is the only
    sensor) rather than every message."""
    return isinstance(consumer, Consumer) and consumer._monitor_only() is not None


class Consumer(aiokafka_driver.Consumer):
    # Pausing a partition while a fetched batch is being handed over loses records: Faust checks each record's
    # partition against the live set of active partitions and skips it if paused, but the fetch position is
    # already past it. So pauses asked for during a ``getmany`` are applied between fetches.
    _handing_over: bool = False
    _deferred_pauses: set[TP] | None = None

    def pause_partitions(self, tps: Iterable[TP]) -> None:
        if self._handing_over:
            if self._deferred_pauses is None:
                self._deferred_pauses = set()
            self._deferred_pauses.update(tps)
        else:
            super().pause_partitions(tps)

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        tps = set(tps)
        if self._deferred_pauses:
            self._deferred_pauses.difference_update(tps)
        super().resume_partitions(tps)

    def _monitor_only(self) -> Monitor | None:
        """The app's monitor if it is the only sensor (the usual case): then the bulk paths below tell it about a
        whole fetch or batch at once; with any other sensor installed, every sensor hears of every message."""
        sensors = list(cast(Any, self.app.sensors))
        if len(sensors) == 1 and type(sensors[0]) is Monitor:
            return sensors[0]
        return None

    def _received(self, messages: list[Message]) -> None:
        """``on_message_in`` for a fetch handed over in bulk."""
        monitor = self._monitor_only()
        if monitor is None:
            on_message_in = self._on_message_in
            for message in messages:
                on_message_in(message.tp, message.offset, message)
            return
        monitor.messages_received_total += len(messages)
        monitor.messages_active += len(messages)
        by_topic = monitor.messages_received_by_topic
        read_offsets = monitor.tp_read_offsets
        for message in messages:  # in fetch order: the last offset of each partition stays
            by_topic[message.topic] += 1
            read_offsets[message.tp] = message.offset

    def ack_applied(self, messages: list[Message]) -> int:
        """``Consumer.ack`` (and the sensors' ``on_message_out``) for every message of an applied batch: Faust's
        bookkeeping, under one hold of its ack lock. Returns how many were acked now."""
        acks_enabled_for = self.app.topics.acks_enabled_for
        committed_offset = self._committed_offset
        acked_index_of = self._acked_index
        acked_of = self._acked
        acked_now: list[Message] = []
        with ack_lock:
            try:
                for message in messages:
                    if message.acked:
                        continue
                    message.acked = True
                    if not acks_enabled_for(message.topic):
                        continue
                    tp = message.tp
                    offset = message.offset
                    committed = committed_offset[tp]
                    if committed is None or offset >= committed:
                        acked_index = acked_index_of[tp]
                        if offset not in acked_index:
                            acked_index.add(offset)
                            acked_of[tp].append(offset)
                            acked_now.append(message)
                self._n_acked += len(acked_now)
            finally:
                notify(self._waiting_for_ack)
        monitor = self._monitor_only()
        if monitor is None:
            on_message_out = self.app.sensors.on_message_out
            for message in acked_now:
                on_message_out(message.tp, message.offset, message)
        else:
            monitor.messages_active -= len(acked_now)
        return len(acked_now)

    _rewinds: dict[TP, int] | None = None
    _rewind_failed: Callable[[TP], None] | None = None

    def rewind(self, offsets: dict[TP, int], failed: Callable[[TP], None]) -> None:
        """Seek these partitions back before the next fetch; ``failed(tp)`` for each if the seek fails. Not at once:
        a fetch in flight would hand over records from before the seek, and the drain loop would move the read
        offset past the rewind again (and count the skipped offsets as a gap, committable unapplied)."""
        if self._rewinds is None:
            self._rewinds = {}
        self._rewinds.update(offsets)
        self._rewind_failed = failed

    async def _seek_rewinds(self) -> None:
        pending, self._rewinds = self._rewinds, None
        if not pending:
            return
        try:  # through the consumer thread, which owns the fetch positions; sets the read offsets too
            await self.seek_wait(pending)
        except Exception as exc:  # revoked meanwhile, say: asked again by the next batch while still assigned
            self.log.warning("could not seek back to %r: %r", pending, exc)
            if self._rewind_failed is not None:
                for tp in pending:
                    self._rewind_failed(tp)

    def _apply_deferred_pauses(self) -> None:
        self._handing_over = False
        if self._deferred_pauses:
            pauses, self._deferred_pauses = self._deferred_pauses, None
            super().pause_partitions(pauses)

    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover - exercised end to end
        # Faust's loop (faust/transport/consumer.py), with the per-record wait_first made conditional; its
        # handling of a stop, here, and the loop in ``_drain_until_stopped``.
        try:
            await self._drain_until_stopped(fetcher)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self._apply_deferred_pauses()
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _drain_until_stopped(self, fetcher: ServiceT) -> None:  # pragma: no cover - exercised end to end
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set
        inbox = inbox_of(self.app)
        bulk_topics = inbox.topics if inbox is not None else frozenset()
        while not (consumer_should_stop() or fetcher_should_stop()):
            self.diag.set_flag(CONSUMER_FETCHING)
            if self._rewinds:  # between two fetches: no fetch in flight can undo the seek
                await self._seek_rewinds()
            self._apply_deferred_pauses()
            self._handing_over = True
            ait = cast(AsyncIterator[Any], self.getmany(timeout=1.0))
            await self.sleep(0)
            if self.should_stop:
                continue
            fetched = await self._deliver_fetch(ait, bulk_topics)
            if fetched:
                assert inbox is not None
                self._received(fetched)
                await self._commit_if_due()
                await inbox.put(fetched)
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _commit_if_due(self) -> None:
        if self._commit_every is not None and self._n_acked >= self._commit_every:
            self._n_acked = 0
            await self.commit()

    async def _deliver_fetch(self, ait: AsyncIterator[Any], bulk_topics: frozenset[str]) -> list[Message]:
        """One fetch: records of ``bulk_topics`` are returned, to be handed over as one list; the others go to
        the callback one by one, as Faust's loop delivers them."""
        callback = self.callback
        suspended = self.suspend_flow.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        num_since_yield = 0
        fetched: list[Message] = []
        async for tp, message in ait:
            offset = message.offset
            r_offset = get_read_offset(tp)
            if r_offset is not None and offset < r_offset:
                continue  # already read (Faust drops it the same way)
            gap = offset - (r_offset or 0)
            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                await self._add_gap(tp, r_offset + 1, offset)
            if message.topic in bulk_topics:
                # Handed over even during a rebalance (Faust drops those): the reader waits for the rebalance to
                # end and decides by the generation the record was fetched in, and by the records it dropped before
                # (streamproc/pipeline/readmission.py). A record dropped here, after the fetch position moved past
                # it, would be lost if the rebalance's seek came first. Tracked as Faust's streams track, but not in
                # ``_unacked_messages``: a weak set read only by ``wait_empty``, which this app turns off
                # (``stream_wait_empty=False``)
                message.tracked = True
                fetched.append(message)
                set_read_offset(tp, offset)
                continue
            num_since_yield += 1
            if num_since_yield > YIELD_EVERY:
                await asyncio.sleep(0)
                num_since_yield = 0
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
            if suspended():
                await self.wait_first(callback(message), self.suspend_flow.wait())
            else:
                await callback(message)
            set_read_offset(tp, offset)
        return fetched


class Producer(aiokafka_driver.Producer):
    """Faust's producer with idempotence on (and so ``acks=all``): a retried send after a lost acknowledgement, or a
    broker's leadership moving, does not write a record twice or out of order. Faust turns it on only inside its
    own transactions."""

    def _settings_extra(self) -> Any:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class Transport(aiokafka_driver.Transport):
    Consumer: type[ConsumerT] = Consumer  # type: ignore[misc]
    Producer: type[ProducerT] = Producer  # type: ignore[misc]


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
            # follows it, streamproc/pipeline/readmission.py); the new owner re-reads it from the committed offset
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
