"""The records streamproc publishes, as the classes the pipeline builds on its hot path: each is serialised once,
by orjson, straight from these objects, and ``streamproc/contracts/schemas/`` is generated from these same classes
(``streamproc.schemas``). Plain slotted dataclasses, not pydantic models: one is built per output, and validating
what the pipeline itself made would only cost time; pydantic reads their annotations for the schemas and for
``validate`` (tests, tools, a consumer checking what it read).

Field order is the order of the keys in the published JSON."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, with_config
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

# The version of every output record's layout (``schema_version`` in each record): raised when a field is
# removed or changes meaning; adding an optional field keeps it (consumers ignore fields they do not know).
OUTPUT_SCHEMA_VERSION = 2  # 2: alerts give reasons in words, CLV with the churn risk, value at risk; cleared records

PREVIEW_CHARS = 1000  # a dead letter's readable preview of the value

R = TypeVar("R")

RiskLevel = Literal["medium", "high", "critical"]
ValueTier = Literal["low", "medium", "high"]
ClearedBy = Literal["purchase", "risk_fell"]
RecommendationTrigger = Literal["purchase", "product_view", "add_to_cart", "churn_alert"]

_CLOSED = ConfigDict(extra="forbid")  # a record with a field its contract does not have is invalid


class DeadLetter(BaseModel):
    """A record that could not be applied (or an output the broker refused), with where it came from and a bounded
    copy of its bytes: the whole key and value up to ``dead_letter_max_original_bytes`` each, otherwise their size
    and SHA-256 only (the original stays on its input topic at ``partition``/``offset``). A pydantic model: rare,
    and re-read when the broker refuses a dead letter itself."""

    model_config = _CLOSED

    schema_version: int = OUTPUT_SCHEMA_VERSION
    dlq_id: str = Field(description="source_topic:partition:offset (an output: output:topic:output id); unique")
    reason: str = Field(description="Stable reason code, e.g. invalid_json, validation, late_event")
    detail: str = Field(description="Readable explanation")
    source_topic: str = Field(description="The input topic (output_rejected: the output topic it was meant for)")
    partition: int | None = Field(default=None, description="Input partition (None for output_rejected)")
    offset: int | None = Field(default=None, description="Input offset (None for output_rejected)")
    record_timestamp_ms: int | None = None
    key_size: int | None = Field(default=None, description="Key length in bytes (None: no key)")
    key_sha256: str | None = Field(default=None, description="SHA-256 of the key bytes, hex")
    key_b64: str | None = Field(default=None, description="Original key bytes, base64 (absent over the size limit)")
    value_size: int | None = Field(default=None, description="Value length in bytes (None: no value)")
    value_sha256: str | None = Field(default=None, description="SHA-256 of the value bytes, hex")
    value_b64: str | None = Field(
        default=None, description="Original value bytes, base64 (absent when value_size is over the size limit)")
    value_preview: str | None = Field(
        default=None, description=f"The value's first {PREVIEW_CHARS} characters as UTF-8 (undecodable bytes replaced)")

    @classmethod
    def of_bytes(
        cls, dlq_id: str, reason: str, detail: str, source_topic: str, key: bytes | None, value: bytes | None,
        max_original_bytes: int, partition: int | None = None, offset: int | None = None,
        record_timestamp_ms: int | None = None,
    ) -> DeadLetter:
        """A dead letter whose size is bounded whatever the record's: bytes over ``max_original_bytes`` are
        described (size, digest, preview), not copied."""
        return cls(
            dlq_id=dlq_id, reason=reason, detail=detail[:2000], source_topic=source_topic, partition=partition,
            offset=offset, record_timestamp_ms=record_timestamp_ms,
            key_size=None if key is None else len(key),
            key_sha256=None if key is None else hashlib.sha256(key).hexdigest(),
            key_b64=_kept(key, max_original_bytes),
            value_size=None if value is None else len(value),
            value_sha256=None if value is None else hashlib.sha256(value).hexdigest(),
            value_b64=_kept(value, max_original_bytes),
            # at most 4 bytes a character: the slice holds the preview's characters, whatever they are
            value_preview=None if value is None else value[: 4 * PREVIEW_CHARS].decode("utf-8", "replace")[
                :PREVIEW_CHARS],
        )


def _kept(data: bytes | None, limit: int) -> str | None:
    return base64.b64encode(data).decode() if data is not None and len(data) <= limit else None


@with_config(_CLOSED)
class Reason(TypedDict):
    """Why a customer is at risk, in business words (built by ``domain.alerts.explain``), with the coded model input
    it reads."""

    code: Annotated[str, Field(description="overdue, last_purchase, single_purchase, never_bought, spend_down, "
                                           "browsing_down or no_visit")]
    text: Annotated[str, Field(description="The reason in words and units, e.g. 'no purchase for 84 days, 3.0× "
                                           "this customer's usual 28-day gap between purchases'")]
    feature: Annotated[str, Field(description="The model input it reads")]
    value: Annotated[float, Field(description="That input's value, as the model saw it")]


@with_config(_CLOSED)
class RfmScores(TypedDict):
    """A buyer's RFM scores (1-5, against the live buyers' quintiles) and named segment (``domain.rfm``)."""

    r: int
    f: int
    m: int
    segment: str


class RecommendedItem(TypedDict):
    """One recommended product (built by ``domain.recommend.recommend``)."""

    product_id: str
    score: float
    reason: Literal["bought_together", "popular_in_segment", "viewed_not_bought"]


@dataclass(slots=True, kw_only=True)
class ChurnAlert:
    """A customer whose churn probability crossed the alert threshold, sent within its day's budget for the value
    tier in order of value at risk."""

    __pydantic_config__: ClassVar[ConfigDict] = _CLOSED
    schema_version: int = OUTPUT_SCHEMA_VERSION
    record: Literal["alert"] = "alert"
    alert_id: Annotated[str, Field(description="customer : alert instant; never random")]
    customer_id: str
    ts: Annotated[int, Field(description="The alert instant: a UTC midnight (event time, epoch milliseconds)")]
    probability: Annotated[float, Field(ge=0, le=1)]
    risk_level: RiskLevel
    segment: str | None = None
    value_tier: ValueTier
    clv: Annotated[float, Field(description="Predictive CLV with the churn probability as retention term (the "
                                            "lookup's formula)")]
    value_at_risk: Annotated[float, Field(description="probability × clv: the alert's priority")]
    lifecycle_stage: str | None = None
    rfm: Annotated[RfmScores | None, Field(
        description="RFM scores and segment at the alert instant (None: no purchase yet, or no quintiles yet)")] = None
    model_version: int
    scored_by: Annotated[str, Field(description="The churn scorer served: model, bgnbd or recency")]
    reasons: Annotated[list[Reason], Field(description="Most telling first")]
    action: Annotated[str, Field(description="Recommended retention action")]
    recommended_items: Annotated[
        list[RecommendedItem], Field(description="Next best action: the items most likely to bring them back")]
    control: Annotated[bool, Field(description="In the control group: do NOT contact this customer (they measure "
                                               "what contacting the others does)")] = False


@dataclass(slots=True, kw_only=True)
class AlertCleared:
    """An alert that no longer holds: the customer bought again, or their risk fell below the re-arm threshold.
    Follows its alert on the alerts topic (same key: the customer id)."""

    __pydantic_config__: ClassVar[ConfigDict] = _CLOSED
    schema_version: int = OUTPUT_SCHEMA_VERSION
    record: Literal["cleared"] = "cleared"
    alert_id: Annotated[str, Field(description="The alert this clears")]
    customer_id: str
    ts: Annotated[int, Field(description="The alert-grid instant it was seen at (event time, epoch milliseconds)")]
    cleared_by: ClearedBy
    days: Annotated[int, Field(description="Whole days from the alert to the purchase (or to the instant the risk "
                                           "was seen below the re-arm threshold)")]
    probability: Annotated[float | None, Field(description="The churn probability at ``ts``")] = None


AlertRecord = Annotated[ChurnAlert | AlertCleared, Field(discriminator="record")]


class UndeliverableAlert(BaseModel):
    """An alert record the webhook forwarder gave up on (``streamproc forward alerts``): the receiver rejected it
    (a 4xx) or every attempt failed. Rare: a pydantic model."""

    model_config = _CLOSED

    schema_version: int = OUTPUT_SCHEMA_VERSION
    idempotency_key: str | None = Field(description="The key every attempt carried (None: not a JSON object)")
    attempts: int = Field(ge=0, description="POSTs made")
    last_error: str = Field(description="The last attempt's error: an HTTP status and reason, or a network error")
    last_status: int | None = Field(default=None, description="The last HTTP status (None: no response)")
    url: str = Field(description="Where it was meant to go")
    alert: dict[str, Any] | None = Field(default=None, description="The alert record as it was on the alerts topic")
    raw: str | None = Field(default=None, description="The record's first bytes, when it was not a JSON object")


@dataclass(slots=True, kw_only=True)
class Recommendation:
    """Products recommended to one customer, with the reason for each."""

    __pydantic_config__: ClassVar[ConfigDict] = _CLOSED
    schema_version: int = OUTPUT_SCHEMA_VERSION
    recommendation_id: Annotated[
        str, Field(description="customer : trigger : triggering event id (stable across replays)")]
    customer_id: str
    ts: Annotated[int, Field(description="Event time, epoch milliseconds")]
    trigger: RecommendationTrigger
    items: Annotated[list[RecommendedItem], Field(description="Best first, at most k")]
    strategy_version: str
    model_version: Annotated[int | None, Field(description="Checkpoint whose rules and favourites ranked them")] = None
    segment: str | None = None


@dataclass(slots=True, kw_only=True)
class SegmentMove:
    """A customer's segment changed."""

    __pydantic_config__: ClassVar[ConfigDict] = _CLOSED
    schema_version: int = OUTPUT_SCHEMA_VERSION
    customer_id: str
    ts: int
    from_segment: int
    to_segment: int
    to_name: str | None = None
    model_version: int | None = None


