"""BG/NBD as a churn baseline: the fit recovers the parameters of its own generative process, the churn probability
is calibrated on held-out history, and the served score is the candidate that ranks one moment's customers best."""

from __future__ import annotations

import random

import pytest

from streamproc.domain.btyd import BgNbd, fit
from streamproc.domain.churn_scorers import ChurnScorers, exact_roc_auc
from streamproc.domain.model_config import ModelConfig
from streamproc.domain.models import ModelBundle
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


def _labelled(instants: int, per_instant: int, seed: int) -> list[tuple[str, int, int, dict[str, float]]]:
    """(customer, instant, label, scores as of the instant): bgnbd ranks perfectly, recency half right, the model
    at random."""
    rnd = random.Random(seed)
    out = []
    for instant in range(instants):
        for c in range(per_instant):
            label = int(rnd.random() < 0.5)
            out.append((f"c{c}", instant * 7 * DAY, label,
                        {"model": rnd.random(), "bgnbd": 0.2 + 0.6 * label,
                         "recency": 0.2 + 0.6 * label if rnd.random() < 0.5 else rnd.random()}))
    return out


X = {"log_recency_days": 1.0, "btyd_x": 1.0, "btyd_t_x": 5.0, "btyd_T": 20.0}


def test_the_served_score_is_the_one_that_ranks_a_moment_s_customers_best():
    scorers = ChurnScorers(horizon_days=60, window=500, min_labels=100)
    labelled = _labelled(16, 100, seed=1)
    for customer, instant, label, judged in labelled:
        scorers.learn(customer, X, label, 0.5, instant, judged)
    # complete: a label of a snapshot more than the 60-day horizon later came (instants 0..6 of 0..15, weekly); the
    # choice is on the latest five of them, within each
    assert scorers.chosen_on == [t * 7 * DAY for t in (6, 5, 4, 3, 2)]
    auc = scorers.chosen_auc
    assert auc["bgnbd"] == pytest.approx(1.0) and auc["model"] < 0.65 < auc["recency"] < 0.95
    assert scorers.served_by == "bgnbd"
    assert scorers.bgnbd_fits >= 1  # the early fits came after min_labels, then twice as many
    table = scorers.quality["bgnbd"].reliability_table()
    assert {row["bin"] for row in table} == {"0.2-0.3", "0.8-0.9"}
    assert sum(row["n"] for row in table) == len(labelled)
    # only the instants a choice can still need are sampled
    assert min(scorers.samples) == 2 * 7 * DAY


def test_the_choice_is_the_same_whatever_order_an_instant_s_labels_come_in():
    """A backlog's labels come in another order than a live stream's (a lagging sweep sends the 1s of silent
    customers late): the sampled customers, their AUCs and the choice are the same."""
    labelled = _labelled(12, 1500, seed=2)  # more customers per instant than the sample keeps
    in_order = ChurnScorers(horizon_days=60, window=500)
    shuffled_within = ChurnScorers(horizon_days=60, window=500)
    for customer, instant, label, judged in labelled:
        in_order.learn(customer, X, label, 0.5, instant, judged)
    rnd = random.Random(3)
    by_instant: dict[int, list[tuple[str, int, int, dict[str, float]]]] = {}
    for row in labelled:
        by_instant.setdefault(row[1], []).append(row)
    for instant in sorted(by_instant):
        rows = by_instant[instant]
        rnd.shuffle(rows)
        rows.sort(key=lambda r: r[2])  # every 0 before every 1, as they mature
        for customer, _, label, judged in rows:
            shuffled_within.learn(customer, X, label, 0.5, instant, judged)
    for a, b in ((in_order, shuffled_within),):
        assert a.chosen_on == b.chosen_on and a.chosen_on
        assert {t: sorted(s.rows) for t, s in a.samples.items()} == {t: sorted(s.rows) for t, s in b.samples.items()}
        assert a.chosen_auc == pytest.approx(b.chosen_auc)
        assert a.served_by == b.served_by == "bgnbd"
    assert all(len(s.rows) == 1000 for s in in_order.samples.values())


def test_the_exact_roc_auc_counts_ties_half():
    assert exact_roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert exact_roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert exact_roc_auc([1, 1], [0.2, 0.3]) != exact_roc_auc([1, 1], [0.2, 0.3])  # NaN: one class


def test_an_instant_s_labels_are_judged_by_the_candidates_as_of_the_instant():
    """The judge of an instant is frozen at its first label: labels learnt after it (here, all 1s at a high
    recency) move the live recency calibration, not the judge's."""
    bundle = ModelBundle(ModelConfig())
    young = {**X, "log_recency_days": 0.5}
    old = {**X, "log_recency_days": 4.0}
    for i in range(300):
        bundle.learn_churn(old if i % 2 else young, i % 2, None, customer=f"w{i}", instant=0)
    judge = bundle.judge_for(7 * DAY)
    before = judge.candidate_scores(old)["recency"]
    for i in range(300):
        bundle.learn_churn(young, 1, None, customer=f"z{i}", instant=7 * DAY)
    assert bundle.judge_for(7 * DAY) is judge
    assert judge.candidate_scores(old)["recency"] == before
    assert bundle.candidate_scores(young)["recency"] > judge.candidate_scores(young)["recency"] + 0.05
