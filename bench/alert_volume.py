"""Alert volume per 1,000 customers per month, without a daily budget and with one (``STREAMPROC_ALERT_DAILY_BUDGET``),
on the persona simulator: how many alerts a retention team would get, how many the budget holds back, what value
at risk is sent, and how alerts clear.

The batch step and sweep in process (in-memory store, the records spread over the declared partitions), scored by
a checkpoint trained on the same history (``training.offline``), the same records and checkpoint for both runs.
Not a test.

Usage: python bench/alert_volume.py [--customers 3000] [--days 365] [--budget '{"high": 3, "medium": 3, "low": 2}']
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from batch_step import as_records  # noqa: E402
from common import machine  # noqa: E402

from streamproc.adapters.memory import InMemoryFeatureStore  # noqa: E402
from streamproc.domain.models import ModelBundle  # noqa: E402
from streamproc.pipeline.factory import build_processor  # noqa: E402
from streamproc.pipeline.records import BatchResult, RawRecord  # noqa: E402
from streamproc.settings import Settings  # noqa: E402
from streamproc.tools.simulate import SimulationConfig, Simulator  # noqa: E402
from streamproc.training.offline import run_offline  # noqa: E402

DAYS_PER_MONTH = 365.25 / 12


async def run(records: list[RawRecord], trained: bytes, settings: Settings) -> dict[str, object]:
    proc = build_processor(settings, InMemoryFeatureStore())
    proc.bundle = ModelBundle.loads(trained)
    proc.sweep_budget = None
    sent = BatchResult()
    for i in range(0, len(records), 2000):
        result = await proc.process(records[i : i + 2000])
        await proc.sweep()
        result.absorb(proc.sweep_outputs)
        sent.alerts.extend(result.alerts)
        sent.cleared.extend(result.cleared)
    registry = proc.metrics.registry
    over = {tier: registry.get_sample_value("streamproc_churn_alerts_over_budget_total", {"value_tier": tier}) or 0.0
            for tier in ("high", "medium", "low")}
    return {
        "alerts": len(sent.alerts), "by_tier": dict(Counter(a.value_tier for a in sent.alerts)),
        "over_budget": {k: int(v) for k, v in over.items()},
        "value_at_risk_sent": round(sum(a.value_at_risk for a in sent.alerts), 2),
        "cleared": dict(Counter(c.cleared_by for c in sent.cleared)),
        "median_days_to_clear": sorted(c.days for c in sent.cleared)[len(sent.cleared) // 2] if sent.cleared else None,
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    payloads = list(Simulator(SimulationConfig(customers=args.customers, days=args.days, seed=args.seed)).payloads())
    settings = Settings()
    bundle, _, _ = await run_offline(payloads, settings)
    trained = bundle.dumps()
    records = as_records(payloads)
    budget = json.loads(args.budget)
    runs = {"no budget": await run(records, trained, settings),
            "budget": await run(records, trained, settings.model_copy(update={"alert_daily_budget": budget}))}
    per = 1000 / args.customers / (args.days / DAYS_PER_MONTH)
    for figures in runs.values():
        figures["alerts_per_1000_customers_per_month"] = round(int(figures["alerts"]) * per, 1)  # type: ignore[call-overload]
    return {"bench": "alert_volume", "customers": args.customers, "days": args.days, "seed": args.seed,
            "events": len(records), "daily_budget": budget, "runs": runs, "machine": machine(),
            "date": datetime.now(UTC).date().isoformat()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--budget", default='{"high": 3, "medium": 3, "low": 2}')
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    out = ROOT / "bench" / "results" / f"alert-volume-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
