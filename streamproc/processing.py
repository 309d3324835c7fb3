"""The batch step between Kafka and Redis: decode → load → fold (pure) → save, plus dead letters.

No Faust here: the agent hands over raw records and gets back what to produce. The store and the
metrics bundle are injected, so the whole step runs against the in-memory store in tests.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from streamproc.adapters.feature_store import BatchSideEffects, FeatureStore, Loaded, SaveResult, Update
from streamproc.domain.churn import (
    ChurnConfig,
    ModelState,
    churn_inputs,
    grid_points,
    inputs_at,
    mature_labels,
    maturity_span,
    profile_at,
    retention_action,
    risk_level,
    segment_inputs,
    should_alert,
    take_snapshots,
    top_reasons,
)
from streamproc.domain.customer import (
    DAY_MS,
    CustomerState,
    FoldConfig,
    FoldOutcome,
    Positioned,
    Trigger,
    apply_events,
    calendar_month,
    features,
    month_label,
    prune_days,
)
from streamproc.domain.events import DecodeLimits, Rejection, decode_event_noting_unknown
from streamproc.domain.models import ModelBundle
from streamproc.domain.recommend import CustomerView, recommend
from streamproc.errors import InjectedFault, TransientError
from streamproc.metrics import Metrics, observe_many
from streamproc.schemas import OUTPUT_SCHEMA_VERSION, DeadLetter

log = logging.getLogger(__name__)

MAX_SAVE_ATTEMPTS = 5
# Days of silence at which a silent customer's stored features are refreshed by the inactivity sweep
# (window edges and lifecycle thresholds are added to these). Lookups always compute exactly as of now.
SWEEP_BOUNDARIES_DAYS = (7, 14)
SWEEP_CHUNK = 500  # customers refreshed per sweep step (bounds the sweep's working set)
# customers per save call of a batch or sweep step: each chunk is saved while the next one is computed (chunks
# hold different customers, so the order in which their scripts run does not matter)
SAVE_CHUNK = 150
# customers per load call of a batch or sweep step: every chunk is asked for at once and folded as soon as its
# reply is in, so only the first chunk's round trip is waited for (not the whole step's)
LOAD_CHUNK = 250


class RawRecord(NamedTuple):
    """One consumed Kafka record, as the agent saw it (a named tuple: one is made per record, and a frozen
    dataclass costs three times as much to build)."""

    topic: str  # physical topic name
    kind: str  # declared input name: "clicks" or "transactions"
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None

    @property
    def source(self) -> str:
        return f"{self.kind}:{self.partition}"


@dataclass
class SweepPass:
    """One partition's sweep from its mark to ``target``: who is due, and how far the refresh got."""

    target: int
    due: list[str]
    done: int = 0
    # last-seen times whose customers are dropped when the pass ends (silent ``expire_after_days``)
    expire_range: tuple[int, int] | None = None


@dataclass
class BatchResult:
    dead_letters: list[DeadLetter] = field(default_factory=list)
    outcome: FoldOutcome = field(default_factory=FoldOutcome)  # (kind, outcome) counts
    alerts: list[dict[str, Any]] = field(default_factory=list)
    segment_moves: list[dict[str, Any]] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)  # for the training topic
    recommendations: list[dict[str, Any]] = field(default_factory=list)
    outbox: dict[int, list[str]] = field(default_factory=dict)  # outbox entries these outputs were parked in

    def absorb(self, other: BatchResult) -> None:
        self.outcome.merge(other.outcome)
        self.dead_letters.extend(other.dead_letters)
        self.alerts.extend(other.alerts)
        self.segment_moves.extend(other.segment_moves)
        self.examples.extend(other.examples)
        self.recommendations.extend(other.recommendations)
        for partition, fields in other.outbox.items():
            self.outbox.setdefault(partition, []).extend(fields)

    def outputs_blob(self) -> bytes:
        """What the outbox keeps of these outputs ("" when there are none)."""
        if not (self.dead_letters or self.alerts or self.segment_moves or self.examples or self.recommendations):
            return b""
        return orjson.dumps({"a": self.alerts, "s": self.segment_moves, "e": self.examples,
                             "r": self.recommendations, "d": [d.model_dump(mode="json") for d in self.dead_letters]})

    @classmethod
    def from_outbox(cls, blob: bytes) -> BatchResult:
        data = orjson.loads(blob)
        return cls(dead_letters=[DeadLetter.model_validate(d) for d in data.get("d", [])], alerts=data.get("a", []),
                   segment_moves=data.get("s", []), examples=data.get("e", []),
                   recommendations=data.get("r", []))

    def total(self, outcome: str) -> int:
        return self.outcome.total(outcome) + (len(self.dead_letters) if outcome == "dead_lettered" else 0)

    def reject(self, record: RawRecord, reason: str, detail: str, max_original_bytes: int) -> None:
        self.dead_letters.append(dead_letter(record, reason, detail, max_original_bytes))
        self.outcome.count(record.source, "dead_lettered")


def dead_letter(record: RawRecord, reason: str, detail: str, max_original_bytes: int) -> DeadLetter:
    return DeadLetter.of_bytes(
        f"{record.topic}:{record.partition}:{record.offset}", reason, detail, record.topic, record.key, record.value,
        max_original_bytes, partition=record.partition, offset=record.offset,
        record_timestamp_ms=record.timestamp_ms,
    )


