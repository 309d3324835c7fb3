"""The Faust worker: thin agents that decode, load, call the domain, save and emit.

Agent concurrency stays 1: with more, offsets could be committed past an event still in flight.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import faust
import orjson
from faust.types import TP, EventT, Message
from faust.web import Request, Response, View
from prometheus_client import CollectorRegistry, generate_latest

from streamproc.adapters.feature_store import FeatureStore, RedisFeatureStore
from streamproc.adapters.model_store import ModelStore, RedisModelStore
from streamproc.align import TopicAligner
from streamproc.compiled import status as compiled_status
from streamproc.config import model_config
from streamproc.errors import FatalStepError, is_transient, root_cause
from streamproc.lookup import lookup
from streamproc.metrics import Metrics
from streamproc.pipeline.factory import build_processor
from streamproc.processing import BatchResult, RawRecord
from streamproc.readmission import Readmission
from streamproc.schemas import OUTPUT_SCHEMA_VERSION, DeadLetter
from streamproc.settings import Settings
from streamproc.topics import DLQ_TOPIC, INPUT_TOPICS, faust_credentials, wait_for_topics
from streamproc.trainer import TRAINING_TOPIC, Trainer
from streamproc.transport import (
    BulkInbox,
    ack_batch,
    attach_inbox,
    committed_offset,
    drain_batches,
    inbox_of,
    install_loop_bound_futures,
    mark_taken,
    sensors_told_in_bulk,
)
from streamproc.transport import Consumer as FastConsumer

ALERTS_TOPIC = "churn-alerts"
RECOMMENDATIONS_TOPIC = "recommendations"
MOVES_TOPIC = "segment-moves"

@dataclass
class Delivery:
    """One output handed to the producer: what it was (to dead-letter it if the broker refuses it) and the
    future of the broker's acknowledgement."""

    name: str  # declared topic name
    key: str
    output_id: str
    value: bytes
    future: Any = None


Pair = tuple[RawRecord, Message | EventT]  # an input record and its Faust handle (acked once applied)

log = logging.getLogger("streamproc.worker")

TRAINING_RECORD_EXAMPLES = 500  # examples per training-topic record (~150-200 KB, under the broker's 1 MB default)
RETRY_MAX_SECONDS = 5.0
MAX_UNCONFIRMED = 8  # emits whose broker acknowledgements may be awaited at once (bounds outputs in flight)
SHUTDOWN_CONFIRM_S = 10.0  # a clean stop waits this long at most for outputs still being confirmed
FATAL_EXIT_CODE = 70  # EX_SOFTWARE: a step failed for good (the log and stderr say which and why)
SWEEP_IDLE_S = 0.5  # no batch for this long: the sweep timer carries a pass on by itself


class RawSchema(faust.Schema):
    """Key and value stay the record's bytes: the batch step decodes and validates them itself, so Faust's
    codec registry (two lookups and calls per record) has nothing to do."""

    def compile(self, app: Any, *, on_key_decode_error: Any = None, on_value_decode_error: Any = None,
                default_propagate: bool = False) -> Any:
        create_event = app.create_event

        async def decode(message: Any, *, propagate: bool = default_propagate) -> Any:
            return create_event(message.key, message.value, message.headers, message)

        return decode


