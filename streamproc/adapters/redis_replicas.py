"""Saves acknowledged only once replicas have them (``STREAMPROC_REDIS_WAIT_REPLICAS``).

Redis replication is asynchronous: a master that dies takes with it what it had not passed on, and for a worker
that is a save whose events Kafka already counts as consumed. Here a save is followed by ``WAIT`` in the same
pipeline (WAIT counts the replicas that acknowledged the writes of its own connection, and a pipeline, on a
cluster per node, goes out on one connection). A save that falls short fails as transient, so its batch is not
acknowledged and is retried; the retry finds its events fenced and may write nothing, so before the batch counts
as done a fresh write on that node must reach the replicas (a later write vouches for the earlier ones: replicas
acknowledge an offset in one ordered stream). Strict, like ``min.insync.replicas``: a master without replicas
holds its partitions back until one joins.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from streamproc.adapters.feature_rows import partition_key
from streamproc.adapters.redis_clients import AsyncRedis
from streamproc.errors import TransientError


class ReplicaWait:
    def __init__(self, client: AsyncRedis, wanted: int = 0, timeout_ms: int = 1000) -> None:
        self.redis = client
        self.wanted = wanted  # replicas a save must reach (0: not waited for)
        self.timeout_ms = timeout_ms
        self._unconfirmed: set[int] = set()  # partitions whose last WAIT fell short

    async def save(self, script: AsyncScript, partition: int, keys: list[str], args: list[str | bytes]) -> Any:
        """Run the save script and WAIT for the replicas; the script's reply."""
        target = self._node_of(keys[0])
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            await script(keys=keys, args=args, client=pipe)  # type: ignore[arg-type]  # queued in the pipeline
            pipe.execute_command("WAIT", self.wanted, self.timeout_ms, **target)
            try:
                replies = await pipe.execute()
            except NoScriptError:  # a node that has not seen the script (a replica promoted since it was loaded)
                if attempt:
                    raise
                await self.redis.script_load(script.script)
                continue
            self._confirmed(partition, int(replies[1]))
            return replies[0]
        raise AssertionError("unreachable")

    async def confirm(self) -> None:
        """For each partition whose save fell short: a write (that leaves nothing behind) and WAIT on its node
        again; raises ``TransientError`` while the replicas have not caught up."""
        for partition in sorted(self._unconfirmed):
            key = partition_key(partition, "replicated")
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(key, 1)
            pipe.delete(key)
            pipe.execute_command("WAIT", self.wanted, self.timeout_ms, **self._node_of(key))
            self._confirmed(partition, int((await pipe.execute())[2]))

    def _node_of(self, key: str) -> dict[str, Any]:
        """Where a pipeline's WAIT goes: the node that took the writes (on one Redis, the pipeline's connection)."""
        if isinstance(self.redis, aioredis.RedisCluster):
            return {"target_nodes": self.redis.get_node_from_key(key)}
        return {}

    def _confirmed(self, partition: int, replicas: int) -> None:
        if replicas < self.wanted:
            self._unconfirmed.add(partition)
            raise TransientError(f"a save reached {replicas} of {self.wanted} replicas in {self.timeout_ms} ms")
        self._unconfirmed.discard(partition)