class Watermarks:
    """Per input partition: the largest event time seen, and the watermark that trails it.

    Advanced event by event (replayed events included), so lateness decisions depend only on each
    partition's content, not on how records were batched or on the wall clock.
    """

    def __init__(self, allowed_lateness_ms: int, kinds: tuple[str, ...] = ("clicks", "transactions"),
                 max_skew_ms: int | None = None) -> None:
        self.lateness = allowed_lateness_ms
        self.max_skew = max_skew_ms
        self.kinds = kinds
        self.max_ts: dict[str, int] = {}
        self.partition_marks: dict[int, int] = {}

    def watermark(self, source: str) -> int | None:
        top = self.max_ts.get(source)
        return None if top is None else top - self.lateness

    def observe(self, source: str, ts: int) -> bool:
        """Record an event time; True if the event was late (older than the watermark before it)."""
        top = self.max_ts.get(source)
        late = top is not None and ts < top - self.lateness
        if top is None or ts > top:
            self.max_ts[source] = ts
        return late

    def copy(self) -> Watermarks:
        twin = Watermarks(self.lateness, self.kinds, self.max_skew)
        twin.max_ts = dict(self.max_ts)
        twin.partition_marks = dict(self.partition_marks)
        return twin

    def overall(self) -> int | None:
        """The worker's watermark: the largest event time it has seen, minus the allowed lateness."""
        return max(self.max_ts.values()) - self.lateness if self.max_ts else None

    def by_partition(self) -> dict[int, int]:
        """Watermark per input partition number, a function of the data alone (never of the wall clock, so
        a replay, a crash or a hand-over to another worker ends in the same place): the slower of its input
        topics (clicks, transactions) minus the allowed lateness, so time-driven work (sweep, snapshots,
        labels) waits for both, and nothing until both have been heard from. With ``max_skew`` set, a topic
        more than that far behind the other (or never heard from) holds the partition back by at most that
        much: liveness for a topic that can stay silent, at the price of determinism for replays whose topics
        drift further apart than that. Never moves backwards."""
        tops: dict[int, dict[str, int]] = {}
        for source, top in self.max_ts.items():
            kind, _, number = source.rpartition(":")
            tops.setdefault(int(number), {})[kind] = top
        out: dict[int, int] = {}
        for partition, by_kind in tops.items():
            heard = [by_kind[k] for k in self.kinds if k in by_kind]
            candidates = [min(heard) - self.lateness] if len(heard) == len(self.kinds) else []
            if self.max_skew is not None:
                candidates.append(max(by_kind.values()) - self.lateness - self.max_skew)
            previous = self.partition_marks.get(partition)
            if previous is not None:
                candidates.append(previous)
            if candidates:
                out[partition] = self.partition_marks[partition] = max(candidates)
        return out


@dataclass(slots=True)
class ChurnStep:
    """What a customer's churn bookkeeping decided in one step, for scoring once the features are computed."""

    mstate: ModelState
    digest: str  # the customer's pseudonymous id in training examples
    snapshotted: bool = False
    alerts: list[tuple[int, float, dict[str, float], dict[str, float]]] = field(default_factory=list)


@dataclass(slots=True)
class _Attempt:
    """One attempt at a batch step's customers: their events, and what each one's fold gave."""

    pending: dict[str, list[tuple[RawRecord, Positioned]]]
    marks_wm: dict[int, int]
    results: dict[str, BatchResult] = field(default_factory=dict)
    outcomes: dict[str, FoldOutcome] = field(default_factory=dict)
    states: dict[str, CustomerState] = field(default_factory=dict)


