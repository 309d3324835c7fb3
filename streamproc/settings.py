"""One typed settings object, read from the environment (prefix ``STREAMPROC_``) at the edge only.

Everything below the CLI and the Faust app receives plain values or this object; nothing reads
``os.environ`` on its own.
"""

from __future__ import annotations

import difflib
import operator
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as EnvParseError

from streamproc.domain.churn import ChurnConfig
from streamproc.domain.customer import FoldConfig
from streamproc.domain.events import DecodeLimits
from streamproc.domain.model_config import ModelConfig
from streamproc.domain.recommend import RecConfig

# Each tunable the domain has is defaulted there, once: a setting takes its default from the domain's config
# (in the settings' units), and streamproc/config.py maps the settings back onto the configs.
_LIMITS, _FOLD, _CHURN, _MODEL, _REC = DecodeLimits(), FoldConfig(), ChurnConfig(), ModelConfig(), RecConfig()

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# run from a checkout (an editable install, `make`, CI), PROJECT_ROOT is the repository and the state and caches
# stay beside it, as they always have; installed from a wheel (the image, `pip install .`) it is only the
# interpreter's lib directory, so the user's XDG base directories are used instead
IN_CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file()


def _xdg_dir(variable: str, fallback: str) -> Path:
    # the XDG spec: an unset, empty or relative value is ignored (a relative one would depend on the cwd)
    base = os.environ.get(variable, "")
    return (Path(base) if os.path.isabs(base) else Path.home() / fallback) / "streamproc"


def default_state_dir() -> Path:
    """``.local`` of the checkout, else ``$XDG_STATE_HOME/streamproc`` (``~/.local/state/streamproc``)."""
    return PROJECT_ROOT / ".local" if IN_CHECKOUT else _xdg_dir("XDG_STATE_HOME", ".local/state")


def default_cache_dir() -> Path:
    """``.cache`` of the checkout, else ``$XDG_CACHE_HOME/streamproc`` (``~/.cache/streamproc``)."""
    return PROJECT_ROOT / ".cache" if IN_CHECKOUT else _xdg_dir("XDG_CACHE_HOME", ".cache")


def pseudonym(key: str, customer_id: str) -> str:
    """Keyed, stable pseudonym of a customer id (HMAC-SHA256, 32 hex characters)."""
    import hashlib
    import hmac

    return "p" + hmac.new(key.encode(), customer_id.encode(), hashlib.sha256).hexdigest()[:32]


