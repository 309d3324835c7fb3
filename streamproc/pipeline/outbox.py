"""The transactional outbox, in one place: a save parks the step's outputs in the same Redis write as the state
(``BatchResult.outputs_blob``); ``OutboxSender`` hands them to the producer, waits for the broker's
acknowledgements in the background and clears the parked copies; a partition's next owner re-sends what is
still parked (``recover_outbox``: a worker may die between a save and its delivery). An output the producer or
the broker refuses for what it is goes to the dead-letter topic as ``output_rejected``."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from streamproc.contracts.outputs import DeadLetter, TrainingBatch
from streamproc.errors import FatalStepError, is_transient, root_cause
from streamproc.metrics import Metrics
from streamproc.pipeline.records import BatchResult
from streamproc.ports import FeatureStore
from streamproc.settings import Settings
from streamproc.topics import ALERTS_TOPIC, DLQ_TOPIC, MOVES_TOPIC, RECOMMENDATIONS_TOPIC, TRAINING_TOPIC

log = logging.getLogger("streamproc.worker")

TRAINING_RECORD_EXAMPLES = 500  # examples per training-topic record (~150-200 KB, under the broker's 1 MB default)
MAX_UNCONFIRMED = 8  # emits whose broker acknowledgements may be awaited at once (bounds outputs in flight)
SHUTDOWN_CONFIRM_S = 10.0  # a clean stop waits this long at most for outputs still being confirmed

# the producer's send: (physical topic, key, value) -> the future of the broker's acknowledgement
ProducerSend = Callable[[str, bytes, bytes], Awaitable[Any]]


@dataclass
class Delivery:
    """One output handed to the producer: what it was (to dead-letter it if the broker refuses it) and the
    future of the broker's acknowledgement."""

    name: str  # declared topic name
    key: str
    output_id: str
    value: bytes
    future: Any = None


