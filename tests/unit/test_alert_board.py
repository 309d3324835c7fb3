"""The alert board (streamproc/domain/alert_board.py): the alerts topic folded into who is at risk now."""

from __future__ import annotations

from streamproc.domain.alert_board import AlertBoard

DAY = 86_400_000


def alert(cid: str, day: int, risk: str = "high", tier: str = "medium", var: float = 10.0) -> dict:
    return {"record": "alert", "alert_id": f"{cid}:{day * DAY}", "customer_id": cid, "ts": day * DAY,
            "risk_level": risk, "value_tier": tier, "value_at_risk": var, "segment": 1, "control": False}


def cleared(cid: str, alert_day: int, day: int) -> dict:
    return {"record": "cleared", "alert_id": f"{cid}:{alert_day * DAY}", "customer_id": cid, "ts": day * DAY,
            "cleared_by": "purchase", "days": day - alert_day}


def test_a_cleared_alert_leaves_the_board_and_a_newer_alert_replaces_an_older_one():
    board = AlertBoard().apply_all([alert("a", 1), alert("b", 1), cleared("a", 1, 3), alert("b", 5)])
    assert set(board.open) == {"b"} and board.open["b"]["ts"] == 5 * DAY
    assert board.watermark == 5 * DAY
    assert [r["record"] for r in board.history["a"]] == ["alert", "cleared"]


def test_clearing_an_older_alert_keeps_the_newer_one_open():
    board = AlertBoard().apply_all([alert("a", 1), alert("a", 9), cleared("a", 1, 10)])
    assert board.open["a"]["ts"] == 9 * DAY


def test_redelivered_records_count_once_and_order_of_delivery_between_customers_does_not_matter():
    records = [alert(f"c{i}", i % 7, risk=["medium", "high", "critical"][i % 3], var=float(i)) for i in range(30)]
    records += [cleared(f"c{i}", i % 7, 8) for i in range(0, 30, 4)]
    once = AlertBoard().apply_all(records)
    # a customer's records stay in order (one key, one partition); only customers interleave differently
    by_customer: dict[str, list[dict]] = {}
    for r in records:
        by_customer.setdefault(r["customer_id"], []).append(r)
    interleaved = [r for rs in sorted(by_customer.values(), key=lambda rs: -len(rs)) for r in rs] + records[:10]
    again = AlertBoard().apply_all(interleaved)
    assert again.open == once.open and again.totals() == once.totals()
    assert all(len(again.history[c]) == len(once.history[c]) for c in once.history)


def test_at_risk_is_by_risk_level_then_value_at_risk_and_filters_compose():
    board = AlertBoard().apply_all([alert("m", 1, "medium", var=500.0), alert("h1", 1, "high", var=5.0),
                                    alert("c", 1, "critical", "low", 1.0), alert("h2", 1, "high", "high", 50.0)])
    assert [a["customer_id"] for a in board.at_risk()] == ["c", "h2", "h1", "m"]
    assert [a["customer_id"] for a in board.at_risk(risk="high")] == ["h2", "h1"]
    assert [a["customer_id"] for a in board.at_risk(risk="high", tier="high")] == ["h2"]
    assert [a["customer_id"] for a in board.at_risk(limit=2)] == ["c", "h2"]
    assert board.totals() == {"open": 4, "value_at_risk": 556.0, "control": 0,
                              "by_risk": {"critical": 1, "high": 2, "medium": 1}}


def test_records_that_are_not_alerts_are_ignored():
    board = AlertBoard().apply_all([{"record": "recommendation", "customer_id": "x"}, alert("a", 2)])
    assert list(board.open) == ["a"]
