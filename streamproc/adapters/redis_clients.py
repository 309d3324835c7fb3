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


def _seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A cluster URL's first seed node as a plain URL (scheme, credentials, no database), and every seed node: the
    host part may list several (``redis+cluster://h1:7000,h2:7000/0``), so a client starts while one is down."""
    scheme, rest = url.split("://", 1)
    netloc = rest.split("/", 1)[0]
    credentials, _, hosts = netloc.rpartition("@")
    seeds = []
    for hostport in hosts.split(","):
        host, _, port = hostport.rpartition(":")
        seeds.append((host, int(port)))
    first = f"{CLUSTER_SCHEMES[scheme]}://{credentials + '@' if credentials else ''}{hosts.split(',')[0]}"
    return first, seeds


AsyncRedis = aioredis.Redis | aioredis.RedisCluster
SyncRedis = redis.Redis | redis.RedisCluster


def _cluster_kwargs(url: str, node: Any, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The first seed's URL and the client options, with every seed as a startup node when there are several
    (``node``: the client flavour's ``ClusterNode``)."""
    first, seeds = _seeds(url)
    if len(seeds) > 1:
        kwargs = {**kwargs, "startup_nodes": [node(host, port) for host, port in seeds]}
    return first, kwargs


def async_redis(url: str, **kwargs: Any) -> AsyncRedis:
    if is_cluster_url(url):
        first, options = _cluster_kwargs(url, aioredis.cluster.ClusterNode, kwargs)
        return aioredis.RedisCluster.from_url(first, **options)
    return aioredis.from_url(url, **kwargs)


def sync_redis(url: str, **kwargs: Any) -> SyncRedis:
    if is_cluster_url(url):
        first, options = _cluster_kwargs(url, redis.cluster.ClusterNode, kwargs)
        return redis.RedisCluster.from_url(first, **options)
    return redis.Redis.from_url(url, **kwargs)
