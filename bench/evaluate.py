"""End-to-end model evaluation on the real pipeline: simulate → Kafka → one worker (everything on, its own
trainer) → Redis, then `streamproc evaluate` against the simulator's ground truth.

Fresh topics (own prefix) and Redis db 15. Waits until the worker has processed every event and the
trainer has learned every example it was sent and written a checkpoint, then scores. The scores land in
``bench/results/evaluate-<tag>.json``.

Usage: python bench/evaluate.py [--customers 20000] [--days 180] [--rate 2000] [--trainer-process]. Not a test.
``--rate`` offers the events live at that rate instead of as a backlog: drained as fast as possible, the
clicks and transactions topics drift apart by hours of event time (the worker reads them independently),
and recommendations made from a session's views miss purchases not read yet.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import isolated_run  # noqa: E402

from streamproc.tools.demo import metric_total, processed_total, scrape, start_pipeline, stop_pipeline  # noqa: E402
from streamproc.topics import delete_run_topics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="events per second offered (0: as fast as possible, a backlog the worker drains)")
    parser.add_argument("--trainer-process", action="store_true",
                        help="the production layout: a scoring worker and `streamproc trainer` in its own process")
    args = parser.parse_args()
    settings, env, tag = isolated_run("eval", 15, 6196)
    run_dir = ROOT / ".local" / f"eval-{tag}"
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer_port = settings.web_port + 100
    procs = start_pipeline(env, run_dir, trainer_port if args.trainer_process else None, cwd=ROOT)
    try:
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "streamproc.cli", "simulate", "--customers", str(args.customers),
                        "--days", str(args.days), "--seed", str(args.seed), "--rate", str(args.rate),
                        "--out", str(run_dir), "--quiet"],
                       env=env, cwd=ROOT, check=True)
        produced = sum(1 for _ in (run_dir / "ground_truth.jsonl").open())  # customers, for the log only
        print(f"simulated {produced} customers in {time.monotonic() - started:.0f}s", flush=True)
        stable = 0
        last = -1.0
        while stable < 3:
            time.sleep(10)
            m = scrape(settings.web_port)
            done = processed_total(m)
            sent = metric_total(m, "streamproc_training_examples_total")
            learned = metric_total(scrape(trainer_port) if args.trainer_process else m,
                                   "streamproc_examples_learned_total")
            print(f"processed {done:,.0f}, examples sent {sent:,.0f}, learned {learned:,.0f}", flush=True)
            stable = stable + 1 if done == last and learned >= sent else 0
            last = done
        time.sleep(15)  # a last checkpoint, reloaded by the scorer
        out = ROOT / "bench" / "results" / f"evaluate-{tag}.json"
        out.parent.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "streamproc.cli", "evaluate", "--run", str(run_dir), "--out", str(out)],
                       env=env, cwd=ROOT, check=True)
        print(f"events processed {last:,.0f} in {time.monotonic() - started:.0f}s; scores in {out}")
    finally:
        stop_pipeline(procs, 60)
        delete_run_topics(settings)


if __name__ == "__main__":
    main()
