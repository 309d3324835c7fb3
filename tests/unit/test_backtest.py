"""``streamproc backtest``'s pure parts: reading a shop's CSV into transactions (bad rows counted by reason, order lines
grouped, refunds), the calibration/holdout split, and the holdout scores."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from streamproc.tools.backtest import Columns, History, holdout_scores, read_history, split_history
from streamproc.tools.instants import parse_instant

DAY = 86_400_000
JAN_1 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def test_instants_from_the_date_forms_shops_export():
    assert parse_instant("2026-01-01") == JAN_1
    assert parse_instant("20260101") == JAN_1  # the CDNOW log's form
    assert parse_instant("2026-01-01T02:00:00+02:00") == JAN_1
    assert parse_instant("2026-01-01 10:30:00") == JAN_1 + 10.5 * 3600 * 1000  # no offset: UTC
    assert parse_instant(str(JAN_1)) == JAN_1
    assert parse_instant("01/02/2026", "%d/%m/%Y") == JAN_1 + 31 * DAY
    for bad in ("", "yesterday", "2026-13-01"):
        with pytest.raises(ValueError):
            parse_instant(bad)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "history.csv"
    path.write_text(text)
    return path


def test_rows_become_transactions_and_bad_rows_are_counted_by_reason(tmp_path):
    path = write(tmp_path, "cust,day,total,invoice\n"
                           "a,2026-01-02,10.5,i1\n"
                           "a,2026-01-02,4.5,i1\n"  # a second line of order i1
                           "b,2026-01-03,-3,i2\n"  # a refund
                           "b,2026-01-01,20,i3\n"
                           ",2026-01-01,20,i4\n"
                           "c,someday,20,i5\n"
                           "c,2026-01-05,n/a,i6\n"
                           "c,2026-01-05,inf,i7\n")
    history = read_history(path, Columns("cust", "day", "total", order="invoice"))
    assert history.rows == 8
    assert history.skipped == {"no_customer": 1, "bad_date": 1, "bad_amount": 2}
    got = [(t["customer_id"], t["order_id"], t["type"], t["amount"], t["ts"]) for t in history.transactions]
    assert got == [("b", "i3", "purchase", 20.0, JAN_1), ("a", "i1", "purchase", 15.0, JAN_1 + DAY),
                   ("b", "i2", "refund", 3.0, JAN_1 + 2 * DAY)]
    assert len({t["event_id"] for t in history.transactions}) == 3
    # without an order column every row is a transaction of its own
    assert len(read_history(path, Columns("cust", "day", "total")).transactions) == 4


def test_a_missing_column_is_named(tmp_path):
    path = write(tmp_path, "cust,day,total\na,2026-01-02,1\n")
    with pytest.raises(ValueError, match="'amount'"):
        read_history(path, Columns("cust", "day", "amount"))


def test_the_split_replays_what_came_before_the_calibration_end_and_labels_from_the_holdout():
    def tx(cid: str, day: float, kind: str = "purchase") -> dict[str, object]:
        return {"customer_id": cid, "ts": int(JAN_1 + day * DAY), "type": kind, "amount": 1.0}

    history = History([tx("a", 1), tx("b", 2), tx("c", 3, "refund"), tx("a", 10), tx("b", 11, "refund"),
                       tx("d", 12), tx("b", 20)])
    split = split_history(history, JAN_1 + 10 * DAY, JAN_1 + 20 * DAY)
    assert [t["customer_id"] for t in split.calibration] == ["a", "b", "c"]
    assert split.calibration_buyers == {"a", "b"}  # c only had a refund
    assert split.holdout_buyers == {"a", "d"}  # b's refund is no purchase; day 20 is after the holdout
    assert split.holdout_purchases == 2
    with pytest.raises(ValueError):
        split_history(history, JAN_1 + 10 * DAY, JAN_1 + 10 * DAY)


def test_holdout_scores():
    labels = [1, 1, 0, 0]
    perfect = holdout_scores(labels, [0.9, 0.8, 0.2, 0.1])
    assert perfect["roc_auc"] == 1.0
    assert perfect["brier"] == pytest.approx((0.01 + 0.04 + 0.04 + 0.01) / 4, abs=1e-4)
    assert perfect["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.8) + math.log(0.9)) / 4,
                                                abs=1e-4)
    backwards = holdout_scores(labels, [0.1, 0.2, 0.8, 0.9])
    assert backwards["roc_auc"] == 0.0 and backwards["log_loss"] > perfect["log_loss"]
    certain_and_wrong = holdout_scores([1], [0.0])
    assert math.isfinite(certain_and_wrong["log_loss"])  # clipped, not infinite
