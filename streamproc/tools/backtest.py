"""``streamproc backtest``: how the churn scores would have done on a shop's own transaction history.

A CSV of transactions (one row per order, or per order line with ``--order``) is split at the calibration end. The
calibration period is replayed through the real pipeline: the events go to fresh topics of the backtest's own on
the configured broker, one ``streamproc worker`` with its in-process trainer folds them into a Redis database of
the backtest's own and learns the global models from the snapshots and labels it matures, exactly as in
production. When everything is processed, learned and checkpointed, every customer is scored from their Redis state
as of the calibration end with the final checkpoint: the served score and each candidate beside it (the recency
baseline, BG/NBD, the stacked classifier). Each score is judged on the holdout period: did the customer buy in it?

Times are instants: a bare date is its 00:00 UTC, a time without an offset is UTC. The calibration period is every
transaction before ``--calibration-end``; the holdout period runs from there to before ``--holdout-end``. The model
answers "no purchase within the churn horizon" (``STREAMPROC_CHURN_HORIZON_DAYS``, or ``--horizon-days``): ROC AUC
does not care if the holdout is longer, log loss and the Brier score do (the report says so).

The reading, splitting and judging are pure and unit-tested; ``run_backtest`` is the I/O around them.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from streamproc.adapters.checkpoint_signing import signing_key
from streamproc.adapters.feature_rows import customer_id_of, decode_feature_row, feature_names_from
from streamproc.adapters.model_store import RedisModelStore
from streamproc.adapters.redis_clients import sync_redis
from streamproc.adapters.redis_store import RedisFeatureStore
from streamproc.domain.churn import churn_inputs, inputs_at
from streamproc.domain.churn_scorers import exact_roc_auc
from streamproc.domain.customer import DAY_MS, CustomerState
from streamproc.domain.models import ModelBundle
from streamproc.domain.rfm import score_values
from streamproc.settings import Settings
from streamproc.tools.demo import metric_total, processed_total, scrape, start_pipeline, stop_pipeline
from streamproc.tools.instants import parse_instant
from streamproc.tools.producer import EventProducer
from streamproc.topics import apply_topics, delete_run_topics

# a probability of exactly 0 or 1 would make one wrong answer cost infinite log loss
LOG_LOSS_CLIP = 1e-6
BACKTEST_PREFIX = "backtest"


# ------------------------------------------------------------------ reading the history (pure)
@dataclass(frozen=True)
class Columns:
    """Which CSV columns hold what."""

    customer: str
    date: str
    amount: str
    order: str | None = None  # rows sharing a customer and an order are one transaction (order lines)
    date_format: str | None = None


@dataclass
class History:
    """A file's transactions as event payloads (``Transaction`` contract), in event-time order, and the rows that
    were not, by reason."""

    transactions: list[dict[str, Any]]
    skipped: Counter[str] = field(default_factory=Counter)
    rows: int = 0


def read_history(path: Path, columns: Columns, currency: str = "EUR") -> History:
    """The transactions of a CSV. A negative amount is a refund of its absolute value; a row with no customer, no
    readable date or no readable amount is skipped and counted by reason (never silently)."""
    orders: dict[tuple[str, str], dict[str, Any]] = {}
    skipped: Counter[str] = Counter()
    rows = 0
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in (columns.customer, columns.date, columns.amount, columns.order)
                   if c is not None and c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            rows += 1
            customer = (row[columns.customer] or "").strip()
            if not customer:
                skipped["no_customer"] += 1
                continue
            try:
                ts = parse_instant(row[columns.date] or "", columns.date_format)
            except ValueError:
                skipped["bad_date"] += 1
                continue
            try:
                amount = float(row[columns.amount])
            except (TypeError, ValueError):
                skipped["bad_amount"] += 1
                continue
            if not math.isfinite(amount):
                skipped["bad_amount"] += 1
                continue
            order = (row[columns.order] or "").strip() if columns.order else ""
            key = (customer, order) if order else (customer, f"line{line}")
            found = orders.get(key)
            if found is None:
                orders[key] = {"customer_id": customer, "ts": ts, "order_id": key[1], "amount": amount}
            else:  # another line of the order: the order's time is its first line's
                found["amount"] += amount
                found["ts"] = min(found["ts"], ts)
    transactions = []
    for (customer, order), o in orders.items():
        amount = round(o["amount"], 2)
        transactions.append({
            "event_id": f"bt-{customer}-{order}", "customer_id": customer, "ts": o["ts"], "order_id": order,
            "type": "refund" if amount < 0 else "purchase", "amount": abs(amount), "currency": currency,
        })
    transactions.sort(key=lambda t: (t["ts"], t["event_id"]))
    return History(transactions, skipped, rows)


@dataclass(frozen=True)
class Split:
    calibration: list[dict[str, Any]]  # the transactions to replay
    holdout_buyers: set[str]  # customers who bought in the holdout period
    calibration_buyers: set[str]  # customers with a purchase in the calibration period: the ones scored
    holdout_purchases: int


def split_history(history: History, calibration_end: int, holdout_end: int) -> Split:
    if holdout_end <= calibration_end:
        raise ValueError("the holdout must end after the calibration")
    calibration = [t for t in history.transactions if t["ts"] < calibration_end]
    holdout = [t for t in history.transactions
               if calibration_end <= t["ts"] < holdout_end and t["type"] == "purchase"]
    return Split(calibration, {t["customer_id"] for t in holdout},
                 {t["customer_id"] for t in calibration if t["type"] == "purchase"}, len(holdout))


# ------------------------------------------------------------------ judging (pure)
def holdout_scores(labels: Sequence[int], p: Sequence[float]) -> dict[str, float]:
    """ROC AUC, log loss and Brier score of churn probabilities ``p`` against ``labels`` (1: no purchase in the
    holdout)."""
    clipped = [min(max(q, LOG_LOSS_CLIP), 1 - LOG_LOSS_CLIP) for q in p]
    n = len(labels)
    return {
        "roc_auc": round(exact_roc_auc(list(labels), list(p)), 4),
        "log_loss": round(-sum(math.log(q) if y else math.log(1 - q) for y, q in zip(labels, clipped, strict=True))
                          / n, 4),
        "brier": round(sum((q - y) ** 2 for y, q in zip(labels, p, strict=True)) / n, 4),
    }


@dataclass(frozen=True)
class ScoredCustomer:
    customer_id: str
    scores: dict[str, float]  # "served" and each candidate's
    inputs: dict[str, float]  # the model inputs at the calibration end (BG/NBD's x, t_x, T among them)
    rfm_segment: str | None


def score_states(states: dict[str, CustomerState], bundle: ModelBundle, at: int) -> list[ScoredCustomer]:
    """Every customer who bought before ``at``, scored as of ``at`` by the checkpoint ``bundle`` (a
    ``ModelBundle``) from their state (``CustomerState``), as a worker serves them: the served score and each
    candidate's."""
    out = []
    for cid in sorted(states):
        state = states[cid]
        values = inputs_at(state, at, exact=True)
        if values is None or state.first_purchase_ts is None:
            continue
        x = churn_inputs(values)
        candidates = bundle.candidate_scores(x) or {}
        rfm = score_values(bundle.rfm.edges, values)
        out.append(ScoredCustomer(cid, {"served": bundle.churn_probability(x), **candidates}, x,
                                  rfm.segment if rfm else None))
    return out


