"""Event contracts (pydantic v2, strict) and decoding of raw Kafka payloads.

Decoding never raises: it returns either a valid event or a :class:`Rejection` with a readable reason,
so that bad input becomes data (a dead-letter record) instead of a crashed worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Literal

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

MAX_ITEMS_PER_TRANSACTION = 200

Id = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=False)]
Text = Annotated[str, StringConstraints(max_length=256)]


# RFC 3339 date-time with an offset, as JSON Schema's "date-time" format reads it (the published schema carries
# this pattern; the ranges of each part are checked here, a day of the month by the calendar). Years from 2000 on:
# older event times are absurd (``absurd_timestamp`` for epoch milliseconds). ASCII digits only, and nothing after
# the offset (the lookahead keeps a trailing newline out, where ``$`` alone would allow one in Python).
RFC3339_PATTERN = (
    r"^([2-9][0-9]{3})-(0[1-9]|1[0-2])-([0-9]{2})[Tt]([01][0-9]|2[0-3]):([0-5][0-9]):([0-5][0-9])(\.[0-9]+)?"
    r"([Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$(?![\s\S])"
)
_RFC3339 = re.compile(RFC3339_PATTERN)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
TS_ERROR = "ts must be RFC 3339 with an offset or integer epoch milliseconds"


def parse_event_time(value: object) -> int:
    """Event time as epoch milliseconds, from RFC 3339 with an offset or integer epoch milliseconds (a JSON number
    with no fraction, 1.767e12 included: JSON Schema counts it as an integer too)."""
    if isinstance(value, bool):
        raise ValueError(TS_ERROR)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = _RFC3339.match(value)
        if match is None:
            raise ValueError(f"ts is not RFC 3339 with an offset: {value[:40]!r}")
        year, month, day, hour, minute, second, fraction, offset = match.groups()
        micros = int((fraction or ".0")[1:7].ljust(6, "0"))
        if offset in ("Z", "z"):
            zone = UTC
        else:
            sign = 1 if offset[0] == "+" else -1
            zone = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
        try:
            parsed = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micros, zone)
        except ValueError as exc:  # a day the month does not have
            raise ValueError(f"ts is not a calendar date: {value[:40]!r}") from exc
        return (parsed - _EPOCH) // _MS  # exact: no float on the way
    raise ValueError(TS_ERROR)


def _integral(value: object) -> object:
    """A JSON number with no fraction is an integer (as JSON Schema reads it): 2.0 items are 2 items."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Count = Annotated[int, BeforeValidator(_integral)]


# Unknown fields are not the models' business: ``decode_event`` finds them first and, by policy, ignores or rejects
# them (``DecodeLimits.unknown_fields``), so the models themselves ignore extras.
class _Event(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    event_id: Id
    customer_id: Id
    ts: Annotated[int, WithJsonSchema({
        "description": "Event time: RFC 3339 with an offset (from the year 2000 on), or epoch milliseconds.",
        "anyOf": [
            {"type": "integer", "minimum": 946_684_800_000},
            {"type": "string", "format": "date-time", "pattern": RFC3339_PATTERN},
        ],
    })]

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, value: object) -> int:
        return parse_event_time(value)


class Item(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    product_id: Id
    category: Id
    quantity: Count = Field(ge=1, le=10_000)
    unit_price: float = Field(ge=0, le=1e7, allow_inf_nan=False)


class Transaction(_Event):
    """A purchase or a refund. ``amount`` is the order total in ``currency``."""

    order_id: Id
    type: Literal["purchase", "refund"]
    amount: float = Field(ge=0, le=1e8, allow_inf_nan=False)
    # the lengths keep "EUR\n" out of the schema too (a JSON Schema validator in Python lets "$" match before it)
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$", min_length=3, max_length=3)]
    # the schema says the default limit (``max_items_per_transaction``); more is ``too_many_items``
    items: list[Item] = Field(default_factory=list, max_length=10_000,
                              json_schema_extra={"maxItems": MAX_ITEMS_PER_TRANSACTION})


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
    max_items_per_transaction: int = MAX_ITEMS_PER_TRANSACTION
    max_future_skew_ms: int = 24 * 3600 * 1000
    min_event_time_ms: int = 946_684_800_000
    unknown_fields: Literal["ignore", "reject"] = "ignore"
    dead_letter_max_original_bytes: int = 256 * 1024


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
    return decode_event_noting_unknown(kind, payload, limits, now_ms)[0]


def decode_event_noting_unknown(
    kind: str, payload: bytes | None, limits: DecodeLimits, now_ms: int | None
) -> tuple[Event | Rejection, tuple[str, ...]]:
    """``decode_event``, with the undeclared fields it ignored (none unless ``limits.unknown_fields`` is
    "ignore"): the caller counts them, so a producer running ahead of the contract is seen."""
    model = EVENT_MODELS.get(kind)
    if model is None:
        return Rejection("unknown_topic", f"no event contract for topic kind {kind!r}"), ()
    if not payload:
        return Rejection("empty_payload", "the message has no value"), ()
    if len(payload) > limits.max_payload_bytes:
        return Rejection(
            "payload_too_large", f"{len(payload)} bytes exceeds the limit of {limits.max_payload_bytes}"
        ), ()
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return Rejection("invalid_json", f"not valid UTF-8 JSON: {exc}"[:300]), ()
    if not isinstance(data, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(data).__name__}"), ()
    unknown = _unknown_fields(data, DECLARED[kind])
    if unknown and limits.unknown_fields == "reject":
        return Rejection("validation", "; ".join(f"{name}: not a declared field" for name in unknown[:5])), ()
    try:
        event = model.model_validate(data)
    except ValidationError as exc:
        return Rejection("validation", _summarise(exc)), ()
    if isinstance(event, Transaction) and len(event.items) > limits.max_items_per_transaction:
        return Rejection(
            "too_many_items",
            f"{len(event.items)} items exceeds the limit of {limits.max_items_per_transaction}",
        ), ()
    if event.ts < limits.min_event_time_ms:
        return Rejection("absurd_timestamp", f"event time {event.ts} ms is before {limits.min_event_time_ms}"), ()
    if now_ms is not None and event.ts > now_ms + limits.max_future_skew_ms:
        return Rejection(
            "future_timestamp",
            f"event time is {(event.ts - now_ms) / 1000:.0f} s ahead of the record's timestamp",
        ), ()
    return event, unknown  # type: ignore[return-value]


ITEM_FIELDS = frozenset(Item.model_fields)
# the fields each input's contract declares (``items`` entries are checked against ITEM_FIELDS)
DECLARED: dict[str, frozenset[str]] = {kind: frozenset(m.model_fields) for kind, m in EVENT_MODELS.items()}


def _unknown_fields(data: dict[str, object], declared: frozenset[str]) -> tuple[str, ...]:
    """Undeclared field names, ``items[].name`` for those of an order line; () in the usual case, found without
    building a set."""
    unknown: tuple[str, ...] = ()
    if not declared.issuperset(data):
        unknown = tuple(sorted(data.keys() - declared))
    lines = data.get("items")
    if isinstance(lines, list):
        for line in lines:
            if isinstance(line, dict) and not ITEM_FIELDS.issuperset(line):
                unknown += tuple(f"items[].{name}" for name in sorted(line.keys() - ITEM_FIELDS))
    return unknown


def encode_event(event: Event) -> bytes:
    """The wire form of an event (what producers send)."""
    return orjson.dumps(event.model_dump(mode="json", exclude_none=True))
