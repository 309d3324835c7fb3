"""What a published input schema accepts is exactly what the worker applies: a corpus of valid and invalid events
goes through both `jsonschema` (with the "date-time" format checked, as a strict consumer does) and the worker's
decoder, and any disagreement fails.

Out of the schemas' reach, and so out of the corpus: the payload's size in bytes (``payload_too_large``) and an
event time ahead of the record's broker timestamp (``future_timestamp``): the decoder runs here without a record
timestamp. An RFC 3339 time in the first hours of 2000 with a positive offset (1999 in UTC) passes the schema's
year pattern and is ``absurd_timestamp`` to the worker; the corpus keeps clear of that hour.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator, FormatChecker

from streamproc.domain.events import DecodeLimits, Rejection, decode_event
from streamproc.topics import SCHEMAS_DIR

LIMITS = DecodeLimits()  # the defaults the schemas are generated with

CLICK = {"event_id": "e1", "customer_id": "c1", "ts": "2026-01-01T10:00:00+01:00", "session_id": "s1",
         "action": "product_view", "product_id": "p1", "category": "books", "query": "q", "duration_s": 12.5}
LINE = {"product_id": "p1", "category": "books", "quantity": 2, "unit_price": 15.0}
TXN = {"event_id": "t1", "customer_id": "c1", "ts": 1_767_261_600_000, "order_id": "o1", "type": "purchase",
       "amount": 30, "currency": "EUR", "items": [LINE]}

TIMES: list[Any] = [
    1_767_261_600_000, 946_684_800_000, 946_684_799_999, 0, -1, 1.767e12, 1.5e12 + 0.5, True, None, "", "x",
    "2026-01-01T10:00:00Z", "2026-01-01T10:00:00z", "2026-01-01t10:00:00+05:45", "2026-01-01T10:00:00.123456789Z",
    "2026-01-01T10:00:00", "2026-01-01 10:00:00Z", "2026-01-01T10:00Z", "2026-01-01T10:00:00Z\n",
    " 2026-01-01T10:00:00Z", "2026-02-29T10:00:00Z", "2028-02-29T10:00:00Z", "2026-02-30T00:00:00Z",
    "2026-13-01T00:00:00Z", "2026-12-31T24:00:00Z", "2026-12-31T23:60:00Z", "2026-12-31T23:59:60Z",
    "2026-01-01T10:00:00+24:00", "2026-01-01T10:00:00+0100", "1999-06-01T10:00:00Z", "0000-01-01T00:00:00Z",
    "20260101T100000Z", "2026-01-01T10:00:00.Z", "٢٠٢٦-01-01T10:00:00Z", [2026], {"t": 1},
]
IDS: list[Any] = ["a", "", "x" * 128, "x" * 129, " ", 5, None, True, ["a"], "é" * 128, "é" * 129]
FLOATS: list[Any] = [0, 0.0, -0.0, -0.01, 1, 1.5, 1e7, 1e7 + 1, 1e8, 1e8 + 1, "1", None, True, [1], 1e308]
COUNTS: list[Any] = [1, 0, -1, 2.0, 2.5, 10_000, 10_001, "2", None, True, 1e3]
TEXTS: list[Any] = ["", "q", "x" * 256, "x" * 257, 3, None]
CURRENCIES: list[Any] = ["EUR", "eur", "EU", "EURO", "EUR\n", "E1R", "", 978, None]

FIELD_VALUES: dict[str, dict[str, list[Any]]] = {
    "clicks": {
        "event_id": IDS, "customer_id": IDS, "session_id": IDS, "ts": TIMES,
        "action": ["page_view", "product_view", "search", "add_to_cart", "remove_from_cart", "checkout", "buy", "",
                   None, 1],
        "product_id": IDS, "category": IDS, "query": TEXTS,
        "duration_s": [*FLOATS, 86_400, 86_400.5],
    },
    "transactions": {
        "event_id": IDS, "customer_id": IDS, "order_id": IDS, "ts": TIMES,
        "type": ["purchase", "refund", "chargeback", "", None],
        "amount": FLOATS, "currency": CURRENCIES,
        "items": [[], None, "x", [LINE] * 200, [LINE] * 201, [1], [{}], [None]],
    },
}
LINE_VALUES: dict[str, list[Any]] = {"product_id": IDS, "category": IDS, "quantity": COUNTS,
                                     "unit_price": FLOATS}


def corpus() -> Iterator[tuple[str, str, Any]]:
    """(kind, label, event): each field of a valid event changed to each value, dropped, and an undeclared field
    added; the same for an order line; and some events that are not objects at all."""
    for kind, base in (("clicks", CLICK), ("transactions", TXN)):
        yield kind, "valid", base
        for name, values in FIELD_VALUES[kind].items():
            for value in values:
                yield kind, f"{name}={value!r:.40}", {**base, name: value}
            yield kind, f"without {name}", {k: v for k, v in base.items() if k != name}
        yield kind, "an undeclared field", {**base, "channel": "app"}
        yield kind, "only undeclared fields", {"channel": "app"}
        for value in ([], "x", 1, None, [base]):
            yield kind, f"not an object: {value!r:.40}", value
    for name, values in LINE_VALUES.items():
        for value in values:
            yield "transactions", f"items[].{name}={value!r:.40}", {**TXN, "items": [{**LINE, name: value}]}
        yield "transactions", f"items[] without {name}", {**TXN, "items": [{k: v for k, v in LINE.items()
                                                                           if k != name}]}
    yield "transactions", "items[] with an undeclared field", {**TXN, "items": [{**LINE, "colour": "red"}]}


SCHEMA_OF = {"clicks": "click", "transactions": "transaction"}
CASES = list(corpus())


@pytest.fixture(scope="module")
def validators() -> dict[str, Draft202012Validator]:
    out = {}
    for kind, name in SCHEMA_OF.items():
        schema = json.loads((SCHEMAS_DIR / f"{name}.schema.json").read_text())
        Draft202012Validator.check_schema(schema)
        out[kind] = Draft202012Validator(schema, format_checker=FormatChecker())
    return out


def test_the_format_checker_checks_date_time():
    # without rfc3339-validator installed, jsonschema skips "date-time" silently and the corpus would prove less
    assert "date-time" in FormatChecker().checkers


def test_the_corpus_holds_both_outcomes():
    accepted = [label for kind, label, event in CASES
                if not isinstance(decode_event(kind, orjson.dumps(event), LIMITS, None), Rejection)]
    assert 60 < len(accepted) < len(CASES) - 150, (len(accepted), len(CASES))


@pytest.mark.parametrize(("kind", "label", "event"), CASES, ids=[f"{k}:{label}" for k, label, _ in CASES])
def test_the_schema_and_the_worker_agree(validators, kind, label, event):
    decoded = decode_event(kind, orjson.dumps(event), LIMITS, None)
    worker_applies = not isinstance(decoded, Rejection)
    errors = [e.message for e in validators[kind].iter_errors(event)]
    assert worker_applies == (not errors), (
        f"{label}: the worker {'applies' if worker_applies else 'rejects'} it "
        f"({getattr(decoded, 'detail', '')}), the schema {'accepts' if not errors else 'rejects'} it {errors[:3]}")
