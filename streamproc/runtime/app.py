"""The Faust worker: thin agents that decode, load, call the domain, save and emit.

Agent concurrency stays 1: with more, offsets could be committed past an event still in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import faust
from faust.types import EventT, Message
from prometheus_client import CollectorRegistry

from streamproc.adapters.checkpoint_signing import signing_key
from streamproc.adapters.model_store import RedisModelStore
from streamproc.adapters.redis_store import RedisFeatureStore
from streamproc.compiled import status as compiled_status
from streamproc.config import model_config
from streamproc.domain.models import ModelBundle
from streamproc.errors import FatalStepError, is_transient, root_cause
from streamproc.metrics import Metrics
from streamproc.pipeline.factory import build_processor
from streamproc.pipeline.outbox import OutboxSender
from streamproc.pipeline.records import RawRecord
from streamproc.ports import FeatureStore, LayoutMismatch, ModelStore, UntrustedCheckpoint
from streamproc.runtime.consumer import (
    BulkInbox,
    ack_batch,
    attach_inbox,
    drain_batches,
    inbox_of,
    install_loop_bound_futures,
    mark_taken,
    sensors_told_in_bulk,
)
from streamproc.runtime.consumer import Consumer as FastConsumer
from streamproc.runtime.gauges import report_model_summary, report_population
from streamproc.runtime.http import add_views
from streamproc.runtime.intake import Intake, message_of
from streamproc.settings import Settings
from streamproc.topics import INPUT_TOPICS, TRAINING_TOPIC, faust_credentials, input_partitions, wait_for_topics
from streamproc.training.trainer import Trainer

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


def faust_app(s: Settings) -> faust.App:
    """The Faust app as a worker configures it (agents and timers are added by ``Worker``)."""
    return faust.App(
        s.app_id,
        broker=f"kafka://{s.kafka_bootstrap}",
        # our consumer subclass (streamproc/runtime/consumer.py): less per-record machinery, same semantics
        broker_consumer=f"{'streamproc' if s.fast_consumer else 'kafka'}://{s.kafka_bootstrap}",
        broker_producer=f"streamproc://{s.kafka_bootstrap}",  # idempotent (consumer.Producer)
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


class Worker:
    """Everything one worker process holds: the Faust app, the store, the processor, the metrics."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None,
                 store: FeatureStore | None = None, input_partitions: int | None = None) -> None:
        self.settings = settings
        # the input partition count the store must be laid out for: claimed before the first batch is applied
        self.layout_unclaimed = input_partitions
        self.metrics = Metrics(registry)
        self.store = store or RedisFeatureStore.from_url(settings.redis_url, **settings.redis_kwargs())
        if isinstance(self.store, RedisFeatureStore):
            self.store.replicas.wanted = settings.redis_wait_replicas
            self.store.replicas.timeout_ms = settings.redis_wait_timeout_ms
        self.models: ModelStore = RedisModelStore(
            self.store.redis if isinstance(self.store, RedisFeatureStore) else RedisFeatureStore.from_url(
                settings.redis_url, **settings.redis_kwargs()).redis,
            signing_key(settings),
        )
        # the global trainer's group member (streamproc/training/trainer.py): learns where it owns the training
        # partition
        self.trainer: Trainer | None = (
            Trainer(settings, self.models, self.metrics, model_config(settings))
            if settings.models_enabled and settings.trainer_enabled else None
        )
        self.processor = build_processor(settings, self.store, self.metrics)
        self.last_batch_at = 0.0  # monotonic time of the last applied batch
        self.step_lock = asyncio.Lock()  # one batch or sweep step at a time (the ingest agent, the sweep timer)
        self.last_offsets: dict[tuple[str, int], int] = {}
        self.outbox = OutboxSender(settings, self.store, self.metrics, self._producer_send, self.stop_fatally)
        self.model_checked = False  # the checkpoint was looked up before the first batch
        self.refused_version: int | None = None  # the current checkpoint, refused as untrusted
        self.fatal: FatalStepError | None = None  # why the worker is stopping, if a step failed for good
        self.sweep_failures = 0  # sweep steps in a row that failed with an error that is not transient
        self.app = self._build_app()
        self.intake = Intake(settings, self.metrics, self.app)  # what of the consumed input may be applied, when

    async def _producer_send(self, topic: str, key: bytes, value: bytes) -> Any:
        """Straight to the transport's producer: the records are already serialised, so Faust's per-message topic
        machinery would only add cost."""
        return await self.app.producer.send(topic, key, value, None, None, None)

    async def _confirm_before_shutdown(self, sender: object = None, **kwargs: object) -> None:
        await self.outbox.confirm_before_shutdown()

    def _build_app(self) -> faust.App:
        s = self.settings
        app = faust_app(s)
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
        add_views(app, self.store, self.models, self.settings, self.metrics)
        return app

    async def _on_rebalance(self, sender: object = None, **kwargs: object) -> None:
        self.metrics.rebalances.inc()
        # partitions may have moved: report lag only for what this worker owns now
        self.metrics.consumer_lag.clear()
        self.metrics.input_offset.clear()
        self.last_offsets.clear()
        self.outbox.checked.clear()
        self.processor.partitions_changed()
        self.intake.rebalanced()

    async def ingest(self, stream: faust.StreamT) -> None:
        if self.settings.log_level.upper() != "DEBUG":
            # aiokafka's producer formats a debug record per send when its logger inherits DEBUG from Faust's setup
            logging.getLogger("aiokafka").setLevel(logging.INFO)
        idle_s = 0.25 if self.intake.aligner is not None else None  # held records go at the latest after their wait
        if not install_loop_bound_futures(asyncio.get_running_loop()):
            log.info("aiokafka's MessageBatch.append changed: its per-record future asks asyncio for the loop")
        inbox = inbox_of(self.app)
        batches: AsyncIterator[list[Any]]
        log.info("input delivery: %s", "Faust's stock consumer" if inbox is None else "bulk (streamproc://)")
        if inbox is not None:
            monitored = sensors_told_in_bulk(self.app.consumer)
            log.info("sensors told of %s", "whole fetches and batches" if monitored else "every message")
        log.info("domain core: %s", compiled_status())
        if inbox is not None:  # whole fetches from the consumer (streamproc/runtime/consumer.py)
            batches = self._inbox_batches(inbox, stream, idle_s)
        else:
            batches = drain_batches(stream, self.settings.batch_max_events, self.settings.batch_linger_s, idle_s)
        async for batch in batches:
            pairs = [(self.intake.to_raw(message_of(h)), h) for h in batch]
            if self.intake.aligner is not None:
                pairs = self.intake.align(pairs)
            pairs = await self.intake.readmit(pairs)
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
            # during a rebalance, wait for its end: then the generation decides (``Intake.readmit``)
            await app.flow_control.acquire()
            if messages:
                mark_taken(app, messages)
                yield messages


    def _ack_messages(self, messages: list[Message]) -> None:
        """Applied: each message may be committed now (Faust's own ack bookkeeping, as ``Stream.ack`` ends in)."""
        cast(FastConsumer, self.app.consumer).ack_applied(messages)




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
                await self.processor.sweep(self.outbox.emit)
                self.sweep_failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next batch or tick retries; its outputs are parked in the outbox
                self.outbox.checked.clear()
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
                if self.layout_unclaimed is not None:
                    await self.store.claim_layout(self.layout_unclaimed)  # raises while Redis is down: retried
                    self.layout_unclaimed = None
                if self.settings.models_enabled and not self.model_checked:
                    # score the very first batch with the current checkpoint, as a worker that never
                    # restarted would: a restart must not change what gets scored, alerted or recommended
                    await self.models.current_version()  # raises while Redis is down: retried below
                    await self.reload_model()
                    self.model_checked = True
                await self.outbox.resend_parked_of({rec.partition for rec in records})
                self.processor.note_silent_sources(self.intake.silent_sources(self.processor.watermarks.max_ts))
                result = await self.processor.process(records)
                # each chunk's outputs are sent as it is saved; a step's size follows the batch's (a live trickle:
                # small steps, little added latency; a backlog: big steps, so the sweep keeps up with the stream)
                await self.processor.sweep(self.outbox.emit, budget=max(self.settings.sweep_budget, len(records)))
                await self.outbox.emit(result)
                wm = self.processor.watermarks.overall()
                if wm is not None:
                    self.metrics.watermark_delay.set(time.time() - wm / 1000)
                return
            except asyncio.CancelledError:
                raise
            except LayoutMismatch as exc:
                raise FatalStepError(str(exc)) from exc
            except Exception as exc:
                # what this attempt saved is fenced now, so its outputs only exist in the outbox: re-send the
                # parked outputs of every partition on the next attempt
                self.outbox.checked.clear()
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
        await report_population(self.store, self.metrics, self.processor.model.segment_names)






    async def resend_parked(self) -> None:
        """Send the parked outputs of every input partition this worker owns: once after it got the partition
        (a previous owner may have died between a save and its delivery, with the input already committed), and
        again after a delivery failed. A batch of a partition not checked yet does this first, too. Waits for its
        turn between batch steps (the lock is fair), so a backlog on other partitions does not starve it."""
        try:
            owned = {tp.partition for tp in self.app.consumer.assignment() if tp.topic in self.intake.kind_of}
        except Exception:  # no consumer yet
            return
        if not owned - self.outbox.checked or self.fatal is not None:
            return
        async with self.step_lock:
            try:
                await self.outbox.resend_parked_of(owned)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next tick tries again
                log.warning("re-sending parked outputs failed (%s: %s)", type(exc).__name__, exc)


    async def reload_model(self) -> None:
        """Score with the newest checkpoint: every worker, the trainer's own included."""
        try:
            current = await self.models.current_version()
            loaded = self.processor.bundle
            stale = loaded is None or loaded.version != current
            if current is not None and current != self.refused_version and stale:
                try:
                    bundle = await self.models.load(current)
                except UntrustedCheckpoint as exc:
                    self.refused_version = current
                    bundle = await refuse_checkpoint(self.models, self.metrics, exc, loaded)
                if bundle is not None:
                    self.processor.bundle = bundle
                    self.metrics.model_version.set(bundle.version)
            summary = await self.models.summary()
        except Exception as exc:
            log.debug("model reload failed: %s", exc)
            return
        if summary:
            report_model_summary(self.metrics, summary)

    async def update_lag(self) -> None:
        self.intake.report_lag(self.last_offsets)

async def refuse_checkpoint(models: ModelStore, metrics: Metrics, refused: UntrustedCheckpoint,
                            loaded: ModelBundle | None) -> ModelBundle | None:
    """A checkpoint whose signature does not hold is never unpickled: counted and logged, and scoring goes on with
    the loaded bundle (at start: the newest trusted one, which is returned)."""
    metrics.checkpoints_refused.inc()
    log.error("%s: refused; scoring goes on with %s", refused,
              f"v{loaded.version}" if loaded is not None else "the newest trusted checkpoint")
    current = await models.current_version()
    return None if loaded is not None else await models.newest_trusted(below=current)


def run_worker(settings: Settings) -> None:
    """Run one worker until SIGTERM/SIGINT (blocking)."""
    from faust.worker import Worker as FaustWorker

    wait_for_topics(settings, (*INPUT_TOPICS, TRAINING_TOPIC))
    worker = Worker(settings, input_partitions=input_partitions(settings, INPUT_TOPICS))
    if settings.models_enabled and settings.model_signing_key is None:
        log.warning("model checkpoints are not signed: whoever can write to Redis can run code in this worker "
                    "(set STREAMPROC_MODEL_SIGNING_KEY on workers and trainers)")
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
