"""BG/NBD as a churn baseline: the fit recovers the parameters of its own generative process, the churn probability
is calibrated on held-out history, and the served score is the candidate that ranks one moment's customers best."""

from __future__ import annotations

import random

import pytest

from streamproc.domain.btyd import BgNbd, fit
from streamproc.domain.churn_scorers import SCORERS, ChurnScorers
from streamproc.tools.btyd_sim import BtydSimulation, draw_customers

DAY = 86_400_000


def statistics(cfg: BtydSimulation, at_day: float) -> tuple[list[tuple[float, float, float]], list[int]]:
    """(x, t_x, T) of every customer who bought before ``at_day``, and whether they bought nothing in the 60 days
    after it."""
    stats, quiet = [], []
    end = cfg.start_ms + at_day * DAY
    for customer in draw_customers(cfg):
        before = [ts for ts in customer.purchases if ts < end]
        if not before:
            continue
        first, last = before[0], before[-1]
        stats.append((float(len(before) - 1), (last - first) / DAY, (end - first) / DAY))
        quiet.append(int(not any(end <= ts < end + 60 * DAY for ts in customer.purchases)))
    return stats, quiet


def test_the_fit_recovers_the_parameters_that_generated_the_history():
    cfg = BtydSimulation(customers=4000, days=400, seed=5)
    stats, _ = statistics(cfg, 300)
    fitted = fit([s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats])
    truth = cfg.truth
    assert fitted.r == pytest.approx(truth.r, rel=0.2)
    assert fitted.alpha == pytest.approx(truth.alpha, rel=0.25)
    assert fitted.a == pytest.approx(truth.a, rel=0.35)
    assert fitted.b == pytest.approx(truth.b, rel=0.35)
    with pytest.raises(ValueError):
        fit([], [], [])


def test_the_no_purchase_probability_is_calibrated_on_held_out_history():
    cfg = BtydSimulation(customers=4000, days=400, seed=6)
    stats, quiet = statistics(cfg, 300)
    predicted = [cfg.truth.p_no_purchase(x, t_x, big_t, 60) for x, t_x, big_t in stats]
    # the whole population, and its riskiest and safest halves: the predicted share matches the observed one
    assert sum(predicted) / len(predicted) == pytest.approx(sum(quiet) / len(quiet), abs=0.02)
    ranked = sorted(zip(predicted, quiet, strict=True))
    for half in (ranked[: len(ranked) // 2], ranked[len(ranked) // 2 :]):
        assert sum(p for p, _ in half) / len(half) == pytest.approx(sum(q for _, q in half) / len(half), abs=0.03)
    # a customer who bought often and just now is far less likely to stay quiet than one silent for months
    model = BgNbd(0.6, 25.0, 0.8, 3.0)
    assert model.p_no_purchase(10, 99, 100, 60) < 0.2 < 0.8 < model.p_no_purchase(10, 20, 200, 60)
    assert model.p_alive(0, 0, 50) == 1.0  # BG/NBD: no repeat purchase, no chance to have left


def test_the_served_score_is_the_one_that_ranks_a_moment_s_customers_best():
    scorers = ChurnScorers(horizon_days=60, window=500, min_labels=100)
    rnd = random.Random(1)
    x = {"log_recency_days": 1.0, "btyd_x": 1.0, "btyd_t_x": 5.0, "btyd_T": 20.0}
    for instant in range(5):
        for _ in range(100):
            label = int(rnd.random() < 0.5)
            # at snapshot time: bgnbd ranked perfectly, recency half right, the model at random
            at_snapshot = {"model": rnd.random(), "bgnbd": 0.2 + 0.6 * label,
                           "recency": 0.2 + 0.6 * label if rnd.random() < 0.5 else rnd.random()}
            scorers.learn(f"c{rnd.randrange(10**6)}", x, label, 0.5, instant * 7 * DAY, at_snapshot)
    quality = {name: scorers.quality[name].instant_auc() for name in SCORERS}
    assert quality["bgnbd"] == pytest.approx(1.0) and quality["model"] < 0.65 < quality["recency"] < 0.95
    assert scorers.served_by == "bgnbd"
    assert scorers.bgnbd_fits >= 1  # the early fits came after min_labels, then twice as many
    table = scorers.quality["bgnbd"].reliability_table()
    assert {row["bin"] for row in table} == {"0.2-0.3", "0.8-0.9"}
    assert sum(row["n"] for row in table) == 500
