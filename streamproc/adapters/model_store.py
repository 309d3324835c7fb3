"""Versioned model checkpoints behind a small interface.

Redis layout:

    sp:model:v:<n>     string   pickled ModelBundle, version n (the newest ``keep`` are kept)
    sp:model:current   string   the version every worker scores with (rollback moves it back)
    sp:model:summary   string   JSON: the current bundle's summary and segment profiles
"""

from __future__ import annotations

import abc
from typing import Any

import orjson
import redis.asyncio as aioredis

from streamproc.domain.models import ModelBundle


class ModelStore(abc.ABC):
    @abc.abstractmethod
    async def save(self, bundle: ModelBundle, keep: int) -> int:
        """Store the bundle as the next version and make it current; returns the version."""

    @abc.abstractmethod
    async def current_version(self) -> int | None: ...

    @abc.abstractmethod
    async def load(self, version: int | None = None) -> ModelBundle | None: ...

    @abc.abstractmethod
    async def versions(self) -> list[int]: ...

    @abc.abstractmethod
    async def set_current(self, version: int) -> None: ...

    @abc.abstractmethod
    async def summary(self) -> dict[str, Any] | None: ...


def _summary(bundle: ModelBundle) -> bytes:
    import time

    profiles = {str(k): v for k, v in bundle.segment_profiles().items()}
    return orjson.dumps({**bundle.summary(), "segments": profiles, "saved_at": time.time()}, default=float)


class RedisModelStore(ModelStore):
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def save(self, bundle: ModelBundle, keep: int) -> int:
        newest = max(await self.versions(), default=0)
        bundle.version = newest + 1
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(f"sp:model:v:{bundle.version}", bundle.dumps())
        pipe.set("sp:model:current", bundle.version)
        pipe.set("sp:model:summary", _summary(bundle))
        for old in range(1, bundle.version - keep + 1):
            pipe.delete(f"sp:model:v:{old}")
        await pipe.execute()
        return bundle.version

    async def current_version(self) -> int | None:
        raw = await self.redis.get("sp:model:current")
        return int(raw) if raw else None

    async def load(self, version: int | None = None) -> ModelBundle | None:
        version = version if version is not None else await self.current_version()
        if version is None:
            return None
        blob: bytes | None = await self.redis.get(f"sp:model:v:{version}")  # type: ignore[assignment]
        return ModelBundle.loads(blob) if blob else None

    async def versions(self) -> list[int]:
        found = [int(k.decode().rsplit(":", 1)[1]) async for k in self.redis.scan_iter("sp:model:v:*", count=100)]
        return sorted(found)

    async def set_current(self, version: int) -> None:
        bundle = await self.load(version)
        if bundle is None:
            raise KeyError(f"no stored model version {version}")
        pipe = self.redis.pipeline(transaction=True)
        pipe.set("sp:model:current", version)
        pipe.set("sp:model:summary", _summary(bundle))
        await pipe.execute()

    async def summary(self) -> dict[str, Any] | None:
        raw = await self.redis.get("sp:model:summary")
        return orjson.loads(raw) if raw else None


class InMemoryModelStore(ModelStore):
    def __init__(self) -> None:
        self.blobs: dict[int, bytes] = {}
        self.current: int | None = None
        self._summary: bytes | None = None

    async def save(self, bundle: ModelBundle, keep: int) -> int:
        bundle.version = max(self.blobs, default=0) + 1
        self.blobs[bundle.version] = bundle.dumps()
        self.current = bundle.version
        self._summary = _summary(bundle)
        for old in [v for v in self.blobs if v <= bundle.version - keep]:
            del self.blobs[old]
        return bundle.version

    async def current_version(self) -> int | None:
        return self.current

    async def load(self, version: int | None = None) -> ModelBundle | None:
        version = version if version is not None else self.current
        blob = self.blobs.get(version) if version is not None else None
        return ModelBundle.loads(blob) if blob else None

    async def versions(self) -> list[int]:
        return sorted(self.blobs)

    async def set_current(self, version: int) -> None:
        if version not in self.blobs:
            raise KeyError(f"no stored model version {version}")
        self.current = version
        self._summary = _summary(ModelBundle.loads(self.blobs[version]))

    async def summary(self) -> dict[str, Any] | None:
        return orjson.loads(self._summary) if self._summary else None
