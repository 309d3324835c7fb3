"""The inactivity sweep: as the watermark passes silence boundaries and snapshot instants, silent customers'
stored features, snapshots and labels are brought up to date as of those instants (never the wall clock)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from streamproc.domain.alerts import alert_instants
from streamproc.domain.churn import ChurnConfig, maturity_span
from streamproc.domain.customer import DAY_MS
from streamproc.errors import TransientError
from streamproc.metrics import Metrics
from streamproc.pipeline.alert_queue import close_alert_days
from streamproc.pipeline.derive import Derivation
from streamproc.pipeline.records import BatchResult, Watermarks
from streamproc.pipeline.store_calls import StoreCalls
from streamproc.ports import FeatureStore, Loaded, Update

MAX_SAVE_ATTEMPTS = 5  # a customer's save that keeps losing the version race: a transient error after these
SWEEP_CHUNK = 500  # customers refreshed per sweep step (bounds the sweep's working set)


@dataclass
class SweepPass:
    """One partition's sweep from its mark to ``target``: who is due, and how far the refresh got."""

    target: int
    due: list[str]
    done: int = 0
    # last-seen times whose customers are dropped when the pass ends (silent ``expire_after_days``)
    expire_range: tuple[int, int] | None = None


class Sweeper:
    """Sweep passes per partition, spread over calls of at most ``sweep_budget`` customers (None: every due one).
    ``watermarks`` gives the step's current watermarks; ``before_pass`` applies a pending ownership change."""

    def __init__(self, store: FeatureStore, calls: StoreCalls, derivation: Derivation, metrics: Metrics,
                 churn: ChurnConfig, models_enabled: bool, expire_after_days: int, sweep_interval_ms: int,
                 sweep_budget: int | None, watermarks: Callable[[], Watermarks],
                 before_pass: Callable[[], None], alert_budgets: dict[str, int] | None = None) -> None:
        self.store = store
        self.calls = calls
        self.derivation = derivation
        self.metrics = metrics
        self.churn = churn
        self.models_enabled = models_enabled
        self.expire_after_days = expire_after_days
        self.sweep_interval_ms = sweep_interval_ms
        self.sweep_budget = sweep_budget
        self.watermarks = watermarks
        self.before_pass = before_pass
        self.alert_budgets = alert_budgets  # per partition and day, per value tier (None: unlimited)
        self.boundaries = derivation.boundaries
        self.passes: dict[int, SweepPass] = {}  # partition -> the sweep pass in progress
        self.swept: dict[int, int] = {}  # partition -> watermark the inactivity sweep has reached
        self.sweep_outputs = BatchResult()

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
                   for p, wm in self.watermarks().by_partition().items())

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
        self.before_pass()
        marks = await self.store.sweep_marks()
        touched = 0
        for partition, exact_wm in sorted(self.watermarks().by_partition().items()):
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
            if self.models_enabled:
                # every customer live at the pass's alert instants was visited: their days close with the mark
                closed = await close_alert_days(self.store, partition, running.target, self.alert_budgets,
                                                self.metrics)
                if emit is not None:
                    await emit(closed)
                else:
                    outputs.absorb(closed)
            else:
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
        points = alert_instants(low, wm, self.churn) if self.models_enabled else []  # (snapshot instants among them)
        if points:
            # every customer live at an alert instant of the pass, and every one with a snapshot whose label matures at
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
            refreshed = functools.partial(self._refreshed, wm, partition, partials)
            updates, failed = await self.calls.load_step_save(dict.fromkeys(customer_ids, partition), refreshed,
                                                              with_features=True)
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
        as_of = self.derivation.as_of(state, wm)  # the silence boundary passed, as a batch would store it
        partial = partials[cid] = BatchResult()
        feats, model, unchanged = self.derivation.derive(cid, state, row.model, as_of, wm, partial, stored=row.features)
        return Update(cid, row.version, state, feats, model, partition, partial.outputs_blob(),
                      features_unchanged=unchanged, label_due=self.derivation.label_due(state),
                      queued=partial.queued or None)