class BatchProcessor:
    def __init__(
        self,
        store: FeatureStore,
        metrics: Metrics,
        limits: DecodeLimits,
        fold: FoldConfig,
        late_policy: str = "apply",
        sweep_boundaries_days: tuple[int, ...] = SWEEP_BOUNDARIES_DAYS,
        expire_after_days: int = 400,
        sweep_interval_ms: int = 3_600_000,
        churn: ChurnConfig | None = None,
        max_source_skew_ms: int | None = None,
        action_table: dict[str, dict[str, str]] | None = None,
        models_enabled: bool = True,
        pseudonymize: Callable[[str], str] | None = None,
        excluded_products: frozenset[str] = frozenset(),
        sweep_budget: int | None = None,
        fault_event_id: str | None = None,
    ) -> None:
        self.fault_event_id = fault_event_id  # the fault-injection test hook (``_inject_fault``)
        self.excluded_products = excluded_products
        # customers one sweep() call refreshes at most (None: every due one): a pass that visits many (every
        # live customer at a snapshot instant) is spread over the following calls instead of stalling ingest
        self.sweep_budget = sweep_budget
        self.passes: dict[int, SweepPass] = {}  # partition -> the sweep pass in progress
        self._ownership_changed = False
        self.store = store
        self.metrics = metrics
        self.limits = limits
        self.fold = fold
        self.late_policy = late_policy
        self.watermarks = Watermarks(fold.allowed_lateness_ms, max_skew_ms=max_source_skew_ms)
        self._partitions_loaded: set[int] = set()  # partitions whose stored watermarks were loaded
        self.swept: dict[int, int] = {}  # partition -> watermark the inactivity sweep has reached
        self.churn = churn or ChurnConfig()
        self.bundle: ModelBundle | None = None  # the checkpoint this worker scores with
        self.action_table = action_table
        self.models_enabled = models_enabled
        self.pseudonymize = pseudonymize
        self.expire_after_days = expire_after_days
        self.sweep_interval_ms = sweep_interval_ms
        # the names of the features this configuration computes (a stored row with others is recomputed)
        self._feature_names = frozenset(features(CustomerState(""), 0, fold))
        self.boundaries = sorted(
            {*sweep_boundaries_days, *fold.windows_days, 60, fold.at_risk_days, fold.churned_days}
        )

    def _decode(
        self, records: list[RawRecord], result: BatchResult, marks: Watermarks
    ) -> list[tuple[RawRecord, Positioned]]:
        """The valid events, each with its record and as the fold takes it (with its source and offset)."""
        valid: list[tuple[RawRecord, Positioned]] = []
        consumed: dict[str, int] = defaultdict(int)
        for rec in records:
            consumed[rec.kind] += 1
            decoded, unknown = decode_event_noting_unknown(rec.kind, rec.value, self.limits, rec.timestamp_ms)
            if isinstance(decoded, Rejection):
                result.reject(rec, decoded.reason, decoded.detail, self.limits.dead_letter_max_original_bytes)
                continue
            if unknown:
                self.metrics.unknown_fields.labels(rec.kind).inc()
            source = rec.source
            if marks.observe(source, decoded.ts):
                self.metrics.late_events.labels(self.late_policy).inc()
                if self.late_policy == "dlq":
                    wm = marks.watermark(source)
                    result.reject(rec, "late_event", f"event time {decoded.ts} is behind the watermark {wm}",
                                  self.limits.dead_letter_max_original_bytes)
                    continue
            if self.pseudonymize is not None:
                decoded = decoded.model_copy(update={"customer_id": self.pseudonymize(decoded.customer_id)})
            valid.append((rec, Positioned(decoded, source, rec.offset)))
        for kind, n in consumed.items():
            self.metrics.events_consumed.labels(kind).inc(n)
        return valid

    def partitions_changed(self) -> None:
        """Partitions moved between workers (a rebalance): before the next step, reload every partition's stored
        watermarks and sweep marks (another worker may have advanced them meanwhile) and restart sweep passes
        from the stored marks."""
        self._ownership_changed = True

    def _apply_ownership_change(self) -> None:
        if self._ownership_changed:
            self._ownership_changed = False
            self._partitions_loaded = set()
            self.passes = {}

    async def process(self, records: list[RawRecord]) -> BatchResult:
        started = time.perf_counter()
        self._apply_ownership_change()
        fresh = {rec.partition for rec in records} - self._partitions_loaded
        if fresh:
            # a partition this process has not read before (start, or taken over from another worker):
            # resume its watermarks and sweep mark where the previous owner left them, so lateness, the
            # sweep and snapshots go on exactly as they would have without the hand-over
            stored = await self.store.load_watermarks()
            for source, ts in stored.items():
                if int(source.rpartition(":")[2]) in fresh and ts > self.watermarks.max_ts.get(source, ts - 1):
                    self.watermarks.max_ts[source] = ts
            for partition, mark in (await self.store.sweep_marks()).items():
                if partition in fresh:
                    self.swept[partition] = max(self.swept.get(partition, mark), mark)
            self._partitions_loaded |= fresh
        result = BatchResult()
        # watermarks advance only once the batch is saved, so a retried batch is judged the same way
        marks = self.watermarks.copy()
        valid = self._decode(records, result, marks)

        by_customer: dict[str, list[tuple[RawRecord, Positioned]]] = defaultdict(list)
        for rec, pos in valid:
            by_customer[pos.event.customer_id].append((rec, pos))

        marks_wm = marks.by_partition()
        pending = dict(by_customer)
        saved: dict[str, CustomerState] = {}
        for attempt in range(MAX_SAVE_ATTEMPTS):
            if not pending:
                break
            attempt_of = _Attempt(pending, marks_wm)
            updates, failed = await self._load_step_save(list(pending), functools.partial(self._step, attempt_of))
            outcomes, customer_results, states = attempt_of.outcomes, attempt_of.results, attempt_of.states
            for up in updates:
                if up.outputs and up.customer_id not in failed:
                    customer_results[up.customer_id].outbox[up.partition] = [up.outbox_field]
            for cid, outcome in outcomes.items():
                if cid not in failed:
                    result.outcome.merge(outcome)
            for cid, partial in customer_results.items():
                if cid not in failed:
                    result.absorb(partial)
                    if cid in states:
                        # replays included: a crash may have come between their save and the side effects
                        saved[cid] = states[cid]
            if failed:
                self.metrics.cas_conflicts.inc(len(failed))
                log.info("%d customer saves lost a version race (attempt %d); retrying", len(failed), attempt + 1)
                pending = {cid: pending[cid] for cid in failed}
                await asyncio.sleep(0.01 * (attempt + 1))
            else:
                pending = {}
        if pending:
            raise TransientError(f"{len(pending)} customers could not be saved after {MAX_SAVE_ATTEMPTS} attempts")

        t0 = time.perf_counter()
        effects = self._side_effects(by_customer, saved, marks)
        await self.store.after_batch(effects)
        self.metrics.redis_seconds.labels("after_batch").observe(time.perf_counter() - t0)
        self.watermarks = marks
        self._count(result)
        now_ms = time.time() * 1000  # wall clock: only for the latency metric
        observe_many(self.metrics.end_to_end,
                     [max(now_ms - rec.timestamp_ms, 0.0) / 1000 for rec in records if rec.timestamp_ms])
        elapsed = time.perf_counter() - started
        self.metrics.batch_seconds.observe(elapsed)
        self.metrics.batch_size.observe(len(records))
        if records:
            self.metrics.event_seconds.observe(elapsed / len(records))
        wm = self.watermarks.overall()
        if wm is not None:
            self.metrics.watermark.set(wm / 1000)
        return result

    async def _timed_load(self, customer_ids: list[str], with_features: bool = False) -> dict[str, Loaded]:
        t0 = time.perf_counter()
        loaded = await self.store.load(customer_ids, with_features)
        self.metrics.redis_seconds.labels("load").observe(time.perf_counter() - t0)
        return loaded

    async def _timed_save(self, updates: list[Update]) -> SaveResult:
        t0 = time.perf_counter()
        saved = await self.store.save(updates)
        self.metrics.redis_seconds.labels("save").observe(time.perf_counter() - t0)
        return saved

    def _step(self, attempt: _Attempt, cid: str, row: Loaded) -> Update | None:
        """One customer's part of a batch step: the fold, then (unless it changed nothing) features and the model
        step, as the update to save (None: nothing to save, or an erased customer). Pure code that raises on these
        events raises on every retry too: the events it raises on are dead-lettered (``_isolate``) and the rest
        applied, so one customer's poison never stalls the partition."""
        items = attempt.pending[cid]
        customer_result = attempt.results[cid] = BatchResult()
        if row.erased:
            for rec, _ in items:
                customer_result.outcome.count(rec.source, "erased")
            return None
        try:
            # the buckets are pruned once the churn bookkeeping has read them (``_derive``)
            state, outcome = apply_events(row.pristine(cid), [pos for _, pos in items], self.fold, prune=False)
            self._inject_fault(items)
            update = self._features_and_model(attempt, cid, row, items, state, outcome, customer_result)
        except Exception as exc:
            log.warning("a customer's step raised (%s: %s): isolating the events", type(exc).__name__, exc)
            customer_result = attempt.results[cid] = BatchResult()
            state, outcome = self._isolate(cid, row, items, attempt.marks_wm, customer_result)
            try:
                update = self._features_and_model(attempt, cid, row, items, state, outcome, customer_result)
            except Exception as again:  # not one event's doing: none of the customer's events of this batch
                customer_result = attempt.results[cid] = BatchResult()
                state, outcome = self._reject_all(row.pristine(cid), items, again, customer_result)
                update = self._features_and_model(attempt, cid, row, items, state, outcome, customer_result)
        attempt.states[cid], attempt.outcomes[cid] = state, outcome
        return update

    def _features_and_model(
        self, attempt: _Attempt, cid: str, row: Loaded, items: list[tuple[RawRecord, Positioned]],
        state: CustomerState, outcome: FoldOutcome, customer_result: BatchResult,
    ) -> Update | None:
        partition = items[-1][0].partition
        # a batch that was all replays changes nothing; anything else moves at least a fence
        if not (row.blob is None or outcome.total("applied") or outcome.total("duplicate")
                or customer_result.dead_letters):
            return None
        as_of = self.as_of(state, self.swept_to(partition))
        feats, model, _ = self._derive(cid, state, row.model, as_of, attempt.marks_wm.get(partition), customer_result,
                                       outcome.triggers)
        return Update(cid, row.version, state, feats, model, partition, customer_result.outputs_blob(),
                      label_due=self._label_due(state))

    def _isolate(
        self, cid: str, row: Loaded, items: list[tuple[RawRecord, Positioned]], marks_wm: dict[int, int],
        result: BatchResult,
    ) -> tuple[CustomerState, FoldOutcome]:
        """Apply the customer's events one at a time, each followed by a trial of the features and the model step
        on copies; an event after which any of it raises is dead-lettered (``processing_error``) and its offset
        fenced, so a replay does not apply it either. Deterministic: the same events give the same letters."""
        state = row.pristine(cid)
        total = FoldOutcome()
        for rec, pos in items:
            try:
                trial, outcome = apply_events(copy.deepcopy(state), [pos], self.fold, prune=False)
                self._inject_fault([(rec, pos)])
                self._derive(cid, copy.deepcopy(trial), row.model, self.as_of(trial, self.swept_to(rec.partition)),
                             marks_wm.get(rec.partition), BatchResult(), outcome.triggers)
            except Exception as exc:
                self._poisoned(state, rec, pos, exc, result)
                continue
            state = trial
            total.merge(outcome)
        return state, total

    def _reject_all(
        self, state: CustomerState, items: list[tuple[RawRecord, Positioned]], exc: Exception, result: BatchResult,
    ) -> tuple[CustomerState, FoldOutcome]:
        for rec, pos in items:
            self._poisoned(state, rec, pos, exc, result)
        return state, FoldOutcome()

    def _poisoned(self, state: CustomerState, rec: RawRecord, pos: Positioned, exc: Exception,
                  result: BatchResult) -> None:
        """Dead-letter an event the step raised on, and move the fence past it so a replay does not reapply it."""
        log.warning("poison event at %s:%s offset %s: %r", rec.topic, rec.partition, rec.offset, exc)
        result.reject(rec, "processing_error", f"{type(exc).__name__}: {exc}",
                      self.limits.dead_letter_max_original_bytes)
        state.offsets[pos.source] = max(state.offsets.get(pos.source, -1), pos.offset)

    def _inject_fault(self, items: list[tuple[RawRecord, Positioned]]) -> None:
        """The fault-injection test hook: raise for a chosen event id (``fault_inject_event_id``)."""
        if self.fault_event_id is not None and any(pos.event.event_id == self.fault_event_id for _, pos in items):
            raise InjectedFault(f"injected fault for event {self.fault_event_id}")

    def _side_effects(
        self, by_customer: dict[str, list[tuple[RawRecord, Positioned]]], saved: dict[str, CustomerState],
        marks: Watermarks,
    ) -> BatchSideEffects:
        last_seen: dict[int, dict[str, int]] = defaultdict(dict)
        hll: dict[str, set[str]] = defaultdict(set)
        for cid, state in saved.items():
            if state.last_event_ts is None:
                continue
            partition = by_customer[cid][-1][0].partition
            last_seen[partition][cid] = state.last_event_ts
            if state.purchases and state.first_purchase_ts is not None:
                hll["sp:agg:buyers"].add(cid)
                if state.purchases >= 2:
                    hll["sp:agg:repeat"].add(cid)
                cohort = calendar_month(state.first_purchase_ts)
                for month in state.months:
                    if month >= cohort:
                        hll[f"sp:cohort:{month_label(cohort)}:{month - cohort}"].add(cid)
        return BatchSideEffects(dict(last_seen), dict(marks.max_ts), dict(hll))

    def _derive(
        self, cid: str, state: CustomerState, model_blob: bytes | None, as_of: int, watermark: int | None,
        out: BatchResult, triggers: list[Trigger] | None = None, stored: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None, bool]:
        """What a customer's state gives: the churn bookkeeping on the grid up to ``watermark``, then the features
        as of ``as_of`` (``stored`` ones kept when they are as of that instant already), then the model outputs.
        The bookkeeping reads the day buckets before the fold's pruning drops old ones (a snapshot's label and
        inputs must not depend on which later events were applied first). Returns the features, the model outputs
        to store (None with models off) and whether the features are the stored ones."""
        churn = self._churn_step(cid, state, model_blob, watermark, out) if self.models_enabled else None
        prune_days(state, self.fold)
        # features are a function of the state and the instant: when neither moved since they were stored (a sweep
        # visit between two silence boundaries, the usual case), keep them
        unchanged = stored is not None and stored.get("as_of_ts") == as_of and stored.keys() == self._feature_names
        feats = stored if unchanged and stored is not None else features(state, as_of, self.fold)
        model = self._score(cid, state, churn, feats, as_of, out, triggers) if churn is not None else None
        return feats, model, unchanged

    def _churn_step(
        self, cid: str, state: CustomerState, model_blob: bytes | None, watermark: int | None, out: BatchResult,
    ) -> ChurnStep:
        """Snapshots at the grid instants up to ``watermark`` and the labels that matured by then, as training
        examples; each snapshot scored with the current checkpoint. Mutates ``state``'s snapshot bookkeeping, a
        function of the events alone (``take_snapshots``); the scores depend on the checkpoint."""
        step = ChurnStep(ModelState.from_dict(orjson.loads(model_blob) if model_blob else None),
                         hashlib.blake2b(cid.encode(), digest_size=8).hexdigest())
        if watermark is None:
            return step
        mstate, digest, bundle = step.mstate, step.digest, self.bundle
        version = bundle.version if bundle else None
        for point, values in take_snapshots(state, watermark, self.churn):
            step.snapshotted = True
            x = churn_inputs(values)
            # an untrained model says nothing: its 0.0 must not be scored later as a confident answer
            p = bundle.churn_probability(x) if bundle and bundle.churn_examples else None
            state.pending.append(point)
            mstate.scored_at[str(point)] = [None if p is None else round(p, 4), version]
            out.examples.append({"kind": "segment", "id": f"{digest}:{point}", "ts": point,
                                 "x": segment_inputs(values, state)})
            # alerts are decided on this grid: every live customer is scored at every grid instant from
            # what was known then, so which alerts fire does not depend on batching, crashes or hand-overs
            if bundle is not None and p is not None and should_alert(mstate, p, point, self.churn):
                step.alerts.append((point, p, x, values))
        # labels mature on the snapshot grid, where the sweep visits every customer with a snapshot to mature;
        # nothing is dropped before it matured (``mature_labels`` keeps at most ``max_pending`` of the rest)
        grid = self.churn.cadence_days * DAY_MS
        for point, label in mature_labels(state, watermark - watermark % grid, self.churn):
            # the last purchase and active days as they were when the snapshot was taken (their buckets may be
            # pruned by now)
            then = inputs_at(state, point, anchor=state.anchors.pop(point, None))
            scored = mstate.scored_at.pop(str(point), [None, None])
            if then is None:
                continue
            out.examples.append({"kind": "churn", "id": f"{digest}:{point}", "ts": point, "label": label,
                                 "x": churn_inputs(then), "p": scored[0], "v": scored[1]})
        live = {str(p) for p in state.pending}
        mstate.scored_at = {k: v for k, v in mstate.scored_at.items() if k in live}
        return step

    def _score(
        self, cid: str, state: CustomerState, churn: ChurnStep, feats: dict[str, Any], as_of: int, out: BatchResult,
        triggers: list[Trigger] | None = None,
    ) -> dict[str, Any]:
        """The alerts the churn step decided, recommendations for the triggers, and the customer's current churn
        probability and segment; returns the model outputs to store (checkpoint-dependent)."""
        mstate, bundle = churn.mstate, self.bundle
        for point, p, x, values in churn.alerts:
            assert bundle is not None  # an alert needs a score
            self._alert(cid, state, mstate, feats, point, p, x, values, bundle, out)
        if triggers:
            self._recommend_on(cid, churn.digest, state, mstate, feats, triggers, out)
        if bundle is None:
            return mstate.to_dict()
        now_values = inputs_at(state, as_of + 1, exact=True)
        if now_values is None:
            return mstate.to_dict()
        version = bundle.version
        x = churn_inputs(now_values)
        p = bundle.churn_probability(x)
        if bundle.churn_examples:
            self.metrics.churn_probability.observe(p)
        # the segment is re-assigned at snapshot instants (weekly), under a new model version, or if unknown:
        # segments stay stable between those, and the k-means distance computations stay off the hot path
        segment = mstate.segment
        if segment is None or churn.snapshotted or mstate.model_version != version:
            segment = bundle.segment(segment_inputs(now_values, state))
        names = self.segment_names
        if segment is not None and mstate.segment is not None and segment != mstate.segment:
            out.segment_moves.append({"schema_version": OUTPUT_SCHEMA_VERSION, "customer_id": cid, "ts": as_of,
                                      "from_segment": mstate.segment,
                                      "to_segment": segment, "to_name": names.get(segment), "model_version": version})
        mstate.segment, mstate.churn_p, mstate.model_version = segment, round(p, 4), version
        return mstate.to_dict()

    def _alert(
        self, cid: str, state: CustomerState, mstate: ModelState, feats: dict[str, Any], point: int, p: float,
        x: dict[str, float], values: dict[str, float], bundle: ModelBundle, out: BatchResult,
    ) -> None:
        """A churn alert at grid instant ``point``, with the next best action: the retention action for the
        customer's tier and risk, and the items most likely to bring them back."""
        level = risk_level(p, self.churn)
        profile = profile_at(values, self.fold)
        tier = profile["value_tier"]
        win_back = self._recommendation(cid, state, mstate, feats, point, "churn_alert", f"{point}", ())
        if win_back is not None:
            out.recommendations.append(win_back)
        names = self.segment_names
        out.alerts.append({
            "schema_version": OUTPUT_SCHEMA_VERSION, "alert_id": f"{cid}:{point}", "customer_id": cid, "ts": point,
            "probability": round(p, 4),
            "risk_level": level, "segment": names.get(mstate.segment) if mstate.segment is not None else None,
            "value_tier": tier, "clv": profile["clv"], "lifecycle_stage": profile["lifecycle_stage"],
            "model_version": bundle.version, "reasons": top_reasons(bundle.contributions(x), x),
            "action": retention_action(tier, level, self.action_table),
            "recommended_items": win_back["items"] if win_back else [],
        })

    def _recommend_on(
        self, cid: str, digest: str, state: CustomerState, mstate: ModelState, feats: dict[str, Any],
        triggers: list[Trigger], out: BatchResult,
    ) -> None:
        """Each trigger in event-time order: a purchase first goes to the trainer as a basket, with the
        recommendation shown before it (for hit-rate@k), then every trigger gets a fresh recommendation."""
        for trig in sorted(triggers, key=lambda t: (t.ts, t.kind != "purchase", t.event_id)):
            if trig.kind == "purchase":
                shown = mstate.last_rec
                before = shown["items"] if shown and shown["ts"] <= trig.ts else None
                out.examples.append({
                    "kind": "basket", "id": f"{digest}:{trig.event_id}", "ts": trig.ts,
                    "items": [[p, c, q] for p, c, q in zip(trig.items, trig.categories, trig.quantities, strict=True)],
                    "segment": mstate.segment, "rec": before, "amount": trig.amount,
                })
            rec = self._recommendation(cid, state, mstate, feats, trig.ts, trig.kind, trig.event_id, trig.items)
            if rec is not None:
                out.recommendations.append(rec)

    def _recommendation(
        self, cid: str, state: CustomerState, mstate: ModelState, feats: dict[str, Any], at: int, trigger: str,
        event_id: str, context: tuple[str, ...],
    ) -> dict[str, Any] | None:
        bundle = self.bundle
        if bundle is None:
            return None
        index = bundle.rec_index()
        everything_before = state.max_ts <= at  # the usual case: nothing of the customer is newer than ``at``
        view = CustomerView(
            bought=state.bought if everything_before else {p: ts for p, ts in state.bought.items() if ts <= at},
            viewed={p: (v[0], v[1], v[2] if len(v) > 2 else 1) for p, v in state.viewed.items() if v[0] <= at},
            top_categories=feats.get("top_categories", []), segment=mstate.segment,
        )
        items = recommend(index, view, at, list(context), self.excluded_products)
        if not items:
            return None
        rec_id = f"{cid}:{trigger}:{event_id}"
        last = mstate.last_rec
        # the latest in event time (not the last made: the two input topics are read at their own pace)
        if last is None or (at, rec_id) >= (last["ts"], last["id"]):
            mstate.last_rec = {"id": rec_id, "ts": at, "trigger": trigger, "items": [i["product_id"] for i in items]}
        return {"schema_version": OUTPUT_SCHEMA_VERSION, "recommendation_id": rec_id, "customer_id": cid, "ts": at,
                "trigger": trigger, "items": items,
                "strategy_version": index.cfg.version, "model_version": bundle.version,
                "segment": self.segment_names.get(mstate.segment) if mstate.segment is not None else None}

    @property
    def segment_names(self) -> dict[int, str]:
        if self.bundle is None:
            return {}
        cached = getattr(self, "_names_cache", None)
        if cached is None or cached[0] != self.bundle.version:
            profiles = self.bundle.segment_profiles()
            cached = (self.bundle.version, {cid: p["name"] for cid, p in profiles.items()})
            self._names_cache = cached
        return cached[1]

    async def recover_outbox(self, partition: int) -> BatchResult:
        """Outputs a previous owner of the partition saved but may not have sent (it crashed in between)."""
        recovered = BatchResult()
        for name, blob in sorted((await self.store.outbox(partition)).items()):
            parked = BatchResult.from_outbox(blob)
            parked.outbox = {partition: [name]}
            recovered.absorb(parked)
        return recovered

    def as_of(self, state: CustomerState, swept_to: int) -> int:
        """The event time stored features are computed as of: the customer's newest event, or the latest
        silence boundary the sweep has already passed (an event the sweep overtook, e.g. on a topic that
        lags the other one, is stored as the sweep would have stored it). Either way not batching-dependent.
        """
        last = state.last_event_ts or state.max_ts
        crossed = [d for d in self.boundaries if last + d * DAY_MS <= swept_to]
        return max(state.max_ts, last + crossed[-1] * DAY_MS) if crossed else state.max_ts

    def swept_to(self, partition: int) -> int:
        """Where the sweep stands for stored features: the target of a pass in progress (its customers not yet
        refreshed are stored as the finished pass will store them), else the last mark."""
        running = self.passes.get(partition)
        return running.target if running is not None else self.swept.get(partition, 0)

    @property
    def sweep_pending(self) -> bool:
        """More sweep() calls are due even if no batch comes: a pass is in progress, or a partition's
        watermark passed its sweep mark (a pass spread over batches ended behind the watermark)."""
        if self.passes:
            return True
        return any(wm - wm % self.sweep_interval_ms > self.swept.get(p, 0)
                   for p, wm in self.watermarks.by_partition().items())

    async def sweep(self, emit: Callable[[BatchResult], Awaitable[None]] | None = None,
                    budget: int | None = None) -> int:
        """Run the inactivity sweep (up to ``sweep_budget`` customers). With ``emit``, each chunk's outputs
        (alerts, examples) are handed over as soon as the chunk is saved, so memory stays bounded however many
        customers a grid instant visits; without, they wait in ``self.sweep_outputs``."""
        self.sweep_outputs = BatchResult()
        return await self._sweep(self.sweep_outputs, emit, budget if budget is not None else self.sweep_budget)

    async def _sweep(self, outputs: BatchResult, emit: Callable[[BatchResult], Awaitable[None]] | None = None,
                     budget: int | None = None) -> int:
        """Bring silent customers' stored features up to date as the watermark passes silence boundaries.

        For each partition, customers whose last event time plus a boundary fell in (last sweep mark,
        watermark] are re-materialised as of that instant (never as of the wall clock), so the stored
        features after a replay do not depend on when sweeps ran. A pass's target is fixed when it starts; its
        mark is stored when its last customer is refreshed (a crash before that re-runs the pass, and a
        refresh is idempotent). Returns the number of customers touched.
        """
        self._apply_ownership_change()
        marks = await self.store.sweep_marks()
        touched = 0
        for partition, exact_wm in sorted(self.watermarks.by_partition().items()):
            running = self.passes.get(partition)
            if running is None:
                running = await self._start_pass(partition, exact_wm, marks)
                if running is None:
                    continue
            while running.done < len(running.due):
                room = SWEEP_CHUNK if budget is None else min(SWEEP_CHUNK, budget - touched)
                if room <= 0:
                    break
                ids = running.due[running.done : running.done + room]
                chunk = BatchResult() if emit is not None else outputs
                touched += await self._refresh(ids, running.target, partition, chunk)
                running.done += len(ids)
                if emit is not None:
                    await emit(chunk)
            if running.done < len(running.due):
                break  # out of budget: the next call goes on from here
            if running.expire_range is not None:
                # asked again: a customer who came back while the pass ran is not silent any more
                (expired,) = await self.store.silent_in_ranges(partition, [running.expire_range])
                if expired:
                    await self.store.expire(partition, expired)
            await self.store.set_sweep_mark(partition, running.target)
            self.swept[partition] = running.target
            del self.passes[partition]
        self.metrics.sweep_customers.inc(touched)
        return touched

    async def _start_pass(self, partition: int, exact_wm: int, marks: dict[int, int]) -> SweepPass | None:
        # sweep up to a whole multiple of the interval: where a sweep stops does not depend on batching
        wm = exact_wm - exact_wm % self.sweep_interval_ms
        low = max(marks.get(partition, 0), self.swept.get(partition, 0))  # 0: every boundary is due
        if wm <= low:
            self.swept[partition] = low
            return None
        spans = [d * DAY_MS for d in self.boundaries]
        expire_span = self.expire_after_days * DAY_MS
        live = self.churn.silent_horizons * self.churn.horizon_days * DAY_MS
        ranges = [(low - span, wm - span) for span in spans]
        # every live customer at each snapshot instant the watermark passed (also those whose later
        # events were already applied: a topic can run ahead of the other)
        points = grid_points(low, wm, self.churn) if self.models_enabled else []
        if points:
            # every customer live at a grid instant of the pass, and every one with a snapshot whose label matures at
            # one of them (taken at most ``live`` after the last event, maturing ``maturity_span`` later): so an
            # overdue snapshot matures at its grid instant even for a customer who never sends another event
            ranges.append((points[0] - live - maturity_span(self.churn), 2**62))
        # customers to expire are visited first (their last snapshots and labels are due however far behind the
        # watermark the sweep is) and dropped when the pass ends
        expire_range = (low - expire_span, wm - expire_span)
        found = await self.store.silent_in_ranges(partition, [*ranges, expire_range])
        running = self.passes[partition] = SweepPass(wm, sorted(set().union(*found)), expire_range=expire_range)
        return running

    async def _refresh(self, customer_ids: list[str], wm: int, partition: int, outputs: BatchResult) -> int:
        touched = 0
        for _ in range(MAX_SAVE_ATTEMPTS):
            partials: dict[str, BatchResult] = {}
            updates, failed = await self._load_step_save(
                customer_ids, functools.partial(self._refreshed, wm, partition, partials), with_features=True)
            for up in updates:
                if up.customer_id not in failed:
                    partial = partials[up.customer_id]
                    if up.outputs:
                        partial.outbox[partition] = [up.outbox_field]
                    outputs.absorb(partial)
            touched += len(updates) - len(failed)
            if not failed:
                return touched
            customer_ids = [up.customer_id for up in updates if up.customer_id in failed]
        raise TransientError(f"sweep could not save {len(customer_ids)} customers")

    def _refreshed(self, wm: int, partition: int, partials: dict[str, BatchResult], cid: str, row: Loaded) -> (
        Update | None
    ):
        """A silent customer's stored features and model outputs as of the silence boundary ``wm`` passed."""
        if row.blob is None or row.erased:
            return None
        state = row.pristine(cid)
        as_of = self.as_of(state, wm)  # the silence boundary passed, as a batch would store it
        partial = partials[cid] = BatchResult()
        feats, model, unchanged = self._derive(cid, state, row.model, as_of, wm, partial, stored=row.features)
        return Update(cid, row.version, state, feats, model, partition, partial.outputs_blob(),
                      features_unchanged=unchanged, label_due=self._label_due(state))

    def _label_due(self, state: CustomerState) -> int | None:
        """The grid instant the oldest pending label matures at (the store's maturity index: a label still pending
        once the sweep mark passed it is overdue, ``streamproc_overdue_labels``)."""
        return min(state.pending) + maturity_span(self.churn) if state.pending else None

    async def _load_step_save(
        self, customer_ids: list[str], step: Callable[[str, Loaded], Update | None], with_features: bool = False,
    ) -> tuple[list[Update], set[str]]:
        """Load, step and save customers with Redis working beside the CPU: loads go out in chunks all at once and
        each chunk is stepped as soon as its reply is in; updates are saved in chunks while the next ones are
        computed (chunks hold different customers, so the order their scripts run in does not matter). Returns
        the updates and the customers whose save lost the version check. An error is raised once every call in
        flight has ended, so a retry never races a save of this attempt."""
        chunks = [customer_ids[i : i + LOAD_CHUNK] for i in range(0, len(customer_ids), LOAD_CHUNK)]
        loading = [asyncio.ensure_future(self._timed_load(chunk, with_features)) for chunk in chunks]
        updates: list[Update] = []
        saving: list[asyncio.Future[SaveResult]] = []
        sent = 0
        try:
            for chunk, load in zip(chunks, loading, strict=True):
                loaded = await load
                for cid in chunk:
                    update = step(cid, loaded[cid])
                    if update is None:
                        continue
                    updates.append(update)
                    if len(updates) - sent >= SAVE_CHUNK:
                        saving.append(asyncio.ensure_future(self._timed_save(updates[sent:])))
                        sent = len(updates)
                        await asyncio.sleep(0)  # lets the save write its command
            if sent < len(updates):
                saving.append(asyncio.ensure_future(self._timed_save(updates[sent:])))
            failed = {cid for saved in await asyncio.gather(*saving) for cid in saved.failed}
        except BaseException:
            await asyncio.gather(*loading, *saving, return_exceptions=True)
            raise
        return updates, failed

    def _count(self, result: BatchResult) -> None:
        self.metrics.orders.inc(result.outcome.orders)
        self.metrics.revenue.inc(result.outcome.revenue_cents / 100)
        self.metrics.refunds.inc(result.outcome.refund_cents / 100)
        for letter in result.dead_letters:
            self.metrics.dlq_records.labels(letter.reason).inc()
        for (kind, outcome), n in result.outcome.counts.items():
            self.metrics.events_processed.labels(kind, outcome).inc(n)
