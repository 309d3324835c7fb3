"""Redis clients for a configured URL: one Redis server, or a Redis Cluster (a ``redis+cluster://`` or
``rediss+cluster://`` URL, or ``STREAMPROC_REDIS_CLUSTER=true``, which the settings turn into such a URL).
redis-py's cluster clients route each command by its key's hash slot; every multi-key step streamproc runs keeps
its keys in one slot (``feature_rows``)."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def _node_url(url: str) -> str:
    """A seed node's URL as redis-py's cluster clients take it (plain scheme, no database)."""
    scheme, rest = url.split("://", 1)
    return f"{CLUSTER_SCHEMES[scheme]}://{rest.split('/', 1)[0]}"


AsyncRedis = aioredis.Redis | aioredis.RedisCluster
SyncRedis = redis.Redis | redis.RedisCluster


def async_redis(url: str, **kwargs: Any) -> AsyncRedis:
    if is_cluster_url(url):
        return aioredis.RedisCluster.from_url(_node_url(url), **kwargs)
    return aioredis.from_url(url, **kwargs)


def sync_redis(url: str, **kwargs: Any) -> SyncRedis:
    if is_cluster_url(url):
        return redis.RedisCluster.from_url(_node_url(url), **kwargs)
    return redis.Redis.from_url(url, **kwargs)
