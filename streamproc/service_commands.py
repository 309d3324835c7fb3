"""The commands that start a service or load the models (``worker``, ``trainer``, ``customer``, ``models``,
``evaluate``, ``backtest``): they import Faust and River, seconds of start-up, so ``streamproc.cli`` loads this
module only when one of them runs."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
from pathlib import Path
from typing import Any

import orjson

from streamproc.adapters.checkpoint_signing import signing_key
from streamproc.adapters.model_store import RedisModelStore
from streamproc.adapters.redis_clients import sync_redis
from streamproc.adapters.redis_store import RedisFeatureStore
from streamproc.domain.retention import uplift_table
from streamproc.pipeline.lookup import locate, lookup
from streamproc.runtime.app import run_worker
from streamproc.runtime.forwarder import run_forwarder
from streamproc.runtime.ledger import read_outcomes, run_ledger
from streamproc.settings import Settings, settings_from_env
from streamproc.tools.backtest import Columns, print_report, run_backtest
from streamproc.tools.evaluate import run_evaluate
from streamproc.tools.replay import timed_events
from streamproc.tools.treatment import uplift_lines
from streamproc.training.offline import run_offline
from streamproc.training.trainer import run_trainer
from streamproc.ui.server import run_ui, write_report


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
    settings = settings_from_env()
    if args.web_port is not None:
        settings = settings.model_copy(update={"web_port": args.web_port})
    tune_gc(settings)
    run_worker(settings)
    return 0


def cmd_forward(args: argparse.Namespace) -> int:
    try:
        run_forwarder(settings_from_env(), args.url, args.group)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def metrics_urls(settings: Settings, given: list[str] | None) -> list[str]:
    """The workers' /metrics to sample: as given, else the local worker's."""
    return given or [f"http://127.0.0.1:{settings.web_port}/metrics"]


def cmd_ui(args: argparse.Namespace) -> int:
    settings = settings_from_env()
    run_ui(settings, args.port, metrics_urls(settings, args.metrics))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    settings = settings_from_env()
    counted = write_report(settings, Path(args.out), metrics_urls(settings, args.metrics))
    print(f"wrote {args.out}: {counted['open_alerts']} open alerts, {counted['segments']} segments, "
          f"{counted['uplift_rows']} uplift rows")
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    run_ledger(settings_from_env())
    return 0


def cmd_interventions(args: argparse.Namespace) -> int:

    settings = settings_from_env()
    client = sync_redis(settings.redis_url, **settings.redis_kwargs())
    try:
        outcomes = read_outcomes(client)
    finally:
        client.close()
    table = uplift_table(outcomes)
    if args.json:
        print(json.dumps([row.as_dict() for row in table], indent=2))
        return 0
    print("\n".join(uplift_lines([row.as_dict() for row in table], len(outcomes), settings.outcome_days)))
    return 0


def cmd_trainer(args: argparse.Namespace) -> int:
    settings = settings_from_env()
    tune_gc(settings)
    run_trainer(settings)
    return 0


def cmd_customer(args: argparse.Namespace) -> int:
    settings = settings_from_env()
    async def run() -> int:
        store = RedisFeatureStore.from_url(settings.redis_url, **settings.redis_kwargs())
        try:
            if args.action == "show":
                found = await lookup(store, RedisModelStore(store.redis, signing_key(settings)), settings,
                                     await locate(store, settings, args.customer_id))
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
            if args.action in ("suppress", "unsuppress"):
                # opted out: no churn alert is sent for them from the next day closed on (counted instead)
                await store.set_suppressed(settings.customer_key(args.customer_id), args.action == "suppress")
                print("suppressed: no churn alerts" if args.action == "suppress" else "no longer suppressed")
                return 0
            where = await locate(store, settings, args.customer_id)
            erased = await store.forget(where)
            print("erased" if erased else "no stored features; the erasure is recorded anyway")
            return 0
        finally:
            await store.close()

    return asyncio.run(run())


async def train_from_file(settings: Any, models: Any, path: str | None) -> int:
    """Bootstrap the global models from recorded events (JSON lines or CSV, like ``replay``): the batch step
    and the trainer run in this process, and the result becomes the current checkpoint for every worker."""
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
    settings = settings_from_env()
    async def run() -> int:
        store = RedisFeatureStore.from_url(settings.redis_url, **settings.redis_kwargs())
        models = RedisModelStore(store.redis, signing_key(settings))
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
            _print_churn_scorers(summary)
            _print_rfm(summary)
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


def _print_churn_scorers(summary: dict[str, Any]) -> None:
    """The served churn score next to its baselines, on the same matured labels, and its reliability."""
    scorers = summary.get("scorers")
    if not scorers:
        return
    print(f"churn scores on the same matured labels (served: {summary.get('served_by')}):")
    print(f"  {'scorer':<10} {'roc_auc':>8} {'rolling':>8} {'log_loss':>9} {'brier':>7} {'labels':>8}")
    for name, q in scorers.items():
        print(f"  {name:<10} {q['roc_auc']:>8.4f} {q['rolling_roc_auc']:>8.4f} {q['log_loss']:>9.4f} "
              f"{q['brier']:>7.4f} {q['labels']:>8}")
    fitted = summary.get("bgnbd", {})
    if fitted.get("fits"):
        print(f"  BG/NBD fitted on {fitted['sample']} customers ({fitted['fits']} fits): r={fitted['r']:.3f} "
              f"alpha={fitted['alpha']:.2f} a={fitted['a']:.3f} b={fitted['b']:.3f}")
    table = summary.get("reliability", {}).get(summary.get("served_by"), [])
    if table:
        print("  reliability of the served score (predicted vs observed churn rate):")
        for row in table:
            print(f"    {row['bin']}  n={row['n']:<7} predicted {row['mean_predicted']:.3f}  "
                  f"observed {row['observed']:.3f}")


def _print_rfm(summary: dict[str, Any]) -> None:
    """The RFM quintile edges the scores use, and the buyers per named segment."""
    rfm = summary.get("rfm") or {}
    if not rfm.get("edges"):
        return
    print(f"RFM quintiles of the {rfm['buyers']} live buyers at snapshot instant {rfm['instant']}:")
    for name, edges in rfm["edges"].items():
        print(f"  {name:<10} {' | '.join(f'{e:g}' for e in edges)}")
    if rfm.get("segments"):
        print("  " + ", ".join(f"{k} {v}" for k, v in sorted(rfm["segments"].items(), key=lambda kv: -kv[1])))


def cmd_evaluate(args: argparse.Namespace) -> int:
    run_evaluate(settings_from_env(), Path(args.run), Path(args.out) if args.out else None)
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    columns = Columns(args.customer, args.date, args.amount, args.order, args.date_format)
    try:
        report = run_backtest(settings_from_env(), Path(args.file), columns, args.calibration_end, args.holdout_end,
                              horizon_days=args.horizon_days, redis_db=args.redis_db, flush=args.flush,
                              keep=args.keep, timeout=args.timeout, quiet=args.json)
    except (ValueError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0
