import math

import orjson
import pytest

from streamproc.domain.events import (
    Click,
    DecodeLimits,
    Rejection,
    Transaction,
    decode_event,
    decode_event_noting_unknown,
    encode_event,
)

LIMITS = DecodeLimits(max_payload_bytes=4096, max_items_per_transaction=3, max_future_skew_ms=3_600_000)
NOW = 1_767_261_600_000  # 2026-01-01T10:00:00Z


def click(**over):
    base = {"event_id": "e1", "customer_id": "c1", "ts": "2026-01-01T10:00:00+01:00", "session_id": "s1",
            "action": "product_view", "product_id": "p1", "category": "books", "duration_s": 12}
    base.update(over)
    return base


def txn(**over):
    base = {"event_id": "t1", "customer_id": "c1", "ts": NOW, "order_id": "o1", "type": "purchase",
            "amount": 30, "currency": "EUR",
            "items": [{"product_id": "p1", "category": "books", "quantity": 2, "unit_price": 15}]}
    base.update(over)
    return base


def decode(kind, value):
    payload = value if isinstance(value, bytes) else orjson.dumps(value)
    return decode_event(kind, payload, LIMITS, NOW)


def test_valid_click_with_offset_timestamp():
    ev = decode("clicks", click())
    assert isinstance(ev, Click)
    assert ev.ts == NOW - 3_600_000  # 10:00+01:00 is 09:00Z
    assert ev.duration_s == 12.0


def test_valid_transaction_with_epoch_millis():
    ev = decode("transactions", txn())
    assert isinstance(ev, Transaction)
    assert ev.ts == NOW and ev.amount == 30.0 and ev.items[0].quantity == 2


def test_z_suffix_is_utc():
    ev = decode("clicks", click(ts="2026-01-01T10:00:00Z"))
    assert isinstance(ev, Click) and ev.ts == NOW


@pytest.mark.parametrize(
    ("kind", "value", "reason", "needle"),
    [
        ("clicks", b"", "empty_payload", "no value"),
        ("clicks", b"{nope", "invalid_json", "JSON"),
        ("clicks", b"\xff\xfe{}", "invalid_json", "UTF-8"),
        ("clicks", b"[1, 2]", "not_an_object", "list"),
        ("clicks", click(action="teleport"), "validation", "action"),
        ("clicks", click(ts="2026-01-01T10:00:00"), "validation", "offset"),  # naive
        ("clicks", click(ts="2026-01-01T10:00:00Z\n"), "validation", "RFC 3339"),
        ("clicks", click(ts="2026-02-30T10:00:00Z"), "validation", "calendar"),
        ("clicks", click(ts="2026-01-01 10:00:00Z"), "validation", "RFC 3339"),  # RFC 3339 needs the T here
        ("clicks", click(ts=1.5e12 + 0.5), "validation", "ts"),
        ("clicks", click(ts=True), "validation", "ts"),
        ("clicks", click(customer_id=123), "validation", "customer_id"),
        ("clicks", {k: v for k, v in click().items() if k != "session_id"}, "validation", "session_id"),
        ("clicks", click(duration_s=-1), "validation", "duration_s"),
        ("transactions", txn(amount=-5), "validation", "amount"),
        ("transactions", txn(type="chargeback"), "validation", "type"),
        ("transactions", txn(currency="euro"), "validation", "currency"),
        ("transactions", txn(items=[{"product_id": "p", "category": "c", "quantity": 0, "unit_price": 1}]),
         "validation", "quantity"),
        ("transactions", txn(ts=NOW + 2 * 3_600_000), "future_timestamp", "ahead"),
        ("transactions", txn(ts=1000), "absurd_timestamp", "before"),
        ("transactions", txn(items=[{"product_id": f"p{i}", "category": "c", "quantity": 1, "unit_price": 1}
                                    for i in range(4)]), "too_many_items", "limit"),
        ("clicks", click(query="x" * 5000), "payload_too_large", "exceeds"),
        ("clicks", b'{"event_id": "e", "customer_id": "c", "ts": 1767261600000, "session_id": "s", '
                   b'"action": "search", "duration_s": NaN}', "invalid_json", "JSON"),
        ("refunds", click(), "unknown_topic", "refunds"),
    ],
)
def test_bad_input_is_a_rejection_with_reason(kind, value, reason, needle):
    out = decode(kind, value)
    assert isinstance(out, Rejection), out
    assert out.reason == reason
    assert needle.lower() in out.detail.lower()


def test_non_finite_number_in_valid_json_shape_is_rejected():
    # orjson rejects NaN literals; a float overflow such as 1e999 parses to inf
    out = decode("transactions", orjson.dumps(txn())[:-1] + b', "amount2": 1e999}')
    assert isinstance(out, Rejection)
    assert out.reason in {"validation", "invalid_json"}


def test_encode_round_trip():
    ev = decode("transactions", txn())
    again = decode("transactions", encode_event(ev))
    assert again == ev
    assert not math.isnan(again.amount)


def test_unknown_fields_are_ignored_and_named_by_default():
    value = txn(channel="app", items=[{"product_id": "p1", "category": "b", "quantity": 1, "unit_price": 1,
                                       "colour": "red"}])
    event, unknown = decode_event_noting_unknown("transactions", orjson.dumps(value), LIMITS, NOW)
    assert isinstance(event, Transaction) and event.items[0].product_id == "p1"
    assert unknown == ("channel", "items[].colour")
    assert decode_event_noting_unknown("transactions", orjson.dumps(txn()), LIMITS, NOW)[1] == ()


def test_unknown_fields_are_rejected_by_the_strict_policy():
    from dataclasses import replace

    strict = replace(LIMITS, unknown_fields="reject")
    out = decode_event("clicks", orjson.dumps(click(extra_field=1)), strict, NOW)
    assert isinstance(out, Rejection) and out.reason == "validation" and "extra_field" in out.detail
    line = {"product_id": "p1", "category": "b", "quantity": 1, "unit_price": 1, "colour": "red"}
    out = decode_event("transactions", orjson.dumps(txn(items=[line])), strict, NOW)
    assert isinstance(out, Rejection) and "items[].colour" in out.detail


@pytest.mark.parametrize(("ts", "expected"), [
    ("2026-01-01T00:00:00.001Z", 1_767_225_600_001),  # exact: no float rounding on the way
    ("2026-01-01t00:00:00.0019999z", 1_767_225_600_001),  # lower-case t and z; digits past microseconds dropped
    ("2026-01-01T01:30:00+01:30", 1_767_225_600_000),
    (1_767_225_600_000.0, 1_767_225_600_000),  # a JSON number without a fraction is an integer
])
def test_event_time_forms(ts, expected):
    ev = decode("clicks", click(ts=ts))
    assert isinstance(ev, Click) and ev.ts == expected


def test_an_integral_quantity_written_as_a_float_is_an_integer():
    ev = decode("transactions", txn(items=[{"product_id": "p1", "category": "b", "quantity": 2.0, "unit_price": 1}]))
    assert isinstance(ev, Transaction) and ev.items[0].quantity == 2 and isinstance(ev.items[0].quantity, int)
