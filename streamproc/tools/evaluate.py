"""``streamproc evaluate``: score a simulated run's outputs against the simulator's ground truth.

Reads the customers' model outputs from Redis, the churn alerts and segment moves from their topics,
the model summary, and ``ground_truth.jsonl`` from the run folder. The scoring functions are pure and
tested on hand-made cases.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamproc.adapters.feature_rows import (
    customer_key,
    decode_feature_row,
    feature_names_from,
    stored_partitions,
)
from streamproc.adapters.model_store import RedisModelStore
from streamproc.adapters.redis_clients import sync_redis
from streamproc.adapters.redis_store import RedisFeatureStore
from streamproc.domain.customer import DAY_MS
from streamproc.partitioning import customer_partition
from streamproc.tools.backtest import load_states, score_states
from streamproc.tools.tail import read_topic
from streamproc.topics import ALERTS_TOPIC


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half). NaN with a single class."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y]
    neg = [s for y, s in zip(labels, scores, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    ranked = sorted((s, i) for i, s in enumerate(scores))
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ranked[k][1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def adjusted_rand(a: Sequence[object], b: Sequence[object]) -> float:
    """Adjusted Rand index of two labellings of the same items."""
    n = len(a)
    if n < 2:
        return float("nan")
    pairs = Counter(zip(a, b, strict=True))
    comb = lambda k: k * (k - 1) / 2  # noqa: E731
    index = sum(comb(v) for v in pairs.values())
    sum_a = sum(comb(v) for v in Counter(a).values())
    sum_b = sum(comb(v) for v in Counter(b).values())
    expected = sum_a * sum_b / comb(n)
    maximum = (sum_a + sum_b) / 2
    return 1.0 if maximum == expected else (index - expected) / (maximum - expected)


def precision_recall(predicted: set[str], actual: set[str]) -> tuple[float, float]:
    hit = len(predicted & actual)
    precision = hit / len(predicted) if predicted else float("nan")
    recall = hit / len(actual) if actual else float("nan")
    return precision, recall


def score_run(
    truth: list[dict[str, Any]], churn_p: dict[str, float], segments: dict[str, int], alerted: set[str],
    segment_moves: int, events_applied: int,
) -> dict[str, float]:
    """Scores of one run. A customer is *churned* in the ground truth if they left and did not come back."""
    churned = {t["customer_id"] for t in truth if t.get("churn_ts") is not None and t.get("return_ts") is None}
    scored = [t["customer_id"] for t in truth if t["customer_id"] in churn_p]
    auc = roc_auc([int(c in churned) for c in scored], [churn_p[c] for c in scored])
    precision, recall = precision_recall(alerted, churned)
    personas = {t["customer_id"]: t["persona"] for t in truth}
    with_segment = [c for c in segments if c in personas]
    ari = adjusted_rand([segments[c] for c in with_segment], [personas[c] for c in with_segment])
    return {
        "customers": len(truth), "customers_scored": len(scored), "churned_in_truth": len(churned),
        "churn_roc_auc": auc, "alerts": len(alerted), "alert_precision": precision, "alert_recall": recall,
        "segment_adjusted_rand": ari, "customers_with_segment": len(with_segment),
        "segment_moves": segment_moves,
        "segment_move_rate_per_event": segment_moves / events_applied if events_applied else float("nan"),
    }


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def run_evaluate(settings: Any, run_dir: Path, out: Path | None) -> dict[str, Any]:
    import asyncio


    truth = [json.loads(line) for line in (run_dir / "ground_truth.jsonl").read_text().splitlines() if line]
    client = sync_redis(settings.redis_url)
    names_of = feature_names_from(client)
    churn_p: dict[str, float] = {}
    segments: dict[str, int] = {}
    events_applied = 0
    try:
        ids = [t["customer_id"] for t in truth]
        partitions = stored_partitions(client)  # read once: one key per customer below
        for i in range(0, len(ids), 1000):
            pipe = client.pipeline(transaction=False)
            for cid in ids[i : i + 1000]:
                pipe.hmget(customer_key(customer_partition(cid, partitions), cid), "m", "f")
            for cid, (model, feats) in zip(ids[i : i + 1000], pipe.execute(), strict=True):
                if model:
                    m = json.loads(model)
                    if m.get("churn_p") is not None:
                        churn_p[cid] = m["churn_p"]
                    if m.get("segment") is not None:
                        segments[cid] = m["segment"]
                if feats:
                    f = decode_feature_row(feats, names_of)
                    events_applied += f.get("clicks", 0) + f.get("frequency", 0) + f.get("refunds", 0)
    finally:
        client.close()
    alerted = {a["customer_id"] for a in read_topic(settings, ALERTS_TOPIC, 10_000_000, 3.0)
               if a.get("record", "alert") == "alert"}  # not the cleared records
    moves = len(read_topic(settings, "segment-moves", 10_000_000, 3.0))
    scores: dict[str, Any] = score_run(truth, churn_p, segments, alerted, moves, events_applied)

    async def summary() -> dict[str, Any] | None:
        store = RedisFeatureStore.from_url(settings.redis_url)
        try:
            return await RedisModelStore(store.redis).summary()
        finally:
            await store.close()

    model = asyncio.run(summary()) or {}
    for key in ("roc_auc", "log_loss", "precision", "recall", "labels", "positive_rate"):
        if key in model:
            scores[f"prequential_{key}"] = model[key]
    for key in ("rec_purchases", "rec_hit_rate", "rec_precision", "rec_baseline_hit_rate", "rec_baseline_precision"):
        if key in model:
            scores[key] = model[key]
    if model.get("rec_baseline_hit_rate"):
        scores["rec_lift_over_popularity"] = model["rec_hit_rate"] / model["rec_baseline_hit_rate"]
    scores["model_version"] = model.get("version")
    scores.update(candidate_aucs(settings, truth))
    width = max(len(k) for k in scores)
    print(f"{'metric':<{width}}  value")
    for key, value in scores.items():
        print(f"{key:<{width}}  {_fmt(value)}")
    if out:
        out.write_text(json.dumps(scores, indent=2, default=str))
    return scores


def candidate_aucs(settings: Any, truth: list[dict[str, Any]]) -> dict[str, float]:
    """The served churn score next to each candidate (``recency``, ``bgnbd``, the stacked ``model``), every customer
    who bought scored from their Redis state with the final checkpoint as of the UTC midnight after the last event,
    each judged against the ground truth (churned and not back)."""
    states, bundle, _ = load_states(settings)
    if bundle is None or bundle.churn_examples == 0 or not states:
        return {}
    last = max(s.last_event_ts or 0 for s in states.values())
    at = (last // DAY_MS + 1) * DAY_MS
    scored = score_states(states, bundle, at)
    churned = {t["customer_id"] for t in truth if t.get("churn_ts") is not None and t.get("return_ts") is None}
    labels = [int(s.customer_id in churned) for s in scored]
    out: dict[str, float] = {"candidates_scored": float(len(scored))}
    for name in scored[0].scores if scored else ():
        out[f"churn_roc_auc_{name}"] = roc_auc(labels, [s.scores[name] for s in scored])
    return out
