"""Synthetic customer traffic with known ground truth.

A population drawn from latent personas browses and buys from a catalogue with bundles (products bought
together more often than chance). Each customer has a churn hazard; before leaving their visits thin
out, and some come back after a gap. Events come out in event-time order (a heap of next-session times,
so a million customers need no per-day scan), deterministically from the seed.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import orjson

from streamproc.settings import Settings
from streamproc.tools.producer import EventProducer, paced

DAY_MS = 86_400_000
HOUR_MS = 3_600_000

CATEGORIES = {  # category -> (median price, products)
    "electronics": (180.0, 30),
    "books": (18.0, 40),
    "fashion": (55.0, 40),
    "home": (70.0, 30),
    "beauty": (25.0, 30),
    "sports": (60.0, 25),
    "toys": (30.0, 25),
    "grocery": (12.0, 30),
}


@dataclass(frozen=True)
class Persona:
    name: str
    share: float  # of the population
    sessions_per_day: float
    clicks_per_session: float
    conversion: float  # probability that a session ends in a purchase
    basket_size: float  # mean items per order
    price_bias: float  # multiplies list prices picked (cheap vs premium items)
    category_weights: dict[str, float]
    churn_hazard_per_day: float
    return_probability: float  # after churning, chance of coming back
    joins_late: bool = False  # signs up during the run instead of before it


PERSONAS: tuple[Persona, ...] = (
    Persona("bargain_hunter", 0.30, 0.40, 4.0, 0.30, 2.2, 0.6,
            {"grocery": 3, "fashion": 2, "beauty": 2, "toys": 1, "home": 1}, 0.0035, 0.25),
    Persona("loyal_high_spender", 0.15, 0.45, 3.5, 0.50, 2.8, 1.8,
            {"electronics": 3, "home": 2, "fashion": 2, "sports": 1}, 0.001, 0.5),
    Persona("occasional_browser", 0.30, 0.10, 3.0, 0.15, 1.3, 1.0,
            {"books": 3, "electronics": 1, "toys": 1, "sports": 1}, 0.004, 0.15),
    Persona("new_customer", 0.25, 0.30, 3.5, 0.30, 1.6, 1.0,
            {"beauty": 2, "fashion": 2, "books": 1, "grocery": 1, "home": 1}, 0.006, 0.2, joins_late=True),
)


@dataclass
class SimulationConfig:
    customers: int = 1000
    days: int = 180
    seed: int = 7
    bad_fraction: float = 0.0
    duplicate_fraction: float = 0.0
    start: str = "2026-01-01T00:00:00+00:00"
    decline_days: float = 21.0  # visits fade over this long before a churn
    return_gap_days: tuple[float, float] = (45.0, 110.0)
    bundles: int = 40
    bundle_probability: float = 0.35  # chance that an order containing a bundle item takes the bundle
    # a bundle item bought without its bundle puts the missing pieces on the customer's mind: each later
    # order adds one of them with this probability (the cross-sell that co-purchase rules exist for)
    follow_up_probability: float = 0.5
    # everyone has a few favourite products in their categories that they keep coming back to
    favourites_per_customer: int = 4
    favourite_probability: float = 0.3  # chance that a product pick in a category is one of the favourites

    @property
    def start_ms(self) -> int:
        return int(datetime.fromisoformat(self.start).timestamp() * 1000)


@dataclass
class Product:
    product_id: str
    category: str
    price: float


@dataclass
class CustomerTruth:
    customer_id: str
    persona: str
    signup_ts: int
    churn_ts: int | None = None  # when they left (end of the decline)
    return_ts: int | None = None  # when a churned customer came back
    purchases: int = 0
    events: int = 0


@dataclass
class _Customer:
    truth: CustomerTruth
    persona: Persona
    cat_cdf: list[tuple[float, str]]
    churn_ts: int | None
    return_ts: int | None
    seq: int = 0
    cart: list[Product] = field(default_factory=list)
    follow_ups: list[Product] = field(default_factory=list)  # bundle pieces still to buy
    favourites: dict[str, list[Product]] = field(default_factory=dict)  # category -> favourite products


class Catalogue:
    def __init__(self, rng: random.Random, cfg: SimulationConfig) -> None:
        self.products: list[Product] = []
        self.by_category: dict[str, list[Product]] = {}
        for category, (median, count) in CATEGORIES.items():
            items = []
            for i in range(count):
                price = round(median * math.exp(rng.gauss(0, 0.6)), 2)
                items.append(Product(f"{category[:3]}-{i:03d}", category, max(price, 0.99)))
            items.sort(key=lambda p: p.price)
            self.by_category[category] = items
            self.products.extend(items)
        self.bundle_of: dict[str, list[str]] = {}
        self.bundles: list[list[str]] = []
        by_id = {p.product_id: p for p in self.products}
        self.by_id = by_id
        cats = list(CATEGORIES)
        for _ in range(cfg.bundles):
            anchor_cat = rng.choice(cats)
            other_cat = anchor_cat if rng.random() < 0.5 else rng.choice(cats)
            anchor = rng.choice(self.by_category[anchor_cat])
            mates = rng.sample(self.by_category[other_cat], 2)
            bundle = [anchor.product_id] + [m.product_id for m in mates if m.product_id != anchor.product_id]
            bundle = list(dict.fromkeys(bundle))
            if len(bundle) < 2 or any(pid in self.bundle_of for pid in bundle):
                continue
            self.bundles.append(bundle)
            for pid in bundle:
                self.bundle_of[pid] = bundle


def _cdf(weights: dict[str, float]) -> list[tuple[float, str]]:
    total = sum(weights.values())
    acc = 0.0
    out = []
    for name, w in weights.items():
        acc += w / total
        out.append((acc, name))
    return out


def _pick(cdf: list[tuple[float, str]], u: float) -> str:
    for edge, name in cdf:
        if u <= edge:
            return name
    return cdf[-1][1]


class Simulator:
    """Generates (topic, key, payload) in event-time order; the truth is filled in as it goes."""

    def __init__(self, cfg: SimulationConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.catalogue = Catalogue(self.rng, cfg)
        self.end_ms = cfg.start_ms + cfg.days * DAY_MS
        self.customers: list[_Customer] = []
        self.bad_events = 0
        self.duplicate_events = 0
        self.valid_events = 0
        persona_cdf = _cdf({p.name: p.share for p in PERSONAS})
        by_name = {p.name: p for p in PERSONAS}
        rng = self.rng
        taste = random.Random(cfg.seed + 2)  # favourites: their own stream, the rest stays as it was
        for i in range(cfg.customers):
            persona = by_name[_pick(persona_cdf, rng.random())]
            signup = cfg.start_ms
            if persona.joins_late:
                signup += int(rng.random() * 0.6 * cfg.days * DAY_MS)
            # personal variation of the category taste
            weights = {c: w * rng.uniform(0.5, 1.5) for c, w in persona.category_weights.items()}
            hazard = persona.churn_hazard_per_day * rng.uniform(0.5, 1.5)
            churn_ts: int | None = signup + int(rng.expovariate(hazard) * DAY_MS) + int(cfg.decline_days * DAY_MS)
            return_ts = None
            if churn_ts is not None and churn_ts >= self.end_ms:
                churn_ts = None
            if churn_ts is not None and rng.random() < persona.return_probability:
                return_ts = churn_ts + int(rng.uniform(*cfg.return_gap_days) * DAY_MS)
                if return_ts >= self.end_ms:
                    return_ts = None
            truth = CustomerTruth(f"c{i:07d}", persona.name, signup, churn_ts, return_ts)
            customer = _Customer(truth, persona, _cdf(weights), churn_ts, return_ts)
            for _ in range(cfg.favourites_per_customer):
                category = _pick(customer.cat_cdf, taste.random())
                items = self.catalogue.by_category[category]
                pick = items[min(len(items) - 1, int(taste.random() ** (1 / persona.price_bias) * len(items)))]
                customer.favourites.setdefault(category, []).append(pick)
            self.customers.append(customer)

    # --- activity model
    def _activity(self, c: _Customer, t: int) -> float:
        """Visit-rate multiplier at event time t: fades before a churn, zero while gone."""
        if c.churn_ts is not None and t >= c.churn_ts:
            if c.return_ts is not None and t >= c.return_ts:
                return 0.8
            return 0.0
        if c.churn_ts is not None:
            left = (c.churn_ts - t) / (self.cfg.decline_days * DAY_MS)
            if left < 1.0:
                return max(0.05, left)
        return 1.0

    def _next_session(self, c: _Customer, t: int) -> int | None:
        """Next session start after t (thinning of a Poisson process), or None past the end."""
        rate = c.persona.sessions_per_day
        while True:
            t += int(self.rng.expovariate(rate) * DAY_MS) + 60_000
            if t >= self.end_ms:
                return None
            if c.churn_ts is not None and c.churn_ts <= t and (c.return_ts is None or t < c.return_ts):
                if c.return_ts is None:
                    return None
                return c.return_ts  # the comeback visit, after the absence
            if self.rng.random() < self._activity(c, t):
                return t

    def _session(self, c: _Customer, start: int) -> list[tuple[str, dict]]:
        rng = self.rng
        p = c.persona
        cid = c.truth.customer_id
        c.seq += 1
        session_id = f"{cid}-s{c.seq}"
        t = start
        events: list[tuple[str, dict]] = []
        n_clicks = int(rng.expovariate(1 / p.clicks_per_session))
        category = _pick(c.cat_cdf, rng.random())
        viewed: list[Product] = []
        cart: list[Product] = []

        def click(action: str, **extra: object) -> None:
            c.seq += 1
            events.append(("clicks", {
                "event_id": f"{cid}-{c.seq}", "customer_id": cid, "ts": t, "session_id": session_id,
                "action": action, **{k: v for k, v in extra.items() if v is not None},
            }))

        click("page_view", duration_s=round(rng.uniform(2, 40), 1))
        for _ in range(n_clicks):
            t += int(rng.uniform(5, 90) * 1000)
            u = rng.random()
            if u < 0.15:
                click("search", query=category, category=category)
            elif u < 0.75:
                if rng.random() < 0.25:
                    category = _pick(c.cat_cdf, rng.random())
                product = self._choose_product(category, p.price_bias, c)
                viewed.append(product)
                click("product_view", product_id=product.product_id, category=category,
                      duration_s=round(rng.uniform(3, 120), 1))
            elif viewed and u < 0.92:
                product = rng.choice(viewed)
                cart.append(product)
                click("add_to_cart", product_id=product.product_id, category=product.category)
            elif cart and u < 0.95:
                product = cart.pop()
                click("remove_from_cart", product_id=product.product_id, category=product.category)
            else:
                click("page_view", duration_s=round(rng.uniform(2, 40), 1))
        if rng.random() < p.conversion:
            basket = self._basket(c, cart)
            t += int(rng.uniform(10, 60) * 1000)
            click("checkout")
            events.extend(self._purchase(c, basket, t))
        elif cart:
            pass  # abandoned cart: no checkout
        c.truth.events += len(events)
        return events

    def _basket(self, c: _Customer, cart: list[Product]) -> list[Product]:
        """What a converting session buys: the cart, perhaps a follow-up of an earlier bundle, products of the
        customer's categories up to the persona's basket size, and bundles completed (or remembered to follow)."""
        rng = self.rng
        p = c.persona
        basket = list(cart)
        if c.follow_ups and rng.random() < self.cfg.follow_up_probability:
            basket.append(c.follow_ups.pop(0))
        while len(basket) < max(1, round(rng.gauss(p.basket_size, 0.8))):
            basket.append(self._choose_product(_pick(c.cat_cdf, rng.random()), p.price_bias, c))
        for product in list(basket):
            bundle = self.catalogue.bundle_of.get(product.product_id)
            if bundle and rng.random() < self.cfg.bundle_probability:
                basket.extend(self.catalogue.by_id[pid] for pid in bundle if pid != product.product_id)
            elif bundle:
                have = {b.product_id for b in basket} | {f.product_id for f in c.follow_ups}
                c.follow_ups.extend(self.catalogue.by_id[pid] for pid in bundle if pid not in have)
                del c.follow_ups[:-5]
        return list({b.product_id: b for b in basket}.values())[:20]

    def _purchase(self, c: _Customer, basket: list[Product], t: int) -> list[tuple[str, dict]]:
        """The purchase of ``basket`` at ``t``, and sometimes its refund some days later."""
        rng = self.rng
        cid = c.truth.customer_id
        c.seq += 1
        order_id = f"{cid}-o{c.seq}"
        quantities = [1 if rng.random() < 0.85 else 2 for _ in basket]
        items: list[dict[str, object]] = [
            {"product_id": b.product_id, "category": b.category, "quantity": q, "unit_price": b.price}
            for b, q in zip(basket, quantities, strict=True)
        ]
        amount = round(sum(b.price * q for b, q in zip(basket, quantities, strict=True)), 2)
        events: list[tuple[str, dict]] = [("transactions", {
            "event_id": f"{cid}-{c.seq}", "customer_id": cid, "ts": t, "order_id": order_id,
            "type": "purchase", "amount": amount, "currency": "EUR", "items": items,
        })]
        c.truth.purchases += 1
        if rng.random() < 0.04:  # a refund some days later
            c.seq += 1
            refund_ts = t + int(rng.uniform(1, 10) * DAY_MS)
            if refund_ts < self.end_ms:
                events.append(("transactions", {
                    "event_id": f"{cid}-{c.seq}", "customer_id": cid, "ts": refund_ts, "order_id": order_id,
                    "type": "refund", "amount": round(basket[0].price * quantities[0], 2),
                    "currency": "EUR", "items": [items[0]],
                }))
        return events

    def _choose_product(self, category: str, price_bias: float, customer: _Customer | None = None) -> Product:
        favourites = customer.favourites.get(category) if customer else None
        if favourites and self.rng.random() < self.cfg.favourite_probability:
            return self.rng.choice(favourites)
        items = self.catalogue.by_category[category]
        # price_bias > 1 leans to the expensive end of the (price-sorted) list
        u = self.rng.random() ** (1 / price_bias)  # > 1: u near 1 (expensive); < 1: u near 0 (cheap)
        return items[min(len(items) - 1, int(u * len(items)))]

    def events(self) -> Iterator[tuple[str, str, dict]]:
        """(topic, customer_id, event dict) in event-time order."""
        sessions: list[tuple[int, int]] = []
        for idx, c in enumerate(self.customers):
            first = self._next_session(c, c.truth.signup_ts - 60_000)
            if first is not None:
                sessions.append((first, idx))
        heapq.heapify(sessions)
        pending: list[tuple[int, int, str, str, dict]] = []  # (ts, tiebreak, topic, key, event)
        counter = 0
        while sessions:
            start, idx = heapq.heappop(sessions)
            while pending and pending[0][0] <= start:
                _ts, _, topic, key, ev = heapq.heappop(pending)
                yield topic, key, ev
            c = self.customers[idx]
            for topic, ev in self._session(c, start):
                counter += 1
                heapq.heappush(pending, (ev["ts"], counter, topic, c.truth.customer_id, ev))
            nxt = self._next_session(c, start + HOUR_MS)
            if nxt is not None:
                heapq.heappush(sessions, (nxt, idx))
        while pending:
            _ts, _, topic, key, ev = heapq.heappop(pending)
            yield topic, key, ev

    def payloads(self) -> Iterator[tuple[str, bytes, bytes]]:
        """(topic, key bytes, payload bytes), with bad and duplicate records mixed in as configured."""
        rng = random.Random(self.cfg.seed + 1)
        for topic, key, ev in self.events():
            payload = orjson.dumps(ev)
            if self.cfg.bad_fraction and rng.random() < self.cfg.bad_fraction:
                self.bad_events += 1
                yield topic, key.encode(), corrupt(ev, rng)
                continue
            self.valid_events += 1
            yield topic, key.encode(), payload
            if self.cfg.duplicate_fraction and rng.random() < self.cfg.duplicate_fraction:
                self.duplicate_events += 1
                yield topic, key.encode(), payload

    def truth(self) -> list[CustomerTruth]:
        return [c.truth for c in self.customers]


BAD_KINDS = ("invalid_json", "missing_field", "negative_amount", "naive_ts", "unknown_action", "wrong_type",
             "empty")


def corrupt(event: dict, rng: random.Random) -> bytes:
    """A malformed version of an event, one of several classes of bad input."""
    kind = rng.choice(BAD_KINDS)
    bad = dict(event)
    if kind == "invalid_json":
        return orjson.dumps(bad)[:-3] + b"!!"
    if kind == "missing_field":
        bad.pop("customer_id", None)
    elif kind == "negative_amount":
        if "amount" in bad:
            bad["amount"] = -abs(bad["amount"]) - 1
        else:
            bad["duration_s"] = -5
    elif kind == "naive_ts":
        bad["ts"] = "2026-01-01T10:00:00"
    elif kind == "unknown_action":
        if "action" in bad:
            bad["action"] = "teleport"
        else:
            bad["type"] = "chargeback"
    elif kind == "wrong_type":
        bad["ts"] = [bad["ts"]]
    else:
        return b""
    return orjson.dumps(bad)


def write_truth(sim: Simulator, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "ground_truth.jsonl", "wb") as fh:
        for t in sim.truth():
            fh.write(orjson.dumps(asdict(t)) + b"\n")
    (out_dir / "bundles.json").write_text(json.dumps(sim.catalogue.bundles, indent=1))
    (out_dir / "catalogue.json").write_text(json.dumps(
        [asdict(p) for p in sim.catalogue.products], indent=1))
    summary = {
        "config": {k: v for k, v in asdict(sim.cfg).items()},
        "valid_events": sim.valid_events,
        "bad_events": sim.bad_events,
        "duplicate_events": sim.duplicate_events,
        "customers": len(sim.customers),
        "churned": sum(1 for t in sim.truth() if t.churn_ts is not None),
        "returned": sum(1 for t in sim.truth() if t.return_ts is not None),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def run_simulation(settings: Settings, cfg: SimulationConfig, rate: float, out_dir: str | None,
                   to_file: str | None, quiet: bool = False) -> int:
    sim = Simulator(cfg)
    sent = 0
    started = time.monotonic()
    progress_every = 5000
    if to_file:
        with open(to_file, "wb") as fh:
            for _topic, _key, payload in sim.payloads():
                if _is_json(payload):  # a file holds events; unparseable lines could not be routed
                    fh.write(payload + b"\n")
                    sent += 1
    else:
        producer = EventProducer(settings)
        try:
            for topic, key, payload in paced(sim.payloads(), rate):
                producer.send(topic, key, payload)
                sent += 1
                if not quiet and sent % progress_every == 0:
                    elapsed = time.monotonic() - started
                    sys.stderr.write(f"\rsent {sent:,} events ({sent / max(elapsed, 1e-9):,.0f}/s)")
        finally:
            producer.close()
    if out_dir:
        write_truth(sim, Path(out_dir))
    if not quiet:
        elapsed = time.monotonic() - started
        sys.stderr.write(f"\rsent {sent:,} events in {elapsed:.1f}s "
                         f"({sim.bad_events} malformed, {sim.duplicate_events} duplicates)\n")
    return 0


def _is_json(payload: bytes) -> bool:
    try:
        orjson.loads(payload)
        return True
    except orjson.JSONDecodeError:
        return False
