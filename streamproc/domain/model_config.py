"""What the global models are made of (the segmenter, the classifier, the recommender's bounds): a light module,
so the settings can take their defaults from here without importing River."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from streamproc.domain.churn import ChurnConfig
from streamproc.domain.recommend import RecConfig


@dataclass(frozen=True, slots=True)
class ModelConfig:
    segmenter: Literal["kmeans", "streamkmeans"] = "kmeans"
    n_segments: int = 5
    kmeans_halflife: float = 0.005
    max_segment_categories: int = 24  # category view shares used as segmentation inputs (most seen first)
    # logreg, or hat (Hoeffding adaptive tree), or arf (adaptive random forest)
    classifier: Literal["logreg", "hat", "arf"] = "logreg"
    seed: int = 42
    alert_threshold: float = ChurnConfig().alert_threshold  # the one default: the churn step's
    horizon_days: int = ChurnConfig().horizon_days  # what the labels mean: no purchase within this many days
    rolling_window: int = 2000
    rec: RecConfig = field(default_factory=RecConfig)
