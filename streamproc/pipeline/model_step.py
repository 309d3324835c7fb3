"""The model side of a customer's step: churn snapshots and labels as training examples, scores with the current
checkpoint, alerts with their next best action, recommendations for the triggers, the segment."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from streamproc.contracts.outputs import (
    AlertCleared,
    BasketExample,
    ChurnAlert,
    ChurnExample,
    ClearedBy,
    Reason,
    Recommendation,
    RecommendationTrigger,
    RecommendedItem,
    RfmScores,
    RiskLevel,
    SegmentExample,
    SegmentMove,
    ValueTier,
)
from streamproc.domain.alerts import (
    NO_CONTROL_GROUP,
    ControlGroup,
    alert_instants,
    clearing,
    explain,
    profile_at,
    retention_action,
    risk_level,
    should_alert,
)
from streamproc.domain.churn import (
    ChurnConfig,
    ModelState,
    churn_inputs,
    inputs_at,
    last_days_before,
    mature_labels,
    segment_inputs,
    take_snapshots,
)
from streamproc.domain.churn_scorers import SCORERS
from streamproc.domain.customer import DAY_MS, CustomerState, FoldConfig, Trigger
from streamproc.domain.models import ModelBundle
from streamproc.domain.recommend import CustomerView, recommend
from streamproc.domain.rfm import rfm_scores
from streamproc.metrics import Metrics
from streamproc.pipeline.alert_queue import queued_alert, queued_cleared
from streamproc.pipeline.records import BatchResult


@dataclass(slots=True)
class ChurnStep:
    """What a customer's churn bookkeeping decided in one step, for scoring once the features are computed."""

    mstate: ModelState
    digest: str  # the customer's pseudonymous id in training examples
    snapshotted: bool = False
    alerts: list[tuple[int, float, dict[str, float]]] = field(default_factory=list)  # (instant, p, inputs)


