"""The batch step between Kafka and Redis: decode, group by customer, load, fold (pure), derive features and the
model step, save (compare-and-set, outputs parked in the same write), plus dead letters.

No Faust here: the agent hands over raw records and gets back what to produce. The store and the metrics bundle
are injected, so the whole step runs against the in-memory store in tests. Build it with
``streamproc.pipeline.factory.build_processor``.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from streamproc.domain.alerts import NO_CONTROL_GROUP, ControlGroup
from streamproc.domain.churn import ChurnConfig
from streamproc.domain.customer import (
    CustomerState,
    FoldConfig,
    FoldOutcome,
    Positioned,
    apply_events,
    calendar_month,
    month_label,
)
from streamproc.domain.events import DecodeLimits, Rejection, decode_event_noting_unknown
from streamproc.domain.models import ModelBundle
from streamproc.errors import InjectedFault, TransientError
from streamproc.metrics import Metrics, observe_many
from streamproc.partitioning import home_partition
from streamproc.pipeline.derive import Derivation
from streamproc.pipeline.model_step import ModelStep
from streamproc.pipeline.records import BatchResult, RawRecord, Watermarks
from streamproc.pipeline.store_calls import StoreCalls
from streamproc.pipeline.sweep import MAX_SAVE_ATTEMPTS, Sweeper
from streamproc.ports import BatchSideEffects, FeatureStore, Loaded, Update

log = logging.getLogger(__name__)

# Days of silence at which a silent customer's stored features are refreshed by the inactivity sweep
# (window edges and lifecycle thresholds are added to these). Lookups always compute exactly as of now.
SWEEP_BOUNDARIES_DAYS = (7, 14)


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
        control: ControlGroup | None = None,
        sweep_budget: int | None = None,
        fault_event_id: str | None = None,
        alert_budgets: dict[str, int] | None = None,
    ) -> None:
        self.fault_event_id = fault_event_id  # the fault-injection test hook (``_inject_fault``)
        self._ownership_changed = False
        self.store = store
        self.metrics = metrics
        self.limits = limits
        self.fold = fold
        self.late_policy = late_policy
        self.pseudonymize = pseudonymize
        self.watermarks = Watermarks(fold.allowed_lateness_ms, max_skew_ms=max_source_skew_ms)
        self._partitions_loaded: set[int] = set()  # partitions whose stored watermarks were loaded
        self._layout_partitions: int | None = None  # the store's input partition count (read on resuming)
        churn = churn or ChurnConfig()
        boundaries = sorted({*sweep_boundaries_days, *fold.windows_days, 60, fold.at_risk_days, fold.churned_days})
        self.model = ModelStep(fold, churn, metrics, action_table, excluded_products,
                               control or NO_CONTROL_GROUP)
        self.derivation = Derivation(fold, churn, self.model, models_enabled, boundaries)
        self.calls = StoreCalls(store, metrics)
        # customers one sweep() call refreshes at most (None: every due one): a pass that visits many (every
        # live customer at a snapshot instant) is spread over the following calls instead of stalling ingest
        self.sweeper = Sweeper(store, self.calls, self.derivation, metrics, churn, models_enabled, expire_after_days,
                               sweep_interval_ms, sweep_budget, lambda: self.watermarks,
                               self._apply_ownership_change, alert_budgets)

    @property
    def bundle(self) -> ModelBundle | None:
        """The checkpoint this worker scores with."""
        return self.model.bundle

    @bundle.setter
    def bundle(self, bundle: ModelBundle | None) -> None:
        self.model.bundle = bundle

    @property
    def sweep_budget(self) -> int | None:
        return self.sweeper.sweep_budget

    @sweep_budget.setter
    def sweep_budget(self, budget: int | None) -> None:
        self.sweeper.sweep_budget = budget

    @property
    def sweep_outputs(self) -> BatchResult:
        return self.sweeper.sweep_outputs

    @property
    def sweep_pending(self) -> bool:
        return self.sweeper.sweep_pending

    def note_silent_sources(self, sources: Iterable[str]) -> None:
        """Input sources ("kind:partition") that carry no record at all, as the worker learnt from the broker:
        they do not hold their partition's watermark back (``Watermarks.by_partition``)."""
        self.watermarks.silent = frozenset(sources)

    async def sweep(self, emit: Callable[[BatchResult], Awaitable[None]] | None = None,
                    budget: int | None = None) -> int:
        return await self.sweeper.sweep(emit, budget)

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
            self.sweeper.passes = {}

    async def process(self, records: list[RawRecord]) -> BatchResult:
        started = time.perf_counter()
        self._apply_ownership_change()
        fresh = {rec.partition for rec in records} - self._partitions_loaded
        if fresh:
            await self._resume(fresh)
        result = BatchResult()
        # watermarks advance only once the batch is saved, so a retried batch is judged the same way
        marks = self.watermarks.copy()
        valid = self._decode(records, result, marks)

        by_customer: dict[str, list[tuple[RawRecord, Positioned]]] = defaultdict(list)
        for rec, pos in valid:
            by_customer[pos.event.customer_id].append((rec, pos))
        count_off_partition(self.metrics, self._layout_partitions, by_customer)

        marks_wm = marks.by_partition()
        pending = dict(by_customer)
        saved: dict[str, CustomerState] = {}
        for attempt in range(MAX_SAVE_ATTEMPTS):
            if not pending:
                break
            attempt_of = _Attempt(pending, marks_wm)
            customers = {cid: items[-1][0].partition for cid, items in pending.items()}
            updates, failed = await self.calls.load_step_save(customers, functools.partial(self._step, attempt_of))
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
        effects = population_effects(by_customer, saved, marks)
        await self.store.after_batch(effects)
        self.metrics.redis_seconds.labels("after_batch").observe(time.perf_counter() - t0)
        self.watermarks = marks
        self._observe(records, result, started)
        return result

    async def _resume(self, fresh: set[int]) -> None:
        """Partitions this process has not read before (start, or taken over from another worker): resume their
        watermarks and sweep marks where the previous owner left them, so lateness, the sweep and snapshots go on
        exactly as they would have without the hand-over."""
        stored = await self.store.load_watermarks()
        for source, ts in stored.items():
            if int(source.rpartition(":")[2]) in fresh and ts > self.watermarks.max_ts.get(source, ts - 1):
                self.watermarks.max_ts[source] = ts
        for partition, mark in (await self.store.sweep_marks()).items():
            if partition in fresh:
                self.sweeper.swept[partition] = max(self.sweeper.swept.get(partition, mark), mark)
        self._partitions_loaded |= fresh
        self._layout_partitions = await self.store.layout_partitions()

    def _observe(self, records: list[RawRecord], result: BatchResult, started: float) -> None:
        count_outcomes(self.metrics, result)
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
        as_of = self.derivation.as_of(state, self.sweeper.swept_to(partition))
        feats, model, _ = self.derivation.derive(cid, state, row.model, as_of, attempt.marks_wm.get(partition),
                                                 customer_result, outcome.triggers)
        return Update(cid, row.version, state, feats, model, partition, customer_result.outputs_blob(),
                      label_due=self.derivation.label_due(state), queued=customer_result.queued or None)

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
                as_of = self.derivation.as_of(trial, self.sweeper.swept_to(rec.partition))
                self.derivation.derive(cid, copy.deepcopy(trial), row.model, as_of, marks_wm.get(rec.partition),
                                       BatchResult(), outcome.triggers)
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


def population_effects(
    by_customer: dict[str, list[tuple[RawRecord, Positioned]]], saved: dict[str, CustomerState],
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


def count_outcomes(metrics: Metrics, result: BatchResult) -> None:
    metrics.orders.inc(result.outcome.orders)
    metrics.revenue.inc(result.outcome.revenue_cents / 100)
    metrics.refunds.inc(result.outcome.refund_cents / 100)
    for letter in result.dead_letters:
        metrics.dlq_records.labels(letter.reason).inc()
    for (kind, outcome), n in result.outcome.counts.items():
        metrics.events_processed.labels(kind, outcome).inc(n)


def count_off_partition(metrics: Metrics, partitions: int | None,
                        by_customer: dict[str, list[tuple[RawRecord, Positioned]]]) -> None:
    """Count events whose key Kafka's default partitioner sends elsewhere than where they came from (a producer
    with another partitioner): their customer is stored under the partition they came on, where a lookup by id
    (``pipeline.lookup.locate``) does not look. One key per customer and batch is checked."""
    if not partitions:
        return
    for items in by_customer.values():
        rec = items[0][0]
        if rec.key is not None and home_partition(rec.key.decode(errors="replace"), partitions) != rec.partition:
            metrics.events_off_partition.inc(len(items))
