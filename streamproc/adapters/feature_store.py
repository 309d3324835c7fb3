"""The online feature store: per-customer state and features behind a small interface.

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

import abc
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hiredis
import orjson
import redis.asyncio as aioredis

from streamproc.domain.customer import CustomerState

ERASED_KEY = "sp:erased"
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


@dataclass(slots=True)
class Loaded:
    version: int
    blob: bytes | None  # the stored state blob (None: a new customer)
    erased: bool = False
    model: bytes | None = None  # the stored model outputs
    features: dict[str, Any] | None = None  # the stored features (only when loaded ``with_features``)

    def pristine(self, customer_id: str) -> CustomerState:
        """A fresh copy of the loaded state (or a new customer), safe to fold into."""
        return CustomerState.from_dict(orjson.loads(self.blob)) if self.blob else CustomerState(customer_id)


@dataclass(slots=True)
class Update:
    customer_id: str
    expected_version: int
    state: CustomerState
    features: dict[str, Any]
    model: dict[str, Any] | None = None
    partition: int = 0  # input partition the customer belongs to (census and outbox live per partition)
    outputs: bytes = b""  # JSON outputs to park in the outbox with this save ("" for none)
    features_unchanged: bool = False  # ``features`` are the stored ones: the row is kept, not rewritten
    label_due: int | None = None  # when the oldest pending churn label matures (None: nothing pending)

    @property
    def outbox_field(self) -> str:
        return f"{self.customer_id}:{self.expected_version + 1}"

    @property
    def census_key(self) -> str:
        """lifecycle_stage|value_tier|segment: what the population gauges count customers by."""
        segment = (self.model or {}).get("segment")
        return (f"{self.features.get('lifecycle_stage', '')}|{self.features.get('value_tier', '')}|"
                f"{'' if segment is None else segment}")


@dataclass
class SaveResult:
    failed: list[str]  # lost the version check
    previous_census: dict[str, str | None]  # saved customer -> census key before the save


@dataclass
class BatchSideEffects:
    """Population-level writes that follow a batch; each is idempotent, so a replay repeats them harmlessly."""

    last_seen: dict[int, dict[str, int]]  # partition -> customer -> last event time
    watermarks: dict[str, int]  # source -> largest event time seen
    hll: dict[str, set[str]]  # HLL key -> customers to add


class FeatureStore(abc.ABC):
    @abc.abstractmethod
    async def load(self, customer_ids: list[str], with_features: bool = False) -> dict[str, Loaded]:
        """Version, state blob, model outputs and erasure of each customer (and the stored features)."""

    @abc.abstractmethod
    async def after_batch(self, effects: BatchSideEffects) -> None: ...

    @abc.abstractmethod
    async def outbox(self, partition: int) -> dict[str, bytes]:
        """Outputs saved with customer state but not yet confirmed sent: field -> JSON."""

    @abc.abstractmethod
    async def clear_outbox(self, fields: dict[int, list[str]]) -> None:
        """Forget outbox entries the broker has confirmed (partition -> fields)."""

    @abc.abstractmethod
    async def census(self) -> dict[str, int]:
        """Customers by "lifecycle_stage|value_tier", summed over partitions."""

    @abc.abstractmethod
    async def load_watermarks(self) -> dict[str, int]: ...

    @abc.abstractmethod
    async def sweep_marks(self) -> dict[int, int]: ...

    @abc.abstractmethod
    async def set_sweep_mark(self, partition: int, watermark: int) -> None: ...

    @abc.abstractmethod
    async def overdue_labels(self, marks: dict[int, int]) -> int:
        """Customers whose oldest pending churn label matures at or before their partition's sweep mark in
        ``marks``: labels the sweep should have matured (0 unless something is wrong)."""

    @abc.abstractmethod
    async def silent_in_ranges(self, partition: int, ranges: list[tuple[int, int]]) -> list[list[str]]:
        """For each (low, high]: the customers of a partition whose last event time falls in it."""

    @abc.abstractmethod
    async def expire(self, partition: int, customer_ids: list[str]) -> None:
        """Drop long-silent customers (event-time expiry): their hash and their last-seen entry."""

    @abc.abstractmethod
    async def state_blob(self, customer_id: str) -> bytes | None: ...

    @abc.abstractmethod
    async def population(self) -> dict[str, float]: ...

    @abc.abstractmethod
    async def save(self, updates: list[Update]) -> SaveResult:
        """Apply updates atomically per customer; say which lost the version check."""

    @abc.abstractmethod
    async def features(self, customer_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def model_outputs(self, customer_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def forget(self, customer_id: str) -> bool:
        """Erase a customer and remember the erasure. True if there was anything to erase."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


