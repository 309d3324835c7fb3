"""The features-only job every peer runs, written as a user of that peer would: one plain dict of state per
customer, updated event by event. It computes the subset of streamproc's features the peers are compared on, with
the README's definitions (``## Features``):

- RFM: ``frequency`` (purchases), ``monetary_total`` (purchases − refunds), ``last_purchase_ts``;
- 7/30/90-day windows: purchases, spend (net of refunds) and clicks, as sums of UTC-day buckets; a window as of
  instant t covers the UTC days (day(t) − N, day(t)];
- sessions: clicks split by a 30-minute inactivity gap; a session counts on the day it started.

Duplicates (an ``event_id`` seen before) count once, as in streamproc: the peers keep the ids of the last 90 days.
Pure and shared, so both peers do exactly the same work and the parity test checks it against streamproc."""

from __future__ import annotations

from typing import Any

DAY_MS = 86_400_000
WINDOWS = (7, 30, 90)
SESSION_GAP_MS = 30 * 60 * 1000
KEEP_DAYS = max(WINDOWS)


def new_state() -> dict[str, Any]:
    return {"frequency": 0, "monetary_total": 0.0, "last_purchase_ts": None, "sessions": 0, "last_click_ts": None,
            "days": {}, "ids": {}}


def update(state: dict[str, Any] | None, event: dict[str, Any]) -> dict[str, Any]:
    """``state`` after ``event`` (a decoded click or transaction)."""
    s = state if state is not None else new_state()
    ts, event_id = int(event["ts"]), str(event["event_id"])
    day = ts // DAY_MS
    if event_id in s["ids"]:
        return s  # a duplicate counts once
    s["ids"][event_id] = day
    bucket = s["days"].setdefault(str(day), [0, 0.0, 0, 0])  # purchases, spend, clicks, sessions started
    kind = event.get("type")
    if kind == "purchase":
        amount = float(event["amount"])
        s["frequency"] += 1
        s["monetary_total"] += amount
        s["last_purchase_ts"] = max(ts, s["last_purchase_ts"] or ts)
        bucket[0] += 1
        bucket[1] += amount
    elif kind == "refund":
        s["monetary_total"] -= float(event["amount"])
        bucket[1] -= float(event["amount"])
    elif "action" in event:
        bucket[2] += 1
        if s["last_click_ts"] is None or ts - s["last_click_ts"] > SESSION_GAP_MS:
            s["sessions"] += 1
            bucket[3] += 1
        s["last_click_ts"] = max(ts, s["last_click_ts"] or ts)
    horizon = day - KEEP_DAYS
    if len(s["days"]) > KEEP_DAYS + 1:
        s["days"] = {d: b for d, b in s["days"].items() if int(d) > horizon}
    if len(s["ids"]) > 4096:
        s["ids"] = {i: d for i, d in s["ids"].items() if d > horizon}
    return s


def features(state: dict[str, Any], as_of: int) -> dict[str, Any]:
    """The customer's features as of event time ``as_of``."""
    today = as_of // DAY_MS
    out: dict[str, Any] = {"frequency": state["frequency"], "monetary_total": round(state["monetary_total"], 2),
                           "last_purchase_ts": state["last_purchase_ts"], "sessions": state["sessions"]}
    for n in WINDOWS:
        inside = [b for d, b in state["days"].items() if today - n < int(d) <= today]
        out[f"purchases_{n}d"] = sum(b[0] for b in inside)
        out[f"spend_{n}d"] = round(sum(b[1] for b in inside), 2)
        out[f"clicks_{n}d"] = sum(b[2] for b in inside)
        out[f"sessions_{n}d"] = sum(b[3] for b in inside)
    return out
