"""evaluate's scores on hand-made cases, computed by hand."""

import math

import pytest

from streamproc.tools.evaluate import adjusted_rand, precision_recall, roc_auc, score_run


def test_roc_auc_by_hand():
    # positives 0.8, 0.4; negatives 0.6, 0.2: pairs (0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2) → 3/4
    assert roc_auc([1, 0, 1, 0], [0.8, 0.6, 0.4, 0.2]) == 0.75
    assert roc_auc([1, 0], [0.5, 0.5]) == 0.5  # ties count half
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2]))


def test_adjusted_rand_by_hand():
    assert adjusted_rand([0, 0, 1, 1], ["a", "a", "b", "b"]) == 1.0  # same partition, other names
    # [0,0,1,1] vs [a,b,a,b]: index 0, expected (2*2)/6 = 2/3, max 2 → (0 - 2/3) / (2 - 2/3) = -0.5
    assert adjusted_rand([0, 0, 1, 1], ["a", "b", "a", "b"]) == pytest.approx(-0.5)


def test_precision_recall_by_hand():
    assert precision_recall({"a", "b", "c"}, {"b", "c", "d", "e"}) == (2 / 3, 2 / 4)


def test_score_run_on_a_tiny_ground_truth():
    truth = [
        {"customer_id": "a", "persona": "loyal", "churn_ts": None, "return_ts": None},
        {"customer_id": "b", "persona": "loyal", "churn_ts": 5, "return_ts": 9},  # came back: not churned
        {"customer_id": "c", "persona": "browser", "churn_ts": 5, "return_ts": None},
        {"customer_id": "d", "persona": "browser", "churn_ts": 7, "return_ts": None},
    ]
    scores = score_run(truth, churn_p={"a": 0.1, "b": 0.7, "c": 0.9, "d": 0.3},
                       segments={"a": 0, "b": 0, "c": 1, "d": 1}, alerted={"b", "c"},
                       segment_moves=2, events_applied=40)
    # churned: c, d. positives 0.9, 0.3 vs negatives 0.1, 0.7 → (1 + 1 + 1 + 0) / 4
    assert scores["churn_roc_auc"] == 0.75
    assert scores["alert_precision"] == 0.5 and scores["alert_recall"] == 0.5
    assert scores["segment_adjusted_rand"] == 1.0
    assert scores["segment_move_rate_per_event"] == 0.05
    assert scores["churned_in_truth"] == 2
