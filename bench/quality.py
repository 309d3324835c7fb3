"""Model quality on the simulator, in-process: churn ROC AUC and alert precision/recall against the ground
truth, segments against the personas (adjusted Rand index) and how often they move, and hit-rate@k and
precision@k of the recommendations against the popularity baseline (top-k best sellers at the same
instant) on the same purchases.

The real batch step (BatchProcessor, in-memory store) runs over the simulated stream in event-time order;
a trainer learns every example as it is emitted (exactly what the worker's trainer does with the training
topic) and the scoring side picks up a fresh checkpoint every ``--checkpoint-every`` batches, so the
recommendations are made with stale models as in production. The worker end to end (Kafka, Redis, the
outbox) is exercised by the integration tests; this isolates the quality of the strategy.

Usage: python bench/quality.py [--customers 3000] [--days 120]. Not a test: `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine  # noqa: E402

from streamproc.pipeline.records import BatchResult  # noqa: E402
from streamproc.ports import CustomerRef  # noqa: E402
from streamproc.settings import Settings  # noqa: E402
from streamproc.tools.evaluate import score_run  # noqa: E402
from streamproc.tools.simulate import SimulationConfig, Simulator  # noqa: E402
from streamproc.training.offline import run_offline  # noqa: E402


def skewed(payloads: list[tuple[str, bytes, bytes]], hours: float) -> list[tuple[str, bytes, bytes]]:
    """The stream as a worker reads it when the transactions topic trails the clicks topic by ``hours`` of
    event time (negative: runs ahead), as happens when the two topics of a backlog are drained independently."""
    shift = int(hours * 3_600_000)
    keyed = [(orjson.loads(value)["ts"] + (shift if topic == "transactions" else 0), i, (topic, key, value))
             for i, (topic, key, value) in enumerate(payloads)]
    return [record for *_, record in sorted(keyed)]


async def run(customers: int, days: int, seed: int, batch: int, checkpoint_every: int,
              transactions_lag_h: float = 0.0) -> dict[str, object]:
    settings = Settings()
    sim = Simulator(SimulationConfig(customers=customers, days=days, seed=seed))
    payloads = list(sim.payloads())
    if transactions_lag_h:
        payloads = skewed(payloads, transactions_lag_h)
    moves = alerted = 0
    alerted_ids: set[str] = set()

    def count(result: BatchResult) -> None:
        nonlocal moves, alerted
        moves += len(result.segment_moves)
        alerted += len(result.alerts)
        alerted_ids.update(a.customer_id for a in result.alerts)

    started = time.perf_counter()
    trainer, _, store = await run_offline(payloads, settings, batch, checkpoint_every, count)
    summary = trainer.summary()
    hit, base = summary["rec_hit_rate"], summary["rec_baseline_hit_rate"]
    churn_p: dict[str, float] = {}
    segments: dict[str, int] = {}
    applied = 0
    for cid in store.rows:
        m = await store.model_outputs(CustomerRef(0, cid)) or {}  # the in-memory store keys rows by id alone
        if m.get("churn_p") is not None:
            churn_p[cid] = m["churn_p"]
        if m.get("segment") is not None:
            segments[cid] = m["segment"]
        f = await store.features(CustomerRef(0, cid)) or {}
        applied += f.get("clicks", 0) + f.get("frequency", 0) + f.get("refunds", 0)
    truth = [asdict(t) for t in sim.truth()]
    scores = score_run(truth, churn_p, segments, alerted_ids, moves, applied)
    return {
        "customers": customers, "days": days, "events": len(payloads), "transactions_lag_h": transactions_lag_h,
        "churn_roc_auc": round(scores["churn_roc_auc"], 4), "alerts": alerted,
        "alert_precision": round(scores["alert_precision"], 4), "alert_recall": round(scores["alert_recall"], 4),
        "prequential_roc_auc": round(summary["roc_auc"], 4),
        "segment_adjusted_rand": round(scores["segment_adjusted_rand"], 4),
        "segment_moves_per_event": round(scores["segment_move_rate_per_event"], 5),
        "segment_names": sorted(p["name"] for p in trainer.segment_profiles().values()),
        "purchases_scored": summary["rec_purchases"], "k": trainer.cfg.rec.k,
        "hit_rate_at_k": round(hit, 4), "precision_at_k": round(summary["rec_precision"], 4),
        "baseline_hit_rate_at_k": round(base, 4),
        "baseline_precision_at_k": round(summary["rec_baseline_precision"], 4),
        "lift_over_baseline": round(hit / base, 2) if base else None,
        "rec_pairs": summary["rec_pairs"], "rec_items": summary["rec_items"],
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
        "date": datetime.now(UTC).date().isoformat(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=3000)
    ap.add_argument("--days", type=int, default=120)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--checkpoint-every", type=int, default=10, help="batches between checkpoints")
    ap.add_argument("--transactions-lag-h", type=float, default=0.0,
                    help="read transactions this many hours of event time behind clicks (topic skew)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    args = ap.parse_args()
    report = asyncio.run(run(args.customers, args.days, args.seed, args.batch, args.checkpoint_every,
                             args.transactions_lag_h))
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
