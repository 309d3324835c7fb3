"""Churn quality against a known optimum: a BG/NBD history (``streamproc.tools.btyd_sim``), where BG/NBD with the
true parameters is the best achievable score.

The calibration period (everything before ``--calibration-days``) runs through the batch step and the trainer
in-process (``run_offline``: the worker's step and the trainer's learning, an in-memory store). Then every customer
who bought before the calibration end is scored as of that instant, as a worker serves it, and each score is
judged on what the held-out history says: no purchase within the churn horizon after the calibration end.

Reported (ROC AUC, log loss, Brier): the served score; each candidate (the calibrated model, the fitted BG/NBD,
recency); BG/NBD with the true parameters (the optimum); and which candidate is served. Not a test: a benchmark.

Usage: python bench/churn_quality.py [--customers 5000] [--days 400] [--calibration-days 330] [--seed 11]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine  # noqa: E402

from streamproc.domain.churn import churn_inputs, inputs_at  # noqa: E402
from streamproc.domain.customer import DAY_MS, CustomerState  # noqa: E402
from streamproc.settings import Settings  # noqa: E402
from streamproc.tools.btyd_sim import BtydSimulation, draw_customers, payloads  # noqa: E402
from streamproc.training.offline import run_offline  # noqa: E402


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The Mann-Whitney form, ties counted half."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    positives = labels.sum()
    negatives = len(labels) - positives
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def scores_of(labels: np.ndarray, p: np.ndarray) -> dict[str, float]:
    q = np.clip(p, 1e-6, 1 - 1e-6)
    return {"roc_auc": round(roc_auc(labels, p), 4),
            "log_loss": round(float(-(labels * np.log(q) + (1 - labels) * np.log(1 - q)).mean()), 4),
            "brier": round(float(((p - labels) ** 2).mean()), 4)}


async def run(cfg: BtydSimulation, calibration_days: int) -> dict[str, object]:
    settings = Settings()
    horizon = settings.churn_horizon_days
    cal_end = cfg.start_ms + calibration_days * DAY_MS
    assert calibration_days + horizon <= cfg.days, "the holdout needs a whole horizon after the calibration end"
    customers = draw_customers(cfg)
    records = list(payloads(cfg, customers, until_ms=cal_end))
    started = time.perf_counter()
    bundle, _, store = await run_offline(records, settings)
    elapsed = time.perf_counter() - started
    assert bundle.scorers is not None
    bought = {c.customer_id: c.purchases for c in customers}
    rows: dict[str, list[float]] = {name: [] for name in ("served", "model", "bgnbd", "recency", "optimum")}
    labels = []
    for cid, (_, blob, _) in sorted(store.rows.items()):
        state = CustomerState.from_dict(orjson.loads(blob))
        values = inputs_at(state, cal_end, exact=True)
        if values is None or state.first_purchase_ts is None:
            continue
        x = churn_inputs(values)
        stacked = bundle.scorers.stacked(x)
        raw = float(bundle.classifier.predict_proba_one(stacked).get(True, 0.0))
        for name, p in bundle.scorers.candidates(x, raw).items():
            rows[name].append(p)
        rows["served"].append(bundle.churn_probability(x))
        rows["optimum"].append(cfg.truth.p_no_purchase(x["btyd_x"], x["btyd_t_x"], x["btyd_T"], horizon))
        labels.append(int(not any(cal_end <= ts < cal_end + horizon * DAY_MS for ts in bought[cid])))
    y = np.asarray(labels)
    summary = bundle.summary()
    return {
        "what": "bench/churn_quality.py: a BG/NBD history, calibration period through run_offline, holdout scores",
        "date": datetime.now(UTC).date().isoformat(), "machine": machine(),
        "simulation": {"customers": cfg.customers, "days": cfg.days, "acquisition_days": cfg.acquisition_days,
                       "seed": cfg.seed, "truth": {"r": cfg.truth.r, "alpha": cfg.truth.alpha, "a": cfg.truth.a,
                                                   "b": cfg.truth.b}},
        "calibration_days": calibration_days, "horizon_days": horizon, "scored_customers": len(y),
        "holdout_churn_rate": round(float(y.mean()), 4), "events": len(records),
        "seconds_in_process": round(elapsed, 1),
        "holdout": {name: scores_of(y, np.asarray(p)) for name, p in rows.items()},
        "served_by": summary["served_by"], "fitted_bgnbd": summary["bgnbd"],
        "prequential": summary["scorers"], "churn_labels": summary["labels"],
        "reliability_served": summary["reliability"][summary["served_by"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--days", type=int, default=400)
    parser.add_argument("--calibration-days", type=int, default=330)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    cfg = BtydSimulation(customers=args.customers, days=args.days, seed=args.seed)
    result = asyncio.run(run(cfg, args.calibration_days))
    out = ROOT / "bench" / "results" / f"churn-quality-btyd-{result['date']}-seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("holdout", "served_by", "fitted_bgnbd", "scored_customers",
                                                 "holdout_churn_rate", "seconds_in_process")}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
