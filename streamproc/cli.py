"""``streamproc`` command line: the edge where settings are read from the environment."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from streamproc.access import EXIT_REFUSED, REFUSALS, explain
from streamproc.schemas import stale_schemas, write_schemas
from streamproc.security import kafka_acl_commands, kafka_grants, redis_acl_rules
from streamproc.settings import settings_from_env
from streamproc.tools.alerts import export_alerts, follow_alerts
from streamproc.tools.btyd_sim import BtydSimulation
from streamproc.tools.btyd_sim import write_csv as write_btyd_csv
from streamproc.tools.demo import run_demo
from streamproc.tools.infra import Infra, InfraError
from streamproc.tools.replay import run_replay
from streamproc.tools.secure_infra import SecureInfra
from streamproc.tools.simulate import SimulationConfig, run_simulation
from streamproc.tools.tail import tail_topic
from streamproc.topics import SCHEMAS_DIR, apply_topics, load_specs
from streamproc.ui import UI_PORT

# the one place the command line loads code late: these commands import Faust and River (seconds of start-up),
# which the others (and ``--help``) should not wait for
SERVICE_COMMANDS = "streamproc.service_commands"


def service(name: str) -> Callable[[argparse.Namespace], int]:
    """The command ``name`` of ``SERVICE_COMMANDS``, imported when it runs."""

    def run(args: argparse.Namespace) -> int:
        command: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(SERVICE_COMMANDS), name)
        return command(args)

    return run


def cmd_infra(args: argparse.Namespace) -> int:
    settings = settings_from_env()
    infra, secure = Infra(settings), SecureInfra(settings)
    try:
        if args.action == "up":
            for status in infra.up(redis_cluster=args.redis_cluster, kafka_brokers=args.kafka_brokers):
                print(status.line())
            if args.kafka_brokers > 1:
                print(f"kafka cluster ready: STREAMPROC_KAFKA_BOOTSTRAP={infra.kafka_cluster.bootstrap} "
                      f"STREAMPROC_TOPIC_REPLICATION={min(3, args.kafka_brokers)}")
            if args.redis_cluster:
                print(f"redis cluster healthy: STREAMPROC_REDIS_URL={infra.redis_cluster.url}")
            if args.secure:
                for status in secure.up():
                    print(status.line())
                print(f"secure kafka and redis ready: each role's settings in {secure.dir}/<role>.env "
                      "(worker, trainer, reader, admin)")
        elif args.action == "down":
            stopped = infra.down() + secure.down()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing (no service was started by streamproc)"))
        else:
            statuses = infra.status() + [s for s in (secure.kafka.status(), secure.redis.status()) if s.running]
            for status in statuses:
                print(status.line())
            return 0 if all(s.running for s in statuses) else 3
    except InfraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_security(args: argparse.Namespace) -> int:
    settings = settings_from_env()
    print("# Kafka: one SCRAM user per role, only these ACLs "
          "(StandardAuthorizer, allow.everyone.if.no.acl.found=false)")
    for command in kafka_acl_commands(kafka_grants(settings)):
        print(command)
    print("# Redis: one ACL user per role (the default user off)")
    for role, rules in redis_acl_rules().items():
        print(f"user {role} on >{{password}} {rules}")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
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
    report = apply_topics(settings_from_env(), partitions_override=args.partitions)
    for name in report.created:
        print(f"created   {name}")
    for name in report.unchanged:
        print(f"ok        {name}")
    for line in report.mismatched:
        print(f"MISMATCH  {line}", file=sys.stderr)
    return 0 if report.ok else 2


def cmd_alerts(args: argparse.Namespace) -> int:
    if args.action == "export":
        if not (args.since and args.until):
            print("error: export needs --since DATE and --until DATE", file=sys.stderr)
            return 2
        return export_alerts(settings_from_env(), args.since, args.until, args.format,
                             Path(args.out) if args.out else None)
    return follow_alerts(settings_from_env(), args.min_risk, args.tier, args.json, args.timeout, args.max,
                         group=args.group, from_start=args.from_start)


def cmd_tail(args: argparse.Namespace) -> int:
    return tail_topic(settings_from_env(), args.topic, args.max, args.timeout, args.json)


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.btyd:
        if not args.to_file:
            print("error: --btyd writes a CSV: give --to-file FILE.csv", file=sys.stderr)
            return 2
        btyd = BtydSimulation(customers=args.customers, days=args.days, seed=args.seed, start=args.start)
        rows = write_btyd_csv(btyd, Path(args.to_file))
        truth = btyd.truth
        print(f"wrote {rows} transactions of {args.customers} customers to {args.to_file} (BG/NBD truth: r={truth.r} "
              f"alpha={truth.alpha} a={truth.a} b={truth.b})", file=sys.stderr)
        return 0
    cfg = SimulationConfig(
        customers=args.customers, days=args.days, seed=args.seed, bad_fraction=args.bad_fraction,
        duplicate_fraction=args.duplicate_fraction, start=args.start,
    )
    return run_simulation(settings_from_env(), cfg, rate=args.rate, out_dir=args.out, to_file=args.to_file,
                          quiet=args.quiet)


def cmd_replay(args: argparse.Namespace) -> int:
    mapping = dict(item.split("=", 1) for item in args.map)
    stats = run_replay(settings_from_env(), Path(args.file), args.format, mapping, args.speed, args.topic, args.quiet)
    return 0 if stats.sent else 1


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(settings_from_env(), customers=args.customers, days=args.days, rate=args.rate,
                    effect=not args.no_effect)


def cmd_settings(args: argparse.Namespace) -> int:
    print(json.dumps(settings_from_env().masked(), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamproc", description="Real-time customer intelligence.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("infra", help="start, stop or inspect the local Kafka broker and Redis")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--kafka-brokers", type=int, default=1,
                   help="with up: also a replicated Kafka cluster of this many KRaft nodes "
                   "(STREAMPROC_KAFKA_CLUSTER_PORT+)")
    p.add_argument("--redis-cluster", action="store_true",
                   help="with up: also a local Redis Cluster (3 masters, 3 replicas; STREAMPROC_REDIS_CLUSTER_PORT+)")
    p.add_argument("--secure", action="store_true",
                   help="with up: also a Kafka node that requires SASL_SSL (SCRAM) and ACLs, and a Redis on TLS "
                   "with one ACL user per role (see README, Production security)")
    p.set_defaults(func=cmd_infra)

    p = sub.add_parser("security", help="print the Kafka ACLs and Redis ACL rules of each role")
    p.add_argument("action", choices=["acls"])
    p.set_defaults(func=cmd_security)

    p = sub.add_parser("topics", help="apply topic declarations, list them, or (re)generate schemas")
    p.add_argument("action", choices=["apply", "list", "schemas"])
    p.add_argument("--check", action="store_true", help="with schemas: fail if the files are stale")
    p.add_argument("--partitions", type=int, default=None, help="override every topic's partition count")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("worker", help="run a stream-processing worker")
    p.add_argument("--web-port", type=int, default=None)
    p.set_defaults(func=service("cmd_worker"))

    p = sub.add_parser("trainer", help="run the global model trainer alone (scoring workers then run with "
                                       "STREAMPROC_TRAINER_ENABLED=false)")
    p.set_defaults(func=service("cmd_trainer"))

    p = sub.add_parser("customer", help="show or erase one customer, or record an opt-out of retention contact")
    p.add_argument("action", choices=["show", "forget", "suppress", "unsuppress"])
    p.add_argument("customer_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=service("cmd_customer"))

    p = sub.add_parser("models", help="show the global models, roll back a version, or train from a file")
    p.add_argument("action", nargs="?", choices=["show", "rollback", "train"], default="show")
    p.add_argument("version", nargs="?", help="rollback: the version; train: the events file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=service("cmd_models"))

    p = sub.add_parser("alerts", help="follow churn alerts (tail: resumes where its consumer group left off) or "
                                      "export a period's alerts for a campaign tool")
    p.add_argument("action", choices=["tail", "export"])
    p.add_argument("--min-risk", "--risk", dest="min_risk", choices=["medium", "high", "critical"], default=None,
                   help="tail: this risk level and above")
    p.add_argument("--tier", choices=["low", "medium", "high"], default=None, help="tail: this value tier and above")
    p.add_argument("--json", action="store_true", help="tail: the full records as JSON lines")
    p.add_argument("--timeout", type=float, default=None, help="tail: stop after this many idle seconds")
    p.add_argument("--max", type=int, default=None, help="tail: stop after this many records")
    p.add_argument("--group", default=None, help="tail: the consumer group (default: <app id>-alerts-tail)")
    p.add_argument("--from-start", action="store_true", help="tail: replay the topic from its beginning")
    p.add_argument("--since", default=None, metavar="DATE", help="export: alerts at or after this event time")
    p.add_argument("--until", default=None, metavar="DATE", help="export: alerts before this event time")
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv", help="export: the file format")
    p.add_argument("--out", default=None, help="export: the file (default: standard output)")
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
    p.add_argument("--btyd", action="store_true", help="a transactions-only history from BG/NBD's generative "
                                                       "process (streamproc/tools/btyd_sim.py), as a CSV to --to-file")
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
    p.set_defaults(func=service("cmd_evaluate"))

    p = sub.add_parser("backtest", help="replay a transaction history's calibration period through the pipeline "
                                        "and judge the churn scores on its holdout period")
    p.add_argument("file", help="a CSV of transactions, one row per order (or order line, with --order)")
    p.add_argument("--customer", required=True, metavar="COL", help="the customer id column")
    p.add_argument("--date", required=True, metavar="COL", help="the date or time column")
    p.add_argument("--amount", required=True, metavar="COL", help="the order total column (negative: a refund)")
    p.add_argument("--order", default=None, metavar="COL", help="the order id column: its rows are one transaction")
    p.add_argument("--date-format", default=None, help="strptime format of --date (default: ISO 8601, YYYYMMDD or "
                                                       "epoch ms; UTC without an offset)")
    p.add_argument("--calibration-end", required=True, metavar="DATE", help="replayed: everything before this")
    p.add_argument("--holdout-end", required=True, metavar="DATE", help="judged: purchases from the calibration "
                                                                        "end to before this")
    p.add_argument("--horizon-days", type=int, default=None, help="the churn horizon (default: the setting)")
    p.add_argument("--redis-db", type=int, default=14, help="an empty Redis database of the backtest's own")
    p.add_argument("--flush", action="store_true", help="empty --redis-db first if it holds data")
    p.add_argument("--keep", action="store_true", help="keep the backtest's topics (deleted by default)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for processing and learning")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    p.set_defaults(func=service("cmd_backtest"))

    p = sub.add_parser("retention", help="the retention ledger: alert outcomes and the uplift of contacting")
    p.set_defaults(func=service("cmd_retention"))

    p = sub.add_parser("interventions", help="the uplift of contacting alerted customers over the control group")
    p.add_argument("action", choices=["report"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=service("cmd_interventions"))

    p = sub.add_parser("forward", help="deliver churn alerts to a webhook (signed, retried, at least once)")
    p.add_argument("what", choices=["alerts"])
    p.add_argument("--url", default=None, help="the webhook (default: STREAMPROC_WEBHOOK_URL)")
    p.add_argument("--group", default=None, help="the consumer group (default: <app id>-alerts-forwarder)")
    p.set_defaults(func=service("cmd_forward"))

    p = sub.add_parser("ui", help="the retention team's pages: at risk, customer, segments, uplift, health")
    p.add_argument("--port", type=int, default=UI_PORT)
    p.add_argument("--metrics", action="append", metavar="URL",
                   help="a worker's /metrics (repeat for several; default: the local worker's)")
    p.set_defaults(func=service("cmd_ui"))

    p = sub.add_parser("report", help="the retention pages' figures in one self-contained HTML file")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--metrics", action="append", metavar="URL",
                   help="a worker's /metrics (repeat for several; default: the local worker's)")
    p.set_defaults(func=service("cmd_report"))

    p = sub.add_parser("demo", help="local infra + topics + worker + simulated traffic, then show results")
    p.add_argument("--customers", type=int, default=1000)
    p.add_argument("--days", type=int, default=150)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--no-effect", action="store_true", help="the simulated retention team's contacts bring nobody "
                                                              "back: the measured uplift should cover 0")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("settings", help="print the effective settings (secrets masked)")
    p.set_defaults(func=cmd_settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    REFUSALS.install()
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        line = explain(exc, settings_from_env())
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