# Training examples: the single trainer's input, with no customer id (``id`` is a digest of it).
ExampleId = Annotated[str, Field(description="digest of the customer id : snapshot instant or event id; unique")]


@dataclass(slots=True, kw_only=True)
class SegmentExample:
    """A customer's inputs to the segmenter at a snapshot instant."""

    __pydantic_config__: ClassVar[ConfigDict] = _CLOSED
    kind: Literal["segment"] = "segment"
    id: ExampleId
    ts: Annotated[int, Field(description="Snapshot instant (event time, epoch ms)")]
    x: dict[str, float]
    rfm: Annotated[list[float] | None, Field(
        description="A buyer's [days since the last purchase, purchases, net spend] at the instant (None: no "
                    "purchase yet): the population the RFM quintiles are drawn from")] = None


@dataclass(slots=True, kw_only=True)
class ChurnExample:
    """A matured churn label: the inputs at a snapshot instant and what happened within the horizon after it."""

    __pydantic_config__: ClassVar[ConfigDict] = _CLOSED
    kind: Literal["churn"] = "churn"
    id: ExampleId
    ts: Annotated[int, Field(description="Snapshot instant (event time, epoch ms)")]
    label: Annotated[int, Field(description="1: churned within the horizon, 0: bought again")]
    x: dict[str, float]
    p: Annotated[float | None, Field(description="Churn probability predicted at snapshot time")] = None
    v: Annotated[int | None, Field(description="Model version of that prediction")] = None
    scores: Annotated[dict[str, float] | None, Field(
        description="Every candidate churn score at snapshot time (model, bgnbd, recency), to judge them")] = None


