"""Which failures are worth waiting out, and which are not.

A batch step talks to Redis and Kafka. Losing a connection or timing out is transient: the step is retried, with
capped backoff, for as long as it takes (nothing is acked meanwhile, so nothing is lost). Anything else, a bug or
an input the code cannot handle, would fail the same way on every retry: it gets a few attempts, then what can be
isolated (an event, an output) is dead-lettered, and otherwise the worker stops with a non-zero exit instead of
spinning on one batch.
"""

from __future__ import annotations

import asyncio

import aiokafka.errors
import kafka.errors
import redis.exceptions


class TransientError(Exception):
    """A failure of ours that another attempt may not meet (e.g. saves that kept losing a version race to
    another worker during a rebalance)."""


class InjectedFault(RuntimeError):
    """Raised by the fault-injection test hook (``STREAMPROC_FAULT_INJECT_EVENT_ID``)."""


class FatalStepError(RuntimeError):
    """A step failed with an error that is not transient, as many times as it may: the worker stops."""


# redis-py's ConnectionError covers authentication and authorisation failures too: those are configuration
# problems that no retry mends
_REDIS_NOT_TRANSIENT = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)
_REDIS_TRANSIENT = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.ReadOnlyError,  # a replica that is being promoted
)
# timeouts the Kafka clients do not mark as retriable: a broker that is down times out a delivery this way
_KAFKA_TRANSIENT = (
    aiokafka.errors.KafkaTimeoutError,
    kafka.errors.KafkaTimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    """True for a lost connection or a timeout (to Redis or Kafka) anywhere in ``exc``'s chain of causes; for a
    Kafka error, what the client says of it (``retriable``). Faust wraps the producer's errors in its own, so the
    chain is walked."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _REDIS_NOT_TRANSIENT):
            return False
        if isinstance(current, (TransientError, *_REDIS_TRANSIENT, *_KAFKA_TRANSIENT)):
            return True
        if isinstance(current, aiokafka.errors.KafkaError | kafka.errors.KafkaError):
            return bool(current.retriable)
        if isinstance(current, ConnectionError | TimeoutError | asyncio.TimeoutError):
            return True
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


def root_cause(exc: BaseException) -> BaseException:
    """The first exception of ``exc``'s chain of causes (what a wrapper such as Faust's ProducerSendError says
    less clearly)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc
