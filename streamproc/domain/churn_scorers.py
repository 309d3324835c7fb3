"""The churn scores a worker can serve, side by side, each scored prequentially on the same matured labels:

* ``recency``: days since the last purchase alone, calibrated (a logistic fit on its log), the simplest baseline a
  retention team would use;
* ``bgnbd``: the BG/NBD probability of no purchase within the horizon (``domain.btyd``), its four population
  parameters refitted by maximum likelihood, every ``refit_every`` labels, from a sample of customers'
  sufficient statistics;
* ``model``: the online classifier, given both baselines' scores as inputs (stacking), its probability calibrated
  (a logistic fit on its logit: Platt scaling, monotone, so the ranking is the classifier's).

The served score is the candidate that ranked the customers of the latest snapshot instants best (the mean ROC AUC
within each of them), once each has ``min_labels`` (before that: ``bgnbd`` once fitted, else ``recency``), so what
is served is never worse than its baselines by more than the noise of those instants. Not the AUC pooled over a
window of labels: pooled, a score also gets credit for telling one period's churn rate from another's, and on a
BG/NBD history the online classifier led that way while ranking the customers of one moment worse than BG/NBD
(``bench/churn_quality.py``). Everything here is learnt by the single trainer, in the order of
the training topic: a function of the examples alone.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

from river import linear_model, metrics, optim, preprocessing, utils

from streamproc.domain import btyd

SCORERS = ("model", "bgnbd", "recency")
RELIABILITY_BINS = 10
INSTANTS_KEPT = 5  # snapshot instants whose within-instant ROC AUC is kept (the newest may still be filling)
_EPS = 1e-6
LOGIT_BOUND = 6.0  # a baseline's score as a classifier input: p in [0.0025, 0.9975]


def logit(p: float) -> float:
    p = min(max(p, _EPS), 1 - _EPS)
    return math.log(p / (1 - p))


def _calibrator() -> Any:
    # unweighted and unregularised enough to follow the label rate: a calibrated probability, not a ranking
    return preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer=optim.SGD(0.02), l2=0.0)


@dataclass
class Quality:
    """Test-then-train scores of one candidate: ROC AUC (overall and rolling), log loss, Brier score, and a
    reliability table (per bin of predicted probability: count, sum of predictions, sum of outcomes)."""

    window: int
    auc: Any = field(default_factory=metrics.ROCAUC)
    logloss: Any = field(default_factory=metrics.LogLoss)
    rolling_auc: Any = None
    brier_sum: float = 0.0
    n: int = 0
    # the ROC AUC within each of the latest snapshot instants: how well the score ranks the customers of one
    # moment, which is what a retention team acts on (pooled over instants, a score also gets credit for telling
    # one period's churn rate from another's)
    instants: dict[int, Any] = field(default_factory=dict)
    reliability: list[list[float]] = field(default_factory=lambda: [[0, 0.0, 0] for _ in range(RELIABILITY_BINS)])

    def __post_init__(self) -> None:
        if self.rolling_auc is None:  # River's constructors are unannotated
            self.rolling_auc = utils.Rolling(metrics.ROCAUC(), window_size=self.window)  # type: ignore[no-untyped-call]

    def update(self, label: int, p: float, instant: int = 0) -> None:
        y = bool(label)
        p = min(max(p, _EPS), 1 - _EPS)
        within = self.instants.get(instant)
        if within is None:
            within = self.instants[instant] = metrics.ROCAUC()  # type: ignore[no-untyped-call]
            for old in sorted(self.instants)[:-INSTANTS_KEPT]:
                del self.instants[old]
        within.update(y, p)
        self.auc.update(y, p)
        self.rolling_auc.update(y, p)
        self.logloss.update(y, p)
        self.brier_sum += (p - label) ** 2
        self.n += 1
        row = self.reliability[min(int(p * RELIABILITY_BINS), RELIABILITY_BINS - 1)]
        row[0] += 1
        row[1] += p
        row[2] += label

    def instant_auc(self) -> float:
        """The mean ROC AUC within the latest complete snapshot instants (the newest may still be filling)."""
        done = sorted(self.instants)[:-1]
        aucs = [self.instants[t].get() for t in done]
        return sum(aucs) / len(aucs) if aucs else 0.0

    def summary(self) -> dict[str, Any]:
        return {"roc_auc": self.auc.get(), "rolling_roc_auc": self.rolling_auc.get(),
                "instant_roc_auc": self.instant_auc(), "log_loss": self.logloss.get(),
                "brier": self.brier_sum / self.n if self.n else 0.0, "labels": self.n}

    def reliability_table(self) -> list[dict[str, Any]]:
        """Per bin with predictions in it: the bin, how many, the mean prediction and the observed churn rate."""
        out = []
        for i, (n, sum_p, sum_y) in enumerate(self.reliability):
            if n:
                out.append({"bin": f"{i / RELIABILITY_BINS:.1f}-{(i + 1) / RELIABILITY_BINS:.1f}", "n": int(n),
                            "mean_predicted": round(sum_p / n, 4), "observed": round(sum_y / n, 4)})
        return out


@dataclass
class ChurnScorers:
    horizon_days: float
    window: int
    sample_size: int = 20_000  # customers whose latest statistics the BG/NBD fit uses (a bottom-k sample)
    refit_every: int = 2_000  # labels between two BG/NBD fits
    min_labels: int = 200  # labels a candidate needs before it can be chosen
    bgnbd: btyd.BgNbd = field(default_factory=btyd.BgNbd)
    bgnbd_fits: int = 0
    since_fit: int = 0
    # customer digest -> (rank, x, t_x, T): the sample keeps the ``sample_size`` customers of smallest rank (a
    # hash of the digest), so which customers are in it does not depend on the order their examples came in
    sample: dict[str, tuple[int, float, float, float]] = field(default_factory=dict)
    recency: Any = field(default_factory=_calibrator)
    platt: Any = field(default_factory=_calibrator)
    quality: dict[str, Quality] = field(default_factory=dict)
    served_by: str = "recency"

    def __post_init__(self) -> None:
        for name in SCORERS:
            self.quality.setdefault(name, Quality(self.window))

    # ------------------------------------------------------------------ scoring (every worker)
    def bgnbd_p(self, x: dict[str, float]) -> float:
        big_t = max(x.get("btyd_T", 0.0), 0.0)
        repeat = float(math.floor(max(x.get("btyd_x", 0.0), 0.0)))  # a count of purchases
        return self.bgnbd.p_no_purchase(repeat, min(max(x.get("btyd_t_x", 0.0), 0.0), big_t), big_t,
                                        self.horizon_days)

    def recency_p(self, x: dict[str, float]) -> float:
        recency = {"log_recency_days": x.get("log_recency_days", 0.0)}
        return float(self.recency.predict_proba_one(recency).get(True, 0.5))

    def stacked(self, x: dict[str, float]) -> dict[str, float]:
        """The classifier's inputs: the customer's, and both baselines' scores (as logits, bounded). BG/NBD's raw
        statistics go in as logarithms: customers silent for longer than any snapshot saw (the sweep stops taking
        snapshots of them) must not be extrapolated linearly in days."""
        out = {k: v for k, v in x.items() if not k.startswith("btyd_")}
        out["log_btyd_t_x"] = math.log1p(max(x.get("btyd_t_x", 0.0), 0.0))
        out["bgnbd_logit"] = max(min(logit(self.bgnbd_p(x)), LOGIT_BOUND), -LOGIT_BOUND)
        out["recency_logit"] = max(min(logit(self.recency_p(x)), LOGIT_BOUND), -LOGIT_BOUND)
        return out

    def calibrated(self, raw: float) -> float:
        return float(self.platt.predict_proba_one({"raw_logit": logit(raw)}).get(True, raw))

    def candidates(self, x: dict[str, float], raw: float) -> dict[str, float]:
        return {"model": self.calibrated(raw), "bgnbd": self.bgnbd_p(x), "recency": self.recency_p(x)}

    # ------------------------------------------------------------------ learning (the trainer only)
    def learn(self, digest: str, x: dict[str, float], label: int, raw: float, instant: int = 0,
              at_snapshot: dict[str, float] | None = None) -> None:
        """One matured label of snapshot ``instant``: score every candidate on it, then learn from it, then choose
        what to serve. Each candidate is judged by the score a worker computed at snapshot time (``at_snapshot``),
        never by what it says now: labels arrive in an order that tells them apart (a customer who buys again
        labels a snapshot 0 at once, the 1s come when the horizon has passed), and a score adapting online as they
        come would be judged on that order rather than on what it knew at the snapshot."""
        if at_snapshot:
            for name in SCORERS:
                if name in at_snapshot:
                    self.quality[name].update(label, at_snapshot[name], instant)
        y = bool(label)
        self.recency.learn_one({"log_recency_days": x.get("log_recency_days", 0.0)}, y)
        self.platt.learn_one({"raw_logit": logit(raw)}, y)
        self._remember(digest, x)
        self.since_fit += 1
        # early fits come sooner (after min_labels, then twice as many, ...): a young shop gets its baseline soon
        due = self.refit_every if self.bgnbd_fits >= 3 else min(self.min_labels * 2 ** self.bgnbd_fits,
                                                                  self.refit_every)
        if self.since_fit >= due:
            self.refit()
        self._choose()

    def _remember(self, digest: str, x: dict[str, float]) -> None:
        rank = zlib.crc32(digest.encode())
        if "btyd_T" not in x:  # an example from before BG/NBD's statistics were sent
            return
        big_t = max(x["btyd_T"], 0.0)
        stats = (rank, max(x["btyd_x"], 0.0), min(max(x["btyd_t_x"], 0.0), big_t), big_t)
        sample = self.sample
        if digest in sample or len(sample) < self.sample_size:
            sample[digest] = stats
            return
        worst = max(sample, key=lambda d: (sample[d][0], d))  # O(k), once per new customer past the size
        if (rank, digest) < (sample[worst][0], worst):
            del sample[worst]
            sample[digest] = stats

    def refit(self) -> None:
        """Refit BG/NBD's four parameters on the sample (warm-started from the last fit)."""
        self.since_fit = 0
        if not self.sample:
            return
        ordered = [self.sample[d] for d in sorted(self.sample)]  # a fixed order: the same fit from the same sample
        self.bgnbd = btyd.fit([s[1] for s in ordered], [s[2] for s in ordered], [s[3] for s in ordered],
                              start=self.bgnbd)
        self.bgnbd_fits += 1

    def _choose(self) -> None:
        ready = [name for name in SCORERS if self.quality[name].n >= self.min_labels]
        if not ready:
            self.served_by = "bgnbd" if self.bgnbd_fits else "recency"
            return
        # the best ranking within the latest snapshot instants; ties go to the simpler scorer (SCORERS lists the
        # model first)
        self.served_by = max(reversed(ready), key=lambda name: self.quality[name].instant_auc())

    def summary(self) -> dict[str, Any]:
        return {
            "served_by": self.served_by,
            "scorers": {name: self.quality[name].summary() for name in SCORERS},
            "bgnbd": {"r": self.bgnbd.r, "alpha": self.bgnbd.alpha, "a": self.bgnbd.a, "b": self.bgnbd.b,
                      "fits": self.bgnbd_fits, "sample": len(self.sample)},
            "reliability": {name: self.quality[name].reliability_table() for name in SCORERS},
        }