class Worker:
    """Everything one worker process holds: the Faust app, the store, the processor, the metrics."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None,
                 store: FeatureStore | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(registry)
        self.store = store or RedisFeatureStore.from_url(settings.redis_url, **settings.redis_kwargs())
        self.models: ModelStore = RedisModelStore(
            self.store.redis if isinstance(self.store, RedisFeatureStore) else RedisFeatureStore.from_url(
                settings.redis_url, **settings.redis_kwargs()).redis
        )
        # the global trainer's group member (streamproc/trainer.py): learns where it owns the training partition
        self.trainer: Trainer | None = (
            Trainer(settings, self.models, self.metrics, model_config(settings))
            if settings.models_enabled and settings.trainer_enabled else None
        )
        self.processor = build_processor(settings, self.store, self.metrics)
        self.last_batch_at = 0.0  # monotonic time of the last applied batch
        self.step_lock = asyncio.Lock()  # one batch or sweep step at a time (the ingest agent, the sweep timer)
        self.kind_of = {settings.topic(name): name for name in INPUT_TOPICS}
        self.last_offsets: dict[tuple[str, int], int] = {}
        self.outbox_checked: set[int] = set()  # partitions whose outbox was re-sent since this worker got them
        self.unconfirmed: deque[asyncio.Future[None]] = deque()  # emits whose acknowledgements are awaited
        self.model_checked = False  # the checkpoint was looked up before the first batch
        # input records held back until the other topic of their partition catches up (streamproc/align.py)
        # a consumed record's handle: the Message (bulk delivery, streamproc/transport.py) or Faust's Event
        self.aligner: TopicAligner[Message | EventT] | None = (
            TopicAligner(tuple(INPUT_TOPICS), settings.align_max_wait_s, settings.align_hold_limit,
                         settings.align_pause_at) if settings.align_inputs else None
        )
        self.received: dict[tuple[str, int], int] = {}  # (topic, partition) -> newest offset handed to the aligner
        self.paused: set[TP] = set()  # input partitions paused because the aligner holds too much of them
        self.readmission = Readmission()  # what may be applied after a rebalance
        self.fatal: FatalStepError | None = None  # why the worker is stopping, if a step failed for good
        self.sweep_failures = 0  # sweep steps in a row that failed with an error that is not transient
        self.app = self._build_app()

    def _build_app(self) -> faust.App:
        s = self.settings
        app = faust.App(
            s.app_id,
            broker=f"kafka://{s.kafka_bootstrap}",
            # our consumer subclass (streamproc/transport.py): less per-record machinery, same semantics
            broker_consumer=f"{'streamproc' if s.fast_consumer else 'kafka'}://{s.kafka_bootstrap}",
            store="memory://",
            value_serializer="raw",
            key_serializer="raw",
            topic_disable_leader=True,
            topic_allow_declare=False,
            consumer_auto_offset_reset="earliest",
            web_enabled=True,
            web_bind=s.web_host,
            web_port=s.web_port,
            datadir=str(s.state_dir / "faust" / s.app_id),
            producer_acks=-1,
            broker_credentials=faust_credentials(s),
            # do not wait for unacked records on shutdown or rebalance: they are re-read and fenced
            stream_wait_empty=False,
            broker_commit_every=1000,
            broker_session_timeout=s.kafka_session_timeout_s,
            broker_heartbeat_interval=s.kafka_heartbeat_interval_s,
            broker_commit_interval=1.0,
            stream_processing_timeout=s.stream_processing_timeout_s,
        )
        inputs = app.topic(*(s.topic(name) for name in INPUT_TOPICS), schema=RawSchema())
        if s.fast_consumer:
            # the agent keeps the subscription (and Faust's group membership); its records come in bulk
            attach_inbox(app, BulkInbox((s.topic(name) for name in INPUT_TOPICS), 2 * s.batch_max_events))
        app.agent(inputs, name="ingest", concurrency=1)(self.ingest)
        if s.models_enabled:
            app.timer(s.model_reload_s, name="models")(self.reload_model)
        if self.trainer is not None:
            app.task(self.trainer.run)
        app.timer(0.25, name="sweep")(self.continue_sweep)
        app.timer(1.0, name="outbox")(self.resend_parked)
        app.timer(5.0, name="lag")(self.update_lag)
        app.timer(10.0, name="population")(self.update_population)
        app.on_rebalance_complete.connect(self._on_rebalance)  # type: ignore[arg-type]
        app.on_before_shutdown.connect(self._confirm_before_shutdown)  # type: ignore[arg-type]
        worker = self

        @app.page("/metrics")
        class MetricsView(View):
            async def get(self, request: Request) -> Response:
                return self.bytes(generate_latest(worker.metrics.registry), content_type="text/plain; version=0.0.4")

        def authorized(request: Request) -> bool:
            token = worker.settings.http_token
            if token is None:
                return True
            expected = f"Bearer {token.get_secret_value()}"
            return hmac.compare_digest(request.headers.get("Authorization", ""), expected)

        @app.page("/customers/{customer_id}")
        class CustomerView(View):
            async def get(self, request: Request, customer_id: str) -> Response:
                if not authorized(request):
                    return self.json({"error": "unauthorized"}, status=401)
                found = await lookup(worker.store, worker.models, worker.settings,
                                     worker.settings.customer_key(customer_id))
                if found is None:
                    return self.json({"error": "not found"}, status=404)
                return self.json(found)

            async def delete(self, request: Request, customer_id: str) -> Response:
                """Erase the customer (GDPR): features, state, model outputs; the erasure is remembered."""
                if not authorized(request):
                    return self.json({"error": "unauthorized"}, status=401)
                erased = await worker.store.forget(worker.settings.customer_key(customer_id))
                worker.metrics.customers_erased.inc()
                log.info("a customer was erased through the API")  # no id at info level
                return self.json({"erased": erased})

        @app.page("/healthz")
        class HealthView(View):
            async def get(self, request: Request) -> Response:
                return self.json({"status": "ok"})

        return app

    async def _on_rebalance(self, sender: object = None, **kwargs: object) -> None:
        self.metrics.rebalances.inc()
        # partitions may have moved: report lag only for what this worker owns now
        self.metrics.consumer_lag.clear()
        self.metrics.input_offset.clear()
        self.last_offsets.clear()
        self.outbox_checked.clear()
        self.processor.partitions_changed()
        if self.aligner is not None:
            # held records are re-read from the committed offsets by whoever owns their partitions now (and, if
            # that is this worker, no later record of theirs is applied first); a partition this worker paused
            # and still owns is resumed (Faust keeps pauses of kept partitions)
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

    async def ingest(self, stream: faust.StreamT) -> None:
        if self.settings.log_level.upper() != "DEBUG":
            # aiokafka's producer formats a debug record per send when its logger inherits DEBUG from Faust's setup
            logging.getLogger("aiokafka").setLevel(logging.INFO)
        idle_s = 0.25 if self.aligner is not None else None  # held records go at the latest after their wait
        if not install_loop_bound_futures(asyncio.get_running_loop()):
            log.info("aiokafka's MessageBatch.append changed: its per-record future asks asyncio for the loop")
        inbox = inbox_of(self.app)
        batches: AsyncIterator[list[Any]]
        log.info("input delivery: %s", "Faust's stock consumer" if inbox is None else "bulk (streamproc://)")
        if inbox is not None:
            monitored = sensors_told_in_bulk(self.app.consumer)
            log.info("sensors told of %s", "whole fetches and batches" if monitored else "every message")
        log.info("domain core: %s", compiled_status())
        if inbox is not None:  # whole fetches from the consumer (streamproc/transport.py)
            batches = self._inbox_batches(inbox, stream, idle_s)
        else:
            batches = drain_batches(stream, self.settings.batch_max_events, self.settings.batch_linger_s, idle_s)
        async for batch in batches:
            pairs = [(self.to_raw(_message_of(h)), h) for h in batch]
            if self.aligner is not None:
                pairs = self.align(pairs)
            pairs = await self.readmit(pairs)
            # what the aligner releases at once can be many batches' worth: keep each step to the batch size
            step = self.settings.batch_max_events
            for start in range(0, len(pairs), step):
                chunk = pairs[start : start + step]
                records = [rec for rec, _ in chunk]
                await self.apply_with_retry(records)
                self.last_batch_at = time.monotonic()
                handles = [h for _, h in chunk]
                if inbox is not None:
                    self._ack_messages(cast(list[Message], handles))
                else:
                    await ack_batch(stream, cast(list[EventT], handles))
                for rec in records:
                    self.last_offsets[(rec.topic, rec.partition)] = rec.offset
                self.metrics.last_batch.set(time.time())

    async def _inbox_batches(self, inbox: BulkInbox, stream: faust.StreamT,
                             idle_s: float | None) -> AsyncIterator[list[Message]]:
        """Batches of up to ``batch_max_events`` from the inbox, lingering like ``drain_batches``, none while a
        rebalance is under way. With ``idle_s``, an empty batch after that long without records."""
        app = self.app
        max_events = self.settings.batch_max_events
        linger_s = self.settings.batch_linger_s
        loop_time = asyncio.get_running_loop().time
        while not stream.should_stop:
            if not await inbox.wait(idle_s):
                yield []
                continue
            if linger_s and inbox.size < max_events:
                deadline = loop_time() + linger_s
                while inbox.size < max_events and loop_time() < deadline:
                    await asyncio.sleep(min(0.005, linger_s))
            messages = inbox.take(max_events)
            # during a rebalance, wait for its end: then the generation decides (``Worker.readmit``)
            await app.flow_control.acquire()
            if messages:
                mark_taken(app, messages)
                yield messages

    async def readmit(self, pairs: list[Pair]) -> list[Pair]:
        """The records that may be applied: none fetched before the last rebalance, and none of a partition after
        one dropped until the partition is read again from it (streamproc/readmission.py); partitions left with
        such a hole are sought back to it."""
        readmission = self.readmission
        generation = self.app.consumer_generation_id
        dropped_before = readmission.dropped
        admitted = readmission.admit(pairs, generation, _position_of, _generation_of)
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

    def _ack_messages(self, messages: list[Message]) -> None:
        """Applied: each message may be committed now (Faust's own ack bookkeeping, as ``Stream.ack`` ends in)."""
        cast(FastConsumer, self.app.consumer).ack_applied(messages)

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
        return bool(high - 1 > (seen if seen is not None else self._committed(tp)))

    def _committed(self, tp: TP) -> int:
        """The last offset Faust committed for ``tp`` (-1: none yet)."""
        committed = committed_offset(self.app.consumer, tp)
        return committed if committed is not None else -1

    async def continue_sweep(self) -> None:
        """A sweep pass spread over batches goes on while no batch comes (the end of a replay, a quiet hour).
        While batches flow, each one carries a step of the pass, so the pass never delays them by more than a
        step."""
        if time.monotonic() - self.last_batch_at < SWEEP_IDLE_S or self.step_lock.locked():
            return
        if not self.processor.sweep_pending:
            return
        async with self.step_lock:
            if self.fatal is not None:
                return
            try:
                await self.processor.sweep(self.emit)
                self.sweep_failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next batch or tick retries; its outputs are parked in the outbox
                self.outbox_checked.clear()
                log.warning("sweep step failed (%s: %s)", type(exc).__name__, exc)
                try:
                    self.sweep_failures = self._count_failure(exc, self.sweep_failures, "the inactivity sweep")
                except FatalStepError as fatal:
                    self.stop_fatally(fatal)

    async def apply_with_retry(self, records: list[RawRecord]) -> None:
        """Apply a batch; on a lost connection or a timeout back off and retry as long as it takes, never acking
        what failed; on anything else, a few attempts, then the worker stops (``stop_fatally``) and this waits to
        be cancelled by the shutdown, so nothing after the batch is applied."""
        async with self.step_lock:
            try:
                await self._apply_with_retry(records)
            except FatalStepError as exc:
                self.stop_fatally(exc)
        if self.fatal is not None:
            await asyncio.Event().wait()

    async def _apply_with_retry(self, records: list[RawRecord]) -> None:
        delay = 0.1
        failures = 0  # of this batch's attempts that failed with an error that is not transient
        while True:
            try:
                if self.settings.models_enabled and not self.model_checked:
                    # score the very first batch with the current checkpoint, as a worker that never
                    # restarted would: a restart must not change what gets scored, alerted or recommended
                    await self.models.current_version()  # raises while Redis is down: retried below
                    await self.reload_model()
                    self.model_checked = True
                await self._resend_parked_of({rec.partition for rec in records})
                result = await self.processor.process(records)
                # each chunk's outputs are sent as it is saved; a step's size follows the batch's (a live trickle:
                # small steps, little added latency; a backlog: big steps, so the sweep keeps up with the stream)
                await self.processor.sweep(self.emit, budget=max(self.settings.sweep_budget, len(records)))
                await self.emit(result)
                wm = self.processor.watermarks.overall()
                if wm is not None:
                    self.metrics.watermark_delay.set(time.time() - wm / 1000)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # what this attempt saved is fenced now, so its outputs only exist in the outbox: re-send the
                # parked outputs of every partition on the next attempt
                self.outbox_checked.clear()
                failures = self._count_failure(exc, failures, f"a batch of {len(records)} records")
                log.warning("batch of %d failed (%s: %s); retrying in %.1fs", len(records),
                            type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)

    def _count_failure(self, exc: Exception, failures: int, what: str) -> int:
        """Count a failed step; returns the failures so far that were not transient. Raises FatalStepError once
        there were ``step_max_attempts`` of those: retrying an error that is not a lost connection or a timeout
        would only spin on it."""
        transient = is_transient(exc)
        self.metrics.redis_errors.inc()
        self.metrics.step_failures.labels("transient" if transient else "other").inc()
        if transient:
            return failures
        failures += 1
        if failures >= self.settings.step_max_attempts:
            cause = root_cause(exc)
            raise FatalStepError(f"{what} failed {failures} times with {type(cause).__name__}: {cause} (not a lost "
                                 "connection or a timeout, so another attempt would fail the same way)") from exc
        return failures

    def stop_fatally(self, exc: FatalStepError) -> None:
        """Stop the worker with a clear error and a non-zero exit (``run_worker``): Faust's own shutdown, as on
        SIGTERM, so what was applied is committed and the failed batch is read again by the next owner."""
        if self.fatal is not None:
            return
        self.fatal = exc
        self.metrics.fatal_stops.inc()
        log.critical("stopping the worker: %s", exc)
        os.kill(os.getpid(), signal.SIGTERM)

    async def update_population(self) -> None:
        """Population gauges from Redis: every worker reports the same totals (use max() across workers)."""
        try:
            census = await self.store.census()
            population = await self.store.population()
            overdue = await self.store.overdue_labels(await self.store.sweep_marks())
        except Exception as exc:  # Redis down: keep the last values, the batch loop reports the error
            log.debug("population gauges not updated: %s", exc)
            return
        self.metrics.overdue_labels.set(overdue)
        self.metrics.customers.clear()
        by_stage_tier: dict[tuple[str, str], int] = {}
        by_segment: dict[str, int] = {}
        names = self.processor.segment_names
        for key, n in census.items():
            stage, tier, segment = ([*key.split("|"), "", ""])[:3]
            by_stage_tier[(stage, tier)] = by_stage_tier.get((stage, tier), 0) + n
            if segment:
                label = names.get(int(segment), f"segment {segment}")
                by_segment[label] = by_segment.get(label, 0) + n
        for (stage, tier), n in by_stage_tier.items():
            self.metrics.customers.labels(stage, tier).set(n)
        self.metrics.segment_size.clear()
        for label, n in by_segment.items():
            self.metrics.segment_size.labels(label).set(n)
        self.metrics.buyers.set(population.get("buyers", 0))
        self.metrics.repeat_purchase_rate.set(population.get("repeat_purchase_rate", 0.0))
        self.metrics.cohort_retention.clear()
        cohorts = sorted({k.split(":")[1] for k in population if k.startswith("retention:")})[-6:]
        for key, value in population.items():
            if key.startswith("retention:"):
                _, cohort, months = key.split(":")
                if cohort in cohorts and int(months) <= 6:
                    self.metrics.cohort_retention.labels(cohort, months).set(value)

    async def emit(self, result: BatchResult) -> None:
        """Hand a batch's outputs to the producer; the broker's acknowledgements are awaited in the background
        (up to MAX_UNCONFIRMED emits at a time), so the next batch does not wait for them. Safe because every
        output was parked in the outbox in the same atomic save as the state it came from: once acknowledged the
        parked copies are cleared; if a delivery fails (or the worker dies first) they stay parked and are sent
        again (``resend_parked``). Straight to the transport's producer: the records are already serialised, so
        Faust's per-message topic machinery would only add cost. An output the producer or the broker refuses for
        what it is (too large, say) goes to the dead-letter topic as ``output_rejected`` instead; a refusal that
        may pass (a lost connection) raises, and the batch is retried."""
        deliveries: list[Delivery] = []
        for letter in result.dead_letters:
            await self._send(deliveries, DLQ_TOPIC, letter.dlq_id, letter.dlq_id,
                             orjson.dumps(letter.model_dump(mode="json")))
        for alert in result.alerts:
            await self._send(deliveries, ALERTS_TOPIC, alert["customer_id"], alert["alert_id"], orjson.dumps(alert))
            self.metrics.alerts.labels(alert["risk_level"], alert["value_tier"]).inc()
        for move in result.segment_moves:
            await self._send(deliveries, MOVES_TOPIC, move["customer_id"], f"{move['customer_id']}:{move['ts']}",
                             orjson.dumps(move))
        for rec in result.recommendations:
            await self._send(deliveries, RECOMMENDATIONS_TOPIC, rec["customer_id"], rec["recommendation_id"],
                             orjson.dumps(rec))
        # the trainer's examples go as arrays, up to TRAINING_RECORD_EXAMPLES per record, in order
        for start in range(0, len(result.examples), TRAINING_RECORD_EXAMPLES):
            chunk = result.examples[start : start + TRAINING_RECORD_EXAMPLES]
            await self._send(deliveries, TRAINING_TOPIC, chunk[0]["id"], chunk[0]["id"],
                             orjson.dumps({"schema_version": OUTPUT_SCHEMA_VERSION, "examples": chunk}))
        self.metrics.segment_moves.inc(len(result.segment_moves))
        if not deliveries and not result.outbox:
            return
        unconfirmed = self.unconfirmed
        unconfirmed.append(asyncio.ensure_future(self._confirm(deliveries, result)))
        while unconfirmed and (len(unconfirmed) > MAX_UNCONFIRMED or unconfirmed[0].done()):
            await unconfirmed.popleft()  # never raises: _confirm handles its own failures

    async def _send(self, deliveries: list[Delivery], name: str, key: str, output_id: str, value: bytes) -> None:
        """Send one output (or, if the producer refuses it for good, its dead letter) and note its delivery."""
        sent = Delivery(name, key, output_id, value)
        try:
            sent.future = await self.app.producer.send(self.settings.topic(name), key.encode(), value, None, None,
                                                       None)
        except Exception as exc:
            if is_transient(exc):
                raise
            sent.future = await self._send_rejected(sent, exc)
        deliveries.append(sent)

    async def _send_rejected(self, output: Delivery, exc: BaseException) -> Any:
        """The producer or the broker refused ``output`` for what it is: send its dead letter instead (a bounded
        copy; for a dead letter that was refused itself, the letter without the copied bytes). Returns the
        delivery future; raises FatalStepError if even that is refused."""
        cause = root_cause(exc)
        log.warning("the broker refused an output for %s (%s: %s): dead-lettered as output_rejected", output.name,
                    type(cause).__name__, cause)
        if output.name == DLQ_TOPIC:
            letter = DeadLetter.model_validate_json(output.value).model_copy(
                update={"key_b64": None, "value_b64": None, "value_preview": None,
                        "detail": f"{orjson.loads(output.value).get('detail', '')} (dead letter without its copied "
                                  f"bytes: {type(cause).__name__})"[:2000]})
        else:
            letter = DeadLetter.of_bytes(
                f"output:{self.settings.topic(output.name)}:{output.output_id}", "output_rejected",
                f"{type(cause).__name__}: {cause}", self.settings.topic(output.name), output.key.encode(),
                output.value, self.settings.dead_letter_max_original_bytes)
        self.metrics.dlq_records.labels(letter.reason if output.name != DLQ_TOPIC else "dead_letter_stripped").inc()
        try:
            return await self.app.producer.send(self.settings.topic(DLQ_TOPIC), letter.dlq_id.encode(),
                                                orjson.dumps(letter.model_dump(mode="json")), None, None, None)
        except Exception as again:
            if is_transient(again) or output.name == DLQ_TOPIC:
                raise
            # the letter of an output was refused: its smaller stripped form is the last try
            return await self._send_rejected(Delivery(DLQ_TOPIC, letter.dlq_id, letter.dlq_id,
                                                      orjson.dumps(letter.model_dump(mode="json"))), again)

    async def _confirm(self, deliveries: list[Delivery], result: BatchResult) -> None:
        """Wait for the broker's acknowledgements of one emit, count what it has, clear the parked copies. An
        output the broker refused for what it is goes to the dead-letter topic (and counts as handled); after a
        refusal that may pass, everything stays parked and is sent again."""
        try:
            outcomes = await asyncio.gather(*(d.future for d in deliveries), return_exceptions=True)
            for delivery, outcome in zip(deliveries, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if is_transient(outcome):
                        raise outcome
                    delivery.future = await self._send_rejected(delivery, outcome)
                    delivery.name = DLQ_TOPIC
                    await delivery.future
        except Exception as exc:  # still parked: re-sent from the outbox
            if not is_transient(exc):  # even the dead letter was refused: nothing left to isolate
                self.stop_fatally(FatalStepError(f"an output and its dead letter were refused: {exc!r}"))
                return
            self.outbox_checked.clear()
            self.metrics.delivery_failures.inc()
            log.warning("output delivery failed (%s: %s); the outputs stay parked and are sent again",
                        type(exc).__name__, exc)
            return
        for name, n in Counter(d.name for d in deliveries).items():
            self.metrics.records_produced.labels(name).inc(n)
        # counted once the broker has them, per batch (a re-sent outbox entry counts again: at-least-once out)
        for trigger, n in Counter(rec["trigger"] for rec in result.recommendations).items():
            self.metrics.recommendations.labels(trigger).inc(n)
        for kind, n in Counter(example["kind"] for example in result.examples).items():
            self.metrics.training_examples.labels(kind).inc(n)
        if result.outbox:  # the broker has them: the parked copies can go
            try:
                await self.store.clear_outbox(result.outbox)
            except Exception as exc:  # left parked: sent once more later (at-least-once out)
                self.metrics.redis_errors.inc()
                log.warning("clearing delivered outputs from the outbox failed (%s: %s)", type(exc).__name__, exc)

    async def _confirm_before_shutdown(self, sender: object = None, **kwargs: object) -> None:
        """A clean stop (the consumer already stopped, the producer still up) waits up to SHUTDOWN_CONFIRM_S for
        outputs still being confirmed, so their parked copies are cleared instead of sent again by the next owner."""
        pending = list(self.unconfirmed)
        if pending:
            await asyncio.wait(pending, timeout=SHUTDOWN_CONFIRM_S)

    async def resend_parked(self) -> None:
        """Send the parked outputs of every input partition this worker owns: once after it got the partition
        (a previous owner may have died between a save and its delivery, with the input already committed), and
        again after a delivery failed. A batch of a partition not checked yet does this first, too. Waits for its
        turn between batch steps (the lock is fair), so a backlog on other partitions does not starve it."""
        try:
            owned = {tp.partition for tp in self.app.consumer.assignment() if tp.topic in self.kind_of}
        except Exception:  # no consumer yet
            return
        if not owned - self.outbox_checked or self.fatal is not None:
            return
        async with self.step_lock:
            try:
                await self._resend_parked_of(owned)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next tick tries again
                log.warning("re-sending parked outputs failed (%s: %s)", type(exc).__name__, exc)

    async def _resend_parked_of(self, partitions: set[int]) -> None:
        """Send the parked outputs of those of ``partitions`` not checked since this worker got them."""
        for partition in sorted(partitions - self.outbox_checked):
            recovered = await self.processor.recover_outbox(partition)
            if recovered.outbox:
                log.info("re-sending %d parked outputs of partition %d", len(recovered.outbox[partition]), partition)
                await self.emit(recovered)
            self.outbox_checked.add(partition)

    async def reload_model(self) -> None:
        """Score with the newest checkpoint: every worker, the trainer's own included."""
        try:
            current = await self.models.current_version()
            loaded = self.processor.bundle
            if current is not None and (loaded is None or loaded.version != current):
                bundle = await self.models.load(current)
                if bundle is not None:
                    self.processor.bundle = bundle
                    self.metrics.model_version.set(bundle.version)
            summary = await self.models.summary()
        except Exception as exc:
            log.debug("model reload failed: %s", exc)
            return
        if summary:
            for metric in ("roc_auc", "log_loss", "precision", "recall"):
                self.metrics.model_quality.labels(metric, "overall").set(summary.get(metric, 0.0))
                if f"rolling_{metric}" in summary:
                    self.metrics.model_quality.labels(metric, "rolling").set(summary[f"rolling_{metric}"])
            self.metrics.labels_matured.set(summary.get("labels", 0))
            self.metrics.label_positive_rate.set(summary.get("positive_rate", 0.0))
            self.metrics.drift_detections.set(summary.get("drift_detections", 0))
            if "rec_hit_rate" in summary:
                for metric in ("hit_rate", "precision"):
                    self.metrics.rec_quality.labels(metric, "streamproc").set(summary[f"rec_{metric}"])
                    self.metrics.rec_quality.labels(metric, "popularity").set(summary[f"rec_baseline_{metric}"])
                self.metrics.rec_purchases.set(summary.get("rec_purchases", 0))
            if summary.get("saved_at"):
                self.metrics.checkpoint_age.set(max(0.0, time.time() - summary["saved_at"]))

    async def update_lag(self) -> None:
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
            done = self.last_offsets.get((tp.topic, tp.partition))
            if done is None:  # nothing processed since start: fall back to the committed position
                done = self._committed(tp)
            kind, partition = self.kind_of[tp.topic], str(tp.partition)
            self.metrics.consumer_lag.labels(kind, partition).set(max(0, high - done - 1))
            self.metrics.input_offset.labels(kind, partition).set(done)


def _message_of(handle: Message | EventT) -> Message:
    return handle if isinstance(handle, Message) else handle.message


def _position_of(pair: Pair) -> tuple[TP, int, int | None]:
    message = _message_of(pair[1])
    return message.tp, message.offset, message.generation_id


def _generation_of(pair: Pair) -> int | None:
    return _message_of(pair[1]).generation_id


def run_worker(settings: Settings) -> None:
    """Run one worker until SIGTERM/SIGINT (blocking)."""
    from faust.worker import Worker as FaustWorker

    wait_for_topics(settings, (*INPUT_TOPICS, TRAINING_TOPIC))
    worker = Worker(settings)
    (settings.state_dir / "faust" / settings.app_id).mkdir(parents=True, exist_ok=True)
    try:
        FaustWorker(
            worker.app,
            loglevel=settings.log_level.lower() if settings.log_level.lower() != "warning" else "warn",
            quiet=True,
        ).execute_from_commandline()
    except SystemExit:
        if worker.fatal is None:
            raise
        print(f"error: {worker.fatal}", file=sys.stderr, flush=True)
        raise SystemExit(FATAL_EXIT_CODE) from None