@dataclass(slots=True, kw_only=True)
class BasketExample:
    """A purchase, for the co-purchase model and the hit rate of the recommendation shown before it."""

    __pydantic_config__: ClassVar[ConfigDict] = _CLOSED
    kind: Literal["basket"] = "basket"
    id: ExampleId
    ts: Annotated[int, Field(description="Purchase time (event time, epoch ms)")]
    items: Annotated[list[tuple[str, str, int]], Field(description="[product id, category, quantity] per line")]
    segment: Annotated[int | None, Field(description="The buyer's segment when they bought")] = None
    rec: Annotated[
        list[str] | None, Field(description="Items of the last recommendation shown before the purchase")] = None
    amount: Annotated[float | None, Field(description="Order total (spend share per segment)")] = None


TrainingExample = Annotated[SegmentExample | ChurnExample | BasketExample, Field(discriminator="kind")]


@dataclass(slots=True, kw_only=True)
class TrainingBatch:
    """One record of the training topic: the examples of one batch step, in the order they were made (a record
    per example cost the worker a producer call each: every live customer sends one at every snapshot instant).
    The trainer also reads records written by earlier versions: an array of examples, or one example object."""

    __pydantic_config__: ClassVar[ConfigDict] = _CLOSED
    schema_version: int = OUTPUT_SCHEMA_VERSION
    examples: list[TrainingExample]


# what each kind of example is built as (the trainer reads JSON back into these)
EXAMPLE_KINDS: dict[str, type[SegmentExample | ChurnExample | BasketExample]] = {
    "segment": SegmentExample, "churn": ChurnExample, "basket": BasketExample}

_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def adapter(record_type: Any) -> TypeAdapter[Any]:
    """The pydantic view of a record type (built once): its JSON Schema, and validation of data against it."""
    found = _ADAPTERS.get(record_type)
    if found is None:
        found = _ADAPTERS[record_type] = TypeAdapter(record_type)
    return found


def validate(record_type: Any, data: Any) -> Any:
    """``data`` (decoded JSON) as a ``record_type``, or pydantic's ValidationError saying what breaks its contract."""
    return adapter(record_type).validate_python(data)


def examples_of(record: Any) -> list[dict[str, Any]]:
    """The examples of one decoded training record, as JSON objects: a TrainingBatch, or, as written by earlier
    versions, an array of examples or one example."""
    if isinstance(record, dict) and "examples" in record:
        return list(record["examples"])
    return record if isinstance(record, list) else [record]


def record_of(record_type: type[R], data: dict[str, Any]) -> R:
    """A decoded record rebuilt as the class it was built as, without validation (it was made by a worker), and
    ignoring fields this version does not know (an optional field added later); TypeError if a field it needs
    is missing."""
    names = _FIELD_NAMES.get(record_type)
    if names is None:
        names = _FIELD_NAMES[record_type] = frozenset(f.name for f in fields(record_type))  # type: ignore[arg-type]
    return record_type(**{k: v for k, v in data.items() if k in names})


def example_of(data: dict[str, Any]) -> SegmentExample | ChurnExample | BasketExample:
    """A decoded example as the record it was built as (KeyError or TypeError if it is none of them)."""
    return record_of(EXAMPLE_KINDS[data["kind"]], data)


_FIELD_NAMES: dict[type, frozenset[str]] = {}
