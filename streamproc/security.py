"""Least privilege, declared once: what each role may do on Kafka (ACLs) and on Redis (ACL users).

Four Kafka principals and four Redis users, one per role:

- ``worker``: reads the input topics, writes the output topics and the trainer's snapshots, in its own consumer
  group; on Redis, the customer rows and the per-partition keys, and the model keys read only.
- ``trainer``: reads the training topic in its own group; on Redis, the model keys only.
- ``reader``: lookups, the retention pages and reports, read only: on Kafka the alerts topic (no consumer group).
- ``admin``: the operator's tools (topics apply, replay, simulate, tail, alerts, forward, retention) on Kafka; on
  Redis, everything streamproc stores (erasure, model rollback) but no server administration.

The local secure infrastructure (``streamproc infra up --secure``) applies these grants, and the README's
"Production security" section prints them with ``streamproc security acls``."""

from __future__ import annotations

from dataclasses import dataclass

from streamproc.settings import Settings
from streamproc.topics import (
    ALERTS_TOPIC,
    DLQ_TOPIC,
    INPUT_TOPICS,
    MOVES_TOPIC,
    RECOMMENDATIONS_TOPIC,
    TRAINING_TOPIC,
    load_specs,
)

KAFKA_ROLES = ("worker", "trainer", "reader", "admin")
REDIS_ROLES = ("worker", "trainer", "reader", "admin")

# the outputs a worker publishes (the training topic: the snapshots the trainer learns from)
WORKER_OUTPUTS = (DLQ_TOPIC, ALERTS_TOPIC, RECOMMENDATIONS_TOPIC, MOVES_TOPIC, TRAINING_TOPIC)


@dataclass(frozen=True, order=True)
class KafkaGrant:
    """One ALLOW ACL: ``principal`` may ``operation`` on the resource (``pattern``: literal or prefixed name)."""

    principal: str
    resource: str  # TOPIC or GROUP
    name: str
    operation: str  # READ, WRITE, CREATE, DESCRIBE, DESCRIBE_CONFIGS, ALTER_CONFIGS
    pattern: str = "LITERAL"



def kafka_acl_commands(grants: list[KafkaGrant]) -> list[str]:
    """The grants as ``kafka-acls --add`` commands, one per principal, resource kind and set of operations."""
    operations: dict[tuple[str, str, str, str], list[str]] = {}
    for g in grants:
        operations.setdefault((g.principal, g.resource, g.pattern, g.name), []).append(g.operation)
    names: dict[tuple[str, str, str, tuple[str, ...]], list[str]] = {}
    for (principal, resource, pattern, name), ops in operations.items():
        names.setdefault((principal, resource, pattern, tuple(sorted(ops))), []).append(name)
    lines = []
    for (principal, resource, pattern, kinds), targets in names.items():
        kind = " --resource-pattern-type prefixed" if pattern == "PREFIXED" else ""
        flag = {"TOPIC": "--topic", "GROUP": "--group"}[resource]
        lines.append(f"kafka-acls --add --allow-principal User:{principal}"
                     + "".join(f" --operation {op}" for op in kinds) + kind
                     + "".join(f" {flag} '{t}'" for t in sorted(targets)))
    return lines


def _topic_grants(principal: str, topics: list[str], *operations: str) -> list[KafkaGrant]:
    return [KafkaGrant(principal, "TOPIC", t, op) for t in topics for op in operations]


def kafka_grants(settings: Settings) -> list[KafkaGrant]:
    """Every ACL of the Kafka principals, sorted."""
    topic = settings.topic
    app = settings.app_id
    declared = [topic(name) for name in load_specs()]
    grants = [
        *_topic_grants("worker", [topic(t) for t in INPUT_TOPICS], "READ", "DESCRIBE"),
        *_topic_grants("worker", [topic(t) for t in WORKER_OUTPUTS], "WRITE", "DESCRIBE"),
        KafkaGrant("worker", "GROUP", app, "READ"),
        # Faust's partition assignor keeps its leader election in a topic of its own, created by the first worker
        *[KafkaGrant("worker", "TOPIC", f"{app}-__assignor", op, "PREFIXED")
          for op in ("CREATE", "READ", "WRITE", "DESCRIBE")],
        *_topic_grants("trainer", [topic(TRAINING_TOPIC)], "READ", "DESCRIBE"),
        KafkaGrant("trainer", "GROUP", f"{app}-trainer", "READ"),
        # the retention pages and report read the alerts from the topic's start, without a group
        *_topic_grants("reader", [topic(ALERTS_TOPIC)], "READ", "DESCRIBE"),
        *_topic_grants("admin", declared, "CREATE", "DESCRIBE", "DESCRIBE_CONFIGS", "ALTER_CONFIGS", "READ", "WRITE"),
        # the operator's consumer groups: alerts tail, forwarder, retention ledger
        *[KafkaGrant("admin", "GROUP", f"{app}-", op, "PREFIXED") for op in ("READ", "DESCRIBE")],
    ]
    return sorted(set(grants))


# the categories every role's commands come from; -@dangerous drops FLUSHALL, CONFIG, KEYS, DEBUG, MIGRATE, ...
_READ_ONLY = "+@read +@connection -@dangerous"
_READ_WRITE = "+@read +@write +@scripting +@transaction +@connection -@dangerous"


def redis_acl_rules() -> dict[str, str]:
    """Each role's ACL rules (key patterns and commands), without the ``user <name> on >password`` head.
    ``%R~`` is a read-only key pattern (Redis 7)."""
    return {
        # workers: the customer rows and the per-partition keys (``{p<n>}``), the aggregates, the layout, the
        # opt-outs (DELETE /customers/{id} erases one); the model keys read only (a worker loads checkpoints,
        # never writes one)
        "worker": f"resetkeys ~cust:* ~sp:{{p* ~sp:agg:* ~sp:cohort:* ~sp:layout ~sp:fschema ~sp:wm "
                  f"~sp:suppressed %R~sp:sweep %R~sp:erased %R~sp:{{model}}:* {_READ_WRITE} +wait",
        # the trainer: the model keys only
        "trainer": f"resetkeys ~sp:{{model}}:* {_READ_WRITE}",
        # lookups, reports and dashboards: everything streamproc stores, read only
        "reader": f"resetkeys %R~cust:* %R~sp:* {_READ_ONLY} +scan",
        # erasure, opt-outs, model rollback, the retention ledger: every streamproc key, no server administration
        "admin": f"resetkeys ~cust:* ~sp:* {_READ_WRITE} +wait +scan",
    }


def redis_acl_file(passwords: dict[str, str]) -> str:
    """An ACL file for ``redis-server --aclfile``: the default user off, one user per role."""
    lines = ["user default off resetkeys -@all"]
    lines += [f"user {role} on >{passwords[role]} {rules}" for role, rules in redis_acl_rules().items()]
    return "\n".join(lines) + "\n"
