"""Topics as code: declarations in ``streamproc/contracts/topics.toml``, applied to the broker with kafka-python."""

from __future__ import annotations

import logging
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import TopicAlreadyExistsError

from streamproc.access import refused
from streamproc.contracts import SCHEMAS_DIR, TOPICS_FILE
from streamproc.settings import Settings

log = logging.getLogger("streamproc.topics")

__all__ = ["SCHEMAS_DIR", "TOPICS_FILE"]

# the declared names (streamproc/contracts/topics.toml), as the code refers to them
INPUT_TOPICS = ("clicks", "transactions")
DLQ_TOPIC = "streamproc-dlq"
ALERTS_TOPIC = "churn-alerts"
UNDELIVERABLE_TOPIC = "alerts-undeliverable"  # alerts the webhook forwarder gave up on
INTERVENTIONS_TOPIC = "interventions"  # what the retention team did; read by `streamproc retention`, not by workers
RECOMMENDATIONS_TOPIC = "recommendations"
MOVES_TOPIC = "segment-moves"
TRAINING_TOPIC = "streamproc-training"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int
    retention_ms: int
    cleanup_policy: str
    schema: str
    role: str

    def configs(self) -> dict[str, str]:
        return {"cleanup.policy": self.cleanup_policy, "retention.ms": str(self.retention_ms)}


def min_insync(replication: int) -> int:
    """``min.insync.replicas`` for a replication factor: all but one, so one broker may be down while writes with
    ``acks=all`` go on, and an acknowledged record is on at least two brokers."""
    return max(1, replication - 1)


def replication_configs(replication: int) -> dict[str, str]:
    return {"min.insync.replicas": str(min_insync(replication))} if replication > 1 else {}


def load_specs(path: Path = TOPICS_FILE) -> dict[str, TopicSpec]:
    data = tomllib.loads(path.read_text())
    return {name: TopicSpec(name=name, **entry) for name, entry in data["topics"].items()}


@dataclass
class ApplyReport:
    created: list[str]
    unchanged: list[str]
    mismatched: list[str]  # human-readable differences

    @property
    def ok(self) -> bool:
        return not self.mismatched


def admin_client(settings: Settings) -> KafkaAdminClient:
    # bootstrap_timeout_ms: a broker that refuses the credentials is reported after 20 s rather than kafka-python's
    # 30 (10 s was too short for one refused attempt to be logged on a loaded machine); the callers that wait for
    # a broker to come up (wait_for_topics) retry
    return KafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, client_id="streamproc-topics", request_timeout_ms=15000,
        bootstrap_timeout_ms=20_000, **kafka_security_kwargs(settings),
    )


def kafka_security_kwargs(settings: Settings) -> dict[str, object]:
    """SASL/SSL options for kafka-python clients (none for PLAINTEXT)."""
    out: dict[str, object] = {}
    if settings.kafka_security_protocol == "PLAINTEXT":
        return out
    out["security_protocol"] = settings.kafka_security_protocol
    if settings.kafka_security_protocol.startswith("SASL"):
        out["sasl_mechanism"] = settings.kafka_sasl_mechanism
        out["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            out["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    for name in ("cafile", "certfile", "keyfile"):
        value = getattr(settings, f"kafka_ssl_{name}")
        if value is not None:
            out[f"ssl_{name}"] = str(value)
    return out


def _ssl_context(settings: Settings) -> Any:
    if not settings.kafka_security_protocol.endswith("SSL"):
        return None
    import ssl

    context = ssl.create_default_context(cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None)
    if settings.kafka_ssl_certfile:
        context.load_cert_chain(str(settings.kafka_ssl_certfile),
                                str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None)
    return context


def aiokafka_security_kwargs(settings: Settings) -> dict[str, Any]:
    """The same options for aiokafka clients (the trainer's consumer): SASL as for kafka-python, SSL as a
    context instead of file names."""
    out: dict[str, Any] = {k: v for k, v in kafka_security_kwargs(settings).items() if not k.startswith("ssl_")}
    if settings.kafka_security_protocol.endswith("SSL"):
        out["ssl_context"] = _ssl_context(settings)
    return out


def faust_credentials(settings: Settings) -> object | None:
    """The same options as Faust ``broker_credentials`` (None for PLAINTEXT)."""
    import faust

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    ssl_context = _ssl_context(settings)
    if protocol == "SSL":
        return faust.SSLCredentials(ssl_context)
    password = settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
    if settings.kafka_sasl_mechanism == "PLAIN":
        return faust.SASLCredentials(username=settings.kafka_sasl_username, password=password,
                                     ssl_context=ssl_context)
    return faust.SASLCredentials(username=settings.kafka_sasl_username, password=password,
                                 mechanism=settings.kafka_sasl_mechanism, ssl_context=ssl_context)


def apply_topics(
    settings: Settings, specs: dict[str, TopicSpec] | None = None, partitions_override: int | None = None
) -> ApplyReport:
    """Create missing topics; report those whose partition count or cleanup policy differ."""
    specs = specs or load_specs()
    admin = admin_client(settings)
    report = ApplyReport([], [], [])
    try:
        existing = set(admin.list_topics())
        wanted = {settings.topic(name): spec for name, spec in specs.items()}
        replication = settings.topic_replication
        missing = [
            NewTopic(
                physical,
                partitions_override or spec.partitions,
                replication or spec.replication,
                topic_configs={**spec.configs(), **replication_configs(replication or spec.replication)},
            )
            for physical, spec in wanted.items()
            if physical not in existing
        ]
        for new_topic in missing:
            try:
                admin.create_topics([new_topic], timeout_ms=15000)
                report.created.append(new_topic.name)
            except TopicAlreadyExistsError:  # created meanwhile (metadata lag or a concurrent apply): verify it
                pass
        present = [p for p in wanted if p not in report.created]
        if present:
            described = {d["name"]: d for d in admin.describe_topics(present)}
            configs = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, p) for p in present], config_filter="all"
            )["topic"]
            for physical in present:
                spec = wanted[physical]
                expected_partitions = partitions_override or spec.partitions
                problems = []
                actual_partitions = len(described[physical]["partitions"])
                if actual_partitions != expected_partitions:
                    problems.append(f"partitions {actual_partitions} != declared {expected_partitions}")
                policy = configs.get(physical, {}).get("cleanup.policy", {}).get("value")
                if policy is not None and sorted(policy.split(",")) != sorted(spec.cleanup_policy.split(",")):
                    problems.append(f"cleanup.policy {policy!r} != declared {spec.cleanup_policy!r}")
                if problems:
                    report.mismatched.append(f"{physical}: " + "; ".join(problems))
                else:
                    report.unchanged.append(physical)
    finally:
        admin.close()
    return report