class ModelStep:
    """Scores with ``bundle``, the checkpoint this worker loaded (None: nothing is scored yet)."""

    def __init__(self, fold: FoldConfig, churn: ChurnConfig, metrics: Metrics,
                 action_table: dict[str, dict[str, str]] | None, excluded_products: frozenset[str],
                 control: ControlGroup = NO_CONTROL_GROUP) -> None:
        self.fold = fold
        self.control = control
        self.churn = churn
        self.metrics = metrics
        self.action_table = action_table
        self.excluded_products = excluded_products
        self.bundle: ModelBundle | None = None

    def churn_step(
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
        if mstate.alert_to is None and state.snapshot_ts:
            mstate.alert_to = state.snapshot_ts  # stored before the daily alert grid: from its last snapshot on
        served: dict[int, tuple[float, dict[str, float]]] = {}  # snapshot instant -> (served p, inputs)
        for point, values in take_snapshots(state, watermark, self.churn):
            step.snapshotted = True
            x = churn_inputs(values)
            # an untrained model says nothing: its 0.0 must not be scored later as a confident answer; every
            # candidate score is kept with the served one, so the trainer judges them all on what they said now
            scores = bundle.candidate_scores(x) if bundle else None
            p = scores[bundle.served_by] if bundle and scores is not None else None  # = churn_probability(x)
            state.pending.append(point)
            mstate.scored_at[str(point)] = [None if p is None else round(p, 4), version,
                                            *([round(scores[k], 4) for k in SCORERS] if scores else [])]
            rfm = ([round(values["recency_days"], 4), values["purchases"], round(values["monetary_total"], 2)]
                   if values["purchases"] >= 1 else None)
            out.examples.append(SegmentExample(id=f"{digest}:{point}", ts=point, x=segment_inputs(values, state),
                                               rfm=rfm))
            if p is not None:
                served[point] = (p, values)
        self._alert_grid(cid, state, step, watermark, served, out)
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
            out.examples.append(ChurnExample(id=f"{digest}:{point}", ts=point, label=label, x=churn_inputs(then),
                                             p=scored[0], v=scored[1],
                                             scores=dict(zip(SCORERS, scored[2:], strict=True)) if len(scored) > 2
                                             else None))
        live = {str(p) for p in state.pending}
        mstate.scored_at = {k: v for k, v in mstate.scored_at.items() if k in live}
        return step

    def _alert_grid(self, cid: str, state: CustomerState, step: ChurnStep, watermark: int,
                    served: dict[int, tuple[float, dict[str, float]]], out: BatchResult) -> None:
        """Alerts and their clearing are decided on the daily alert grid: every live customer is scored at every
        instant from what was known then, so which alerts fire does not depend on batching, crashes or hand-overs
        (which checkpoint scored does). Snapshot instants reuse the snapshot's score."""
        mstate, bundle, cfg = step.mstate, self.bundle, self.churn
        if state.first_event_ts is None:
            return
        start = mstate.alert_to if mstate.alert_to is not None else state.first_event_ts - 1
        silent_days = cfg.silent_horizons * cfg.horizon_days
        for point in alert_instants(start, watermark, cfg):
            if point <= state.first_event_ts:
                continue
            found = served.get(point)  # a snapshot instant: live by the same rule
            # not live (the snapshots' rule): leaves no trace, so alert_to does not depend on how far, or how
            # often, the customer was visited past their silence cut-off
            if found is None and point // DAY_MS - last_days_before(state, point)[1] > silent_days:
                continue
            mstate.alert_to = point
            if found is None:
                if bundle is None or not bundle.churn_examples:
                    continue
                values = inputs_at(state, point)
                if values is None:
                    continue
                found = (bundle.churn_probability(churn_inputs(values)), values)
            p, values = found
            open_id = mstate.open_alert[0] if mstate.open_alert else None
            cleared = clearing(state, mstate, p, point, cfg)
            if cleared is not None and open_id is not None:
                queued_cleared(out.queued, AlertCleared(alert_id=open_id, customer_id=cid, ts=point,
                                                        cleared_by=cast("ClearedBy", cleared[0]), days=cleared[1],
                                                        probability=round(p, 4)))
            if should_alert(mstate, p, point, cfg):
                mstate.open_alert = [f"{cid}:{point}", point]
                step.alerts.append((point, p, values))

    def score(
        self, cid: str, state: CustomerState, churn: ChurnStep, feats: dict[str, Any], as_of: int, out: BatchResult,
        triggers: list[Trigger] | None = None,
    ) -> dict[str, Any]:
        """The alerts the churn step decided, recommendations for the triggers, and the customer's current churn
        probability and segment; returns the model outputs to store (checkpoint-dependent)."""
        mstate, bundle = churn.mstate, self.bundle
        for point, p, values in churn.alerts:
            assert bundle is not None  # an alert needs a score
            self._alert(cid, state, mstate, feats, point, p, values, bundle, out)
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
            out.segment_moves.append(SegmentMove(customer_id=cid, ts=as_of, from_segment=mstate.segment,
                                                 to_segment=segment, to_name=names.get(segment), model_version=version))
        mstate.segment, mstate.churn_p, mstate.model_version = segment, round(p, 4), version
        return mstate.to_dict()

    def _alert(
        self, cid: str, state: CustomerState, mstate: ModelState, feats: dict[str, Any], point: int, p: float,
        values: dict[str, float], bundle: ModelBundle, out: BatchResult,
    ) -> None:
        """A churn alert at grid instant ``point``, with the next best action: the retention action for the
        customer's tier and risk, and the items most likely to bring them back. Queued with its win-back
        recommendation until its day closes (``pipeline.alert_queue``): sent within the day's budget, or counted."""
        level = risk_level(p, self.churn)
        profile = profile_at(values, p, self.fold, self.churn)
        win_back = self._recommendation(cid, state, mstate, feats, point, "churn_alert", f"{point}", (),
                                        shown=False)
        names = self.segment_names
        queued_alert(out.queued, ChurnAlert(
            alert_id=f"{cid}:{point}", customer_id=cid, ts=point, probability=round(p, 4),
            risk_level=cast("RiskLevel", level),
            segment=names.get(mstate.segment) if mstate.segment is not None else None,
            value_tier=cast("ValueTier", profile.value_tier), clv=profile.clv, value_at_risk=profile.value_at_risk,
            lifecycle_stage=profile.lifecycle_stage, rfm=cast("RfmScores | None", rfm_scores(bundle.rfm.edges, values)),
            model_version=bundle.version, scored_by=bundle.served_by,
            reasons=cast("list[Reason]", explain(values)),
            action=retention_action(profile.value_tier, level, self.action_table),
            recommended_items=win_back.items if win_back else [], control=self.control.holds(cid, point),
        ), win_back)

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
                out.examples.append(BasketExample(
                    id=f"{digest}:{trig.event_id}", ts=trig.ts,
                    items=list(zip(trig.items, trig.categories, trig.quantities, strict=True)),
                    segment=mstate.segment, rec=before, amount=trig.amount,
                ))
            rec = self._recommendation(cid, state, mstate, feats, trig.ts, trig.kind, trig.event_id, trig.items)
            if rec is not None:
                out.recommendations.append(rec)

    def _recommendation(
        self, cid: str, state: CustomerState, mstate: ModelState, feats: dict[str, Any], at: int, trigger: str,
        event_id: str, context: tuple[str, ...], shown: bool = True,
    ) -> Recommendation | None:
        """``shown``: the customer sees it when it is made (a win-back recommendation is only seen if its alert is
        sent, so it is not the one a later purchase is judged against)."""
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
        items = cast("list[RecommendedItem]", recommend(index, view, at, list(context), self.excluded_products))
        if not items:
            return None
        rec_id = f"{cid}:{trigger}:{event_id}"
        last = mstate.last_rec
        # the latest in event time (not the last made: the two input topics are read at their own pace)
        if shown and (last is None or (at, rec_id) >= (last["ts"], last["id"])):
            mstate.last_rec = {"id": rec_id, "ts": at, "trigger": trigger, "items": [i["product_id"] for i in items]}
        return Recommendation(
            recommendation_id=rec_id, customer_id=cid, ts=at, trigger=cast("RecommendationTrigger", trigger),
            items=items, strategy_version=index.cfg.version, model_version=bundle.version,
            segment=self.segment_names.get(mstate.segment) if mstate.segment is not None else None)

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
