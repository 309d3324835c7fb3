"""``streamproc`` command line: the edge where settings are read from the environment."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from streamproc.settings import Settings, SettingsError, env_warnings, load_settings


def _settings() -> Settings:
    """The settings from the environment; a configuration error ends the command (status 2) with one line per
    problem instead of a traceback, and a STREAMPROC_ variable that nothing reads gets a warning."""
    for warning in env_warnings():
        print(f"warning: {warning}", file=sys.stderr)
    try:
        return load_settings()
    except SettingsError as exc:
        print("error: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_infra(args: argparse.Namespace) -> int:
    from streamproc.infra import Infra, InfraError

    infra = Infra(_settings())
    try:
        if args.action == "up":
            for status in infra.up():
                print(status.line())
        elif args.action == "down":
            stopped = infra.down()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing (no service was started by streamproc)"))
        else:
            statuses = infra.status()
            for status in statuses:
                print(status.line())
            return 0 if all(s.running for s in statuses) else 3
    except InfraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from streamproc.schemas import stale_schemas, write_schemas
    from streamproc.topics import SCHEMAS_DIR, apply_topics, load_specs

    if args.action == "schemas":
        if args.check:
            stale = stale_schemas(SCHEMAS_DIR)
            if stale:
                print("stale schemas (run `make schemas`): " + ", ".join(stale), file=sys.stderr)
                return 1
            print("schemas are up to date")
            return 0
        for path in write_schemas(SCHEMAS_DIR):
            print(f"wrote {path}")
        return 0
    if args.action == "list":
        for spec in load_specs().values():
            print(f"{spec.name:<18} {spec.role:<7} partitions={spec.partitions} cleanup={spec.cleanup_policy} "
                  f"retention_ms={spec.retention_ms} schema={spec.schema}")
        return 0
    report = apply_topics(_settings(), partitions_override=args.partitions)
    for name in report.created:
        print(f"created   {name}")
    for name in report.unchanged:
        print(f"ok        {name}")
    for line in report.mismatched:
        print(f"MISMATCH  {line}", file=sys.stderr)
    return 0 if report.ok else 2


def tune_gc(settings: Settings) -> None:
    """A long-running process that allocates a few dozen short-lived objects per event: with Python's default
    young-generation threshold (700 allocations) the cyclic collector runs every few events and, through the
    older generations, keeps walking every live object (measured on the batch step: 40 % of its time). Collect
    less often, and move what start-up created (modules, Faust, River) out of the collector's way."""
    if settings.gc_young_threshold:
        gc.collect()
        gc.freeze()
        gc.set_threshold(settings.gc_young_threshold, 20, 10)


def cmd_worker(args: argparse.Namespace) -> int:
    from streamproc.app import run_worker

    settings = _settings()
    if args.web_port is not None:
        settings = settings.model_copy(update={"web_port": args.web_port})
    tune_gc(settings)
    run_worker(settings)
    return 0


def cmd_trainer(args: argparse.Namespace) -> int:
    from streamproc.trainer import run_trainer

    settings = _settings()
    tune_gc(settings)
    run_trainer(settings)
    return 0


def cmd_customer(args: argparse.Namespace) -> int:
    from streamproc.adapters.feature_store import RedisFeatureStore
    from streamproc.adapters.model_store import RedisModelStore
    from streamproc.lookup import lookup

    settings = _settings()
    async def run() -> int:
        store = RedisFeatureStore.from_url(settings.redis_url, **settings.redis_kwargs())
        try:
            if args.action == "show":
                found = await lookup(store, RedisModelStore(store.redis), settings,
                                     settings.customer_key(args.customer_id))
                if found is None:
                    print(f"no customer {args.customer_id!r}", file=sys.stderr)
                    return 1
                if args.json:
                    print(json.dumps(found, indent=2, sort_keys=True))
                else:
                    feats = found["features"]
                    width = max(len(k) for k in feats)
                    for key in sorted(feats):
                        print(f"{key:<{width}}  {feats[key]}")
                    seg = found["segment"]
                    print(f"{'segment':<{width}}  {seg.get('name', seg['id']) if seg else '-'}")
                    print(f"{'churn_probability':<{width}}  {found['churn']['probability']}")
                return 0
            erased = await store.forget(settings.customer_key(args.customer_id))
            print("erased" if erased else "no stored features; the erasure is recorded anyway")
            return 0
        finally:
            await store.close()

    return asyncio.run(run())


