"""The single global trainer: reads the training topic with its own Kafka consumer and checkpoints the models.

Why not a Faust agent: the trainer holds what it learned until a checkpoint contains it, and Faust's stream
buffers, flow control and ack bookkeeping are built for records acked as they are processed. The checkpoint
itself is the trainer's offset store (``ModelBundle.training_offset``): whoever owns the training partition
loads the current checkpoint and seeks just past the offset it holds, so every example is learned exactly
once in the model lineage, whatever crashed where. Committing the group offset after each checkpoint only
feeds lag monitoring.

The training topic has one partition and the trainer's consumer group (``<app_id>-trainer``) hands it to one
member: one trainer learns for every worker (models are global). It runs inside every worker by default (an
idle group member where it does not own the partition), or alone as ``streamproc trainer`` so learning has its
own core and scoring workers run with ``STREAMPROC_TRAINER_ENABLED=false``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from prometheus_client import CollectorRegistry, start_http_server

from streamproc.access import refused
from streamproc.adapters.checkpoint_signing import signing_key
from streamproc.adapters.model_store import RedisModelStore
from streamproc.adapters.redis_store import RedisFeatureStore
from streamproc.config import model_config
from streamproc.contracts.outputs import example_of, examples_of
from streamproc.domain.model_config import ModelConfig
from streamproc.domain.models import ModelBundle
from streamproc.metrics import Metrics
from streamproc.ports import ModelStore, StaleCheckpoint, UntrustedCheckpoint
from streamproc.settings import Settings
from streamproc.topics import TRAINING_TOPIC, aiokafka_security_kwargs
from streamproc.training.offline import learn

FETCH_MAX_RECORDS = 5000
TRAINER_METADATA_MAX_AGE_MS = 5000
LEARN_SLICE = 200  # examples learned between yields to the event loop

log = logging.getLogger("streamproc.training.trainer")


def training_examples(value: bytes, offset: int = -1) -> list[dict[str, Any]]:
    """The examples of one training-topic record: ``{"schema_version", "examples"}`` (a batch step's), or, as
    written by earlier versions, an array of examples or one example object. An undecodable record yields none
    (logged)."""
    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        log.warning("skipping an undecodable training record at offset %s: %s", offset, exc)
        return []
    return examples_of(decoded)


class Trainer:
    def __init__(self, settings: Settings, models: ModelStore, metrics: Metrics, config: ModelConfig) -> None:
        self.settings = settings
        self.models = models
        self.metrics = metrics
        self.config = config
        self.topic = settings.topic(TRAINING_TOPIC)
        self.bundle: ModelBundle | None = None  # set while this trainer owns the training partition
        self.owned: TopicPartition | None = None
        self.generation = 0  # bumped at every take-over: records fetched before it are not learned
        self.dirty = False
        self.last_checkpoint = 0.0
        self.consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ ownership
    async def _take_over(self, tp: TopicPartition) -> None:
        """Own the partition: resume from the current checkpoint (retrying while Redis is down)."""
        assert self.consumer is not None
        while True:
            try:
                bundle = await self.models.load()
                break
            except UntrustedCheckpoint as exc:  # never unpickled: resume from the newest trusted one
                self.metrics.checkpoints_refused.inc()
                log.error("%s: refused; the trainer resumes from the newest trusted checkpoint", exc)
                bundle = await self.models.newest_trusted(below=await self.models.current_version())
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.redis_errors.inc()
                log.warning("cannot load the model checkpoint (%s); retrying", exc)
                await asyncio.sleep(1.0)
        self.bundle = bundle or ModelBundle(self.config)
        self.generation += 1
        self.owned = tp
        self.metrics.trainer_active.set(1)
        self.dirty = False
        self.last_checkpoint = time.monotonic()
        self.consumer.seek(tp, self.bundle.training_offset + 1)
        log.info("trainer owns the training partition; resuming after offset %d (checkpoint v%d)",
                 self.bundle.training_offset, self.bundle.version)

    async def _give_up(self) -> None:
        """Losing the partition: checkpoint what was learned (it is still ours), then forget it."""
        if self.bundle is not None and self.dirty:
            try:
                await self.checkpoint()
            except Exception as exc:  # the next owner resumes from the last checkpoint: nothing is lost
                log.warning("final checkpoint before hand-over failed (%s)", exc)
        self.bundle = None
        self.owned = None
        self.generation += 1
        self.metrics.trainer_active.set(0)

    # ------------------------------------------------------------------ learning
    def learn_records(self, records: list[Any]) -> int:
        """Learn the examples of records not yet in the checkpoint, in order; returns how many there were."""
        bundle = self.bundle
        assert bundle is not None
        learned = 0
        for record in records:
            if record.offset <= bundle.training_offset:  # already in the checkpoint
                continue
            examples = training_examples(record.value, record.offset)
            learned += len(examples)
            for example in examples:
                try:
                    drifts = bundle.drift_detections
                    typed = example_of(example)
                    learn(bundle, typed)
                    if bundle.drift_detections > drifts:
                        log.warning("churn model drift detected (ADWIN) at event time %s", typed.ts)
                    self.metrics.examples_learned.labels(typed.kind).inc()
                except Exception as exc:  # a malformed example must not stop learning
                    log.warning("skipping a bad training example at offset %s: %s", record.offset, exc)
            bundle.training_offset = record.offset
            self.dirty = True
        return learned

    async def checkpoint(self) -> int | None:
        """Save the bundle as the next version (and follow a rollback made by an operator)."""
        bundle = self.bundle
        if bundle is None or not self.dirty:
            return None
        current = await self.models.current_version()
        if current not in (None, 0, bundle.version):
            try:
                rolled = await self.models.load(current)
            except UntrustedCheckpoint as exc:  # a planted checkpoint is no rollback to follow: this save replaces it
                self.metrics.checkpoints_refused.inc()
                log.error("%s: refused", exc)
                rolled = None
            if rolled is not None and rolled.version < bundle.version:  # someone rolled back: follow
                rolled.training_offset = bundle.training_offset
                self.bundle = bundle = rolled
        try:
            version = await self.models.save(bundle, self.settings.checkpoint_keep, fenced=True)
        except StaleCheckpoint:
            # another trainer checkpointed past us (we lost the partition without noticing): resume from its
            # checkpoint instead of overwriting it
            log.warning("a newer checkpoint exists; reloading it")
            if self.owned is not None:
                await self._take_over(self.owned)
            return None
        self.dirty = False
        self.last_checkpoint = time.monotonic()
        self.metrics.checkpoints.inc()
        log.info("model checkpoint v%d (%d churn, %d segment examples)", version, bundle.churn_examples,
                 bundle.segment_examples)
        if self.consumer is not None and self.owned is not None:
            try:  # for lag monitoring only: the checkpoint is the offset that counts
                await self.consumer.commit({self.owned: bundle.training_offset + 1})
            except Exception as exc:
                log.debug("trainer offset commit failed: %s", exc)
        return version

    async def checkpoint_if_due(self) -> None:
        if not self.dirty or time.monotonic() - self.last_checkpoint < self.settings.checkpoint_interval_s:
            return
        try:
            await self.checkpoint()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down: keep learning, the next attempt saves everything
            self.metrics.redis_errors.inc()
            log.warning("model checkpoint failed (%s: %s); will retry", type(exc).__name__, exc)

    # ------------------------------------------------------------------ the loop
    def _consumer(self) -> AIOKafkaConsumer:
        s = self.settings
        return AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap, group_id=f"{s.app_id}-trainer", client_id=f"{s.app_id}-trainer",
            enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=FETCH_MAX_RECORDS,
            session_timeout_ms=int(s.kafka_session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.kafka_heartbeat_interval_s * 1000),
            # a group leader that assigns while the topic has no partition metadata yet (a topic whose leader
            # is still being elected, as on a freshly started broker) gives nobody the partition; the group
            # rebalances when the next metadata refresh sees it, so refresh often (default: 5 minutes)
            metadata_max_age_ms=TRAINER_METADATA_MAX_AGE_MS,
            **aiokafka_security_kwargs(s),
        )

    async def run(self) -> None:
        """Until ``stop()``: own the training partition when the group gives it, learn, checkpoint."""
        trainer = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
                if trainer.owned is not None and trainer.owned in revoked:
                    await trainer._give_up()

            async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
                for tp in assigned:
                    await trainer._take_over(tp)

        while not self._stopping.is_set():
            self.consumer = self._consumer()
            try:
                await self.consumer.start()
                self.consumer.subscribe([self.topic], listener=Listener())
                while not self._stopping.is_set():
                    fetched = await self.consumer.getmany(timeout_ms=500, max_records=FETCH_MAX_RECORDS)
                    generation = self.generation
                    for records in fetched.values():
                        since_yield = 0
                        for record in records:
                            if self.bundle is None or self.generation != generation:
                                break  # the partition was taken away (or away and back) meanwhile: re-fetch
                            since_yield += self.learn_records([record])  # a record holds up to 500 examples
                            if since_yield >= LEARN_SLICE:
                                since_yield = 0
                                await asyncio.sleep(0)  # inside a worker: let its batches run between slices
                        await asyncio.sleep(0)
                    if self.bundle is not None:
                        await self.checkpoint_if_due()
                await self._give_up()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker gone and the like: start over from the checkpoint
                refusal = refused(exc, self.settings)
                if refusal is not None:  # a wrong password or a missing ACL: another attempt fails the same way
                    log.critical("trainer stopped: %s", refusal)
                    raise refusal from exc
                log.warning("trainer consumer failed (%s: %s); restarting it", type(exc).__name__, exc)
                self.bundle, self.owned = None, None
                self.metrics.trainer_active.set(0)
                await asyncio.sleep(1.0)
            finally:
                consumer, self.consumer = self.consumer, None
                try:
                    await consumer.stop()
                except Exception as exc:
                    log.debug("trainer consumer stop failed: %s", exc)

    def stop(self) -> None:
        self._stopping.set()


def run_trainer(settings: Settings) -> None:
    """``streamproc trainer``: a trainer alone in its process, with its metrics on ``trainer_metrics_port``."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    if settings.trainer_metrics_port:
        start_http_server(settings.trainer_metrics_port, addr=settings.web_host, registry=registry)
    redis = RedisFeatureStore.from_url(settings.redis_url, **settings.redis_kwargs()).redis
    trainer = Trainer(settings, RedisModelStore(redis, signing_key(settings)), metrics, model_config(settings))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, trainer.stop)
        await trainer.run()

    asyncio.run(main())
