"""The churn scores a worker can serve, side by side, each scored prequentially on the same matured labels:

* ``recency``: days since the last purchase alone, calibrated (a logistic fit on its log), the simplest baseline a
  retention team would use;
* ``bgnbd``: the BG/NBD probability of no purchase within the horizon (``domain.btyd``), its four population
  parameters refitted by maximum likelihood, every ``refit_every`` labels, from a sample of customers'
  sufficient statistics;
* ``model``: the online classifier, given both baselines' scores as inputs (stacking), its probability calibrated
  (a logistic fit on its logit: Platt scaling, monotone, so the ranking is the classifier's).

The served score is the candidate that ranked the customers of the latest complete snapshot instants best (the
mean exact ROC AUC within each of them, on a sample of up to ``SAMPLED_PER_INSTANT`` customers per instant, chosen
by a hash of the customer), so what is served is never worse than its baselines by more than the noise of those
instants. Before any instant is complete: ``bgnbd`` once fitted, else ``recency``. Not the AUC pooled over a window
of labels: pooled, a score also gets credit for telling one period's churn rate from another's, and on a BG/NBD
history the online classifier led that way while ranking the customers of one moment worse than BG/NBD
(``bench/churn_quality.py``).

Each candidate is judged on an instant's labels by what it knew at that instant: the trainer freezes a copy of the
candidates when the first label of an instant arrives (``ModelBundle.judge_for``), and scores every label of the
instant with it. Not the scores a worker computed at snapshot time: which checkpoint a worker had then depends on
how far it ran ahead of the trainer (a backlog is snapshotted long before any model exists), so the choice would
depend on timing, not on the examples. Everything here is learnt by the single trainer, in the order of the
training topic: a function of the examples alone.
"""

from __future__ import annotations

import copy
import heapq
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

from river import linear_model, metrics, optim, preprocessing, utils

from streamproc.domain import btyd

SCORERS = ("model", "bgnbd", "recency")
RELIABILITY_BINS = 10
INSTANTS_CHOSEN_ON = 5  # the latest complete instants the served score is chosen on
SAMPLED_PER_INSTANT = 1000  # customers per instant whose labels and scores are kept to rank exactly
MIN_PER_CLASS = 20  # an instant counts once its sample has this many labels of each class
CHOOSE_EVERY = 500  # labels between two choices (late labels still land in their instant's sample)
DAY_MS = 86_400_000
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
    reliability: list[list[float]] = field(default_factory=lambda: [[0, 0.0, 0] for _ in range(RELIABILITY_BINS)])

    def __post_init__(self) -> None:
        if self.rolling_auc is None:  # River's constructors are unannotated
            self.rolling_auc = utils.Rolling(metrics.ROCAUC(), window_size=self.window)  # type: ignore[no-untyped-call]

    def update(self, label: int, p: float) -> None:
        y = bool(label)
        p = min(max(p, _EPS), 1 - _EPS)
        self.auc.update(y, p)
        self.rolling_auc.update(y, p)
        self.logloss.update(y, p)
        self.brier_sum += (p - label) ** 2
        self.n += 1
        row = self.reliability[min(int(p * RELIABILITY_BINS), RELIABILITY_BINS - 1)]
        row[0] += 1
        row[1] += p
        row[2] += label

    def summary(self) -> dict[str, Any]:
        return {"roc_auc": self.auc.get(), "rolling_roc_auc": self.rolling_auc.get(), "log_loss": self.logloss.get(),
                "brier": self.brier_sum / self.n if self.n else 0.0, "labels": self.n}

    def reliability_table(self) -> list[dict[str, Any]]:
        """Per bin with predictions in it: the bin, how many, the mean prediction and the observed churn rate."""
        out = []
        for i, (n, sum_p, sum_y) in enumerate(self.reliability):
            if n:
                out.append({"bin": f"{i / RELIABILITY_BINS:.1f}-{(i + 1) / RELIABILITY_BINS:.1f}", "n": int(n),
                            "mean_predicted": round(sum_p / n, 4), "observed": round(sum_y / n, 4)})
        return out


def exact_roc_auc(labels: list[int], scores: list[float]) -> float:
    """The ROC AUC of ``scores`` for ``labels`` (Mann-Whitney, ties count half); NaN with one class. River's
    ``ROCAUC`` counts on 10 fixed thresholds: too coarse to tell two good scores apart."""
    positives = sum(labels)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return float("nan")
    order = sorted(range(len(scores)), key=scores.__getitem__)
    rank_sum = 0.0
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        rank_sum += sum(labels[order[k]] for k in range(i, j + 1)) * ((i + j) / 2 + 1)
        i = j + 1
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


