"""Versioned model checkpoints behind a small interface.

Redis layout:

    sp:model:v:<n>     string   pickled ModelBundle, version n (the newest ``keep`` are kept)
    sp:model:current   string   the version every worker scores with (rollback moves it back)
    sp:model:summary   string   JSON: the current bundle's summary and segment profiles
    sp:model:offset    string   training-topic offset of the newest fenced save (trainer checkpoints)
    sp:model:latest    string   the highest version number ever saved
"""

from __future__ import annotations

import abc
from typing import Any

import orjson
import redis.asyncio as aioredis

from streamproc.domain.models import ModelBundle


class StaleCheckpoint(Exception):
    """A fenced save found a checkpoint that already holds the bundle's training offset or a later one."""


class ModelStore(abc.ABC):
    @abc.abstractmethod
    async def save(self, bundle: ModelBundle, keep: int, fenced: bool = False) -> int:
        """Store the bundle as the next version and make it current; returns the version. ``fenced`` (the
        trainer's checkpoints): refuse with ``StaleCheckpoint`` unless the bundle has learned past the training
        offset of the newest fenced save, so a trainer that lost its partition cannot overwrite its successor."""

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


# KEYS: offset, latest, current, summary, the version's key. ARGV: fenced, training offset, expected latest
# version, version, blob, summary, keep. Returns the version; -1 when fenced and stale; -2 when another save
# took the version number first (the caller retries with the next one).
SAVE_SCRIPT = """
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[3]) then return -2 end
if ARGV[1] == '1' then
  local offset = tonumber(ARGV[2])
  if tonumber(redis.call('GET', KEYS[1]) or '-2') >= offset then return -1 end
  redis.call('SET', KEYS[1], offset)
end
local version = tonumber(ARGV[4])
redis.call('SET', KEYS[2], version)
redis.call('SET', KEYS[5], ARGV[5])
redis.call('SET', KEYS[3], version)
redis.call('SET', KEYS[4], ARGV[6])
local keep = tonumber(ARGV[7])
for old = math.max(1, version - keep - 50), version - keep do
  redis.call('DEL', 'sp:model:v:' .. old)
end
return version
"""


class RedisModelStore(ModelStore):
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._save = client.register_script(SAVE_SCRIPT)

    async def save(self, bundle: ModelBundle, keep: int, fenced: bool = False) -> int:
        previous = bundle.version
        for _ in range(20):
            latest = int(await self.redis.get("sp:model:latest") or 0)
            if not latest:  # stores written before the counter existed
                latest = max(await self.versions(), default=0)
                await self.redis.set("sp:model:latest", latest, nx=True)
                latest = int(await self.redis.get("sp:model:latest") or 0)
            bundle.version = latest + 1
            result = int(await self._save(
                keys=["sp:model:offset", "sp:model:latest", "sp:model:current", "sp:model:summary",
                      f"sp:model:v:{bundle.version}"],
                args=["1" if fenced else "0", bundle.training_offset, latest, bundle.version, bundle.dumps(),
                      _summary(bundle), keep],
            ))
            if result == -1:
                bundle.version = previous
                raise StaleCheckpoint(f"training offset {bundle.training_offset} is already checkpointed")
            if result > 0:
                return result
        bundle.version = previous
        raise RuntimeError("could not allocate a model version (concurrent saves)")

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
        self.fence_offset = -2
        self.latest = 0

    async def save(self, bundle: ModelBundle, keep: int, fenced: bool = False) -> int:
        if fenced:
            if self.fence_offset >= bundle.training_offset:
                raise StaleCheckpoint(f"training offset {bundle.training_offset} is already checkpointed")
            self.fence_offset = bundle.training_offset
        self.latest = max(self.latest, *self.blobs, 0) + 1
        bundle.version = self.latest
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
