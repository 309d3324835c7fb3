"""The retention loop against a known truth: does the measured uplift find the simulated team's lift, and 0 without it?

1. The persona simulator's history goes through the real pipeline (a scoring worker and the trainer process) to
   its own topics; the churn alerts it sends are read back.
2. The simulated retention team (``streamproc.tools.treatment``) contacts every alerted customer outside the control
   group with the recommended action; contact brings customers back by a known lift per action (+8 points for a
   coupon, +3 for an email or newsletter, ...). ``streamproc retention`` reads the alerts, the interventions and the
   history with the extra purchases, in event-time order, and decides every alert's outcome.
3. The same with ``--no-effect`` semantics (contacts, no extra purchases): the true uplift is 0.

Reported per action and value tier: treated and control retention, the uplift and its 95 % Newcombe interval, and
whether the interval covers the truth. Results in ``bench/results/retention-uplift-<date>-<customers>.json``.

Usage: python bench/retention_uplift.py [--customers 5000] [--days 180] [--control-share 0.1]. Not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import isolated_run, machine  # noqa: E402

from streamproc.settings import Settings  # noqa: E402
from streamproc.tools.demo import metric_total, processed_total, scrape, start_pipeline, stop_pipeline  # noqa: E402
from streamproc.tools.simulate import SimulationConfig, Simulator  # noqa: E402
from streamproc.tools.tail import read_topic  # noqa: E402
from streamproc.tools.treatment import measure_uplift  # noqa: E402
from streamproc.topics import ALERTS_TOPIC, delete_run_topics  # noqa: E402


def alerts_of_a_run(customers: int, days: int, seed: int, control_share: float) -> tuple[list[dict], float]:
    settings, env, tag = isolated_run("upl", 13, 6296)
    env = {**env, "STREAMPROC_CONTROL_SHARE": str(control_share)}
    run_dir = ROOT / ".local" / f"uplift-{tag}"
    procs = start_pipeline(env, run_dir, settings.web_port + 100, cwd=ROOT)
    started = time.monotonic()
    try:
        subprocess.run([sys.executable, "-m", "streamproc.cli", "simulate", "--customers", str(customers), "--days",
                        str(days), "--seed", str(seed), "--out", str(run_dir), "--quiet"], env=env, cwd=ROOT,
                       check=True)
        stable, last = 0, -1.0
        while stable < 3:
            time.sleep(10)
            m = scrape(settings.web_port)
            done = processed_total(m)
            sent = metric_total(m, "streamproc_training_examples_total")
            learned = metric_total(scrape(settings.web_port + 100), "streamproc_examples_learned_total")
            print(f"processed {done:,.0f}, examples sent {sent:,.0f}, learned {learned:,.0f}", flush=True)
            stable = stable + 1 if done == last and learned >= sent else 0
            last = done
        alerts = read_topic(settings, ALERTS_TOPIC, 10**7, 5.0)
    finally:
        stop_pipeline(procs, 60)
        delete_run_topics(settings)
    return alerts, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--control-share", type=float, default=0.1)
    parser.add_argument("--no-effect", action="store_true", help="only the run whose contacts bring nobody back")
    args = parser.parse_args()
    alerts, seconds = alerts_of_a_run(args.customers, args.days, args.seed, args.control_share)
    sim = Simulator(SimulationConfig(customers=args.customers, days=args.days, seed=args.seed))
    transactions = [json.loads(v) for topic, _, v in sim.payloads() if topic == "transactions"]
    settings = Settings()
    effects = (False,) if args.no_effect else (True, False)
    runs = [measure_uplift(settings, alerts, transactions, effect, seed=args.seed + 1, redis_db=12,
                           log_dir=ROOT / ".local" / "uplift") for effect in effects]
    for run in runs:
        truth = run["true_lift"]
        for row in run["table"]:
            action = row["key"].removeprefix("action=")
            if row["key"].startswith("action=") and row["uplift"] is not None:
                row["truth"] = truth[action]
                row["covered"] = row["lower"] <= truth[action] <= row["upper"]
        print(f"\n== effect {'on' if run['effect'] else 'off'}: {run['alerts']} alerts, {run['interventions']} "
              f"contacts, {run['extra_purchases']} brought back")
        for row in run["table"]:
            print(f"  {row['key']:<42} treated {row['treated_retained']:>5}/{row['treated']:<5} control "
                  f"{row['control_retained']:>4}/{row['control']:<4} uplift {row['uplift']} "
                  f"[{row['lower']}, {row['upper']}] truth {row.get('truth', '-')} covered {row.get('covered', '-')}")
    date = datetime.now(UTC).date().isoformat()
    out = ROOT / "bench" / "results" / f"retention-uplift-{date}-{args.customers}.json"
    out.write_text(json.dumps({
        "what": "bench/retention_uplift.py: persona run through the pipeline, simulated team, streamproc retention",
        "date": date, "machine": machine(), "customers": args.customers, "days": args.days, "seed": args.seed,
        "control_share": args.control_share, "pipeline_seconds": round(seconds), "runs": runs}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
