"""A simulated retention team with a known effect, to prove that the measured uplift finds it.

Given the alerts a run sent and the history it was made from, the team contacts every alerted customer outside the
control group with the alert's recommended action, one hour of event time after the alert (an ``interventions``
record with the action's channel and cost). Contact works with a configured *lift* per action: among the contacted
customers of an action, those who would not have bought within the outcome window anyway buy once in it with
probability lift / (1 − p0), where p0 is the share of them who bought anyway. The expected retention of the treated
is then p0 + lift, and the control group, held out by the keyed hash, estimates p0: the true uplift is the lift.
``effect=False`` keeps the contacts and drops the extra purchases (the true uplift is 0).

The extra purchases are merged into the history in event-time order, so a ledger reading it sees them where they
belong. Alerts come from the run without treatment: a customer brought back might have had fewer later alerts (a
second-order effect this overlay leaves out).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamproc.adapters.redis_clients import sync_redis
from streamproc.domain.retention import uplift_table
from streamproc.runtime.ledger import OUTCOMES_KEY, read_outcomes
from streamproc.tools.producer import EventProducer
from streamproc.topics import apply_topics, delete_run_topics

DAY_MS = 86_400_000
CONTACT_DELAY_MS = 3_600_000

# percentage points of retention an action adds (the example: +8 for a coupon, +3 for a newsletter)
DEFAULT_LIFTS: tuple[tuple[str, float], ...] = (("coupon", 0.08), ("newsletter", 0.03), ("email", 0.03),
                                                ("call", 0.10), ("offer", 0.05), ("shipping", 0.05),
                                                ("access", 0.05))
DEFAULT_COSTS: tuple[tuple[str, float], ...] = (("coupon", 5.0), ("newsletter", 0.05), ("email", 0.05),
                                                ("call", 25.0), ("offer", 8.0), ("shipping", 4.0), ("access", 1.0))


def by_keyword(table: tuple[tuple[str, float], ...], action: str, default: float) -> float:
    """The first entry whose keyword the action names (``"20% win-back coupon"`` → coupon)."""
    lowered = action.lower()
    return next((value for word, value in table if word in lowered), default)


def channel_of(action: str) -> str:
    lowered = action.lower()
    return "phone" if "call" in lowered else "email"


@dataclass
class Treatment:
    interventions: list[dict[str, Any]] = field(default_factory=list)
    extra_purchases: list[dict[str, Any]] = field(default_factory=list)
    true_lift: dict[str, float] = field(default_factory=dict)  # action -> the lift applied (0 without effect)
    baseline: dict[str, float] = field(default_factory=dict)  # action -> p0 of its contacted customers


def treat(alerts: Iterable[dict[str, Any]], purchases: dict[str, list[int]], outcome_days: int, seed: int,
          effect: bool = True, lifts: tuple[tuple[str, float], ...] = DEFAULT_LIFTS) -> Treatment:
    """``alerts``: the alert records sent; ``purchases``: each customer's purchase times in the history."""
    window = outcome_days * DAY_MS
    rnd = random.Random(seed)
    out = Treatment()
    contacted: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in sorted(alerts, key=lambda a: (a["ts"], a["alert_id"])):
        if a.get("record", "alert") != "alert" or a.get("control"):
            continue
        action = str(a["action"])
        contacted[action].append(a)
        out.interventions.append({
            "intervention_id": f"sim-{a['alert_id']}", "customer_id": a["customer_id"], "alert_id": a["alert_id"],
            "action": action, "channel": channel_of(action), "ts": a["ts"] + CONTACT_DELAY_MS,
            "cost": by_keyword(DEFAULT_COSTS, action, 1.0)})
    for action, group in sorted(contacted.items()):
        def bought_anyway(a: dict[str, Any]) -> bool:
            return any(a["ts"] <= t < a["ts"] + window for t in purchases.get(a["customer_id"], ()))

        anyway = [bought_anyway(a) for a in group]
        p0 = sum(anyway) / len(group)
        lift = by_keyword(lifts, action, 0.05) if effect else 0.0
        out.true_lift[action] = lift
        out.baseline[action] = round(p0, 4)
        convert = min(1.0, lift / (1 - p0)) if p0 < 1 else 0.0
        for a, already in zip(group, anyway, strict=True):
            if already or rnd.random() >= convert:
                continue
            when = a["ts"] + CONTACT_DELAY_MS + int(rnd.uniform(0.1, outcome_days - 1) * DAY_MS)
            out.extra_purchases.append({
                "event_id": f"sim-back-{a['alert_id']}", "customer_id": a["customer_id"], "ts": when,
                "order_id": f"sim-back-{a['alert_id']}", "type": "purchase", "amount": 30.0, "currency": "EUR"})
    return out


