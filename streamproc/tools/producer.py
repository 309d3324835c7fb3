"""Producing input events with kafka-python: keyed by customer id, batched, acks from all replicas."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from kafka import KafkaProducer

from streamproc.settings import Settings
from streamproc.topics import kafka_security_kwargs

T = TypeVar("T")


def paced(records: Iterable[T], rate: float) -> Iterator[T]:
    """``records`` at ``rate`` a second at most (0: as fast as they come): after each one, sleeps while ahead of
    the schedule."""
    started = time.monotonic()
    for sent, record in enumerate(records, 1):
        yield record
        if rate > 0:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0.01:
                time.sleep(ahead)


class EventProducer:
    def __init__(self, settings: Settings, linger_ms: int = 20) -> None:
        """``linger_ms``: how long a batch waits for more records (throughput; a latency probe wants less)."""
        self.settings = settings
        self._failed: list[BaseException] = []
        self._producer = KafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            acks="all",
            linger_ms=linger_ms,
            batch_size=512 * 1024,
            max_request_size=4 * 1024 * 1024,
            retries=10,
            max_in_flight_requests_per_connection=1,  # keeps per-partition order across retries
            client_id="streamproc-producer",
            **kafka_security_kwargs(settings),
        )

    def send(self, topic: str, key: bytes | None, value: bytes, timestamp_ms: int | None = None) -> None:
        """``timestamp_ms``: the record's time (default: now); the worker aligns its input topics by it."""
        sent = self._producer.send(self.settings.topic(topic), key=key, value=value, timestamp_ms=timestamp_ms)
        sent.add_errback(self._failed.append)

    def flush(self) -> None:
        """Wait until the broker has every record sent so far; raise the first failure (no ACL, too large, ...)
        rather than report records as sent that were not."""
        self._producer.flush()
        if self._failed:
            raise self._failed[0]

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._producer.close()
