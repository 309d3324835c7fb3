"""Churn quality against a known optimum, through the real pipeline: a BG/NBD history
(``streamproc.tools.btyd_sim``), where BG/NBD with the true parameters is the best achievable score.

The history is written as a CSV and run through ``streamproc backtest`` (``streamproc.tools.backtest``): its
calibration period (everything before ``--calibration-days``) replayed to the local broker, a worker with its
trainer folding it into Redis and learning the models, then every customer who bought before the calibration end
scored as of that instant with the final checkpoint, and judged on the next churn horizon of the held-out history.

Reported (ROC AUC, log loss, Brier): the served score; each candidate (the calibrated model, the fitted BG/NBD,
recency); BG/NBD with the true parameters (the optimum); and which candidate is served. Not a test: a benchmark.

Usage: python bench/churn_quality.py [--customers 5000] [--days 400] [--calibration-days 330] [--seed 11]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine  # noqa: E402

from streamproc.settings import Settings  # noqa: E402
from streamproc.tools.backtest import Columns, ScoredCustomer, print_report, run_backtest  # noqa: E402
from streamproc.tools.btyd_sim import BtydSimulation, write_csv  # noqa: E402
from streamproc.tools.infra import Infra  # noqa: E402


def run(cfg: BtydSimulation, calibration_days: int, redis_db: int) -> dict[str, object]:
    settings = Settings()
    Infra(settings).up()
    horizon = settings.churn_horizon_days
    assert calibration_days + horizon <= cfg.days, "the holdout needs a whole horizon after the calibration end"
    start = datetime.fromisoformat(cfg.start)
    cal_end = (start + timedelta(days=calibration_days)).isoformat()
    hold_end = (start + timedelta(days=calibration_days + horizon)).isoformat()

    def optimum(s: ScoredCustomer) -> float:
        return cfg.truth.p_no_purchase(s.inputs["btyd_x"], s.inputs["btyd_t_x"], s.inputs["btyd_T"], horizon)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "btyd.csv"
        rows = write_csv(cfg, path)
        report = run_backtest(settings, path, Columns("customer_id", "ts", "amount", order="order_id"), cal_end,
                              hold_end, redis_db=redis_db, flush=True, extra={"optimum": optimum})
    print_report(report)
    return {
        "what": "bench/churn_quality.py: a BG/NBD history through streamproc backtest (broker, worker, trainer, "
                "Redis), holdout scores at the calibration end",
        "date": datetime.now(UTC).date().isoformat(), "machine": machine(),
        "simulation": {"customers": cfg.customers, "days": cfg.days, "acquisition_days": cfg.acquisition_days,
                       "seed": cfg.seed, "truth": {"r": cfg.truth.r, "alpha": cfg.truth.alpha, "a": cfg.truth.a,
                                                   "b": cfg.truth.b}},
        "transactions": rows, "calibration_days": calibration_days, "horizon_days": horizon,
        **{k: report[k] for k in ("customers_scored", "holdout_churn_rate", "calibration_transactions", "seconds",
                                  "scores", "served_by", "fitted_bgnbd", "churn_labels", "model_version",
                                  "rfm_totals")},
        "prequential": report["prequential"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--days", type=int, default=400)
    parser.add_argument("--calibration-days", type=int, default=330)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--redis-db", type=int, default=15)
    args = parser.parse_args()
    cfg = BtydSimulation(customers=args.customers, days=args.days, seed=args.seed)
    result = run(cfg, args.calibration_days, args.redis_db)
    out = ROOT / "bench" / "results" / f"churn-quality-btyd-pipeline-{result['date']}-seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
