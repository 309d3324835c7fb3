"""One typed settings object, read from the environment (prefix ``STREAMPROC_``) at the edge only.

Everything below the CLI and the Faust app receives plain values or this object; nothing reads
``os.environ`` on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def pseudonym(key: str, customer_id: str) -> str:
    """Keyed, stable pseudonym of a customer id (HMAC-SHA256, 32 hex characters)."""
    import hashlib
    import hmac

    return "p" + hmac.new(key.encode(), customer_id.encode(), hashlib.sha256).hexdigest()[:32]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMPROC_", extra="ignore")

    # --- connections (default: the local services started by `streamproc infra up`)
    kafka_bootstrap: str = ""
    redis_url: str = ""
    redis_password: SecretStr | None = None
    redis_username: str | None = None  # an ACL user (with redis_password)
    redis_ssl_ca_certs: Path | None = None  # with a rediss:// URL: the CA to verify the server
    # Kafka security, passed through to Faust (broker_credentials) and kafka-python
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None

    # --- local infrastructure (streamproc infra up)
    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    redis_port: int = 16379
    kafka_heap: str = "1g"
    state_dir: Path = PROJECT_ROOT / ".local"
    cache_dir: Path = PROJECT_ROOT / ".cache"

    # --- worker
    app_id: str = "streamproc"
    topic_prefix: str = ""
    web_host: str = "127.0.0.1"  # loopback by default; set 0.0.0.0 (with a token) to serve others
    web_port: int = 6066
    http_token: SecretStr | None = None  # when set, /customers/* requires "Authorization: Bearer <token>"
    # when set, customer ids are replaced at the edge by HMAC-SHA256(key, id): raw ids never reach Redis or
    # the output topics (the dead-letter topic keeps the original bytes of what it could not read)
    pseudonymize_key: SecretStr | None = None
    batch_max_events: int = Field(default=2000, ge=1)
    # allocations between young-generation garbage collections in the worker and trainer (Python's default:
    # 700, which costs the batch step ~40 % of its time); 0 keeps Python's default
    gc_young_threshold: int = Field(default=50_000, ge=0)
    # Faust logs an error for a partition with a backlog that no stream has taken records of for this long
    stream_processing_timeout_s: float = Field(default=300.0, gt=0)
    fast_consumer: bool = True  # streamproc/transport.py; false: Faust's stock consumer
    batch_linger_s: float = 0.05  # wait this long for a batch to fill (latency bound ~ linger + processing)
    # stream-time alignment of the input topics (streamproc/align.py): while one topic's partition has unread
    # records on the broker, hold the other's newer records back, at most this long and this many per partition
    align_inputs: bool = True
    align_max_wait_s: float = Field(default=2.0, ge=0)
    align_hold_limit: int = Field(default=10_000, ge=1)
    align_pause_at: int = Field(default=1_000, ge=1)  # pause fetching a topic partition this far ahead
    # a killed worker's partitions move to the survivors after this long
    kafka_session_timeout_s: float = 10.0
    kafka_heartbeat_interval_s: float = 2.0
    log_level: str = "INFO"

    # --- input limits (bad input is data: anything beyond these goes to the DLQ)
    max_payload_bytes: int = 64 * 1024
    max_items_per_transaction: int = 200
    max_future_skew_s: float = 24 * 3600.0
    min_event_time_ms: int = 946_684_800_000  # 2000-01-01: older timestamps are absurd

    # --- event time
    allowed_lateness_s: float = 3600.0
    late_event_policy: Literal["apply", "dlq"] = "apply"
    dedup_horizon_s: float = 7 * 24 * 3600.0
    dedup_max_ids: int = 32

    # --- features
    session_gap_s: float = 30 * 60.0
    windows_days: tuple[int, ...] = (7, 30, 90)
    lifecycle_new_days: int = 30
    lifecycle_at_risk_days: int = 30
    lifecycle_churned_days: int = 90
    clv_period_days: int = 30
    clv_periods: int = 12
    clv_discount_rate: float = 0.01
    clv_retention_probability: float = 0.8
    tier_high_spend: float = 1000.0
    tier_medium_spend: float = 500.0
    sweep_interval_s: float = 3600.0  # event time between inactivity sweeps
    # customers the sweep refreshes per batch at most: a snapshot instant that visits every live customer is
    # spread over the following batches (and continued between batches) instead of stalling ingest
    sweep_budget: int = Field(default=250, ge=1)
    # unset: the watermark waits for both input topics (replays are deterministic however far they drift
    # apart); set: a topic trailing the other by more than this much event time (or silent) stops holding it
    max_source_skew_s: float | None = None

    # --- models (off: a pure feature-store worker, no snapshots, scores, alerts or trainer)
    models_enabled: bool = True
    # every worker runs a trainer as a member of the trainer group, and the one that owns the training
    # partition learns; false: a scoring-only worker (run `streamproc trainer` alone, or freeze the checkpoint)
    trainer_enabled: bool = True
    trainer_metrics_port: int | None = None  # `streamproc trainer` serves /metrics here when set
    churn_horizon_days: int = 60
    snapshot_cadence_days: int = 7
    churn_label_on: Literal["purchase", "activity"] = "purchase"
    alert_threshold: float = 0.7
    alert_rearm_threshold: float = 0.5
    alert_cooldown_days: float = 14.0
    risk_high: float = 0.8
    risk_critical: float = 0.9
    retention_actions: dict[str, dict[str, str]] | None = None  # value tier -> risk level -> action
    classifier: Literal["logreg", "hat", "arf"] = "logreg"
    segmenter: Literal["kmeans", "streamkmeans"] = "kmeans"
    n_segments: int = 5
    kmeans_halflife: float = 0.005
    model_seed: int = 42
    checkpoint_interval_s: float = 5.0
    checkpoint_keep: int = 10
    model_reload_s: float = 2.0
    expire_after_days: int = 400  # event-time silence after which a customer's features are dropped

    # --- recommendations (need models_enabled: the co-purchase model is learned by the trainer)
    rec_k: int = Field(default=10, ge=1, le=100)
    rec_halflife_days: float = 30.0  # co-purchase and best-seller counts halve every this many event days
    rec_max_pairs: int = 200_000  # memory bound of the co-purchase pair counts
    rec_max_items: int = 20_000
    rec_min_pair_count: float = 2.0
    rec_exclude_bought_days: int = 30
    rec_viewed_days: int = 14
    rec_catalogue_days: int = 90  # not sold for this long: treated as out of the catalogue
    rec_weight_bought_together: float = 1.0
    rec_weight_viewed_not_bought: float = 0.8
    rec_weight_popular_in_segment: float = 0.4
    rec_excluded_products: frozenset[str] = frozenset()  # withdrawn from the catalogue: never recommended

    @model_validator(mode="after")
    def _local_defaults(self) -> Settings:
        if not self.kafka_bootstrap:
            self.kafka_bootstrap = f"127.0.0.1:{self.kafka_port}"
        if not self.redis_url:
            self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        return self

    def topic(self, name: str) -> str:
        """Physical topic name for a declared topic (the prefix isolates tests and tenants)."""
        return f"{self.topic_prefix}{name}"

    def redis_kwargs(self) -> dict[str, Any]:
        """Connection options for redis-py besides the URL."""
        out: dict[str, Any] = {}
        if self.redis_password is not None:
            out["password"] = self.redis_password.get_secret_value()
        if self.redis_username:
            out["username"] = self.redis_username
        if self.redis_ssl_ca_certs is not None:
            out["ssl_ca_certs"] = str(self.redis_ssl_ca_certs)
        return out

    def customer_key(self, customer_id: str) -> str:
        """The id streamproc stores a customer under: the raw id, or its keyed pseudonym."""
        if self.pseudonymize_key is None:
            return customer_id
        return pseudonym(self.pseudonymize_key.get_secret_value(), customer_id)

    def __repr_args__(self) -> Any:
        # repr() and str() show the masked values: a URL's password included
        return list(self.masked().items())

    def masked(self) -> dict[str, object]:
        """Settings as a dict with secrets masked, for printing and logs."""
        out = self.model_dump()
        for key, value in out.items():
            if isinstance(getattr(self, key), SecretStr) and value is not None:
                out[key] = "**********"
        if "@" in self.redis_url:
            scheme, rest = self.redis_url.split("://", 1)
            out["redis_url"] = f"{scheme}://***@{rest.split('@', 1)[1]}"
        return out
