"""The Redis layout of the online feature store, and reading it (tools and tests read rows directly).

Redis layout (one hash per customer, hash-tagged so a customer's keys share a cluster slot):

    cust:{<customer_id>}   hash   ``f`` feature row (JSON array: schema id, then the values), ``_s`` state blob
                                  (JSON), ``_v`` version (write count),
                                  ``k`` census key "stage|tier|segment", ``m`` model outputs (JSON:
                                  segment, churn probability, alert hysteresis; depend on the checkpoint)
    sp:fschema             hash   feature schema id -> the feature names (JSON) its rows hold, in order
    sp:census:<p>          hash   census key -> customers, per input partition (moved inside the save itself)
    sp:outbox:<p>          hash   "<customer>:<version>" -> outputs of that save not yet confirmed by the broker
    sp:erased              set    digests of erased customer ids (a replay must not bring them back)
    sp:lastseen:<p>        zset   customer -> last event time, per input partition number (inactivity sweep)
    sp:due:<p>             zset   customer -> the grid instant their oldest pending churn label matures at (moved
                                  inside the save): a member at or below the sweep mark is overdue
    sp:sweep               hash   partition -> watermark up to which the sweep has run
    sp:wm                  hash   input source (kind:partition) -> largest event time seen
    sp:agg:buyers          HLL    customers with at least one purchase
    sp:agg:repeat          HLL    customers with at least two purchases
    sp:cohort:<YYYY-MM>:<k> HLL   customers whose first purchase was in YYYY-MM and who bought k months later

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

ERASED_KEY = "sp:erased"
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
    """A customer's stored features through a synchronous redis-py client (tools and tests)."""
    raw = client.hget(customer_key(customer_id), "f")
    return decode_feature_row(raw, feature_names_from(client)) if raw else None


def customer_key(customer_id: str) -> str:
    return f"cust:{{{customer_id}}}"


def erasure_digest(customer_id: str) -> str:
    """What the erasure list keeps: a digest, not the id itself."""
    return hashlib.blake2b(customer_id.encode(), digest_size=16, person=b"sp-erased").hexdigest()


def encode_state(state: CustomerState) -> bytes:
    return orjson.dumps(state.to_dict(), option=orjson.OPT_SORT_KEYS)