class OutboxSender:
    """Sends a worker's outputs. ``checked`` holds the input partitions whose parked outputs were re-sent since
    this worker got them (cleared when a delivery fails: everything still parked is sent again)."""

    def __init__(self, settings: Settings, store: FeatureStore, metrics: Metrics, producer_send: ProducerSend,
                 on_fatal: Callable[[FatalStepError], None]) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.producer_send = producer_send
        self.on_fatal = on_fatal
        self.checked: set[int] = set()
        self.unconfirmed: deque[asyncio.Future[None]] = deque()  # emits whose acknowledgements are awaited

    async def emit(self, result: BatchResult) -> None:
        """Hand a batch's outputs to the producer; the broker's acknowledgements are awaited in the background
        (up to MAX_UNCONFIRMED emits at a time), so the next batch does not wait for them. Safe because every
        output was parked in the outbox in the same atomic save as the state it came from: once acknowledged the
        parked copies are cleared; if a delivery fails (or the worker dies first) they stay parked and are sent
        again (``resend_parked_of``). Straight to the transport's producer: the records are already serialised, so
        Faust's per-message topic machinery would only add cost. An output the producer or the broker refuses for
        what it is (too large, say) goes to the dead-letter topic as ``output_rejected`` instead; a refusal that
        may pass (a lost connection) raises, and the batch is retried."""
        deliveries: list[Delivery] = []
        for letter in result.dead_letters:
            await self._send(deliveries, DLQ_TOPIC, letter.dlq_id, letter.dlq_id,
                             orjson.dumps(letter.model_dump(mode="json")))
        for alert in result.alerts:
            await self._send(deliveries, ALERTS_TOPIC, alert.customer_id, alert.alert_id, orjson.dumps(alert))
            # a re-sent output parked by another version may lack a field: counted as unknown, sent all the same
            self.metrics.alerts.labels(getattr(alert, "risk_level", "unknown"),
                                       getattr(alert, "value_tier", "unknown")).inc()
            self.metrics.alert_value_at_risk.labels(getattr(alert, "value_tier", "unknown")).inc(
                getattr(alert, "value_at_risk", 0.0))
        for cleared in result.cleared:
            await self._send(deliveries, ALERTS_TOPIC, cleared.customer_id, f"cleared:{cleared.alert_id}",
                             orjson.dumps(cleared))
            self.metrics.alerts_cleared.labels(getattr(cleared, "cleared_by", "unknown")).inc()
        for move in result.segment_moves:
            await self._send(deliveries, MOVES_TOPIC, move.customer_id, f"{move.customer_id}:{move.ts}",
                             orjson.dumps(move))
        for rec in result.recommendations:
            await self._send(deliveries, RECOMMENDATIONS_TOPIC, rec.customer_id, rec.recommendation_id,
                             orjson.dumps(rec))
        # the trainer's examples go as arrays, up to TRAINING_RECORD_EXAMPLES per record, in order
        for start in range(0, len(result.examples), TRAINING_RECORD_EXAMPLES):
            chunk = result.examples[start : start + TRAINING_RECORD_EXAMPLES]
            await self._send(deliveries, TRAINING_TOPIC, chunk[0].id, chunk[0].id,
                             orjson.dumps(TrainingBatch(examples=chunk)))
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
            sent.future = await self.producer_send(self.settings.topic(name), key.encode(), value)
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
            return await self.producer_send(self.settings.topic(DLQ_TOPIC), letter.dlq_id.encode(),
                                            orjson.dumps(letter.model_dump(mode="json")))
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
                self.on_fatal(FatalStepError(f"an output and its dead letter were refused: {exc!r}"))
                return
            self.checked.clear()
            self.metrics.delivery_failures.inc()
            log.warning("output delivery failed (%s: %s); the outputs stay parked and are sent again",
                        type(exc).__name__, exc)
            return
        for name, n in Counter(d.name for d in deliveries).items():
            self.metrics.records_produced.labels(name).inc(n)
        # counted once the broker has them, per batch (a re-sent outbox entry counts again: at-least-once out)
        for trigger, n in Counter(getattr(rec, "trigger", "unknown") for rec in result.recommendations).items():
            self.metrics.recommendations.labels(trigger).inc(n)
        for kind, n in Counter(getattr(example, "kind", "unknown") for example in result.examples).items():
            self.metrics.training_examples.labels(kind).inc(n)
        if result.outbox:  # the broker has them: the parked copies can go
            try:
                await self.store.clear_outbox(result.outbox)
            except Exception as exc:  # left parked: sent once more later (at-least-once out)
                self.metrics.redis_errors.inc()
                log.warning("clearing delivered outputs from the outbox failed (%s: %s)", type(exc).__name__, exc)

    async def confirm_before_shutdown(self) -> None:
        """A clean stop (the consumer already stopped, the producer still up) waits up to SHUTDOWN_CONFIRM_S for
        outputs still being confirmed, so their parked copies are cleared instead of sent again by the next owner."""
        pending = list(self.unconfirmed)
        if pending:
            await asyncio.wait(pending, timeout=SHUTDOWN_CONFIRM_S)

    async def resend_parked_of(self, partitions: set[int]) -> None:
        """Send the parked outputs of those of ``partitions`` not checked since this worker got them."""
        for partition in sorted(partitions - self.checked):
            recovered = await recover_outbox(self.store, partition)
            if recovered.outbox:
                log.info("re-sending %d parked outputs of partition %d", len(recovered.outbox[partition]), partition)
                await self.emit(recovered)
            self.checked.add(partition)


async def recover_outbox(store: FeatureStore, partition: int) -> BatchResult:
    """Outputs a previous owner of the partition saved but may not have sent (it crashed in between)."""
    recovered = BatchResult()
    for name, blob in sorted((await store.outbox(partition)).items()):
        parked = BatchResult.from_outbox(blob)
        parked.outbox = {partition: [name]}
        recovered.absorb(parked)
    return recovered
