"""Dates and times as people and shops' exports write them, to epoch milliseconds (``backtest``, ``alerts export``)."""

from __future__ import annotations

from datetime import UTC, datetime

from streamproc.domain.events import parse_event_time


def parse_instant(text: str, date_format: str | None = None) -> int:
    """Epoch milliseconds from a date or time: ``date_format`` (strptime) if given; else ISO 8601 (``2024-03-01``,
    ``2024-03-01T10:00:00+02:00``), ``YYYYMMDD`` (as in the CDNOW log) or epoch milliseconds. Without an offset:
    UTC. ValueError if it is none of those."""
    text = text.strip()
    if date_format:
        parsed = datetime.strptime(text, date_format)
    elif text.isdigit() and len(text) == 8:
        parsed = datetime.strptime(text, "%Y%m%d")
    elif text.lstrip("-").isdigit():
        return parse_event_time(int(text))
    else:
        parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)
