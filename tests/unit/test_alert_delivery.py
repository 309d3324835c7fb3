"""Alert delivery's pure parts: the webhook signature, what a response means, the backoff, the idempotency key; the
tail's "at least" filters; the export's period, de-duplication and flat rows."""

from __future__ import annotations

import csv
import io

import pytest

from streamproc.runtime.forwarder import backoff_s, idempotency_key, signature, verdict, verify
from streamproc.tools.alerts import EXPORT_COLUMNS, AlertFilter, csv_row, export_rows, write_export

DAY = 86_400_000


def test_the_signature_is_hmac_sha256_of_the_body_and_checks_in_constant_time():
    # the well-known HMAC-SHA256 test vector
    assert signature(b"key", b"The quick brown fox jumps over the lazy dog") == (
        "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8")
    body = b'{"alert_id":"c1:1"}'
    sig = signature(b"k", body)
    assert verify(b"k", body, sig)
    assert not verify(b"other key", body, sig)
    assert not verify(b"k", body + b" ", sig)


def test_what_a_response_means():
    assert [verdict(s) for s in (200, 201, 204)] == ["delivered"] * 3
    assert [verdict(s) for s in (None, 500, 502, 503, 408, 425, 429)] == ["retry"] * 7
    assert [verdict(s) for s in (400, 401, 404, 410, 301)] == ["reject"] * 5


def test_backoff_is_exponential_capped_jittered_and_the_same_on_a_replay():
    waits = [backoff_s("c1:1", n, 0.5, 8.0) for n in range(1, 9)]
    assert waits == [backoff_s("c1:1", n, 0.5, 8.0) for n in range(1, 9)]
    ceilings = [min(8.0, 0.5 * 2 ** (n - 1)) for n in range(1, 9)]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    assert max(waits) <= 8.0 and waits[5] >= 4.0  # capped, still long once it is
    assert waits != [backoff_s("c2:1", n, 0.5, 8.0) for n in range(1, 9)]  # spread over alerts


def test_the_idempotency_key_is_the_alert_id_and_its_clearing_has_its_own():
    assert idempotency_key({"record": "alert", "alert_id": "c1:1767225600000"}) == "c1:1767225600000"
    assert idempotency_key({"record": "cleared", "alert_id": "c1:1767225600000"}) == "c1:1767225600000:cleared"


def alert(cid: str, day: int, risk: str = "high", tier: str = "medium", **extra: object) -> dict[str, object]:
    return {"record": "alert", "alert_id": f"{cid}:{day}", "customer_id": cid, "ts": day * DAY, "risk_level": risk,
            "value_tier": tier, "probability": 0.8, "reasons": [{"text": "no purchase for 84 days"}],
            "recommended_items": [{"product_id": "p1"}, {"product_id": "p2"}], **extra}


def test_filters_keep_a_level_and_above_and_cleared_records_follow_their_alert():
    keep = AlertFilter("high", "medium")
    shown = [a["alert_id"] for a in (alert("a", 1, "medium"), alert("b", 1, "high"), alert("c", 1, "critical"),
                                     alert("d", 1, "critical", "low"), alert("e", 1, "high", "high"))
             if keep.keep(a)]
    assert shown == ["b:1", "c:1", "e:1"]  # --risk high used to hide critical
    assert keep.keep({"record": "cleared", "alert_id": "c:1"})
    assert not keep.keep({"record": "cleared", "alert_id": "a:1"})
    assert AlertFilter(None, None).keep({"record": "cleared", "alert_id": "zz"})


def test_export_takes_a_period_s_alerts_once_each_in_time_order():
    records = [alert("a", 3), alert("b", 1), alert("a", 3), alert("c", 5),
               {"record": "cleared", "alert_id": "b:1", "ts": 2 * DAY}]
    rows = export_rows(records, 1 * DAY, 5 * DAY)
    assert [r["alert_id"] for r in rows] == ["b:1", "a:3"]
    out = io.StringIO()
    write_export(rows, "csv", out)
    parsed = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(parsed[0]) == list(EXPORT_COLUMNS)
    assert parsed[1]["customer_id"] == "a" and parsed[1]["date"] == "1970-01-04"
    assert parsed[1]["reasons"] == "no purchase for 84 days" and parsed[1]["recommended_items"] == "p1 p2"
    assert csv_row(alert("x", 0, rfm={"segment": "At risk"}))["rfm_segment"] == "At risk"


@pytest.mark.parametrize("fmt", ["jsonl"])
def test_export_as_json_lines_keeps_the_full_records(fmt):
    out = io.StringIO()
    write_export([alert("a", 1)], fmt, out)
    assert out.getvalue().count("\n") == 1 and '"alert_id": "a:1"' in out.getvalue()
