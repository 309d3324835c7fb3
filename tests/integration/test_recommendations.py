"""Recommendations on the real broker and Redis: learned by the trainer, published by the worker."""

from __future__ import annotations

import time
import urllib.request

import orjson
import pytest

from streamproc.contracts.outputs import Recommendation, TrainingExample, validate
from streamproc.tools.simulate import SimulationConfig, Simulator
from streamproc.tools.tail import read_topic, read_training_examples
from tests.conftest import produce

pytestmark = pytest.mark.integration


def test_a_purchase_publishes_a_recommendation_with_reasons_and_the_lookup_shows_it(topics, worker_factory):
    settings = topics
    sim = Simulator(SimulationConfig(customers=120, days=40, seed=5))
    history = list(sim.payloads())
    produce(settings, history)
    worker = worker_factory(settings).start()
    worker.wait_processed(len(history), timeout=120)

    # wait for a checkpoint that has learned baskets (the trainer owns the co-purchase rules)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = worker.metrics()
        if m.get('streamproc_examples_learned_total{kind="basket"}', 0) > 0 and m.get("streamproc_model_version"):
            break
        time.sleep(1)
    else:
        pytest.fail(f"no basket learned / no checkpoint: {worker.log_tail()}")
    time.sleep(3)  # the worker reloads the checkpoint holding them

    # a known customer buys the anchor of a simulated bundle
    anchor = sim.catalogue.bundles[0][0]
    product = sim.catalogue.by_id[anchor]
    last_ts = max(orjson.loads(p)["ts"] for _, _, p in history if p.startswith(b"{"))
    buy = {"event_id": "rec-test-1", "customer_id": "rec-customer", "ts": last_ts + 1000, "order_id": "rec-o1",
           "type": "purchase", "amount": product.price, "currency": "EUR",
           "items": [{"product_id": anchor, "category": product.category, "quantity": 1,
                      "unit_price": product.price}]}
    produce(settings, [("transactions", b"rec-customer", orjson.dumps(buy))])

    deadline = time.monotonic() + 60
    found = []
    while time.monotonic() < deadline and not found:
        records = read_topic(settings, "recommendations", 1_000_000, 3.0)
        found = [r for r in records if r["customer_id"] == "rec-customer"]
    assert found, worker.log_tail()
    (rec,) = found
    validate(Recommendation, rec)  # the published record honours its contract
    assert rec["trigger"] == "purchase" and rec["recommendation_id"] == "rec-customer:purchase:rec-test-1"
    items = [i["product_id"] for i in rec["items"]]
    assert anchor not in items  # just bought
    assert 0 < len(items) <= settings.rec_k
    assert all(i["reason"] in ("bought_together", "popular_in_segment", "viewed_not_bought") for i in rec["items"])
    assert [i["score"] for i in rec["items"]] == sorted((i["score"] for i in rec["items"]), reverse=True)

    with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/customers/rec-customer") as resp:
        shown = orjson.loads(resp.read())["last_recommendation"]
    assert shown["id"] == rec["recommendation_id"] and shown["items"] == items

    # the purchase reached the trainer as a basket, in its contract, without the customer id
    baskets = [e for e in read_training_examples(settings)[0] if e["kind"] == "basket"]
    assert baskets and all(validate(TrainingExample, e) for e in baskets)
    assert not any("rec-customer" in orjson.dumps(e).decode() for e in baskets)
    metrics = worker.metrics()
    assert metrics.get('streamproc_recommendations_total{trigger="purchase"}', 0) >= 1
    worker.stop()
