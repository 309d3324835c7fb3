"""``streamproc backtest`` as a user runs it, on the real broker and Redis: a shop's CSV (a BG/NBD history, with a
few broken rows), its calibration period replayed through a worker and its trainer, every customer scored at the
calibration end and judged on the holdout."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from streamproc.tools.btyd_sim import BtydSimulation, draw_customers, write_csv
from streamproc.topics import admin_client
from tests.conftest import ROOT, worker_env


def test_backtest_replays_the_calibration_through_the_pipeline_and_judges_every_score_on_the_holdout(settings,
                                                                                                     tmp_path):
    cfg = BtydSimulation(customers=1000, days=330, seed=5)
    path = tmp_path / "shop.csv"
    write_csv(cfg, path)
    with path.open("a") as fh:  # what real exports hold too
        fh.write("b0000001,last tuesday,b0000001-x1,10.0\nb0000002,2026-03-01T00:00:00+00:00,b0000002-x2,ten\n")
    start = datetime.fromisoformat(cfg.start)
    calibration_end = (start + timedelta(days=270)).date().isoformat()
    holdout_end = (start + timedelta(days=330)).date().isoformat()
    db = int(settings.redis_url.rsplit("/", 1)[1])
    proc = subprocess.run(
        [sys.executable, "-m", "streamproc.cli", "backtest", str(path), "--customer", "customer_id", "--date", "ts",
         "--amount", "amount", "--order", "order_id", "--calibration-end", calibration_end,
         "--holdout-end", holdout_end, "--redis-db", str(db), "--flush", "--json", "--timeout", "300"],
        env=worker_env(settings), cwd=ROOT, capture_output=True, timeout=400)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    report = json.loads(proc.stdout)

    cut = int(datetime.fromisoformat(calibration_end).replace(tzinfo=UTC).timestamp() * 1000)
    bought = {c.customer_id: c.purchases for c in draw_customers(cfg)}
    calibration = {cid: [t for t in times if t < cut] for cid, times in bought.items()}
    buyers = {cid for cid, times in calibration.items() if times}
    assert report["skipped_rows"] == {"bad_date": 1, "bad_amount": 1}
    assert report["calibration_transactions"] == sum(len(t) for t in calibration.values())
    # RFM through the pipeline: the same customers, purchases and spend as the file, customer by customer
    totals = report["rfm_totals"]
    assert totals["file"] == totals["streamproc"] and totals["customers_differing"] == 0
    assert totals["file"]["customers"] == len(buyers)
    assert report["customers_scored"] == len(buyers)
    quiet = {cid for cid in buyers if not any(cut <= t < cut + 60 * 86_400_000 for t in bought[cid])}
    assert report["holdout_churn_rate"] == round(len(quiet) / len(buyers), 4)

    scores = report["scores"]
    assert set(scores) == {"served", "model", "bgnbd", "recency"}
    assert report["served_by"] in {"model", "bgnbd", "recency"}
    assert scores["served"] == scores[report["served_by"]]
    for name, q in scores.items():  # every candidate scored; the online classifier alone may rank poorly (it is
        # then not served: bench/README, "Churn against a known optimum")
        assert 0 < q["roc_auc"] < 1.0 and 0 < q["brier"] < 0.3 and q["log_loss"] > 0, (name, q)
    for name in ("served", "bgnbd", "recency"):
        assert scores[name]["roc_auc"] > 0.7, (name, scores[name])
    # never worse than its baselines by more than the noise of 1,000 customers
    assert scores["served"]["roc_auc"] >= max(scores["bgnbd"]["roc_auc"], scores["recency"]["roc_auc"]) - 0.02
    assert report["churn_labels"] > 1000 and report["fitted_bgnbd"]["fits"] >= 1
    assert sum(report["rfm_segments"].values()) == len(buyers)

    # the backtest's topics are gone
    admin = admin_client(settings)
    try:
        left = [t for t in admin.list_topics() if t.startswith(report["topic_prefix"])]
    finally:
        admin.close()
    assert not left, left
