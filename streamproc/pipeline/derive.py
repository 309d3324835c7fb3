"""What a customer's state gives at an instant: the churn bookkeeping, then the features, then the model
outputs; and the instants a batch or the sweep computes them as of."""

from __future__ import annotations

from typing import Any

from streamproc.domain.churn import ChurnConfig, maturity_span
from streamproc.domain.customer import DAY_MS, CustomerState, FoldConfig, Trigger, prune_days
from streamproc.domain.features import features
from streamproc.pipeline.model_step import ModelStep
from streamproc.pipeline.records import BatchResult


class Derivation:
    def __init__(self, fold: FoldConfig, churn: ChurnConfig, model: ModelStep, models_enabled: bool,
                 boundaries: list[int]) -> None:
        self.fold = fold
        self.churn = churn
        self.model = model
        self.models_enabled = models_enabled
        self.boundaries = boundaries
        # the names of the features this configuration computes (a stored row with others is recomputed)
        self._feature_names = frozenset(features(CustomerState(""), 0, fold))

    def derive(
        self, cid: str, state: CustomerState, model_blob: bytes | None, as_of: int, watermark: int | None,
        out: BatchResult, triggers: list[Trigger] | None = None, stored: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None, bool]:
        """What a customer's state gives: the churn bookkeeping on the grid up to ``watermark``, then the features
        as of ``as_of`` (``stored`` ones kept when they are as of that instant already), then the model outputs.
        The bookkeeping reads the day buckets before the fold's pruning drops old ones (a snapshot's label and
        inputs must not depend on which later events were applied first). Returns the features, the model outputs
        to store (None with models off) and whether the features are the stored ones."""
        churn = self.model.churn_step(cid, state, model_blob, watermark, out) if self.models_enabled else None
        prune_days(state, self.fold)
        # features are a function of the state and the instant: when neither moved since they were stored (a sweep
        # visit between two silence boundaries, the usual case), keep them
        unchanged = stored is not None and stored.get("as_of_ts") == as_of and stored.keys() == self._feature_names
        feats = stored if unchanged and stored is not None else features(state, as_of, self.fold)
        model = self.model.score(cid, state, churn, feats, as_of, out, triggers) if churn is not None else None
        return feats, model, unchanged

    def as_of(self, state: CustomerState, swept_to: int) -> int:
        """The event time stored features are computed as of: the customer's newest event, or the latest
        silence boundary the sweep has already passed (an event the sweep overtook, e.g. on a topic that
        lags the other one, is stored as the sweep would have stored it). Either way not batching-dependent.
        """
        last = state.last_event_ts or state.max_ts
        crossed = [d for d in self.boundaries if last + d * DAY_MS <= swept_to]
        return max(state.max_ts, last + crossed[-1] * DAY_MS) if crossed else state.max_ts

    def label_due(self, state: CustomerState) -> int | None:
        """The grid instant the oldest pending label matures at (the store's maturity index: a label still pending
        once the sweep mark passed it is overdue, ``streamproc_overdue_labels``)."""
        return min(state.pending) + maturity_span(self.churn) if state.pending else None