ENV_PREFIX = "STREAMPROC_"
Port = Annotated[int, Field(ge=1, le=65535)]
Probability = Annotated[float, Field(ge=0, le=1)]
# the keys retention_actions may use: value_tier (domain/customer.py) and risk_level (domain/churn.py)
VALUE_TIERS = ("high", "medium", "low")
RISK_LEVELS = ("critical", "high", "medium")
# cross-field rules (a, relation, b), each reported as "STREAMPROC_A=x <relation> STREAMPROC_B=y"
ORDER_RULES: tuple[tuple[str, str, str], ...] = (
    ("alert_rearm_threshold", "<", "alert_threshold"),  # else no hysteresis (or no alert below the re-arm level)
    ("alert_threshold", "<=", "risk_high"),  # else no alert is ever graded "medium"
    ("risk_high", "<=", "risk_critical"),
    ("tier_medium_spend", "<", "tier_high_spend"),
    ("lifecycle_at_risk_days", "<", "lifecycle_churned_days"),  # else no customer is ever "at_risk"
    ("kafka_heartbeat_interval_s", "<", "kafka_session_timeout_s"),  # else the group evicts live members
    ("kafka_controller_port", "!=", "kafka_port"),  # both listeners of the local broker
)
_RELATIONS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "<": (operator.lt, "must be below"),
    "<=": (operator.le, "must not exceed"),
    "!=": (operator.ne, "must differ from"),
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # --- connections (default: the local services started by `streamproc infra up`)
    kafka_bootstrap: str = ""
    redis_url: str = ""
    redis_password: SecretStr | None = None
    redis_username: str | None = None  # an ACL user (with redis_password)
    redis_ssl_ca_certs: Path | None = None  # with a rediss:// URL: the CA to verify the server
    redis_cluster: bool = False  # the URL names seed nodes of a Redis Cluster (as redis+cluster:// does)
    # a batch counts as done once its saves reached this many replicas (WAIT; adapters/redis_replicas.py)
    redis_wait_replicas: int = Field(default=0, ge=0)
    redis_wait_timeout_ms: int = Field(default=1000, ge=1)
    # Kafka security, passed through to Faust (broker_credentials) and kafka-python
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None

    # --- local infrastructure (streamproc infra up)
    kafka_port: Port = 19092
    kafka_controller_port: Port = 19093
    redis_port: Port = 16379
    kafka_cluster_port: Port = 19192  # `infra up --kafka-brokers 3`: brokers from here, controllers from + 100
    # replication factor of the topics `topics apply` creates (0: as topics.toml declares, 1 for a single broker);
    # above 1 the topics also get min.insync.replicas = factor - 1, so writes go on with one broker down
    topic_replication: int = Field(default=0, ge=0)
    redis_cluster_port: Port = 17101  # `infra up --redis-cluster`: 6 nodes from here (cluster buses on + 10000)
    # the broker's -Xmx; infra derives -Xms from it and reads megabytes or gigabytes only (infra.min_heap)
    kafka_heap: str = Field(default="1g", pattern=r"^[1-9][0-9]*[mg]$")
    # STREAMPROC_STATE_DIR / STREAMPROC_CACHE_DIR override these; read when the settings are made, not imported
    state_dir: Path = Field(default_factory=default_state_dir)
    cache_dir: Path = Field(default_factory=default_cache_dir)

    # --- worker
    app_id: str = "streamproc"
    topic_prefix: str = ""
    web_host: str = "127.0.0.1"  # loopback by default; set 0.0.0.0 (with a token) to serve others
    web_port: Port = 6066
    http_token: SecretStr | None = None  # when set, /customers/* requires "Authorization: Bearer <token>"
    # when set, customer ids are replaced at the edge by HMAC-SHA256(key, id): raw ids never reach Redis or
    # the output topics (the dead-letter topic keeps the original bytes of what it could not read)
    pseudonymize_key: SecretStr | None = None
    model_signing_key: SecretStr | None = None  # checkpoints signed, and verified before unpickling (see README)
    batch_max_events: int = Field(default=2000, ge=1)
    # allocations between young-generation garbage collections in the worker and trainer (Python's default:
    # 700, which costs the batch step ~40 % of its time); 0 keeps Python's default
    gc_young_threshold: int = Field(default=50_000, ge=0)
    # Faust logs an error for a partition with a backlog that no stream has taken records of for this long
    stream_processing_timeout_s: float = Field(default=300.0, gt=0)
    fast_consumer: bool = True  # streamproc/runtime/consumer.py; false: Faust's stock consumer
    # wait this long for a batch to fill (latency bound ~ linger + processing)
    batch_linger_s: float = Field(default=0.05, ge=0)
    # stream-time alignment of the input topics (streamproc/pipeline/align.py): while one topic's partition has unread
    # records on the broker, hold the other's newer records back, at most this long and this many per partition
    align_inputs: bool = True
    align_max_wait_s: float = Field(default=2.0, ge=0)
    align_hold_limit: int = Field(default=10_000, ge=1)
    align_pause_at: int = Field(default=1_000, ge=1)  # pause fetching a topic partition this far ahead
    # a killed worker's partitions move to the survivors after this long
    kafka_session_timeout_s: float = Field(default=10.0, gt=0)
    kafka_heartbeat_interval_s: float = Field(default=2.0, gt=0)  # below the session timeout (ORDER_RULES)
    # what both logging.basicConfig (trainer) and Faust (worker) accept, in any case
    log_level: str = Field(default="INFO", pattern=r"(?i)^(debug|info|warn|warning|error|critical)$")

    # --- input limits (bad input is data: anything beyond these goes to the DLQ)
    # at most the producer's max request size (1 MB): a bigger record never reaches the topic to be read
    max_payload_bytes: int = Field(default=_LIMITS.max_payload_bytes, ge=1, le=1_000_000)
    max_items_per_transaction: int = Field(default=_LIMITS.max_items_per_transaction, ge=1)
    max_future_skew_s: float = Field(default=_LIMITS.max_future_skew_ms / 1000, ge=0)
    min_event_time_ms: int = Field(default=_LIMITS.min_event_time_ms, ge=0)  # 2000-01-01: older timestamps are absurd
    # fields a contract does not declare: "ignore" (counted in streamproc_unknown_fields_total, the rest applied:
    # a producer may add an optional field before every consumer knows it) or "reject" (dead-lettered)
    unknown_fields: Literal["ignore", "reject"] = _LIMITS.unknown_fields
    # a dead letter keeps the original key and value bytes up to this size each; a larger one keeps its size, its
    # SHA-256 and a preview (the record itself stays on its input topic, at the offset the dead letter names).
    # Bounded so that a dead letter (base64 is 4/3 of the bytes) always fits the broker's 1 MB record limit.
    dead_letter_max_original_bytes: int = Field(default=_LIMITS.dead_letter_max_original_bytes, ge=0, le=512 * 1024)
    # a batch step that fails with an error that is not a lost connection or a timeout is tried this many times;
    # then the worker stops with a non-zero exit (what can be isolated, an event or an output, is dead-lettered
    # before that: see README "Dead letters")
    step_max_attempts: int = Field(default=3, ge=1)
    # test hook: an event with this event id makes its customer's step raise after the fold (fault-injection
    # tests of the isolation path; never set in production)
    fault_inject_event_id: str | None = None

    # --- event time
    allowed_lateness_s: float = Field(default=_FOLD.allowed_lateness_ms / 1000, ge=0)
    late_event_policy: Literal["apply", "dlq"] = "apply"
    dedup_horizon_s: float = Field(default=_FOLD.dedup_horizon_ms / 1000, ge=0)
    # 0 would forget every id at once: no deduplication at all
    dedup_max_ids: int = Field(default=_FOLD.dedup_max_ids, ge=1)

    # --- features
    session_gap_s: float = Field(default=_FOLD.session_gap_ms / 1000, gt=0)
    windows_days: tuple[Annotated[int, Field(ge=1)], ...] = Field(default=_FOLD.windows_days, min_length=1)
    lifecycle_new_days: int = Field(default=_FOLD.new_days, ge=1)
    lifecycle_at_risk_days: int = Field(default=_FOLD.at_risk_days, ge=1)  # below lifecycle_churned_days
    lifecycle_churned_days: int = Field(default=_FOLD.churned_days, ge=1)
    clv_period_days: int = Field(default=_FOLD.clv_period_days, ge=1)
    clv_periods: int = Field(default=_FOLD.clv_periods, ge=1)
    clv_discount_rate: float = Field(default=_FOLD.clv_discount_rate, ge=0)
    clv_retention_probability: Probability = _FOLD.clv_retention_probability
    tier_high_spend: float = Field(default=_FOLD.tier_high, ge=0)
    tier_medium_spend: float = Field(default=_FOLD.tier_medium, ge=0)  # below tier_high_spend
    sweep_interval_s: float = Field(default=3600.0, gt=0)  # event time between inactivity sweeps
    # customers the sweep refreshes per batch at most: a snapshot instant that visits every live customer is
    # spread over the following batches (and continued between batches) instead of stalling ingest
    sweep_budget: int = Field(default=250, ge=1)
    # unset: the watermark waits for both input topics (replays are deterministic however far they drift
    # apart); set: a topic trailing the other by more than this much event time (or silent) stops holding it
    max_source_skew_s: float | None = Field(default=None, ge=0)

    # --- models (off: a pure feature-store worker, no snapshots, scores, alerts or trainer)
    models_enabled: bool = True
    # every worker runs a trainer as a member of the trainer group, and the one that owns the training
    # partition learns; false: a scoring-only worker (run `streamproc trainer` alone, or freeze the checkpoint)
    trainer_enabled: bool = True
    trainer_metrics_port: Port | None = None  # `streamproc trainer` serves /metrics here when set
    churn_horizon_days: int = Field(default=_CHURN.horizon_days, ge=1)
    snapshot_cadence_days: int = Field(default=_CHURN.cadence_days, ge=1)
    churn_label_on: Literal["purchase", "activity"] = _CHURN.label_on
    # churn probabilities, ordered: alert_rearm_threshold < alert_threshold <= risk_high <= risk_critical (an
    # alert is raised at alert_threshold and graded medium/high/critical by the risk levels; ORDER_RULES)
    alert_threshold: float = Field(default=_CHURN.alert_threshold, gt=0, le=1)
    alert_rearm_threshold: Probability = _CHURN.rearm_threshold  # 0: never re-armed (one alert per customer)
    alert_cooldown_days: float = Field(default=_CHURN.cooldown_days, ge=0)
    risk_high: Probability = _CHURN.high_risk
    risk_critical: Probability = _CHURN.critical_risk
    retention_actions: dict[str, dict[str, str]] | None = None  # value tier -> risk level -> action
    # alerts are decided on this event-time grid (UTC midnights): a silent customer's rising risk is seen within it;
    # the sweep visits every live customer at each instant (what that costs: bench/README.md)
    alert_cadence_days: int = Field(default=_CHURN.alert_cadence_days, ge=1)
    # the most alerts sent per event-time day per value tier ({"high": 50, "medium": 100, "low": 200}; a tier left
    # out, or no budget at all: unlimited), filled in order of value at risk; the rest are counted, not sent. Split
    # over the input partitions declared in topics.toml (each closes its days on its own), rounded up
    alert_daily_budget: dict[str, int] | None = None
    classifier: Literal["logreg", "hat", "arf"] = _MODEL.classifier
    segmenter: Literal["kmeans", "streamkmeans"] = _MODEL.segmenter
    n_segments: int = Field(default=_MODEL.n_segments, ge=2, le=50)  # k-means: one segment segments nothing
    kmeans_halflife: float = Field(default=_MODEL.kmeans_halflife, gt=0, le=1)  # river: a centre's step toward a point
    model_seed: int = _MODEL.seed
    checkpoint_interval_s: float = Field(default=5.0, gt=0)
    checkpoint_keep: int = Field(default=10, ge=1)
    model_reload_s: float = Field(default=2.0, gt=0)
    # event-time silence after which a customer's features are dropped
    expire_after_days: int = Field(default=400, ge=1)

    # --- recommendations (need models_enabled: the co-purchase model is learned by the trainer)
    rec_k: int = Field(default=_REC.k, ge=1, le=100)
    # co-purchase and best-seller counts halve every this many event days
    rec_halflife_days: float = Field(default=_REC.halflife_days, gt=0)
    rec_max_pairs: int = Field(default=_REC.max_pairs, ge=1)  # memory bound of the co-purchase pair counts
    rec_max_items: int = Field(default=_REC.max_items, ge=1)
    rec_min_pair_count: float = Field(default=_REC.min_pair_count, ge=0)
    rec_exclude_bought_days: int = Field(default=_REC.exclude_bought_days, ge=0)
    rec_viewed_days: int = Field(default=_REC.viewed_days, ge=0)
    rec_catalogue_days: int = Field(default=_REC.catalogue_days, ge=1)  # not sold this long: out of the catalogue
    rec_weight_bought_together: float = Field(default=_REC.weight_bought_together, ge=0)
    rec_weight_viewed_not_bought: float = Field(default=_REC.weight_viewed_not_bought, ge=0)
    rec_weight_popular_in_segment: float = Field(default=_REC.weight_popular_in_segment, ge=0)
    rec_excluded_products: frozenset[str] = frozenset()  # withdrawn from the catalogue: never recommended

    # --- the control group: this share of alerted customers is marked "control": true and must not be contacted
    control_share: Probability = 0.1
    # the key of the hash that picks them (per customer and month); unset: the app id, which anyone can compute
    control_key: SecretStr | None = None

    # --- the retention ledger (streamproc retention): an alert's outcome is whether the customer bought within this
    # many days of event time after it, and for how much
    outcome_days: int = Field(default=30, ge=1)
    retention_metrics_port: Port | None = None  # /metrics of `streamproc retention` when set

    # --- alert delivery (streamproc forward alerts)
    webhook_url: str | None = None  # where the forwarder POSTs alert records (or --url)
    webhook_secret: SecretStr | None = None  # the HMAC-SHA256 key of the X-Streamproc-Signature header (required)
    forward_max_attempts: int = Field(default=8, ge=1)  # then the record goes to alerts-undeliverable
    forward_timeout_s: float = Field(default=10.0, gt=0)  # one POST
    forward_backoff_base_s: float = Field(default=0.5, gt=0)  # the wait after the first failure; doubles
    forward_backoff_cap_s: float = Field(default=60.0, gt=0)
    forward_metrics_port: Port | None = None  # /metrics of the forwarder when set

    @field_validator("http_token", "pseudonymize_key", "webhook_secret", "control_key", "model_signing_key")
    @classmethod
    def _usable_secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            return value
        secret = value.get_secret_value()
        # set but blank protects nothing: "Bearer " would open /customers/*, and a blank HMAC key is no secret
        if not secret.strip():
            raise ValueError("must not be blank (unset it to turn the feature off)")
        # a server strips a header's surrounding whitespace: a token read with a trailing newline never matches
        if info.field_name == "http_token" and secret != secret.strip():
            raise ValueError("must not start or end with whitespace")
        return value

    @field_validator("alert_daily_budget")
    @classmethod
    def _budget_tiers(cls, budget: dict[str, int] | None) -> dict[str, int] | None:
        unknown = [tier for tier in budget or {} if tier not in VALUE_TIERS]
        if unknown:
            raise ValueError(f"must be keyed by value tier ({', '.join(VALUE_TIERS)}); unknown: {', '.join(unknown)}")
        negative = [tier for tier, n in (budget or {}).items() if n < 0]
        if negative:
            raise ValueError(f"must not be negative: {', '.join(negative)}")
        return budget

    @field_validator("retention_actions")
    @classmethod
    def _known_keys(cls, table: dict[str, dict[str, str]] | None) -> dict[str, dict[str, str]] | None:
        # a key that is never looked up would silently leave the default action in place
        rows = (table or {}).items()
        unknown = [tier for tier, _ in rows if tier not in VALUE_TIERS]
        unknown += [f"{tier}.{level}" for tier, row in rows for level in row if level not in RISK_LEVELS]
        if unknown:
            raise ValueError(f"must be keyed by value tier ({', '.join(VALUE_TIERS)}), then risk level "
                             f"({', '.join(RISK_LEVELS)}); unknown: {', '.join(unknown)}")
        return table

    @model_validator(mode="after")
    def _rules(self) -> Settings:
        broken = [
            InitErrorDetails(type=PydanticCustomError("settings_rule", f"{verb} {env_name(b)}={getattr(self, b)!r}"),
                             loc=(a,), input=getattr(self, a))
            for a, relation, b in ORDER_RULES
            for holds, verb in [_RELATIONS[relation]]
            if not holds(getattr(self, a), getattr(self, b))
        ]
        # a customer is expired only after their last churn labels matured: snapshots are taken until 3 horizons of
        # silence (ChurnConfig.silent_horizons), and each matures at the first snapshot instant a horizon later
        cadence = self.snapshot_cadence_days
        labelled = 3 * self.churn_horizon_days + -(-self.churn_horizon_days // cadence) * cadence
        if self.expire_after_days <= labelled:
            broken.append(InitErrorDetails(
                type=PydanticCustomError("settings_rule", f"must exceed {labelled} days (3 x "
                                         f"{env_name('churn_horizon_days')} + the days to a snapshot's label): a "
                                         "customer must not be dropped before their last churn labels matured"),
                loc=("expire_after_days",), input=self.expire_after_days))
        if self.snapshot_cadence_days % self.alert_cadence_days:
            broken.append(InitErrorDetails(
                type=PydanticCustomError("settings_rule", f"must divide {env_name('snapshot_cadence_days')}="
                                         f"{self.snapshot_cadence_days}: a snapshot instant is an alert instant"),
                loc=("alert_cadence_days",), input=self.alert_cadence_days))
        if broken:
            # one error per broken rule, at its first variable, so that all are reported and each like a range
            # error (pydantic-core passes a ValidationError raised in a validator on with its line errors)
            raise ValidationError.from_exception_data(type(self).__name__, broken)
        return self

    @model_validator(mode="after")
    def _local_defaults(self) -> Settings:
        if not self.kafka_bootstrap:
            self.kafka_bootstrap = f"127.0.0.1:{self.kafka_port}"
        if not self.redis_url:
            self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        if self.redis_cluster and self.redis_url.split("://", 1)[0] in ("redis", "rediss"):
            scheme, rest = self.redis_url.split("://", 1)
            self.redis_url = f"{scheme}+cluster://{rest.split('/', 1)[0]}/0"  # a cluster has database 0 only
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


SECRET_FIELDS = frozenset(
    name for name, info in Settings.model_fields.items() if SecretStr in (info.annotation, *get_args(info.annotation))
)
# STREAMPROC_ variables read outside Settings on purpose, so not typos: the test suite's switch to require the
# compiled core (tests/unit/test_compiled_core.py; `make test` sets it)
ENV_READ_ELSEWHERE = frozenset({"STREAMPROC_REQUIRE_COMPILED", "STREAMPROC_PURE_PYTHON"})  # tests; setup.py


class SettingsError(ValueError):
    """Invalid configuration: one line per problem, each naming its environment variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(problems))
        self.problems = problems


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _shown(field: str, value: object) -> str:
    if field in SECRET_FIELDS and value is not None:
        return "**********"
    # as given; quoted where it would not read back plainly (empty, surrounding whitespace, a newline)
    if isinstance(value, str) and value and value.isprintable() and value == value.strip():
        return value
    return repr(value)


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per error: ``STREAMPROC_X=<value given, secrets masked> <rule>``, no traceback."""
    lines = []
    for error in exc.errors(include_url=False):
        # pydantic says "Input should be ...", "String should match ...", and "Value error, ..." for a ValueError
        rule = re.sub(r"^\w+ should\b", "must", error["msg"].removeprefix("Value error, "))
        if not error["loc"]:
            lines.append(rule)
            continue
        field, *inner = (str(part) for part in error["loc"])
        where = env_name(field) + "".join(f"[{part}]" for part in inner)  # [1]: an item of a list setting
        lines.append(f"{where}={_shown(field, error['input'])}{' ' if rule.startswith('must') else ': '}{rule}")
    return lines


def load_settings() -> Settings:
    """Settings from the environment, or a SettingsError listing what is wrong (one line per problem)."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from None
    except EnvParseError as exc:
        # a list or dict setting is JSON in the environment; pydantic-settings stops at the first that is not
        match = re.search(r'field "(\w+)"', str(exc))
        if match is None:
            raise SettingsError([str(exc)]) from None
        field = match[1]
        given = next((value for var, value in os.environ.items() if var.upper() == env_name(field)), "")
        raise SettingsError([f"{env_name(field)}={_shown(field, given)} must be JSON ({exc.__cause__})"]) from None


def env_warnings(environ: Mapping[str, str] = os.environ) -> list[str]:
    """A line for each STREAMPROC_* variable that nothing reads: a typo would otherwise be silently ignored."""
    known = {env_name(name) for name in Settings.model_fields} | ENV_READ_ELSEWHERE
    # compared without the prefix, which every name shares and would make anything look close
    suffixes = sorted(name.removeprefix(ENV_PREFIX) for name in known)
    lines = []
    for var in sorted(environ):
        name = var.upper()  # pydantic-settings matches names in any case
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1)
            lines.append(f"{var} matches no setting" + (f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""))
    return lines


def settings_from_env() -> Settings:
    """The settings from the environment; a configuration error ends the command (status 2) with one line per
    problem instead of a traceback, and a STREAMPROC_ variable that nothing reads gets a warning."""
    for warning in env_warnings():
        print(f"warning: {warning}", file=sys.stderr)
    try:
        return load_settings()
    except SettingsError as exc:
        print("error: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None
