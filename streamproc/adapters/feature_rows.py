"""The Redis layout of the online feature store, and reading it (tools and tests read rows directly).

Redis layout (version 2). Every key one atomic step touches carries its input partition as a hash tag
(``{p7}``), so a batch's script call stays in one cluster slot while partitions spread over the shards (as
Kafka Streams keeps one state store per partition). The partition count is part of the layout (``sp:layout``).

    cust:{p<p>}:<customer_id>  hash  ``f`` feature row (JSON array: schema id, then the values), ``_s`` state
                                     blob (JSON), ``_v`` version (write count), ``k`` census key
                                     "stage|tier|segment", ``m`` model outputs (JSON: segment, churn probability,
                                     alert hysteresis; depend on the checkpoint)
    sp:{p<p>}:census       hash   census key -> customers of the partition (moved inside the save itself)
    sp:{p<p>}:outbox       hash   "<customer>:<version>" -> outputs of that save not yet confirmed by the broker
    sp:{p<p>}:erased       set    digests of the partition's erased customer ids (a replay must not bring them back)
    sp:{p<p>}:lastseen     zset   customer -> last event time (inactivity sweep)
    sp:{p<p>}:due          zset   customer -> the grid instant their oldest pending churn label matures at (moved
                                  inside the save): a member at or below the sweep mark is overdue
    sp:{p<p>}:alertq       hash   alert decisions waiting for their day to close
    sp:{p<p>}:alertsent    hash   customer -> their sent alert not cleared yet
    sp:{p<p>}:sweep        string watermark up to which the partition's sweep has run
    sp:layout              hash   ``version``, ``partitions``: what this database is laid out for
    sp:fschema             hash   feature schema id -> the feature names (JSON) its rows hold, in order
    sp:suppressed          set    customers opted out of retention contact
    sp:wm                  hash   input source (kind:partition) -> largest event time seen
    sp:agg:buyers          HLL    customers with at least one purchase
    sp:agg:repeat          HLL    customers with at least two purchases
    sp:cohort:<YYYY-MM>:<k> HLL   customers whose first purchase was in YYYY-MM and who bought k months later

The keys without a partition tag are only ever touched one command at a time. A customer's partition is the one
their events arrive on; a lookup by id finds it with the producers' partitioner (``streamproc.partitioning``).

Feature rows carry their values only, not their names: the names (the same for every customer under one
configuration, ~55 of them) are stored once under a schema id, which halves the bytes of ``f``. Rows written
as JSON objects (before schema ids) still read.

A save is a compare-and-set on ``_v``: it applies only if nobody wrote the customer since it was loaded
(a zombie worker after a rebalance loses), and the state blob carries the offset fences, so state and
fence change in one atomic step. The same script moves the customer between census keys and parks the
save's outputs (alerts, recommendations, training examples) in a transactional outbox: a worker killed
after the save but before the broker had the outputs re-sends them from the outbox on restart, because
the replayed events themselves are fenced and would produce nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import orjson

from streamproc.domain.customer import CustomerState
from streamproc.partitioning import customer_partition

LAYOUT_VERSION = 2
LAYOUT_KEY = "sp:layout"
SUPPRESSED_KEY = "sp:suppressed"  # customers opted out of retention contact: never alerted
FEATURE_SCHEMAS_KEY = "sp:fschema"


def feature_schema_id(names: tuple[str, ...]) -> str:
    """A short name for an ordered set of feature names (the same on every worker)."""
    return hashlib.blake2b("\x1f".join(names).encode(), digest_size=4, person=b"sp-fschema").hexdigest()


def encode_feature_row(schema_id: str, features: dict[str, Any]) -> bytes:
    return orjson.dumps([schema_id, *features.values()])


def decode_feature_row(raw: bytes | str, names_of: Callable[[str], list[str]]) -> dict[str, Any]:
    """A stored feature row as a dict; ``names_of`` gives a schema id's feature names."""
    if raw[:1] in (b"{", "{"):  # a row written before schema ids: a JSON object
        decoded: dict[str, Any] = orjson.loads(raw)
        return decoded
    schema_id, *values = orjson.loads(raw)
    return dict(zip(names_of(schema_id), values, strict=True))


def feature_names_from(client: Any) -> Callable[[str], list[str]]:
    """``names_of`` for :func:`decode_feature_row` through a synchronous redis-py client (tools and tests)."""
    cache: dict[str, list[str]] = {}

    def names_of(schema_id: str) -> list[str]:
        if schema_id not in cache:
            cache[schema_id] = orjson.loads(client.hget(FEATURE_SCHEMAS_KEY, schema_id))
        return cache[schema_id]

    return names_of


def read_features(client: Any, customer_id: str) -> dict[str, Any] | None:
    """A customer's stored features through a synchronous redis-py client (tools and tests; ids not pseudonymised)."""
    raw = client.hget(stored_customer_key(client, customer_id), "f")
    return decode_feature_row(raw, feature_names_from(client)) if raw else None


def customer_key(partition: int, customer_id: str) -> str:
    return f"cust:{{p{partition}}}:{customer_id}"


def customer_id_of(key: bytes | str) -> str:
    """The customer id of a customer hash's key (``cust:{p<p>}:<id>``)."""
    name = key.decode() if isinstance(key, bytes) else key
    return name.split("}:", 1)[1]


def stored_partitions(client: Any) -> int | None:
    """The input partition count a database is laid out for, through a synchronous redis-py client (None: empty)."""
    raw = client.hget(LAYOUT_KEY, "partitions")
    return int(raw) if raw is not None else None


def stored_customer_key(client: Any, customer_id: str) -> str:
    """The key of a customer's hash in the database behind a synchronous redis-py client."""
    return customer_key(customer_partition(customer_id, stored_partitions(client)), customer_id)


def partition_key(partition: int, kind: str) -> str:
    """A partition's own key of one kind (census, outbox, erased, lastseen, due, alertq, alertsent, sweep)."""
    return f"sp:{{p{partition}}}:{kind}"


def erasure_digest(customer_id: str) -> str:
    """What the erasure list keeps: a digest, not the id itself."""
    return hashlib.blake2b(customer_id.encode(), digest_size=16, person=b"sp-erased").hexdigest()


def encode_state(state: CustomerState) -> bytes:
    return orjson.dumps(state.to_dict(), option=orjson.OPT_SORT_KEYS)
