"""The global online models (River) and their prequential evaluation, as one picklable bundle.

One trainer owns the bundle and learns from the single-partition training topic; every worker scores
with the newest checkpoint of it. Nothing here touches Redis, Kafka or the clock.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from river import cluster, drift, forest, linear_model, metrics, optim, preprocessing, tree, utils

from streamproc.domain.churn import SEGMENT_FEATURES, VIEW_SHARE
from streamproc.domain.churn_scorers import ChurnScorers
from streamproc.domain.model_config import ModelConfig
from streamproc.domain.recommend import CoPurchaseModel, RecIndex
from streamproc.domain.rfm import RfmPopulation


class SeededKMeans(cluster.KMeans):
    """River's KMeans without the dependence on Python's hash seed. River's ``predict_one`` visits the names of
    ``{*center, *x}``, a set: a centre's missing coordinates are drawn from the shared random generator, and the
    distances summed, in hash order, so two processes (two workers, a restarted trainer, a replay) trained
    different models from the same examples. Here ``x``'s names come in ``x``'s order (drawing missing
    coordinates in that order), then the centre's other names in insertion order: the arithmetic of
    ``_NearestCenter``. Learning stays River's (it walks ``x.items()``)."""

    def predict_one(self, x: dict[Hashable, Any]) -> int:
        p = self.p

        def distance(c: int) -> float:
            center = self.centers[c]
            near = sum([abs(center[k] - v) ** p for k, v in x.items()])
            total: float = near + sum(abs(v) ** p for k, v in center.items() if k not in x)
            return total

        return min(self.centers, key=distance)


def make_segmenter(cfg: ModelConfig) -> Any:
    if cfg.segmenter == "streamkmeans":
        model: Any = cluster.STREAMKMeans(  # type: ignore[no-untyped-call]  # River's, unannotated
            chunk_size=100, n_clusters=cfg.n_segments, halflife=cfg.kmeans_halflife, seed=cfg.seed)
    elif cfg.segmenter == "kmeans":
        model = SeededKMeans(n_clusters=cfg.n_segments, halflife=cfg.kmeans_halflife, seed=cfg.seed)
    else:
        raise ValueError(f"unknown segmenter {cfg.segmenter!r}")
    return preprocessing.StandardScaler() | model


def make_classifier(cfg: ModelConfig) -> Any:
    if cfg.classifier == "logreg":
        model: Any = linear_model.LogisticRegression(optimizer=optim.SGD(0.02), l2=1e-4)
        return preprocessing.StandardScaler() | model
    if cfg.classifier == "hat":
        return preprocessing.StandardScaler() | tree.HoeffdingAdaptiveTreeClassifier(grace_period=100, seed=cfg.seed)
    if cfg.classifier == "arf":
        return preprocessing.StandardScaler() | forest.ARFClassifier(n_models=5, seed=cfg.seed)
    raise ValueError(f"unknown classifier {cfg.classifier!r}")


def upgraded_config(cfg: ModelConfig) -> ModelConfig:
    """A configuration unpickled from an older checkpoint, with the defaults of the fields it did not have yet."""
    known = {f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if hasattr(cfg, f.name)}
    return ModelConfig(**known)


_DERIVED = ("_rec_index", "_segment_fast")  # caches a bundle builds for scoring, never checkpointed


class _NearestCenter:
    """River's ``StandardScaler | KMeans`` prediction, with the scaler's statistics and the centres read once into
    lists: per customer, a loop over a fixed key order instead of a set union and dict lookups per centre. Same
    arithmetic (``(x - mean) / var ** 0.5``, ``Σ |c - x| ** p`` in the same order as ``SeededKMeans``, the first
    nearest centre wins), so the same segment."""

    def __init__(self, keys: list[str], means: list[float], stds: list[float],
                 centers: list[tuple[int, list[float], float]], p: float) -> None:
        self.keys, self.means, self.stds, self.centers, self.p = keys, means, stds, centers, p

    @classmethod
    def of(cls, pipeline: Any, keys: list[str]) -> _NearestCenter | None:
        """The fast form of a fitted pipeline, or None when it is not one this class reproduces exactly."""
        steps = list(getattr(pipeline, "steps", {}).values())
        if len(steps) != 2 or type(steps[0]) is not preprocessing.StandardScaler or type(steps[1]) not in (
                cluster.KMeans, SeededKMeans):
            return None
        scaler, kmeans = steps
        if scaler.window_size is not None or not scaler.with_std or not all(k in scaler.vars for k in keys):
            return None
        centers = []
        for cid, center in kmeans.centers.items():
            if not all(k in center for k in keys):
                return None  # River would draw a random coordinate for the missing key: leave it to River
            # coordinates of keys the input does not have count as |c - 0| ** p
            rest = sum(abs(v) ** kmeans.p for k, v in center.items() if k not in keys)
            centers.append((cid, [center[k] for k in keys], rest))
        means = [scaler.means[k] for k in keys]
        stds = [scaler.vars[k] ** 0.5 for k in keys]
        return cls(keys, means, stds, centers, kmeans.p)

    def __call__(self, x: dict[str, float]) -> int:
        get = x.get
        scaled = [(get(k, 0.0) - m) / sd if sd else 0.0
                  for k, m, sd in zip(self.keys, self.means, self.stds, strict=True)]
        p = self.p
        best, best_distance = -1, math.inf
        for cid, coords, rest in self.centers:
            distance = sum([abs(c - v) ** p for c, v in zip(coords, scaled, strict=True)]) + rest
            if distance < best_distance:
                best, best_distance = cid, distance
        return int(best)


