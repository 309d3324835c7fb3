"""The online feature store on Redis (the layout: ``streamproc/adapters/feature_rows.py``; the scripts:
``streamproc/adapters/lua/``).

A save is a compare-and-set on ``_v``: it applies only if nobody wrote the customer since it was loaded
(a zombie worker after a rebalance loses), and the state blob carries the offset fences, so state and
fence change in one atomic step. The same script moves the customer between census keys and parks the
save's outputs (alerts, recommendations, training examples) in a transactional outbox: a worker killed
after the save but before the broker had the outputs re-sends them from the outbox on restart, because
the replayed events themselves are fenced and would produce nothing.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any

import hiredis
import orjson
import redis.asyncio as aioredis

from streamproc.adapters.feature_rows import (
    FEATURE_SCHEMAS_KEY,
    LAYOUT_KEY,
    LAYOUT_VERSION,
    SUPPRESSED_KEY,
    customer_key,
    decode_feature_row,
    encode_feature_row,
    encode_state,
    erasure_digest,
    feature_schema_id,
    partition_key,
)
from streamproc.adapters.redis_clients import AsyncRedis, async_redis
from streamproc.adapters.redis_replicas import ReplicaWait
from streamproc.errors import TransientError
from streamproc.ports import (
    AlertClose,
    BatchSideEffects,
    CustomerRef,
    FeatureStore,
    LayoutMismatch,
    Loaded,
    SaveResult,
    Update,
)


def lua(name: str) -> str:
    """A Lua script of this package (``streamproc/adapters/lua/<name>.lua``)."""
    return resources.files("streamproc.adapters").joinpath("lua", f"{name}.lua").read_text()


_LOAD_FIELDS = ("_v", "_s", "m")
# each process writes a feature schema again (HSETNX) a minute after it last did: a schema a failover lost (it is
# stored on another shard than the rows that use it) comes back
SCHEMA_REWRITE_S = 60.0


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


class RedisFeatureStore(FeatureStore):
    def __init__(self, client: AsyncRedis) -> None:
        self.redis = client
        self.replicas = ReplicaWait(client)  # saves acknowledged only once replicas have them (off by default)
        self._save = client.register_script(lua("save_customers"))
        self._load = client.register_script(lua("load_customers"))
        self._close_alerts = client.register_script(lua("close_alerts"))
        self._schema_ids: dict[tuple[str, ...], str] = {}  # feature names -> their schema id
        self._schema_names: dict[str, list[str]] = {}  # schema id -> feature names (read side)
        self._schemas_stored: dict[str, float] = {}  # schema id -> when last written (SCHEMA_REWRITE_S)
        self._partitions: int | None = None  # the input partition count of the layout, once read or claimed

    @classmethod
    def from_url(cls, url: str, password: str | None = None, **kwargs: Any) -> RedisFeatureStore:
        client = async_redis(url, password=password, decode_responses=False, **kwargs)
        if isinstance(client, aioredis.RedisCluster):
            return cls(client)  # its nodes make their own connections: redis-py packs the commands there
        pool = client.connection_pool
        pool.connection_class = _packing_in_c(pool.connection_class)  # plain, TLS or unix socket alike
        return cls(client)

    async def load(self, partition: int, customer_ids: list[str], with_features: bool = False) -> dict[str, Loaded]:
        if not customer_ids:
            return {}
        # one script call for the whole batch: one command to encode and one reply to parse, instead of one
        # HMGET per customer
        digests = [erasure_digest(cid) for cid in customer_ids]
        fields = (*_LOAD_FIELDS, "f") if with_features else _LOAD_FIELDS
        flat = await self._load(keys=[*(customer_key(partition, cid) for cid in customer_ids),
                                      partition_key(partition, "erased")],
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
        by_partition: dict[int, list[tuple[Update, str]]] = {}  # partition -> (update, its feature schema id)
        used: dict[str, tuple[str, ...]] = {}  # schema id -> feature names
        for up in updates:
            names = tuple(up.features)
            schema_id = self._schema_ids.get(names)
            if schema_id is None:
                schema_id = self._schema_ids[names] = feature_schema_id(names)
            used[schema_id] = names
            by_partition.setdefault(up.partition, []).append((up, schema_id))
        await self._store_schemas(used)
        # one script call per partition: its keys share the partition's hash tag, so on a cluster it runs on one
        # shard; the calls go out together
        results = await asyncio.gather(*(self._save_partition(p, ups) for p, ups in by_partition.items()))
        merged = SaveResult([], {})
        for result in results:
            merged.failed += result.failed
            merged.previous_census.update(result.previous_census)
        return merged

    async def _store_schemas(self, used: dict[str, tuple[str, ...]]) -> None:
        """Store the names of each feature schema the rows use before any row that refers to it (a crash between
        the two leaves an unused schema, never a row without one)."""
        now = time.monotonic()
        schemas = {schema_id: names for schema_id, names in used.items()
                   if now - self._schemas_stored.get(schema_id, -SCHEMA_REWRITE_S) >= SCHEMA_REWRITE_S}
        if schemas:
            pipe = self.redis.pipeline(transaction=False)
            for schema_id, names in schemas.items():
                pipe.hsetnx(FEATURE_SCHEMAS_KEY, schema_id, orjson.dumps(names))
            await pipe.execute()
            self._schemas_stored.update(dict.fromkeys(schemas, now))

    async def _save_partition(self, partition: int, updates: list[tuple[Update, str]]) -> SaveResult:
        keys: list[str] = [partition_key(partition, kind) for kind in ("census", "outbox", "due", "alertq")]
        args: list[str | bytes] = []
        for up, schema_id in updates:
            keys.append(customer_key(partition, up.customer_id))
            args.append(up.customer_id)
            args.append(str(up.expected_version))
            args.append(b"" if up.features_unchanged else encode_feature_row(schema_id, up.features))
            args.append(encode_state(up.state))
            args.append(up.census_key)
            args.append(orjson.dumps(up.model or {}, option=orjson.OPT_SORT_KEYS))
            args.append(up.outputs)
            args.append(b"" if up.label_due is None else str(up.label_due))
            args.append(orjson.dumps([x for name, value in up.queued.items() for x in (name, value.decode())])
                        if up.queued else b"")
        replies = await (self.replicas.save(self._save, partition, keys, args) if self.replicas.wanted
                         else self._save(keys=keys, args=args))
        result = SaveResult([], {})
        for (up, _), reply in zip(updates, replies, strict=True):
            if reply is None:
                result.failed.append(up.customer_id)
            else:
                result.previous_census[up.customer_id] = reply.decode() or None
        return result

    async def claim_layout(self, partitions: int) -> None:
        if await self.redis.exists("sp:sweep") or await self.redis.exists("sp:erased"):  # only the first layout had
            raise LayoutMismatch(
                "this Redis database holds state in streamproc's first layout (keys not tagged by partition); "
                "rebuild it by replay into an empty database (README: 'Changing the partition count')")
        await self.redis.hsetnx(LAYOUT_KEY, "version", LAYOUT_VERSION)
        await self.redis.hsetnx(LAYOUT_KEY, "partitions", partitions)
        raw: list[bytes | None] = await self.redis.hmget(LAYOUT_KEY, ["version", "partitions"])  # type: ignore[assignment]
        version, stored = (int(x) if x is not None else None for x in raw)
        if version != LAYOUT_VERSION or stored != partitions:
            raise LayoutMismatch(
                f"this Redis database holds customer state laid out for {stored} input partitions (layout "
                f"v{version}), but the input topics have {partitions}: a customer's state would be looked for under "
                "the wrong partition. Keep the partition count, or rebuild by replay into an empty database "
                "(README: 'Changing the partition count')")
        self._partitions = partitions

    async def layout_partitions(self) -> int | None:
        if self._partitions is None:
            raw = await self.redis.hget(LAYOUT_KEY, "partitions")
            self._partitions = int(raw) if raw is not None else None
        return self._partitions

    async def _decode_row(self, raw: bytes) -> dict[str, Any]:
        """A stored feature row as a dict, its schema's names fetched once per process."""
        try:
            return decode_feature_row(raw, self._schema_names.__getitem__)
        except KeyError as unknown:  # a schema this process has not read yet
            schema_id = unknown.args[0]
            names = await self.redis.hget(FEATURE_SCHEMAS_KEY, schema_id)
            if names is None:
                # written again within SCHEMA_REWRITE_S by whichever process saves rows of it: retried
                raise TransientError(f"feature schema {schema_id} is not stored") from None
            self._schema_names[schema_id] = orjson.loads(names)
            return decode_feature_row(raw, self._schema_names.__getitem__)

    async def after_batch(self, effects: BatchSideEffects) -> None:
        await self.replicas.confirm()  # before the batch is acknowledged
        pipe = self.redis.pipeline(transaction=False)
        for partition, seen in effects.last_seen.items():
            if seen:
                pipe.zadd(partition_key(partition, "lastseen"), seen, gt=True)
        if effects.watermarks:
            # only ever moves forward: HSET of the max is safe because one worker owns a partition
            pipe.hset("sp:wm", mapping={k: str(v) for k, v in effects.watermarks.items()})
        for key, members in effects.hll.items():
            pipe.pfadd(key, *members)
        await pipe.execute()

    async def outbox(self, partition: int) -> dict[str, bytes]:
        raw: dict[bytes, bytes] = await self.redis.hgetall(partition_key(partition, "outbox"))  # type: ignore[assignment]
        return {k.decode(): v for k, v in raw.items()}

    async def clear_outbox(self, fields: dict[int, list[str]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for partition, names in fields.items():
            if names:
                pipe.hdel(partition_key(partition, "outbox"), *names)
        await pipe.execute()

    async def census(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        pipe = self.redis.pipeline(transaction=False)
        for partition in range(await self.layout_partitions() or 0):
            pipe.hgetall(partition_key(partition, "census"))
        for raw in await pipe.execute():
            for k, v in raw.items():
                totals[k.decode()] = totals.get(k.decode(), 0) + int(v)
        return {k: v for k, v in totals.items() if v}

    async def load_watermarks(self) -> dict[str, int]:
        raw: dict[bytes, bytes] = await self.redis.hgetall("sp:wm")  # type: ignore[assignment]
        return {k.decode(): int(v) for k, v in raw.items()}

    async def sweep_marks(self) -> dict[int, int]:
        partitions = range(await self.layout_partitions() or 0)
        pipe = self.redis.pipeline(transaction=False)
        for partition in partitions:
            pipe.get(partition_key(partition, "sweep"))
        return {p: int(v) for p, v in zip(partitions, await pipe.execute(), strict=True) if v is not None}

    async def set_sweep_mark(self, partition: int, watermark: int) -> None:
        await self.redis.set(partition_key(partition, "sweep"), str(watermark))

    async def alert_queue(self, partition: int) -> dict[str, bytes]:
        raw: dict[bytes, bytes] = await self.redis.hgetall(partition_key(partition, "alertq"))  # type: ignore[assignment]
        return {k.decode(): v for k, v in raw.items()}

    async def open_sent_alerts(self, partition: int, customer_ids: list[str]) -> dict[str, str]:
        if not customer_ids:
            return {}
        raw: list[bytes | None] = await self.redis.hmget(partition_key(partition, "alertsent"), customer_ids)  # type: ignore[assignment]
        return {cid: v.decode() for cid, v in zip(customer_ids, raw, strict=True) if v}

    async def close_alerts(self, close: AlertClose) -> None:
        p = close.partition
        args: list[str | bytes] = [str(p), str(close.mark), close.outbox_field or "", close.outputs,
                                   str(len(close.done)), *close.done]
        for cid, alert_id in close.open_sent.items():
            args += [cid, alert_id or ""]
        keys = [partition_key(p, kind) for kind in ("alertq", "alertsent", "outbox", "sweep")]
        await self._close_alerts(keys=keys, args=args)

    async def overdue_labels(self, marks: dict[int, int]) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for partition, mark in marks.items():
            pipe.zcount(partition_key(partition, "due"), "-inf", mark)
        return sum(await pipe.execute())

    async def silent_in_ranges(self, partition: int, ranges: list[tuple[int, int]]) -> list[list[str]]:
        pipe = self.redis.pipeline(transaction=False)
        for low, high in ranges:
            pipe.zrangebyscore(partition_key(partition, "lastseen"), f"({low}", high)
        return [[m.decode() for m in found] for found in await pipe.execute()]

    async def expire(self, partition: int, customer_ids: list[str]) -> None:
        if not customer_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for cid in customer_ids:
            pipe.hget(customer_key(partition, cid), "k")
        previous = await pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for cid, census_key in zip(customer_ids, previous, strict=True):
            pipe.delete(customer_key(partition, cid))
            if census_key:
                pipe.hincrby(partition_key(partition, "census"), census_key.decode(), -1)
        pipe.zrem(partition_key(partition, "lastseen"), *customer_ids)
        pipe.zrem(partition_key(partition, "due"), *customer_ids)
        await pipe.execute()

    async def state_blob(self, customer: CustomerRef) -> bytes | None:
        blob: bytes | None = await self.redis.hget(customer_key(customer.partition, customer.id), "_s")  # type: ignore[assignment]
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

    async def features(self, customer: CustomerRef) -> dict[str, Any] | None:
        raw: bytes | None = await self.redis.hget(customer_key(customer.partition, customer.id), "f")  # type: ignore[assignment]
        return await self._decode_row(raw) if raw else None

    async def model_outputs(self, customer: CustomerRef) -> dict[str, Any] | None:
        raw: bytes | None = await self.redis.hget(customer_key(customer.partition, customer.id), "m")  # type: ignore[assignment]
        return orjson.loads(raw) if raw else None

    async def suppressed(self, customer_ids: list[str]) -> set[str]:
        if not customer_ids:
            return set()
        found = await self.redis.smismember(SUPPRESSED_KEY, customer_ids)
        return {cid for cid, hit in zip(customer_ids, found, strict=True) if hit}

    async def set_suppressed(self, customer_id: str, suppressed: bool) -> None:
        if suppressed:
            await self.redis.sadd(SUPPRESSED_KEY, customer_id)
        else:
            await self.redis.srem(SUPPRESSED_KEY, customer_id)

    async def forget(self, customer: CustomerRef) -> bool:
        p, cid = customer.partition, customer.id
        key = customer_key(p, cid)
        census_key: bytes | None = await self.redis.hget(key, "k")  # type: ignore[assignment]
        deleted = await self.redis.delete(key)
        pipe = self.redis.pipeline(transaction=False)
        if deleted and census_key:
            pipe.hincrby(partition_key(p, "census"), census_key.decode(), -1)
        pipe.sadd(partition_key(p, "erased"), erasure_digest(cid))
        pipe.srem(SUPPRESSED_KEY, cid)  # the opt-out record names them too
        pipe.zrem(partition_key(p, "lastseen"), cid)
        pipe.zrem(partition_key(p, "due"), cid)
        pipe.hdel(partition_key(p, "alertsent"), cid)
        await pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for kind in ("outbox", "alertq"):  # unsent outputs about them, alert decisions waiting
            for match in (f"{cid}:*", f"cleared:{cid}:*"):
                async for name, _ in self.redis.hscan_iter(partition_key(p, kind), match=match):
                    pipe.hdel(partition_key(p, kind), name)
        await pipe.execute()
        return bool(deleted)

    async def close(self) -> None:
        await self.redis.aclose()
