"""The retention team's alert board: a fold over the alerts topic (``ChurnAlert`` and ``AlertCleared`` records, as
decoded dicts) into who is at risk now, and each customer's alert history. No I/O: the UI feeds it from a consumer,
the report from one read of the topic, and a replay gives the same board."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RISK_ORDER = {"critical": 0, "high": 1, "medium": 2}
HISTORY_PER_CUSTOMER = 20  # alerts kept per customer for their page, newest last


@dataclass
class AlertBoard:
    open: dict[str, dict[str, Any]] = field(default_factory=dict)  # customer -> their open alert
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # customer -> alerts and clearances
    watermark: int = 0  # the newest record instant seen (event time)

    def reset(self) -> None:
        """Empty, to be folded again from the topic's start."""
        self.open.clear()
        self.history.clear()
        self.watermark = 0

    def apply(self, record: dict[str, Any]) -> None:
        kind = record.get("record")
        if kind not in ("alert", "cleared"):
            return
        customer = record["customer_id"]
        past = self.history.setdefault(customer, [])
        if any(r["record"] == kind and r["alert_id"] == record["alert_id"] for r in past):
            return  # a redelivered record counts once
        self.watermark = max(self.watermark, int(record["ts"]))
        past.append(record)
        past.sort(key=lambda r: (r["ts"], r["record"] == "cleared"))
        del past[:-HISTORY_PER_CUSTOMER]
        current = self.open.get(customer)
        if kind == "alert":
            if current is None or record["ts"] >= current["ts"]:
                self.open[customer] = record
        elif current is not None and current["alert_id"] == record["alert_id"]:
            del self.open[customer]

    def apply_all(self, records: list[dict[str, Any]]) -> AlertBoard:
        for record in records:
            self.apply(record)
        return self

    def at_risk(self, tier: str | None = None, risk: str | None = None, segment: str | None = None,
                limit: int | None = None) -> list[dict[str, Any]]:
        """Open alerts by priority: the risk level, then the value at risk, then the customer id (a stable order)."""
        rows = [a for a in self.open.values()
                if (tier is None or a.get("value_tier") == tier) and (risk is None or a.get("risk_level") == risk)
                and (segment is None or str(a.get("segment")) == segment)]
        rows.sort(key=lambda a: (RISK_ORDER.get(a.get("risk_level", ""), 9), -float(a.get("value_at_risk") or 0.0),
                                 a["customer_id"]))
        return rows[:limit] if limit is not None else rows

    def totals(self) -> dict[str, Any]:
        """What the open alerts add up to: how many, the value at risk, how many are in the control group."""
        rows = list(self.open.values())
        return {"open": len(rows), "value_at_risk": round(sum(float(a.get("value_at_risk") or 0.0) for a in rows), 2),
                "control": sum(1 for a in rows if a.get("control")),
                "by_risk": {level: sum(1 for a in rows if a.get("risk_level") == level) for level in RISK_ORDER}}