def loop_records(alerts: Iterable[dict[str, Any]], transactions: Iterable[dict[str, Any]], treatment: Treatment,
                 outcome_days: int, clock_customers: int = 40) -> list[tuple[str, bytes, bytes]]:
    """Everything the ledger reads, on its topics in event-time order as a live loop would produce it: the alerts,
    the team's interventions, the history's transactions with the extra purchases merged in; then a purchase for a
    few "clock" customers past the last outcome window, so the watermark closes them all."""
    timed: list[tuple[int, str, str, dict[str, Any]]] = []
    for a in alerts:
        timed.append((int(a["ts"]), "churn-alerts", str(a["customer_id"]), a))
    for it in treatment.interventions:
        timed.append((int(it["ts"]), "interventions", str(it["customer_id"]), it))
    for t in [*transactions, *treatment.extra_purchases]:
        timed.append((int(t["ts"]), "transactions", str(t["customer_id"]), t))
    end = max((t[0] for t in timed), default=0) + (outcome_days + 2) * DAY_MS
    for i in range(clock_customers):  # keys spread over every partition
        cid = f"clock-{i}"
        timed.append((end, "transactions", cid, {"event_id": f"{cid}-end", "customer_id": cid, "ts": end,
                                                 "order_id": f"{cid}-end", "type": "purchase", "amount": 0.0,
                                                 "currency": "EUR"}))
    timed.sort(key=lambda t: (t[0], t[1], t[2]))
    return [(topic, cid.encode(), json.dumps(value).encode()) for _, topic, cid, value in timed]


def measure_uplift(settings: Any, alerts: list[dict[str, Any]], transactions: list[dict[str, Any]], effect: bool,
                   seed: int, redis_db: int, log_dir: Any, timeout: float = 600.0) -> dict[str, Any]:
    """The simulated team on a run's alerts, and the uplift `streamproc retention` measures from it: the loop's
    records go to fresh topics of their own, a ledger process reads them into an emptied Redis database, and the
    report is read back once every alert has its outcome."""
    # what a worker would dead-letter is no purchase here either (a simulator mixes broken records in)
    transactions = [t for t in transactions if isinstance(t.get("customer_id"), str) and isinstance(t.get("ts"), int)
                    and "event_id" in t]
    purchases: dict[str, list[int]] = defaultdict(list)
    for t in transactions:
        if t.get("type") == "purchase":
            purchases[t["customer_id"]].append(t["ts"])
    sent = [a for a in alerts if a.get("record", "alert") == "alert"]
    treatment = treat(sent, purchases, settings.outcome_days, seed, effect)
    tag = uuid.uuid4().hex[:6]
    run = settings.model_copy(update={
        "topic_prefix": f"uplift{tag}.", "app_id": f"uplift-{tag}",
        "redis_url": settings.redis_url.rsplit("/", 1)[0] + f"/{redis_db}"})
    client = sync_redis(run.redis_url)
    client.flushdb()
    apply_topics(run)
    producer = EventProducer(run)
    for topic, key, value in loop_records(sent, transactions, treatment, settings.outcome_days):
        producer.send(topic, key, value)
    producer.close()
    env = {**os.environ, "STREAMPROC_TOPIC_PREFIX": run.topic_prefix, "STREAMPROC_APP_ID": run.app_id,
           "STREAMPROC_REDIS_URL": run.redis_url, "STREAMPROC_LOG_LEVEL": "WARNING"}
    log = Path(log_dir) / f"retention-{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "streamproc.cli", "retention"], env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
    try:
        wanted = len({a["alert_id"] for a in sent})
        while client.hlen(OUTCOMES_KEY) < wanted and time.monotonic() - started < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"the ledger exited ({proc.returncode}); its log: {log}")
            time.sleep(1.0)
        outcomes = read_outcomes(client)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        client.close()
        delete_run_topics(run)
    return {"effect": effect, "alerts": wanted, "outcomes": len(outcomes), "seconds": round(time.monotonic() - started),
            "true_lift": treatment.true_lift, "baseline": treatment.baseline,
            "interventions": len(treatment.interventions), "extra_purchases": len(treatment.extra_purchases),
            "table": [row.as_dict() for row in uplift_table(outcomes)]}


def uplift_lines(table: list[dict[str, Any]], outcomes: int, days: int,
                 truth: dict[str, float] | None = None) -> list[str]:
    """The uplift table for people (``UpliftRow.as_dict`` rows); ``truth``: a simulation's lift per action."""
    def rate(s: int, n: int) -> str:
        return f"{s}/{n} {s / n:.0%}" if n else "-"

    lines = [f"{outcomes} alert outcomes (bought within {days} days of the alert). Treated: contacted, not in the "
             "control group. Control: held out, not contacted.",
             f"  {'breakdown':<44} {'treated':>14} {'control':>12} {'uplift':>7} {'95 % interval':>17} "
             f"{'rev/alerted T/C':>15} {'cost/retained':>13}" + ("  truth" if truth else "")]
    for r in table:
        interval = f"[{r['lower']:+.3f},{r['upper']:+.3f}]" if r["lower"] is not None else "-"
        uplift = f"{r['uplift']:+.3f}" if r["uplift"] is not None else "-"
        revenue = f"{r['revenue_per_alerted_treated'] or 0:.0f}/{r['revenue_per_alerted_control'] or 0:.0f}"
        action = r["key"].removeprefix("action=")
        shown = f"  {truth[action]:+.3f}" if truth and r["key"].startswith("action=") and action in truth else ""
        lines.append(f"  {r['key'][:44]:<44} {rate(r['treated_retained'], r['treated']):>14} "
                     f"{rate(r['control_retained'], r['control']):>12} {uplift:>7} {interval:>17} {revenue:>15} "
                     f"{r['cost_per_retained'] if r['cost_per_retained'] is not None else '-':>13}{shown}")
    return lines