# KEYS, per update: customer hash, its partition's census hash, its partition's outbox hash, its partition's label
# maturity index; last, the feature schemas hash. ARGV per update: expected version, feature row ("" keeps the stored
# one), state blob, census key, model JSON, outputs JSON ("" none), when its oldest pending label matures ("" none);
# then (schema id, names JSON) for each feature schema the rows use, stored in the same atomic step.
# Returns, per update, the previous census key ("" if none) or false when the version check failed.
_SAVE_LUA = """
local out = {}
local n = (#KEYS - 1) / 4
for j = 7 * n + 1, #ARGV, 2 do
  redis.call('HSETNX', KEYS[#KEYS], ARGV[j], ARGV[j + 1])
end
for i = 1, n do
  local key, census, outbox, due = KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1], KEYS[4 * i]
  local a = 7 * i - 6
  local current = redis.call('HMGET', key, '_v', 'k')
  local version = current[1] or '0'
  if version == ARGV[a] then
    local next_version = tostring(tonumber(version) + 1)
    local s, k, m = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
    if ARGV[a + 1] ~= '' then  -- one HSET with the feature row, or without it (the stored row stays)
      redis.call('HSET', key, '_v', next_version, '_s', s, 'k', k, 'm', m, 'f', ARGV[a + 1])
    else
      redis.call('HSET', key, '_v', next_version, '_s', s, 'k', k, 'm', m)
    end
    local old = current[2] or ''
    if old ~= ARGV[a + 3] then
      if old ~= '' then redis.call('HINCRBY', census, old, -1) end
      redis.call('HINCRBY', census, ARGV[a + 3], 1)
    end
    local customer = string.sub(key, 7, -2)
    if ARGV[a + 5] ~= '' then
      redis.call('HSET', outbox, customer .. ':' .. next_version, ARGV[a + 5])
    end
    if ARGV[a + 6] ~= '' then
      redis.call('ZADD', due, ARGV[a + 6], customer)
    else
      redis.call('ZREM', due, customer)
    end
    out[i] = old
  else
    out[i] = false
  end
end
return out
"""


# KEYS: customer hashes, then the erasure set. ARGV: the customers' erasure digests, then the fields to read.
# Returns, per customer: the fields, then erased (1/0) — false for missing fields.
_LOAD_LUA = """
local out = {}
local n = #KEYS - 1
local erased = KEYS[#KEYS]
local fields = {}
for j = n + 1, #ARGV do
  fields[#fields + 1] = ARGV[j]
end
local width = #fields + 1
for i = 1, n do
  local row = redis.call('HMGET', KEYS[i], unpack(fields))
  for j = 1, #fields do
    out[width * (i - 1) + j] = row[j]
  end
  out[width * i] = redis.call('SISMEMBER', erased, ARGV[i])
end
return out
"""
_LOAD_FIELDS = ("_v", "_s", "m")


