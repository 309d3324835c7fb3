"""Refused access (a wrong password, an untrusted certificate, no ACL) said in one line, never a hang or a traceback.

Kafka's Python clients retry a refused connection until their timeout and then report only "Unable to bootstrap";
the reason is in what they logged. ``RefusalLog`` keeps that reason, and ``explain`` turns an exception into the
line an operator can act on. No secret is ever part of it: the clients' messages name users, never passwords."""

from __future__ import annotations

import logging
import re
import time

import redis
from aiokafka import errors as aiokafka_errors
from kafka import errors as kafka_errors

from streamproc.settings import Settings

# what Kafka's clients log when a broker refuses a connection for good (not a broker that is merely down)
_KAFKA_REFUSALS = ("SaslAuthenticationFailed", "AuthenticationFailed", "CERTIFICATE_VERIFY_FAILED",
                   "WRONG_VERSION_NUMBER", "UnsupportedSaslMechanism", "IllegalSaslState")
EXIT_REFUSED = 77  # EX_NOPERM (sysexits.h)
REFUSAL_FRESH_S = 60.0  # longer than any client's bootstrap timeout


class AccessRefused(RuntimeError):
    """Kafka or Redis refused this process's credentials or certificate: retrying cannot help."""


class RefusalLog(logging.Handler):
    """The newest reason a Kafka client logged for a refused connection."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._reason: str | None = None
        self._seen_at = 0.0

    @property
    def reason(self) -> str | None:
        """The reason, if logged in the last ``REFUSAL_FRESH_S``: an old refusal (a password since rotated) does
        not explain today's broker being down."""
        return self._reason if time.monotonic() - self._seen_at < REFUSAL_FRESH_S else None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        found = [message.find(marker) for marker in _KAFKA_REFUSALS if marker in message]
        if found:  # from the first marker on: "SaslAuthenticationFailedError: ... invalid credentials ..."
            parts = re.sub(r" \(backoff [^)]*\)$", "", message[min(found):]).split(": ")
            self._reason = ": ".join(p for i, p in enumerate(parts) if i == 0 or p != parts[i - 1])
            self._seen_at = time.monotonic()

    def install(self) -> RefusalLog:
        for name in ("kafka", "aiokafka"):
            logging.getLogger(name).addHandler(self)
        return self


REFUSALS = RefusalLog()


def _kafka_user(settings: Settings) -> str:
    return settings.kafka_sasl_username or "(no SASL user)"


def explain(exc: BaseException, settings: Settings) -> str | None:
    """One line for an exception that means access was refused; None for anything else."""
    if isinstance(exc, AccessRefused):
        return str(exc)
    user = settings.redis_username or "default"
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return (f"Redis refused user {user}: {exc} (each role's rules: `streamproc security acls`; "
                "README, Production security)")
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return f"Redis refused the credentials of user {user}: {exc} (STREAMPROC_REDIS_USERNAME/_PASSWORD)"
    if isinstance(exc, redis.exceptions.ConnectionError) and "certificate verify failed" in str(exc):
        return f"Redis's TLS certificate is not trusted: {exc} (STREAMPROC_REDIS_SSL_CA_CERTS)"
    if type(exc).__name__.endswith("AuthorizationFailedError"):  # kafka-python's and aiokafka's
        return (f"Kafka refused user {_kafka_user(settings)}: {type(exc).__name__}: no ACL allows it "
                "(each role's ACLs: `streamproc security acls`)")
    if isinstance(exc, (kafka_errors.KafkaError, aiokafka_errors.KafkaError)) and REFUSALS.reason:
        return (f"Kafka at {settings.kafka_bootstrap} refused the connection of user {_kafka_user(settings)}: "
                f"{REFUSALS.reason} (STREAMPROC_KAFKA_SASL_* and STREAMPROC_KAFKA_SSL_CAFILE)")
    return None


def refused(exc: BaseException, settings: Settings) -> AccessRefused | None:
    """``exc`` as an ``AccessRefused`` when it means access was refused."""
    line = explain(exc, settings)
    return AccessRefused(line) if line else None