@dataclass
class Prequential:
    """Test-then-train scores of predictions made at snapshot time, once their labels matured."""

    threshold: float
    window: int
    auc: Any = field(default_factory=metrics.ROCAUC)
    logloss: Any = field(default_factory=metrics.LogLoss)
    precision: Any = field(default_factory=metrics.Precision)
    recall: Any = field(default_factory=metrics.Recall)
    rolling_auc: Any = None
    rolling_precision: Any = None
    rolling_recall: Any = None
    positives: int = 0
    n: int = 0

    def __post_init__(self) -> None:
        # River's metric constructors are unannotated
        self.rolling_auc = utils.Rolling(metrics.ROCAUC(), window_size=self.window)  # type: ignore[no-untyped-call]
        self.rolling_precision = utils.Rolling(metrics.Precision(),  # type: ignore[no-untyped-call]
                                               window_size=self.window)
        self.rolling_recall = utils.Rolling(metrics.Recall(), window_size=self.window)  # type: ignore[no-untyped-call]

    def update(self, label: int, p: float) -> None:
        y = bool(label)
        p = min(max(p, 1e-6), 1 - 1e-6)
        self.auc.update(y, p)
        self.rolling_auc.update(y, p)
        self.logloss.update(y, p)
        hit = p >= self.threshold
        for metric in (self.precision, self.recall, self.rolling_precision, self.rolling_recall):
            metric.update(y, hit)
        self.n += 1
        self.positives += int(y)

    def summary(self) -> dict[str, float]:
        return {
            "roc_auc": self.auc.get(), "log_loss": self.logloss.get(), "precision": self.precision.get(),
            "recall": self.recall.get(), "rolling_roc_auc": self.rolling_auc.get(),
            "rolling_precision": self.rolling_precision.get(), "rolling_recall": self.rolling_recall.get(),
            "labels": self.n, "positive_rate": self.positives / self.n if self.n else 0.0,
        }


def raw_churn_probability(classifier: Any, stacked: dict[str, float], trained: bool) -> float:
    """The classifier's own probability (trained with balanced class weights: it ranks, it is not calibrated)."""
    if not trained:
        return 0.5
    return float(classifier.predict_proba_one(stacked).get(True, 0.0))


@dataclass
class ChurnJudge:
    """The churn candidates frozen as of a snapshot instant (``ModelBundle.judge_for``): they score, never learn."""

    scorers: ChurnScorers
    classifier: Any
    trained: bool

    def candidate_scores(self, x: dict[str, float]) -> dict[str, float]:
        return self.scorers.candidates(x, raw_churn_probability(self.classifier, self.scorers.stacked(x), self.trained))


@dataclass
class ModelBundle:
    cfg: ModelConfig
    version: int = 0
    segmenter: Any = None
    classifier: Any = None
    prequential: Prequential | None = None
    drift_detector: Any = field(default_factory=drift.ADWIN)
    drift_detections: int = 0
    churn_examples: int = 0
    segment_examples: int = 0
    class_counts: list[int] = field(default_factory=lambda: [0, 0])
    training_offset: int = -1  # last applied offset of the training topic
    event_time: int = 0  # newest example time learned from
    recs: CoPurchaseModel | None = None  # co-purchase rules, segment favourites, online hit-rate
    segment_vocab: dict[str, int] = field(default_factory=dict)  # view-share input -> examples that had it
    segment_mix: dict[int, float] = field(default_factory=dict)  # segment -> decayed share of snapshots
    segment_spend: dict[int, float] = field(default_factory=dict)  # segment -> decayed spend of its baskets
    scorers: ChurnScorers | None = None  # the churn baselines, the calibration, and which score is served
    rfm: RfmPopulation = field(default_factory=RfmPopulation)  # the live buyers' RFM quintiles
    # snapshot instant -> the churn candidates as they were when its first label came (``judge_for``)
    judges: dict[int, ChurnJudge] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scorers is None:
            self.scorers = ChurnScorers(self.cfg.horizon_days, self.cfg.rolling_window)
        if self.recs is None:
            self.recs = CoPurchaseModel(self.cfg.rec)
            self.recs.hits.k = self.cfg.rec.k
        if self.segmenter is None:
            self.segmenter = make_segmenter(self.cfg)
        if self.classifier is None:
            self.classifier = make_classifier(self.cfg)
        if self.prequential is None:
            self.prequential = Prequential(self.cfg.alert_threshold, self.cfg.rolling_window)

    # ------------------------------------------------------------ learning (the trainer only)
    def segment_vector(self, x: dict[str, float]) -> dict[str, float]:
        """A fixed input vector: the base traits, and a share (0 if none) for each of the categories seen most
        often, so that k-means compares every customer on the same axes."""
        out = {k: x.get(k, 0.0) for k in SEGMENT_FEATURES}
        vocab = sorted(self.segment_vocab, key=lambda k: (-self.segment_vocab[k], k))[: self.cfg.max_segment_categories]
        for key in sorted(vocab):
            out[key] = x.get(key, 0.0)
        return out

    def learn_segment(self, x: dict[str, float]) -> None:
        for key in x:
            if key.startswith(VIEW_SHARE):
                self.segment_vocab[key] = self.segment_vocab.get(key, 0) + 1
        vector = self.segment_vector(x)
        self.segmenter.learn_one(vector)
        self.segment_examples += 1
        if self.segment_examples >= self.cfg.n_segments:  # who the snapshots belong to, decayed over ~5,000
            seg = int(self.segmenter.predict_one(vector))
            for k in self.segment_mix:
                self.segment_mix[k] *= 1 - 1 / 5000
            self.segment_mix[seg] = self.segment_mix.get(seg, 0.0) + 1 / 5000

    def learn_churn(self, x: dict[str, float], label: int, p_at_snapshot: float | None, customer: str = "",
                    instant: int = 0) -> bool:
        """Learn one matured example (``customer``: its customer digest, ``instant``: its snapshot's); score the
        prediction served at snapshot time first, and every candidate score as of the instant (``judge_for``).
        True on drift."""
        assert self.prequential is not None and self.scorers is not None
        scorers = self.scorers
        stacked = scorers.stacked(x)
        raw = self._raw_churn_probability(stacked)
        p_now = scorers.candidates(x, raw)[scorers.served_by]
        self.prequential.update(label, p_at_snapshot if p_at_snapshot is not None else p_now)
        self.drift_detector.update(abs(label - p_now))
        drifted = bool(self.drift_detector.drift_detected)
        self.drift_detections += int(drifted)
        scorers.learn(customer, x, label, raw, instant, self.judge_for(instant).candidate_scores(x))
        self.class_counts[label] += 1
        total = sum(self.class_counts)
        weight = total / (2 * self.class_counts[label])  # balanced class weights, as counted so far
        if self.cfg.classifier == "arf":
            self.classifier.learn_one(stacked, bool(label))
        else:
            self.classifier.learn_one(stacked, bool(label), w=min(weight, 10.0))
        self.churn_examples += 1
        return drifted

    def learn_basket(self, ts: int, items: Sequence[Sequence[Any]], segment: int | None,
                     rec: Sequence[str] | None = None, amount: float | None = None) -> None:
        """A purchase (``items``: [product id, category, quantity] per line): first score the recommendation shown
        before it (and the popularity baseline at this instant) on what was bought, then learn the basket."""
        assert self.recs is not None
        bought = {line[0] for line in items}
        if rec is not None:
            self.recs.hits.update(bought, list(rec), self.recs.popular())
        lines = [(str(pid), str(cat), int(qty)) for pid, cat, qty in items]
        self.recs.learn_basket(int(ts), lines, segment)
        if segment is not None and amount:
            seg = int(segment)
            for k in self.segment_spend:
                self.segment_spend[k] *= 1 - 1 / 5000
            self.segment_spend[seg] = self.segment_spend.get(seg, 0.0) + float(amount)

    def rec_index(self) -> RecIndex:
        """The scoring view of the co-purchase model; built once per loaded checkpoint."""
        cached: RecIndex | None = self.__dict__.get("_rec_index")
        if cached is None:
            assert self.recs is not None
            cached = self.recs.index()
            self.__dict__["_rec_index"] = cached
        return cached

    # ------------------------------------------------------------ scoring (every worker)
    def churn_probability(self, x: dict[str, float]) -> float:
        """The served churn probability: the candidate ``ChurnScorers`` chose (0.0 before any label was learnt:
        an untrained model says nothing)."""
        if self.churn_examples == 0:
            return 0.0
        scorers = self.scorers
        assert scorers is not None
        served = scorers.served_by
        if served == "bgnbd":
            return scorers.bgnbd_p(x)
        if served == "recency":
            return scorers.recency_p(x)
        return scorers.calibrated(self._raw_churn_probability(scorers.stacked(x)))

    @property
    def served_by(self) -> str:
        """The candidate whose score ``churn_probability`` serves."""
        assert self.scorers is not None
        return self.scorers.served_by

    def candidate_scores(self, x: dict[str, float]) -> dict[str, float] | None:
        """Every candidate churn score (None before any label was learnt)."""
        if self.churn_examples == 0:
            return None
        assert self.scorers is not None
        return self.scorers.candidates(x, self._raw_churn_probability(self.scorers.stacked(x)))

    def judge_for(self, instant: int) -> ChurnJudge:
        """The candidates as of snapshot ``instant``: a copy made when its first label came (every label of an instant
        matures after it; labels that matured before it were learnt from), kept while the scorers still sample the
        instant. What judges an instant's labels, whatever the order they come in."""
        judge = self.judges.get(instant)
        if judge is None:
            assert self.scorers is not None
            judge = ChurnJudge(self.scorers.frozen(), copy.deepcopy(self.classifier), self.churn_examples > 0)
            self.judges[instant] = judge
            for old in [t for t in self.judges if t < instant and t not in self.scorers.samples]:
                del self.judges[old]
        return judge

    def _raw_churn_probability(self, stacked: dict[str, float]) -> float:
        return raw_churn_probability(self.classifier, stacked, self.churn_examples > 0)

    def contributions(self, x: dict[str, float]) -> dict[str, float]:
        """Per feature: how much it pushed the score up. Linear model: weight × scaled value; otherwise the
        scaled value's distance from the mean signed by its correlation with churn is not known, so use
        the drop in probability when the feature is set to its mean."""
        assert self.scorers is not None
        x = self.scorers.stacked(x)
        scaler = self.classifier["StandardScaler"]
        scaled = scaler.transform_one(x)
        final = self.classifier[list(self.classifier.steps)[-1]]
        if isinstance(final, linear_model.LogisticRegression):
            return {k: final.weights.get(k, 0.0) * v for k, v in scaled.items()}
        base = self._raw_churn_probability(x)
        out = {}
        for k in x:
            probe = dict(x)
            probe[k] = scaler.means.get(k, x[k])
            out[k] = base - self._raw_churn_probability(probe)
        return out

    def segment(self, x: dict[str, float]) -> int | None:
        if self.segment_examples < self.cfg.n_segments:
            return None
        cached = self.__dict__.get("_segment_fast")
        if cached is None or cached[0] != self.segment_examples:  # derived from what was learned so far
            cached = (self.segment_examples, _NearestCenter.of(self.segmenter, list(self.segment_vector({}))))
            self.__dict__["_segment_fast"] = cached
        nearest = cached[1]
        if nearest is None:
            return int(self.segmenter.predict_one(self.segment_vector(x)))
        return nearest(x)

    def segment_profiles(self) -> dict[int, dict[str, Any]]:
        """Per segment: centroid in original units (log inputs shown back through expm1), share of recent
        snapshots (size), share of recent spend, and a name derived from the centroid."""
        if self.segment_examples < self.cfg.n_segments:
            return {}
        scaler = self.segmenter["StandardScaler"]
        centers = self.segmenter[list(self.segmenter.steps)[-1]].centers
        keys = list(self.segment_vector({}))
        mix_total = sum(self.segment_mix.values()) or 1.0
        spend_total = sum(self.segment_spend.values()) or 1.0
        profiles: dict[int, dict[str, Any]] = {}
        for cid, center in centers.items():
            raw = {}
            for k in keys:
                mean = scaler.means.get(k, 0.0)
                std = math.sqrt(scaler.vars.get(k, 0.0)) or 1.0
                raw[k] = center.get(k, 0.0) * std + mean
            profiles[int(cid)] = {
                "centroid": _original_units(raw), "scaled": {k: center.get(k, 0.0) for k in keys},
                "size_share": round(self.segment_mix.get(int(cid), 0.0) / mix_total, 4),
                "spend_share": round(self.segment_spend.get(int(cid), 0.0) / spend_total, 4),
            }
        names = name_segments({c: p["scaled"] for c, p in profiles.items()},
                              {c: p["centroid"] for c, p in profiles.items()})
        for cid, name in names.items():
            profiles[cid]["name"] = name
        return profiles

    # ------------------------------------------------------------ checkpoints
    def dumps(self) -> bytes:
        derived = {k: self.__dict__.pop(k) for k in _DERIVED if k in self.__dict__}  # not part of the checkpoint
        try:
            return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            self.__dict__.update(derived)

    @staticmethod
    def loads(blob: bytes) -> ModelBundle:
        bundle = pickle.loads(blob)
        if not isinstance(bundle, ModelBundle):
            raise TypeError("not a model bundle")
        last = list(getattr(bundle.segmenter, "steps", {}).values())[-1:]
        if last and type(last[0]) is cluster.KMeans:  # a checkpoint from before SeededKMeans: the same state
            last[0].__class__ = SeededKMeans
        if "rfm" not in bundle.__dict__:  # a checkpoint from before RFM scores
            bundle.rfm = RfmPopulation()
        if "judges" not in bundle.__dict__:  # a checkpoint from before candidates were judged as of their instant
            bundle.judges = {}
        if "scorers" not in bundle.__dict__:  # a checkpoint from before the churn baselines
            bundle.cfg = upgraded_config(bundle.cfg)
            bundle.scorers = ChurnScorers(bundle.cfg.horizon_days, bundle.cfg.rolling_window)
        return bundle

    def summary(self) -> dict[str, Any]:
        assert self.prequential is not None
        return {
            "version": self.version, "classifier": self.cfg.classifier, "segmenter": self.cfg.segmenter,
            "churn_examples": self.churn_examples, "segment_examples": self.segment_examples,
            "drift_detections": self.drift_detections, "event_time": self.event_time,
            **self.prequential.summary(), **(self.recs.summary() if self.recs else {}),
            **(self.scorers.summary() if self.scorers else {}),
            "rfm": self.rfm.summary(),
        }