class _PackInC:
    """Commands packed by hiredis (``hiredis.pack_command``, C) instead of redis-py's Python loop: the same bytes
    on the wire, in about half the time for a batch's multi-megabyte script calls (thousands of arguments)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # redis-py's own splitting of a command name holding spaces ("CONFIG GET")
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # an argument type hiredis does not pack (e.g. a memoryview): redis-py's way
            packed: list[bytes] = super().pack_command(*args)  # type: ignore[misc]
            return packed


_PACKING_CLASSES: dict[type, type] = {}


def _packing_in_c(connection_class: type) -> Any:
    if connection_class not in _PACKING_CLASSES:
        name = f"PackInC{connection_class.__name__}"
        _PACKING_CLASSES[connection_class] = type(name, (_PackInC, connection_class), {})
    return _PACKING_CLASSES[connection_class]


def _encode_state(state: CustomerState) -> bytes:
    return orjson.dumps(state.to_dict(), option=orjson.OPT_SORT_KEYS)


class RedisFeatureStore(FeatureStore):
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._save = client.register_script(_SAVE_LUA)
        self._load = client.register_script(_LOAD_LUA)
        self._schema_ids: dict[tuple[str, ...], str] = {}  # feature names -> their schema id
        self._schema_names: dict[str, list[str]] = {}  # schema id -> feature names (read side)

    @classmethod
    def from_url(cls, url: str, password: str | None = None, **kwargs: Any) -> RedisFeatureStore:
        client = aioredis.from_url(url, password=password, decode_responses=False, **kwargs)
        pool = client.connection_pool
        pool.connection_class = _packing_in_c(pool.connection_class)  # plain, TLS or unix socket alike
        return cls(client)

    async def load(self, customer_ids: list[str], with_features: bool = False) -> dict[str, Loaded]:
        if not customer_ids:
            return {}
        # one script call for the whole batch: one command to encode and one reply to parse, instead of one
        # HMGET per customer
        digests = [erasure_digest(cid) for cid in customer_ids]
        fields = (*_LOAD_FIELDS, "f") if with_features else _LOAD_FIELDS
        flat = await self._load(keys=[*(customer_key(cid) for cid in customer_ids), ERASED_KEY],
                                args=[*digests, *fields])
        width = len(fields) + 1  # the fields, then the erasure flag
        out: dict[str, Loaded] = {}
        for i, cid in enumerate(customer_ids):
            version, blob, model, *row, erased = flat[width * i : width * (i + 1)]
            feats = await self._decode_row(row[0]) if row and row[0] else None
            out[cid] = Loaded(int(version or 0), blob or None, bool(erased), model or None, feats)
        return out

    async def save(self, updates: list[Update]) -> SaveResult:
        if not updates:
            return SaveResult([], {})
        keys: list[str] = []
        args: list[str | bytes] = []
        schema_ids = self._schema_ids
        schemas: dict[str, tuple[str, ...]] = {}
        for up in updates:
            names = tuple(up.features)
            schema_id = schema_ids.get(names)
            if schema_id is None:
                schema_id = schema_ids[names] = feature_schema_id(names)
            schemas[schema_id] = names
            keys.append(customer_key(up.customer_id))
            keys.append(f"sp:census:{up.partition}")
            keys.append(f"sp:outbox:{up.partition}")
            keys.append(f"sp:due:{up.partition}")
            args.append(str(up.expected_version))
            args.append(b"" if up.features_unchanged else encode_feature_row(schema_id, up.features))
            args.append(_encode_state(up.state))
            args.append(up.census_key)
            args.append(orjson.dumps(up.model or {}, option=orjson.OPT_SORT_KEYS))
            args.append(up.outputs)
            args.append(b"" if up.label_due is None else str(up.label_due))
        keys.append(FEATURE_SCHEMAS_KEY)
        for schema_id, names in schemas.items():
            args.append(schema_id)
            args.append(orjson.dumps(names))
        replies = await self._save(keys=keys, args=args)
        result = SaveResult([], {})
        for up, reply in zip(updates, replies, strict=True):
            if reply is None:
                result.failed.append(up.customer_id)
            else:
                result.previous_census[up.customer_id] = reply.decode() or None
        return result

    async def _decode_row(self, raw: bytes) -> dict[str, Any]:
        """A stored feature row as a dict, its schema's names fetched once per process."""
        try:
            return decode_feature_row(raw, self._schema_names.__getitem__)
        except KeyError as unknown:  # a schema this process has not read yet
            schema_id = unknown.args[0]
            names = await self.redis.hget(FEATURE_SCHEMAS_KEY, schema_id)
            if names is None:
                raise KeyError(f"feature schema {schema_id} is not stored") from None
            self._schema_names[schema_id] = orjson.loads(names)
            return decode_feature_row(raw, self._schema_names.__getitem__)

    async def after_batch(self, effects: BatchSideEffects) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for partition, seen in effects.last_seen.items():
            if seen:
                pipe.zadd(f"sp:lastseen:{partition}", seen, gt=True)
        if effects.watermarks:
            # only ever moves forward: HSET of the max is safe because one worker owns a partition
            pipe.hset("sp:wm", mapping={k: str(v) for k, v in effects.watermarks.items()})
        for key, members in effects.hll.items():
            pipe.pfadd(key, *members)
        await pipe.execute()

    async def outbox(self, partition: int) -> dict[str, bytes]:
        raw: dict[bytes, bytes] = await self.redis.hgetall(f"sp:outbox:{partition}")  # type: ignore[assignment]
        return {k.decode(): v for k, v in raw.items()}

    async def clear_outbox(self, fields: dict[int, list[str]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for partition, names in fields.items():
            if names:
                pipe.hdel(f"sp:outbox:{partition}", *names)
        await pipe.execute()

    async def census(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        async for key in self.redis.scan_iter("sp:census:*", count=100):
            raw: dict[bytes, bytes] = await self.redis.hgetall(key)  # type: ignore[assignment]
            for k, v in raw.items():
                totals[k.decode()] = totals.get(k.decode(), 0) + int(v)
        return {k: v for k, v in totals.items() if v}

    async def load_watermarks(self) -> dict[str, int]:
        raw: dict[bytes, bytes] = await self.redis.hgetall("sp:wm")  # type: ignore[assignment]
        return {k.decode(): int(v) for k, v in raw.items()}

    async def sweep_marks(self) -> dict[int, int]:
        raw: dict[bytes, bytes] = await self.redis.hgetall("sp:sweep")  # type: ignore[assignment]
        return {int(k): int(v) for k, v in raw.items()}

    async def set_sweep_mark(self, partition: int, watermark: int) -> None:
        await self.redis.hset("sp:sweep", str(partition), str(watermark))

    async def overdue_labels(self, marks: dict[int, int]) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for partition, mark in marks.items():
            pipe.zcount(f"sp:due:{partition}", "-inf", mark)
        return sum(await pipe.execute())

    async def silent_in_ranges(self, partition: int, ranges: list[tuple[int, int]]) -> list[list[str]]:
        pipe = self.redis.pipeline(transaction=False)
        for low, high in ranges:
            pipe.zrangebyscore(f"sp:lastseen:{partition}", f"({low}", high)
        return [[m.decode() for m in found] for found in await pipe.execute()]

    async def expire(self, partition: int, customer_ids: list[str]) -> None:
        if not customer_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for cid in customer_ids:
            pipe.hget(customer_key(cid), "k")
        previous = await pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for cid, census_key in zip(customer_ids, previous, strict=True):
            pipe.delete(customer_key(cid))
            if census_key:
                pipe.hincrby(f"sp:census:{partition}", census_key.decode(), -1)
        pipe.zrem(f"sp:lastseen:{partition}", *customer_ids)
        pipe.zrem(f"sp:due:{partition}", *customer_ids)
        await pipe.execute()

    async def state_blob(self, customer_id: str) -> bytes | None:
        blob: bytes | None = await self.redis.hget(customer_key(customer_id), "_s")  # type: ignore[assignment]
        return blob or None

    async def population(self) -> dict[str, float]:
        buyers = await self.redis.pfcount("sp:agg:buyers")
        repeat = await self.redis.pfcount("sp:agg:repeat")
        out: dict[str, float] = {"buyers": buyers, "repeat_buyers": repeat,
                                 "repeat_purchase_rate": repeat / buyers if buyers else 0.0}
        sizes: dict[str, int] = {}
        async for key in self.redis.scan_iter("sp:cohort:*", count=500):
            name = key.decode()
            _, _, month, k = name.split(":")
            if k == "0":
                sizes[month] = await self.redis.pfcount(name)
        async for key in self.redis.scan_iter("sp:cohort:*", count=500):
            name = key.decode()
            _, _, month, k = name.split(":")
            if k != "0" and sizes.get(month):
                out[f"retention:{month}:{k}"] = await self.redis.pfcount(name) / sizes[month]
        for month, size in sizes.items():
            out[f"cohort_size:{month}"] = size
        return out

    async def features(self, customer_id: str) -> dict[str, Any] | None:
        raw: bytes | None = await self.redis.hget(customer_key(customer_id), "f")  # type: ignore[assignment]
        return await self._decode_row(raw) if raw else None

    async def model_outputs(self, customer_id: str) -> dict[str, Any] | None:
        raw: bytes | None = await self.redis.hget(customer_key(customer_id), "m")  # type: ignore[assignment]
        return orjson.loads(raw) if raw else None

    async def forget(self, customer_id: str) -> bool:
        census_key: bytes | None = await self.redis.hget(customer_key(customer_id), "k")  # type: ignore[assignment]
        deleted = await self.redis.delete(customer_key(customer_id))
        pipe = self.redis.pipeline(transaction=False)
        if deleted and census_key:
            # the census is read as a sum over partitions: take the customer off any partition holding the key
            async for key in self.redis.scan_iter("sp:census:*", count=100):
                if await self.redis.hget(key, census_key.decode()):
                    pipe.hincrby(key, census_key.decode(), -1)
                    break
        pipe.sadd(ERASED_KEY, erasure_digest(customer_id))
        for pattern in ("sp:lastseen:*", "sp:due:*"):
            async for key in self.redis.scan_iter(pattern, count=100):
                pipe.zrem(key, customer_id)
        async for key in self.redis.scan_iter("sp:outbox:*", count=100):  # unsent outputs about them
            async for name, _ in self.redis.hscan_iter(key, match=f"{customer_id}:*"):
                pipe.hdel(key, name)
        await pipe.execute()
        return bool(deleted)

    async def close(self) -> None:
        await self.redis.aclose()


class InMemoryFeatureStore(FeatureStore):
    """The same contract in a dict, for domain-level tests of the processing step."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[int, bytes, bytes]] = {}  # version, state blob, features JSON
        self.erased: set[str] = set()
        self.last_seen: dict[int, dict[str, int]] = {}
        self.watermarks: dict[str, int] = {}
        self.marks: dict[int, int] = {}
        self.hll: dict[str, set[str]] = {}
        self.census_keys: dict[str, str] = {}
        self.models: dict[str, bytes] = {}
        self.census_counts: dict[int, dict[str, int]] = {}
        self.outboxes: dict[int, dict[str, bytes]] = {}
        self.label_due: dict[int, dict[str, int]] = {}  # partition -> customer -> oldest pending label's maturity

    async def outbox(self, partition: int) -> dict[str, bytes]:
        return dict(self.outboxes.get(partition, {}))

    async def clear_outbox(self, fields: dict[int, list[str]]) -> None:
        for partition, names in fields.items():
            for name in names:
                self.outboxes.get(partition, {}).pop(name, None)

    async def after_batch(self, effects: BatchSideEffects) -> None:
        for partition, seen in effects.last_seen.items():
            table = self.last_seen.setdefault(partition, {})
            for cid, ts in seen.items():
                table[cid] = max(ts, table.get(cid, ts))
        self.watermarks.update(effects.watermarks)
        for key, members in effects.hll.items():
            self.hll.setdefault(key, set()).update(members)

    async def load_watermarks(self) -> dict[str, int]:
        return dict(self.watermarks)

    async def sweep_marks(self) -> dict[int, int]:
        return dict(self.marks)

    async def set_sweep_mark(self, partition: int, watermark: int) -> None:
        self.marks[partition] = watermark

    async def overdue_labels(self, marks: dict[int, int]) -> int:
        return sum(1 for partition, mark in marks.items()
                   for due in self.label_due.get(partition, {}).values() if due <= mark)

    async def silent_in_ranges(self, partition: int, ranges: list[tuple[int, int]]) -> list[list[str]]:
        table = self.last_seen.get(partition, {})
        return [sorted(c for c, ts in table.items() if low < ts <= high) for low, high in ranges]

    async def expire(self, partition: int, customer_ids: list[str]) -> None:
        for cid in customer_ids:
            self.rows.pop(cid, None)
            self.models.pop(cid, None)
            old = self.census_keys.pop(cid, None)
            if old:
                table = self.census_counts.setdefault(partition, {})
                table[old] = table.get(old, 0) - 1
            self.last_seen.get(partition, {}).pop(cid, None)
            self.label_due.get(partition, {}).pop(cid, None)

    async def state_blob(self, customer_id: str) -> bytes | None:
        row = self.rows.get(customer_id)
        return row[1] if row else None

    async def population(self) -> dict[str, float]:
        buyers = len(self.hll.get("sp:agg:buyers", set()))
        repeat = len(self.hll.get("sp:agg:repeat", set()))
        return {"buyers": buyers, "repeat_buyers": repeat, "repeat_purchase_rate": repeat / buyers if buyers else 0.0}

    async def load(self, customer_ids: list[str], with_features: bool = False) -> dict[str, Loaded]:
        out = {}
        for cid in customer_ids:
            row = self.rows.get(cid)
            feats = orjson.loads(row[2]) if with_features and row and row[2] else None
            out[cid] = Loaded(row[0] if row else 0, row[1] if row else None, cid in self.erased, self.models.get(cid),
                              feats)
        return out

    async def save(self, updates: list[Update]) -> SaveResult:
        result = SaveResult([], {})
        for up in updates:
            current = self.rows.get(up.customer_id, (0, b"", b""))[0]
            if current != up.expected_version:
                result.failed.append(up.customer_id)
                continue
            old = self.census_keys.get(up.customer_id)
            result.previous_census[up.customer_id] = old
            if old != up.census_key:
                table = self.census_counts.setdefault(up.partition, {})
                if old:
                    table[old] = table.get(old, 0) - 1
                table[up.census_key] = table.get(up.census_key, 0) + 1
            if up.outputs:
                self.outboxes.setdefault(up.partition, {})[up.outbox_field] = up.outputs
            self.census_keys[up.customer_id] = up.census_key
            due = self.label_due.setdefault(up.partition, {})
            if up.label_due is None:
                due.pop(up.customer_id, None)
            else:
                due[up.customer_id] = up.label_due
            self.models[up.customer_id] = orjson.dumps(up.model or {}, option=orjson.OPT_SORT_KEYS)
            previous = self.rows.get(up.customer_id)
            if up.features_unchanged and previous is not None:
                row = previous[2]
            else:
                row = orjson.dumps(up.features, option=orjson.OPT_SORT_KEYS)
            self.rows[up.customer_id] = (current + 1, _encode_state(up.state), row)
        return result

    async def census(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for deltas in self.census_counts.values():
            for k, v in deltas.items():
                totals[k] = totals.get(k, 0) + v
        return {k: v for k, v in totals.items() if v}

    async def features(self, customer_id: str) -> dict[str, Any] | None:
        row = self.rows.get(customer_id)
        return orjson.loads(row[2]) if row else None

    async def model_outputs(self, customer_id: str) -> dict[str, Any] | None:
        raw = self.models.get(customer_id)
        return orjson.loads(raw) if raw else None

    async def forget(self, customer_id: str) -> bool:
        self.erased.add(customer_id)
        self.models.pop(customer_id, None)
        old = self.census_keys.pop(customer_id, None)
        for table in self.census_counts.values():
            if old and table.get(old):
                table[old] -= 1
                break
        for table in [*self.last_seen.values(), *self.label_due.values()]:
            table.pop(customer_id, None)
        for box in self.outboxes.values():
            for name in [n for n in box if n.startswith(f"{customer_id}:")]:
                del box[name]
        return self.rows.pop(customer_id, None) is not None