async def train_from_file(settings: Any, models: Any, path: str | None) -> int:
    """Bootstrap the global models from recorded events (JSON lines or CSV, like ``replay``): the batch step
    and the trainer run in this process, and the result becomes the current checkpoint for every worker."""
    from pathlib import Path

    from streamproc.offline import run_offline
    from streamproc.replay import timed_events

    if not path:
        print("usage: streamproc models train FILE", file=sys.stderr)
        return 2
    timed = timed_events(Path(path))
    payloads = [(target, str(e.get("customer_id", "")).encode(), orjson.dumps(e)) for _, _, target, e in timed]
    bundle, _, _ = await run_offline(payloads, settings)
    version = await models.save(bundle, settings.checkpoint_keep)
    print(f"trained on {len(payloads)} events: checkpoint v{version} is current "
          f"({bundle.churn_examples} churn, {bundle.segment_examples} segment examples)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from streamproc.adapters.feature_store import RedisFeatureStore
    from streamproc.adapters.model_store import RedisModelStore

    settings = _settings()
    async def run() -> int:
        store = RedisFeatureStore.from_url(settings.redis_url, **settings.redis_kwargs())
        models = RedisModelStore(store.redis)
        try:
            if args.action == "train":
                return await train_from_file(settings, models, args.version)
            if args.action == "rollback":
                await models.set_current(int(args.version))
                print(f"current model version is now {args.version}")
                return 0
            summary = await models.summary()
            versions = await models.versions()
            if summary is None:
                print("no model checkpoint yet")
                return 1
            if args.json:
                print(json.dumps({**summary, "versions": versions}, indent=2, sort_keys=True))
                return 0
            print(f"current version {summary['version']} (kept: {versions}); classifier {summary['classifier']}, "
                  f"segmenter {summary['segmenter']}")
            print(f"churn examples {summary['churn_examples']}, segment examples {summary['segment_examples']}, "
                  f"drift detections {summary['drift_detections']}")
            print("prequential (scored at snapshot time, once labels matured):")
            for key in ("roc_auc", "log_loss", "precision", "recall", "rolling_roc_auc", "rolling_precision",
                        "rolling_recall", "labels", "positive_rate"):
                print(f"  {key:<18} {summary.get(key, 0):.4f}" if isinstance(summary.get(key), float)
                      else f"  {key:<18} {summary.get(key)}")
            if "rec_purchases" in summary:
                print("recommendations (each purchase vs the last recommendation shown before it):")
                print(f"  hit-rate@k {summary['rec_hit_rate']:.4f}  precision@k {summary['rec_precision']:.4f}  "
                      f"on {summary['rec_purchases']} purchases")
                print(f"  popularity baseline: hit-rate@k {summary['rec_baseline_hit_rate']:.4f}  "
                      f"precision@k {summary['rec_baseline_precision']:.4f}")
                print(f"  co-purchase model: {summary.get('rec_items', 0)} items, {summary.get('rec_pairs', 0)} pairs")
            print("segments:")
            for sid, profile in sorted(summary.get("segments", {}).items()):
                centroid = ", ".join(f"{k}={v}" for k, v in profile["centroid"].items())
                print(f"  {sid} {profile['name']:<45} size {profile.get('size_share', 0):.1%}, "
                      f"spend {profile.get('spend_share', 0):.1%}: {centroid}")
            return 0
        finally:
            await store.close()

    return asyncio.run(run())


def cmd_alerts(args: argparse.Namespace) -> int:
    from streamproc.tail import follow_alerts

    return follow_alerts(_settings(), args.risk, args.tier, args.json, args.timeout, args.max)


def cmd_tail(args: argparse.Namespace) -> int:
    from streamproc.tail import tail_topic

    return tail_topic(_settings(), args.topic, args.max, args.timeout, args.json)


def cmd_simulate(args: argparse.Namespace) -> int:
    from streamproc.simulate import SimulationConfig, run_simulation

    cfg = SimulationConfig(
        customers=args.customers, days=args.days, seed=args.seed, bad_fraction=args.bad_fraction,
        duplicate_fraction=args.duplicate_fraction, start=args.start,
    )
    return run_simulation(_settings(), cfg, rate=args.rate, out_dir=args.out, to_file=args.to_file,
                          quiet=args.quiet)


def cmd_replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from streamproc.replay import run_replay

    mapping = dict(item.split("=", 1) for item in args.map)
    stats = run_replay(_settings(), Path(args.file), args.format, mapping, args.speed, args.topic, args.quiet)
    return 0 if stats.sent else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from streamproc.evaluate import run_evaluate

    run_evaluate(_settings(), Path(args.run), Path(args.out) if args.out else None)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streamproc.demo import run_demo

    return run_demo(_settings(), customers=args.customers, days=args.days, rate=args.rate)


def cmd_settings(args: argparse.Namespace) -> int:
    print(json.dumps(_settings().masked(), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamproc", description="Real-time customer intelligence.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("infra", help="start, stop or inspect the local Kafka broker and Redis")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=cmd_infra)

    p = sub.add_parser("topics", help="apply topic declarations, list them, or (re)generate schemas")
    p.add_argument("action", choices=["apply", "list", "schemas"])
    p.add_argument("--check", action="store_true", help="with schemas: fail if the files are stale")
    p.add_argument("--partitions", type=int, default=None, help="override every topic's partition count")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("worker", help="run a stream-processing worker")
    p.add_argument("--web-port", type=int, default=None)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("trainer", help="run the global model trainer alone (scoring workers then run with "
                                       "STREAMPROC_TRAINER_ENABLED=false)")
    p.set_defaults(func=cmd_trainer)

    p = sub.add_parser("customer", help="show or erase one customer")
    p.add_argument("action", choices=["show", "forget"])
    p.add_argument("customer_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_customer)

    p = sub.add_parser("models", help="show the global models, roll back a version, or train from a file")
    p.add_argument("action", nargs="?", choices=["show", "rollback", "train"], default="show")
    p.add_argument("version", nargs="?", help="rollback: the version; train: the events file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("alerts", help="follow churn alerts: streamproc alerts tail [--risk high] [--tier high]")
    p.add_argument("action", choices=["tail"])
    p.add_argument("--risk", choices=["medium", "high", "critical"], default=None)
    p.add_argument("--tier", choices=["low", "medium", "high"], default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=None, help="stop after this many idle seconds")
    p.add_argument("--max", type=int, default=None)
    p.set_defaults(func=cmd_alerts)

    p = sub.add_parser("tail", help="print records of a topic (dlq, churn-alerts, recommendations, ...)")
    p.add_argument("topic")
    p.add_argument("--max", type=int, default=20)
    p.add_argument("--timeout", type=float, default=5.0, help="stop after this many idle seconds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("simulate", help="produce synthetic customer traffic with ground truth")
    p.add_argument("--customers", type=int, default=1000)
    p.add_argument("--days", type=int, default=180)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rate", type=float, default=0.0, help="events per second (0: as fast as possible)")
    p.add_argument("--bad-fraction", type=float, default=0.0)
    p.add_argument("--duplicate-fraction", type=float, default=0.0)
    p.add_argument("--start", default="2026-01-01T00:00:00+00:00", help="event time of day 0")
    p.add_argument("--out", default="runs/latest", help="folder for the ground truth")
    p.add_argument("--to-file", default=None, help="write JSON lines here instead of producing to Kafka")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("replay", help="publish recorded events (JSON lines or CSV) in event-time order")
    p.add_argument("file")
    p.add_argument("--format", choices=["jsonl", "csv"], default=None, help="default: from the file suffix")
    p.add_argument("--map", action="append", default=[], metavar="COLUMN=FIELD", help="CSV column mapping")
    p.add_argument("--speed", type=float, default=0.0, help="event time / wall time (0: as fast as possible)")
    p.add_argument("--topic", choices=["clicks", "transactions"], default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("evaluate", help="score a simulated run's outputs against its ground truth")
    p.add_argument("--run", default="runs/latest", help="the simulation's output folder (ground truth)")
    p.add_argument("--out", default=None, help="write the scores as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="local infra + topics + worker + simulated traffic, then show results")
    p.add_argument("--customers", type=int, default=1000)
    p.add_argument("--days", type=int, default=150)
    p.add_argument("--rate", type=float, default=0.0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("settings", help="print the effective settings (secrets masked)")
    p.set_defaults(func=cmd_settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