@dataclass
class InstantSample:
    """The labels of one snapshot instant and every candidate's score on them, for up to ``size`` customers: those
    of the smallest hash, so the sample does not depend on the order the labels came in."""

    size: int = SAMPLED_PER_INSTANT
    rows: dict[str, tuple[int, int, tuple[float, ...]]] = field(default_factory=dict)  # digest -> (rank, label, p)
    heap: list[tuple[int, str]] = field(default_factory=list)  # (-rank, digest): the largest rank on top

    def add(self, digest: str, label: int, scores: tuple[float, ...]) -> None:
        rank = zlib.crc32(digest.encode())
        if digest in self.rows:
            self.rows[digest] = (self.rows[digest][0], label, scores)
            return
        if len(self.rows) >= self.size:
            top_rank, top = -self.heap[0][0], self.heap[0][1]
            if (rank, digest) >= (top_rank, top):
                return
            heapq.heappop(self.heap)
            del self.rows[top]
        self.rows[digest] = (rank, label, scores)
        heapq.heappush(self.heap, (-rank, digest))

    def counts(self) -> tuple[int, int]:
        positives = sum(row[1] for row in self.rows.values())
        return len(self.rows) - positives, positives

    def aucs(self) -> list[float]:
        """Each candidate's exact ROC AUC on the sample (in ``SCORERS`` order)."""
        ordered = [self.rows[d] for d in sorted(self.rows)]
        labels = [row[1] for row in ordered]
        return [exact_roc_auc(labels, [row[2][i] for row in ordered]) for i in range(len(SCORERS))]


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
    samples: dict[int, InstantSample] = field(default_factory=dict)  # snapshot instant -> its ranking sample
    newest_instant: int = 0
    since_choice: int = 0
    chosen_at: int = 0  # the newest instant when the last choice was made
    chosen_on: list[int] = field(default_factory=list)  # the instants of the last choice
    chosen_auc: dict[str, float] = field(default_factory=dict)  # each candidate's mean within-instant AUC on them

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

    def frozen(self) -> ChurnScorers:
        """A copy that scores as these do now and learns nothing: the judge of an instant's labels."""
        return ChurnScorers(self.horizon_days, self.window, bgnbd=self.bgnbd, recency=copy.deepcopy(self.recency),
                            platt=copy.deepcopy(self.platt), served_by=self.served_by)

    def complete(self, instant: int) -> bool:
        """Every label of ``instant`` has matured once a label of a snapshot more than a horizon later came (the
        1s come a horizon after the snapshot; the 0s before). Labels a lagging sweep sends later still land in the
        instant's sample, and the choice is made again every ``CHOOSE_EVERY`` labels."""
        return instant + self.horizon_days * DAY_MS < self.newest_instant

    # ------------------------------------------------------------------ learning (the trainer only)
    def learn(self, digest: str, x: dict[str, float], label: int, raw: float, instant: int = 0,
              judged: dict[str, float] | None = None) -> None:
        """One matured label of snapshot ``instant``: score every candidate on it, then learn from it, then choose
        what to serve. Each candidate is judged by what it said as of the instant (``judged``: the frozen copy's
        scores), never by what it says now: labels arrive in an order that tells them apart (a customer who buys
        again labels a snapshot 0 at once, the 1s come when the horizon has passed), and a score adapting online as
        they come would be judged on that order rather than on what it knew at the snapshot."""
        if judged:
            for name in SCORERS:
                self.quality[name].update(label, judged[name])
            self._sample(digest, label, instant, tuple(judged[name] for name in SCORERS))
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

    def _sample(self, digest: str, label: int, instant: int, scores: tuple[float, ...]) -> None:
        newer = instant > self.newest_instant
        self.newest_instant = max(self.newest_instant, instant)
        sample = self.samples.get(instant)
        if sample is None:
            if instant < self._oldest_needed():
                return  # older than every instant still needed: learnt, not sampled
            sample = self.samples[instant] = InstantSample()
        sample.add(digest, label, scores)
        if newer:  # the instants no choice needs any more: older than the latest complete ones chosen on
            oldest = self._oldest_needed()
            for old in [t for t in self.samples if t < oldest]:
                del self.samples[old]

    def _oldest_needed(self) -> int:
        """The oldest instant a choice can still need: the last of the latest complete ones chosen on, once more
        complete instants than those are sampled (before that: every instant)."""
        complete = sorted((t for t in self.samples if self.complete(t)), reverse=True)
        return complete[INSTANTS_CHOSEN_ON - 1] if len(complete) > INSTANTS_CHOSEN_ON else -1

    def _choose(self) -> None:
        """Again when a newer instant came (another may be complete now), and every ``CHOOSE_EVERY`` labels."""
        self.since_choice += 1
        if self.chosen_on and self.since_choice < CHOOSE_EVERY and self.newest_instant == self.chosen_at:
            return
        self.chosen_at = self.newest_instant
        self.since_choice = 0
        counted = [t for t in sorted(self.samples, reverse=True)
                   if self.complete(t) and min(self.samples[t].counts()) >= MIN_PER_CLASS][:INSTANTS_CHOSEN_ON]
        if not counted:
            self.served_by = "bgnbd" if self.bgnbd_fits else "recency"
            return
        per_instant = [self.samples[t].aucs() for t in counted]
        self.chosen_on = counted
        self.chosen_auc = {name: sum(a[i] for a in per_instant) / len(per_instant) for i, name in enumerate(SCORERS)}
        # ties go to the simpler scorer (SCORERS lists the model first)
        self.served_by = max(reversed(SCORERS), key=self.chosen_auc.__getitem__)

    def summary(self) -> dict[str, Any]:
        return {
            "served_by": self.served_by,
            # instant_roc_auc: the exact mean ROC AUC within the instants the choice was made on, what a retention
            # team acts on (how well the score ranks the customers of one moment)
            "scorers": {name: {**self.quality[name].summary(), "instant_roc_auc": self.chosen_auc.get(name, 0.0)}
                        for name in SCORERS},
            "chosen_on_instants": list(self.chosen_on),
            "bgnbd": {"r": self.bgnbd.r, "alpha": self.bgnbd.alpha, "a": self.bgnbd.a, "b": self.bgnbd.b,
                      "fits": self.bgnbd_fits, "sample": len(self.sample)},
            "reliability": {name: self.quality[name].reliability_table() for name in SCORERS},
        }
