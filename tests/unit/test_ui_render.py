"""The retention pages' HTML (streamproc/ui/render.py): data is escaped, empty states say why, the report loads
nothing from anywhere."""

from __future__ import annotations

import re

from streamproc.domain.alert_board import AlertBoard
from streamproc.ui import render
from streamproc.ui.data import segment_rows

HOSTILE = '<script>alert("x")</script>'


def test_values_from_data_are_escaped():
    board = AlertBoard().apply_all([{"record": "alert", "alert_id": "a:1", "customer_id": HOSTILE, "ts": 1,
                                     "risk_level": "high", "value_tier": "low", "value_at_risk": 1.0,
                                     "reasons": [{"text": HOSTILE}], "action": HOSTILE, "segment": 0}])
    page = render.document("t", render.at_risk_body(board.at_risk(), board.totals(), ["0"], {}, 1))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<script>" not in render.customer_body(HOSTILE, None)


def test_empty_states_say_why():
    empty_board = AlertBoard()
    assert "No open alerts yet" in render.at_risk_body([], empty_board.totals(), [], {}, 0)
    assert "No customer nobody" in render.customer_body("nobody", None)
    assert "No alert outcome yet" in render.uplift_body([])
    assert "No customers stored yet" in render.segments_body([])


def test_the_report_has_no_script_link_or_remote_reference():
    board = AlertBoard().apply_all([{"record": "alert", "alert_id": "a:1", "customer_id": "a", "ts": 86_400_000,
                                     "risk_level": "critical", "value_tier": "high", "value_at_risk": 3.0,
                                     "reasons": [{"text": "no purchase for 40 days"}], "action": "call"}])
    page = render.report_document(board, [], [], {"events processed": 10.0}, 100)
    assert "<script" not in page and "<a " not in page and "<form" not in page
    assert not re.search(r"(src|href)\s*=", page), "a reference the browser would fetch"
    assert "http" not in page.replace('content="no-referrer"', "")
    assert "no purchase for 40 days" in page


def test_segment_rows_count_customers_from_the_census_and_name_traits():
    census = {"active|high|0": 3, "at_risk|low|0": 2, "active|medium|1": 4, "new|low|None": 1}
    summary = {"segments": {"0": {"name": "loyal big spenders", "size_share": 0.4, "spend_share": 0.7,
                                  "scaled": {"monetary": 1.5, "recency": -0.2, "frequency": 0.9},
                                  "centroid": {"monetary": 900.0, "recency": 3.0, "frequency": 12.0}}}}
    rows = {r["id"]: r for r in segment_rows(census, summary)}
    assert rows["0"]["customers"] == 5 and rows["1"]["customers"] == 4 and rows["None"]["customers"] == 1
    assert rows["0"]["traits"][0].startswith("monetary high") and "frequency high" in rows["0"]["traits"][1]
    assert rows["1"]["name"] == "segment 1" and rows["1"]["size_share"] is None


def test_a_found_customer_is_escaped_too():
    found = {"stored_features": {"lifecycle_stage": HOSTILE, "top_categories": [HOSTILE]}, "features": {"clv": 1.0},
             "churn": {"probability": 0.5}, "rfm": {"segment": HOSTILE}, "segment": {"name": HOSTILE},
             "alerts": [{"record": "alert", "alert_id": "x:1", "ts": 1, "risk_level": "high", "probability": 0.5,
                         "action": HOSTILE}], "interventions": [{"ts": 1, "action": HOSTILE, "cost": 1.0}],
             "risk_history": [(1, 0.2), (2, 0.5)], "last_recommendation": {"items": [HOSTILE], "trigger": HOSTILE}}
    page = render.customer_body(HOSTILE, found)
    assert "<script>" not in page and page.count("&lt;script&gt;") >= 7


def test_uplift_rows_show_both_groups_rates_and_the_interval():
    row = {"key": "action=10% coupon", "treated": 40, "treated_retained": 30, "control": 10, "control_retained": 5,
           "uplift": 0.25, "lower": 0.02, "upper": 0.48}
    page = render.uplift_body([row])
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", page)
    assert cells == ["action=10% coupon", "40", "75 %", "10", "50 %", "25 %", "2 % … 48 %"]