def _original_units(raw: dict[str, float]) -> dict[str, float]:
    out = {}
    for k, v in raw.items():
        if k.startswith("log_"):
            out[k[4:]] = round(math.expm1(max(v, 0.0)), 2)
        else:
            out[k] = round(v, 4)
    return out


def name_segments(scaled: dict[int, dict[str, float]], raw: dict[int, dict[str, float]]) -> dict[int, str]:
    """A readable name per centroid: its two most viewed categories, qualified by what sets it apart from the
    other segments (scaled values: standard deviations from the population mean): "premium" or "budget" by
    average order value, "new" by tenure, "browsing" or "decisive" by checkout rate. Unique (a clash gets
    the segment id appended)."""
    names: dict[int, str] = {}
    for cid in sorted(scaled):
        z, centroid = scaled[cid], raw.get(cid, {})
        shares = {k[len(VIEW_SHARE):]: v for k, v in centroid.items() if k.startswith(VIEW_SHARE) and v > 0.05}
        top = [c for c, _ in sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))[:2]]
        words = []
        if z.get("log_tenure_days", 0.0) < -0.8:
            words.append("new")
        if z.get("log_monetary_avg", 0.0) > 0.5:
            words.append("premium")
        elif z.get("log_monetary_avg", 0.0) < -0.5:
            words.append("budget")
        if z.get("conversion_rate", 0.0) > 0.8:
            words.append("decisive")
        elif z.get("conversion_rate", 0.0) < -0.8:
            words.append("browsing")
        words.append(" & ".join(top) if top else "mixed")
        names[cid] = " ".join([*words, "shoppers"])
    seen: dict[str, int] = {}
    for cid in sorted(names):
        seen[names[cid]] = seen.get(names[cid], 0) + 1
    return {cid: (f"{name} #{cid}" if seen[name] > 1 else name) for cid, name in names.items()}