def judge(scored: list[ScoredCustomer], holdout_buyers: set[str],
          extra: dict[str, Callable[[ScoredCustomer], float]] | None = None) -> dict[str, Any]:
    """Each score's holdout quality; ``extra`` adds scores computed from a customer's inputs (a benchmark's
    optimum)."""
    labels = [int(s.customer_id not in holdout_buyers) for s in scored]
    names = list(scored[0].scores) if scored else []
    table = {name: holdout_scores(labels, [s.scores[name] for s in scored]) for name in names}
    for name, fn in (extra or {}).items():
        table[name] = holdout_scores(labels, [fn(s) for s in scored])
    return {"customers_scored": len(scored), "holdout_churn_rate": round(sum(labels) / len(labels), 4) if labels
            else float("nan"), "scores": table}


# ------------------------------------------------------------------ the run (I/O)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class BacktestRun:
    """An isolated run: its own topics, Faust app id and Redis database, and a worker with its own trainer."""

    settings: Settings
    env: dict[str, str]
    log: Path


def isolated(settings: Settings, redis_db: int, horizon_days: int, span_days: int, log_dir: Path) -> BacktestRun:
    tag = uuid.uuid4().hex[:8]
    base_url = settings.redis_url.rsplit("/", 1)[0]
    # a customer silent for longer than the calibration must still be there to be scored at its end (and the
    # settings rule: not before their last labels matured)
    cadence = settings.snapshot_cadence_days
    labelled = 3 * horizon_days + -(-horizon_days // cadence) * cadence
    expire = max(settings.expire_after_days, span_days + 1, labelled + 1)
    run = settings.model_copy(update={
        "topic_prefix": f"{BACKTEST_PREFIX}-{tag}.", "app_id": f"{BACKTEST_PREFIX}-{tag}",
        "redis_url": f"{base_url}/{redis_db}", "web_port": _free_port(), "churn_horizon_days": horizon_days,
        "expire_after_days": expire,
    })
    env = {**os.environ, "STREAMPROC_TOPIC_PREFIX": run.topic_prefix, "STREAMPROC_APP_ID": run.app_id,
           "STREAMPROC_REDIS_URL": run.redis_url, "STREAMPROC_WEB_PORT": str(run.web_port),
           "STREAMPROC_CHURN_HORIZON_DAYS": str(horizon_days), "STREAMPROC_EXPIRE_AFTER_DAYS": str(expire),
           "STREAMPROC_TRAINER_ENABLED": "true", "STREAMPROC_LOG_LEVEL": "WARNING",
           # River's k-means sums over key sets, whose order follows string hashing: pinned, a run reproduces
           "PYTHONHASHSEED": "0"}
    log_dir = log_dir / tag
    log_dir.mkdir(parents=True, exist_ok=True)
    return BacktestRun(run, env, log_dir / "worker.log")  # start_pipeline's name for it


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def _wait_until_learned(run: BacktestRun, proc: subprocess.Popen[bytes], sent: int, timeout: float,
                        quiet: bool) -> dict[str, float]:
    """Until the worker has processed every event, the trainer has learned every example it was sent, and the
    current checkpoint holds all of it; returns the last metrics."""
    deadline = time.monotonic() + timeout
    last: tuple[float, ...] = ()
    steady = 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited ({proc.returncode}); its log: {run.log}")
        m = scrape(run.settings.web_port)
        done = processed_total(m)
        examples = {kind: metric_total(m, f'streamproc_training_examples_total{{kind="{kind}"}}')
                    for kind in ("churn", "segment")}
        learned = {kind: metric_total(m, f'streamproc_examples_learned_total{{kind="{kind}"}}')
                   for kind in ("churn", "segment")}
        checkpoint = _checkpoint_counts(run.settings)
        now = (done, *examples.values(), *learned.values(), *checkpoint)
        _say(quiet, f"  processed {done:,.0f}/{sent:,}, churn examples sent {examples['churn']:,.0f}, learned "
                    f"{learned['churn']:,.0f}, in the checkpoint {checkpoint[0]:,}")
        complete = (done >= sent and all(learned[k] >= examples[k] for k in examples)
                    and checkpoint == (int(learned["churn"]), int(learned["segment"])))
        # the sweep may still be visiting the last snapshot instant after the last event: steady for a while
        steady = steady + 1 if complete and now == last else 0
        if steady >= 3:
            return m
        last = now
        time.sleep(2.0)
    raise TimeoutError(f"the backtest did not finish processing and learning in {timeout:.0f}s; log: {run.log}")


def _checkpoint_counts(settings: Settings) -> tuple[int, int]:
    async def counts() -> tuple[int, int]:
        store = RedisFeatureStore.from_url(settings.redis_url, **settings.redis_kwargs())
        try:
            summary = await RedisModelStore(store.redis).summary()
        finally:
            await store.close()
        return (0, 0) if summary is None else (int(summary["churn_examples"]), int(summary["segment_examples"]))

    return asyncio.run(counts())


def load_states(settings: Settings) -> tuple[dict[str, CustomerState], ModelBundle | None, dict[str, dict[str, Any]]]:
    """Every customer's state and features from Redis, and the current checkpoint."""
    client = sync_redis(settings.redis_url, **settings.redis_kwargs())
    states: dict[str, CustomerState] = {}
    features: dict[str, dict[str, Any]] = {}
    names_of = feature_names_from(client)
    try:
        keys = list(client.scan_iter("cust:*", count=5000))
        for i in range(0, len(keys), 1000):
            pipe = client.pipeline(transaction=False)
            for key in keys[i : i + 1000]:
                pipe.hmget(key, "_s", "f")
            for key, (blob, feats) in zip(keys[i : i + 1000], pipe.execute(), strict=True):
                if blob is None:
                    continue
                cid = customer_id_of(key)
                states[cid] = CustomerState.from_dict(orjson.loads(blob))
                if feats:
                    features[cid] = decode_feature_row(feats, names_of)
    finally:
        client.close()

    async def checkpoint() -> ModelBundle | None:
        store = RedisFeatureStore.from_url(settings.redis_url, **settings.redis_kwargs())
        try:
            return await RedisModelStore(store.redis, signing_key(settings)).load()
        finally:
            await store.close()

    return states, asyncio.run(checkpoint()), features


def rfm_totals(split: Split, features: dict[str, dict[str, Any]], key_of: Callable[[str], str]) -> dict[str, Any]:
    """The calibration period's customers, purchases and net spend, from the file and from the features streamproc
    keeps in Redis, and how many customers differ."""
    from_file: dict[str, list[float]] = {}
    for t in split.calibration:
        row = from_file.setdefault(key_of(t["customer_id"]), [0, 0.0])
        if t["type"] == "purchase":
            row[0] += 1
            row[1] += t["amount"]
        else:
            row[1] -= t["amount"]
    differ = sum(1 for cid, (n, spend) in from_file.items()
                 if int(features.get(cid, {}).get("frequency", -1)) != n
                 or abs(float(features.get(cid, {}).get("monetary_total", math.inf)) - spend) > 0.005 + 1e-9 * spend)
    return {
        "file": {"customers": len(from_file), "purchases": int(sum(n for n, _ in from_file.values())),
                 "net_spend": round(sum(s for _, s in from_file.values()), 2)},
        "streamproc": {"customers": len(features),
                       "purchases": int(sum(f.get("frequency", 0) for f in features.values())),
                       "net_spend": round(sum(float(f.get("monetary_total", 0.0)) for f in features.values()), 2)},
        "customers_differing": differ,
    }


def _empty_db(settings: Settings, redis_db: int, flush: bool) -> None:
    client = sync_redis(settings.redis_url, **settings.redis_kwargs())
    try:
        if client.dbsize() and not flush:
            raise ValueError(f"Redis db {redis_db} holds data: choose an empty one (--redis-db) or pass --flush")
        client.flushdb()
    finally:
        client.close()


def _replay(run: BacktestRun, transactions: list[dict[str, Any]], timeout: float,
            quiet: bool) -> tuple[dict[str, float], float]:
    """The transactions through a worker with its trainer, until all is processed, learnt and checkpointed; returns
    the worker's last metrics and the seconds it took."""
    report = apply_topics(run.settings)
    if not report.ok:
        raise RuntimeError("topics: " + "; ".join(report.mismatched))
    procs = start_pipeline(run.env, run.log.parent)
    started = time.monotonic()
    try:
        producer = EventProducer(run.settings)
        for t in transactions:
            producer.send("transactions", t["customer_id"].encode(), orjson.dumps(t))
        producer.close()
        metrics = _wait_until_learned(run, procs[0], len(transactions), timeout, quiet)
    finally:
        stop_pipeline(procs, 60)
    elapsed = time.monotonic() - started
    return metrics, elapsed


def run_backtest(settings: Settings, path: Path, columns: Columns, calibration_end: str, holdout_end: str,
                 horizon_days: int | None = None, redis_db: int = 14, flush: bool = False, keep: bool = False,
                 timeout: float = 3600.0, quiet: bool = False,
                 extra: dict[str, Callable[[ScoredCustomer], float]] | None = None) -> dict[str, Any]:
    """The whole backtest; returns the report (``print_report`` shows it)."""
    cal_end, hold_end = parse_instant(calibration_end), parse_instant(holdout_end)
    history = read_history(path, columns)
    split = split_history(history, cal_end, hold_end)
    if not split.calibration:
        raise ValueError(f"no transaction before the calibration end {calibration_end}")
    horizon = horizon_days or settings.churn_horizon_days
    span_days = math.ceil((cal_end - split.calibration[0]["ts"]) / DAY_MS)
    run = isolated(settings, redis_db, horizon, span_days, Path(settings.state_dir) / "backtest")
    _empty_db(run.settings, redis_db, flush)
    _say(quiet, f"{len(split.calibration):,} calibration transactions of {len(split.calibration_buyers):,} "
                f"customers ({history.rows:,} rows, skipped {dict(history.skipped) or 'none'}); topics "
                f"{run.settings.topic_prefix}*, Redis db {redis_db}, churn horizon {horizon} days")
    metrics, elapsed = _replay(run, split.calibration, timeout, quiet)
    states, bundle, features = load_states(run.settings)
    if not keep:
        delete_run_topics(run.settings)
    if bundle is None or bundle.churn_examples == 0:
        raise RuntimeError("no churn label matured in the calibration period: it must be longer than the churn "
                           f"horizon ({horizon} days) plus a snapshot cadence")
    scored = score_states(states, bundle, cal_end)
    holdout = {run.settings.customer_key(c) for c in split.holdout_buyers}
    judged = judge(scored, holdout, extra)
    summary = bundle.summary()
    return {
        "file": str(path), "rows": history.rows, "skipped_rows": dict(history.skipped),
        "calibration_end": calibration_end, "holdout_end": holdout_end,
        "holdout_days": round((hold_end - cal_end) / DAY_MS, 2), "horizon_days": horizon,
        "calibration_transactions": len(split.calibration), "holdout_purchases": split.holdout_purchases,
        "events_processed": int(processed_total(metrics)),
        "seconds": round(elapsed, 1), **judged,
        "served_by": summary.get("served_by"), "model_version": summary.get("version"),
        "churn_labels": summary.get("labels"), "fitted_bgnbd": summary.get("bgnbd"),
        "prequential": summary.get("scorers"),
        "rfm_totals": rfm_totals(split, features, run.settings.customer_key),
        "rfm_segments": dict(Counter(s.rfm_segment for s in scored if s.rfm_segment).most_common()),
        "topic_prefix": run.settings.topic_prefix, "topics_kept": keep, "worker_log": str(run.log),
    }


SCORE_LABELS = {"served": "served", "recency": "recency only (baseline)", "bgnbd": "BG/NBD (baseline)",
                "model": "stacked classifier"}


def print_report(report: dict[str, Any]) -> None:
    print(f"backtest of {report['file']}: calibration before {report['calibration_end']} "
          f"({report['calibration_transactions']:,} transactions), holdout to {report['holdout_end']} "
          f"({report['holdout_days']:g} days, {report['holdout_purchases']:,} purchases)")
    print(f"{report['customers_scored']:,} customers scored as of the calibration end; "
          f"{report['holdout_churn_rate']:.1%} bought nothing in the holdout")
    print(f"served: {report['served_by']} (checkpoint v{report['model_version']}, "
          f"{report['churn_labels']:,} matured labels)")
    print(f"  {'score':<28} {'ROC AUC':>8} {'log loss':>9} {'Brier':>7}")
    for name, q in report["scores"].items():
        print(f"  {SCORE_LABELS.get(name, name):<28} {q['roc_auc']:>8.4f} {q['log_loss']:>9.4f} {q['brier']:>7.4f}")
    if abs(report["holdout_days"] - report["horizon_days"]) >= 1:
        print(f"  (the scores are probabilities of no purchase within {report['horizon_days']} days and the holdout "
              f"is {report['holdout_days']:g} days: ROC AUC compares, log loss and Brier measure another question)")
    fitted = report.get("fitted_bgnbd") or {}
    if fitted.get("fits"):
        print(f"  BG/NBD fitted by the trainer: r={fitted['r']:.3f} alpha={fitted['alpha']:.2f} "
              f"a={fitted['a']:.3f} b={fitted['b']:.3f}")
    totals = report["rfm_totals"]
    print(f"RFM totals of the calibration period: file {json.dumps(totals['file'])}, streamproc "
          f"{json.dumps(totals['streamproc'])}; customers differing: {totals['customers_differing']}")
    if report["rfm_segments"]:
        print("RFM segments at the calibration end: "
              + ", ".join(f"{k} {v}" for k, v in report["rfm_segments"].items()))
    if report["skipped_rows"]:
        print(f"rows skipped: {report['skipped_rows']}")
