"""One factory builds the batch step: ``streamproc models train`` (``run_offline``) honours the settings that shape
what the step computes, as the worker does (it used to build its own step and ignored four of them)."""

from __future__ import annotations

import json
from collections import Counter

import orjson

from streamproc.adapters.memory import InMemoryModelStore
from streamproc.pipeline.records import BatchResult
from streamproc.service_commands import train_from_file
from streamproc.settings import Settings
from streamproc.tools.simulate import SimulationConfig, Simulator
from streamproc.training.offline import run_offline

DAY_MS = 86_400_000
# a young model scores low: a low threshold makes sure alerts are raised, so the action table is tried
EAGER = {"alert_threshold": 0.15, "alert_rearm_threshold": 0.1, "risk_high": 0.3, "risk_critical": 0.6}


def history() -> list[tuple[str, bytes, bytes]]:
    payloads = list(Simulator(SimulationConfig(customers=100, days=200, seed=3)).payloads())
    # one purchase three days behind the newest event: late by far more than the allowed lateness
    last = max(orjson.loads(v)["ts"] for _, _, v in payloads)
    late = {"event_id": "late-1", "customer_id": "c0000001", "ts": last - 3 * DAY_MS, "order_id": "late-o1",
            "type": "purchase", "amount": 10.0, "currency": "EUR",
            "items": [{"product_id": "p-late", "category": "c-late", "quantity": 1, "unit_price": 10.0}]}
    return [*payloads, ("transactions", b"c0000001", orjson.dumps(late))]


async def offline(settings: Settings) -> tuple[BatchResult, dict[str, bytes]]:
    outputs = BatchResult()
    _, _, store = await run_offline(history(), settings, batch=500, on_result=outputs.absorb)
    return outputs, {cid: blob for cid, (_, blob, _) in store.rows.items()}


async def test_models_train_honours_the_settings_the_worker_honours() -> None:
    default_out, default_rows = await offline(Settings(**EAGER))
    assert not [d for d in default_out.dead_letters if d.reason == "late_event"]  # applied, by default
    assert "c0000001" in default_rows
    recommended = Counter(item["product_id"] for rec in default_out.recommendations for item in rec.items)
    excluded = {pid for pid, _ in recommended.most_common(3)}
    assert default_out.alerts, "the history must raise alerts, or the action table would go untried"

    graded = {"medium": "mail them", "high": "call them", "critical": "call them now"}
    actions = {tier: graded for tier in ("high", "medium", "low")}
    custom = Settings(**EAGER, late_event_policy="dlq", pseudonymize_key="k" * 32, rec_excluded_products=excluded,
                      retention_actions=actions)
    out, rows = await offline(custom)

    assert [d.reason for d in out.dead_letters] == ["late_event"]
    assert not any(cid.startswith("c0") for cid in rows), "customer ids are pseudonymised before they are stored"
    assert custom.customer_key("c0000001") in rows
    shown = {item["product_id"] for rec in out.recommendations for item in rec.items}
    assert shown and not shown & excluded
    assert out.alerts and {a.action for a in out.alerts} <= {"mail them", "call them", "call them now"}


async def test_models_train_saves_a_checkpoint_trained_through_the_same_step(tmp_path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(orjson.loads(v)) + "\n" for _, _, v in history()))
    models = InMemoryModelStore()
    assert await train_from_file(Settings(), models, str(path)) == 0
    bundle = await models.load(await models.current_version())
    assert bundle is not None and bundle.churn_examples > 0 and bundle.segment_examples > 0
