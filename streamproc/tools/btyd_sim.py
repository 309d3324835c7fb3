"""A transactions-only history drawn from the BG/NBD generative process (Fader, Hardie and Lee 2005), where the best
possible churn score is known: BG/NBD itself with the true parameters.

Each customer makes a first purchase at a moment drawn uniformly over the first ``acquisition_days`` and then, while
alive, buys at a Poisson rate λ ~ Gamma(r, α) a day; after every repeat purchase they leave for good with
probability p ~ Beta(a, b). Order values are Gamma-distributed around a per-customer mean. The default parameters,
r = 0.6, α = 25 days, a = 0.8, b = 3.0, give a median customer about one purchase a month and about one in five
leaving after each repeat purchase: a shop where "days since the last purchase" is already a strong baseline.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson

from streamproc.domain.btyd import BgNbd
from streamproc.domain.customer import DAY_MS


@dataclass(frozen=True)
class BtydSimulation:
    customers: int = 5000
    days: int = 400
    acquisition_days: int = 200
    truth: BgNbd = field(default_factory=lambda: BgNbd(r=0.6, alpha=25.0, a=0.8, b=3.0))
    seed: int = 11
    start: str = "2026-01-01T00:00:00+00:00"

    @property
    def start_ms(self) -> int:
        return int(datetime.fromisoformat(self.start).timestamp() * 1000)

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.days * DAY_MS


@dataclass
class BtydCustomer:
    customer_id: str
    rate: float  # purchases a day while alive
    dropout: float  # probability of leaving after each repeat purchase
    purchases: list[int]  # event times, epoch ms


def draw_customers(cfg: BtydSimulation) -> list[BtydCustomer]:
    rng = random.Random(cfg.seed)
    truth = cfg.truth
    out = []
    for i in range(cfg.customers):
        rate = rng.gammavariate(truth.r, 1 / truth.alpha)
        dropout = rng.betavariate(truth.a, truth.b)
        t = rng.uniform(0, cfg.acquisition_days)
        times = [t]
        while True:
            t += rng.expovariate(rate) if rate > 0 else cfg.days
            if t >= cfg.days:
                break
            times.append(t)
            if rng.random() < dropout:
                break
        out.append(BtydCustomer(f"b{i:07d}", rate, dropout, [cfg.start_ms + int(d * DAY_MS) for d in times]))
    return out


def payloads(cfg: BtydSimulation, customers: list[BtydCustomer] | None = None,
             until_ms: int | None = None) -> Iterator[tuple[str, bytes, bytes]]:
    """The customers' purchases as transactions records (topic, key, value), in event-time order, up to
    ``until_ms`` (exclusive)."""
    rng = random.Random(cfg.seed + 1)
    customers = customers if customers is not None else draw_customers(cfg)
    mean_value = {c.customer_id: rng.gammavariate(2.0, 25.0) for c in customers}
    events = sorted((ts, c.customer_id, n) for c in customers for n, ts in enumerate(c.purchases)
                    if until_ms is None or ts < until_ms)
    for ts, cid, n in events:
        amount = round(max(rng.gammavariate(4.0, mean_value[cid] / 4.0), 1.0), 2)
        event = {"event_id": f"{cid}-t{n}", "customer_id": cid, "ts": ts, "order_id": f"{cid}-o{n}",
                 "type": "purchase", "amount": amount, "currency": "EUR",
                 "items": [{"product_id": f"p{rng.randrange(200):03d}", "category": f"c{rng.randrange(8)}",
                            "quantity": 1, "unit_price": amount}]}
        yield "transactions", cid.encode(), orjson.dumps(event)


CSV_COLUMNS = ("customer_id", "ts", "order_id", "amount")


def write_csv(cfg: BtydSimulation, path: Path, customers: list[BtydCustomer] | None = None) -> int:
    """The history as a CSV of transactions (``streamproc backtest FILE --customer customer_id --date ts --amount
    amount``), times in RFC 3339 UTC; returns the rows written."""
    rows = 0
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for _, _, value in payloads(cfg, customers):
            event = orjson.loads(value)
            when = datetime.fromtimestamp(event["ts"] / 1000, UTC).isoformat(timespec="milliseconds")
            writer.writerow((event["customer_id"], when, event["order_id"], event["amount"]))
            rows += 1
    return rows
