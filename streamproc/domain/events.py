"""Event contracts (pydantic v2, strict) and decoding of raw Kafka payloads.

Decoding never raises: it returns either a valid event or a :class:`Rejection` with a readable reason,
so that bad input becomes data (a dead-letter record) instead of a crashed worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

Id = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=False)]
Text = Annotated[str, StringConstraints(max_length=256)]


def parse_event_time(value: object) -> int:
    """Event time as epoch milliseconds, from RFC 3339 with an offset or integer epoch milliseconds."""
    if isinstance(value, bool):
        raise ValueError("ts must be RFC 3339 with an offset or integer epoch milliseconds")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"ts is not RFC 3339: {value[:40]!r}") from exc
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            raise ValueError("ts has no UTC offset (naive timestamps are rejected)")
        return int(parsed.timestamp() * 1000)
    raise ValueError("ts must be RFC 3339 with an offset or integer epoch milliseconds")


class _Event(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    event_id: Id
    customer_id: Id
    ts: int = Field(description="Event time: RFC 3339 with an offset, or integer epoch milliseconds.")

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, value: object) -> int:
        return parse_event_time(value)


class Item(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    product_id: Id
    category: Id
    quantity: int = Field(ge=1, le=10_000)
    unit_price: float = Field(ge=0, le=1e7, allow_inf_nan=False)


class Transaction(_Event):
    """A purchase or a refund. ``amount`` is the order total in ``currency``."""

    order_id: Id
    type: Literal["purchase", "refund"]
    amount: float = Field(ge=0, le=1e8, allow_inf_nan=False)
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
    items: list[Item] = Field(default_factory=list, max_length=10_000)


ClickAction = Literal["page_view", "product_view", "search", "add_to_cart", "remove_from_cart", "checkout"]


class Click(_Event):
    """A click-stream event within a browsing session."""

    session_id: Id
    action: ClickAction
    product_id: Id | None = None
    category: Id | None = None
    query: Text | None = None
    duration_s: float | None = Field(default=None, ge=0, le=86_400, allow_inf_nan=False)


Event = Transaction | Click

EVENT_MODELS: dict[str, type[_Event]] = {"transactions": Transaction, "clicks": Click}


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a payload could not become an event. ``reason`` is a short stable code for metrics."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    max_payload_bytes: int = 64 * 1024
    max_items_per_transaction: int = 200
    max_future_skew_ms: int = 24 * 3600 * 1000
    min_event_time_ms: int = 946_684_800_000


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def decode_event(
    kind: str, payload: bytes | None, limits: DecodeLimits, now_ms: int | None
) -> Event | Rejection:
    """Decode and validate one raw payload from input topic ``kind`` (``clicks`` or ``transactions``).

    ``now_ms`` bounds future skew: it is the record's broker timestamp (the edge's notion of now), not
    the worker's clock, so a replay decides the same way as the live run.
    """
    model = EVENT_MODELS.get(kind)
    if model is None:
        return Rejection("unknown_topic", f"no event contract for topic kind {kind!r}")
    if not payload:
        return Rejection("empty_payload", "the message has no value")
    if len(payload) > limits.max_payload_bytes:
        return Rejection(
            "payload_too_large", f"{len(payload)} bytes exceeds the limit of {limits.max_payload_bytes}"
        )
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return Rejection("invalid_json", f"not valid UTF-8 JSON: {exc}"[:300])
    if not isinstance(data, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(data).__name__}")
    try:
        event = model.model_validate(data)
    except ValidationError as exc:
        return Rejection("validation", _summarise(exc))
    if isinstance(event, Transaction) and len(event.items) > limits.max_items_per_transaction:
        return Rejection(
            "too_many_items",
            f"{len(event.items)} items exceeds the limit of {limits.max_items_per_transaction}",
        )
    if event.ts < limits.min_event_time_ms:
        return Rejection("absurd_timestamp", f"event time {event.ts} ms is before {limits.min_event_time_ms}")
    if now_ms is not None and event.ts > now_ms + limits.max_future_skew_ms:
        return Rejection(
            "future_timestamp",
            f"event time is {(event.ts - now_ms) / 1000:.0f} s ahead of the record's timestamp",
        )
    return event  # type: ignore[return-value]


def encode_event(event: Event) -> bytes:
    """The wire form of an event (what producers send)."""
    return orjson.dumps(event.model_dump(mode="json", exclude_none=True))