def delete_topics(settings: Settings, names: list[str], timeout_s: float = 30.0) -> None:
    """Delete declared topics (by declared name) and wait until the broker no longer lists them."""
    physical = {settings.topic(n) for n in names}
    _delete_present(settings, lambda topic: topic in physical, timeout_s)


def delete_run_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Delete every topic of an isolated run (a test, a benchmark): the names under its own topic prefix and
    Faust's internal topics of its app id. A broker that keeps every run's topics ends up with tens of thousands
    of partitions, and runs out of file handles. Refuses settings without a topic prefix (shared topics)."""
    if not settings.topic_prefix:
        raise ValueError("delete_run_topics needs settings with their own topic prefix")
    prefixes = (settings.topic_prefix, f"{settings.app_id}-")
    return _delete_present(settings, lambda topic: topic.startswith(prefixes), timeout_s)


def _delete_present(settings: Settings, chosen: Callable[[str], bool], timeout_s: float) -> list[str]:
    """Delete the broker's topics ``chosen`` picks and wait until it no longer lists them; returns their names."""
    import time

    admin = admin_client(settings)
    try:
        present = [t for t in admin.list_topics() if chosen(t)]
        if present:
            admin.delete_topics(present, timeout_ms=int(timeout_s * 1000))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and set(present) & set(admin.list_topics()):
            time.sleep(0.2)
        return present
    finally:
        admin.close()


def declared_input_partitions() -> int:
    """The partition count ``topics.toml`` declares for the input topics."""
    return input_partition_count({name: spec.partitions for name, spec in load_specs().items() if name in INPUT_TOPICS})


def input_partition_count(counts: dict[str, int]) -> int:
    if len(set(counts.values())) != 1:
        raise ValueError(f"the input topics must share a partition count (a customer's events land on the same "
                         f"partition number in each), but they have {counts}")
    return next(iter(counts.values()))


def input_partitions(settings: Settings, names: tuple[str, ...]) -> int:
    """The partition count the input topics share, as the broker has them. Customer state is stored per input
    partition, so the count is part of the storage layout; inputs that differ cannot be co-partitioned."""
    admin = admin_client(settings)
    try:
        described = admin.describe_topics([settings.topic(name) for name in names])
    finally:
        admin.close()
    return input_partition_count({d["name"]: len(d["partitions"]) for d in described})


def topic_partitions(settings: Settings, name: str) -> int:
    """How many partitions the declared topic ``name`` has on the broker (0: none, or not there yet)."""
    admin = admin_client(settings)
    try:
        described = admin.describe_topics([settings.topic(name)])
    finally:
        admin.close()
    return sum(len(d.get("partitions") or []) for d in described if not d.get("error_code"))


def wait_for_topics(settings: Settings, names: tuple[str, ...], poll_s: float = 1.0) -> None:
    """Block until the broker reports every topic (Faust subscribes once and ignores a missing topic for
    good, so a worker started before `streamproc topics apply` would otherwise consume nothing)."""
    wanted = {settings.topic(name) for name in names}
    waited = 0.0
    while True:
        try:
            admin = admin_client(settings)
            try:
                missing = wanted - set(admin.list_topics())
            finally:
                admin.close()
        except Exception as exc:  # broker not up yet, unless it refused this process's credentials
            refusal = refused(exc, settings)
            if refusal is not None:
                raise refusal from exc
            missing = wanted
            log.debug("topic check failed: %s", exc)
        if not missing:
            return
        if waited % 30 == 0:  # before Faust configures logging: straight to stderr
            print(f"waiting for topics {', '.join(sorted(missing))} (run `streamproc topics apply`, or grant "
                  f"{settings.kafka_sasl_username or 'this user'} DESCRIBE on them)",
                  file=sys.stderr, flush=True)
        time.sleep(poll_s)
        waited += poll_s
