"""Replay recorded events (JSON lines or CSV) to the input topics in event-time order.

Each line is one event with the topic contract's fields; the topic is taken from the shape of the event
(``order_id`` → transactions, ``session_id`` → clicks) unless ``--topic`` says. CSV columns are mapped
to fields with ``--map column=field``; a CSV ``items`` column holds the items as JSON.
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from streamproc.domain.events import parse_event_time
from streamproc.settings import Settings
from streamproc.tools.producer import EventProducer

INT_FIELDS = {"quantity"}
FLOAT_FIELDS = {"amount", "unit_price", "duration_s"}


@dataclass
class ReplayStats:
    sent: int = 0
    skipped: int = 0  # lines that could not even be routed to a topic (not JSON objects, no event time)


def topic_of(event: dict[str, Any]) -> str | None:
    if "order_id" in event or "items" in event:
        return "transactions"
    if "session_id" in event or "action" in event:
        return "clicks"
    return None


def _typed_csv_row(row: dict[str, str], mapping: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for column, value in row.items():
        name = mapping.get(column, column)
        if value == "" or value is None:
            continue
        if name == "items":
            out[name] = orjson.loads(value)
        elif name == "ts":
            out[name] = int(value) if value.lstrip("-").isdigit() else value
        elif name in INT_FIELDS:
            out[name] = int(value)
        elif name in FLOAT_FIELDS:
            out[name] = float(value)
        else:
            out[name] = value
    return out


def read_events(path: Path, fmt: str, mapping: dict[str, str]) -> Iterator[dict[str, Any] | None]:
    """Events from a file, None for a line that is not an event object."""
    if fmt == "csv":
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                yield _typed_csv_row(row, mapping)
        return
    with open(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                yield None
                continue
            yield value if isinstance(value, dict) else None


def timed_events(path: Path, fmt: str | None = None, mapping: dict[str, str] | None = None, topic: str | None = None,
                 stats: ReplayStats | None = None) -> list[tuple[int, int, str, dict[str, Any]]]:
    """A file's routable events as (event time, line, topic, event), in event-time order (stable for equal
    times); unroutable lines are counted in ``stats.skipped``."""
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    timed: list[tuple[int, int, str, dict[str, Any]]] = []
    for i, event in enumerate(read_events(path, fmt, mapping or {})):
        target = topic or (topic_of(event) if event else None)
        try:
            ts = parse_event_time(event.get("ts")) if event else None
        except ValueError:
            ts = None
        if event is None or target is None or ts is None:
            if stats is not None:
                stats.skipped += 1
            continue
        timed.append((ts, i, target, event))
    timed.sort(key=lambda t: (t[0], t[1]))
    return timed


def run_replay(settings: Settings, path: Path, fmt: str | None = None, mapping: dict[str, str] | None = None,
               speed: float = 0.0, topic: str | None = None, quiet: bool = False) -> ReplayStats:
    """Publish the file's events in event-time order (stable for equal times).

    ``speed`` 0 sends as fast as possible; otherwise event time runs ``speed`` times faster than wall time.
    """
    stats = ReplayStats()
    timed = timed_events(path, fmt, mapping, topic, stats)
    producer = EventProducer(settings)
    started = time.monotonic()
    first_ts = timed[0][0] if timed else 0
    try:
        for ts, _, target, event in timed:
            if speed > 0:
                due = (ts - first_ts) / 1000 / speed - (time.monotonic() - started)
                if due > 0.005:
                    time.sleep(due)
            key = str(event.get("customer_id", "")).encode()
            producer.send(target, key, orjson.dumps(event))
            stats.sent += 1
    finally:
        producer.close()
    if not quiet:
        sys.stderr.write(f"replayed {stats.sent} events ({stats.skipped} unroutable lines skipped)\n")
    return stats
