"""Versioned model checkpoints behind a small interface.

Redis layout:

    sp:{model}:v:<n>     string   pickled ModelBundle, version n, signed when a key is set (the newest ``keep`` are
                                  kept; ``checkpoint_signing``)
    sp:{model}:current   string   the version every worker scores with (rollback moves it back)
    sp:{model}:summary   string   JSON: the current bundle's summary and segment profiles
    sp:{model}:offset    string   training-topic offset of the newest fenced save (trainer checkpoints)
    sp:{model}:latest    string   the highest version number ever saved
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from streamproc.adapters.checkpoint_signing import sign, verified_payload
from streamproc.adapters.redis_clients import AsyncRedis
from streamproc.adapters.redis_store import lua
from streamproc.domain.models import ModelBundle
from streamproc.ports import ModelStore, StaleCheckpoint


def checkpoint_summary(bundle: ModelBundle) -> bytes:
    profiles = {str(k): v for k, v in bundle.segment_profiles().items()}
    return orjson.dumps({**bundle.summary(), "segments": profiles, "saved_at": time.time()}, default=float)


class RedisModelStore(ModelStore):
    def __init__(self, client: AsyncRedis, signing_key: bytes | None = None) -> None:
        self.redis = client
        self.signing_key = signing_key  # signs what is saved; what is loaded must carry its signature
        self._save = client.register_script(lua("save_checkpoint"))

    async def save(self, bundle: ModelBundle, keep: int, fenced: bool = False) -> int:
        previous = bundle.version
        for _ in range(20):
            latest = int(await self.redis.get("sp:{model}:latest") or 0)
            if not latest:  # stores written before the counter existed
                latest = max(await self.versions(), default=0)
                await self.redis.set("sp:{model}:latest", latest, nx=True)
                latest = int(await self.redis.get("sp:{model}:latest") or 0)
            bundle.version = latest + 1
            blob = bundle.dumps()
            if self.signing_key is not None:
                blob = sign(self.signing_key, bundle.version, blob)
            result = int(await self._save(
                keys=["sp:{model}:offset", "sp:{model}:latest", "sp:{model}:current", "sp:{model}:summary",
                      f"sp:{{model}}:v:{bundle.version}"],
                args=["1" if fenced else "0", bundle.training_offset, latest, bundle.version, blob,
                      checkpoint_summary(bundle), keep],
            ))
            if result == -1:
                bundle.version = previous
                raise StaleCheckpoint(f"training offset {bundle.training_offset} is already checkpointed")
            if result > 0:
                return result
        bundle.version = previous
        raise RuntimeError("could not allocate a model version (concurrent saves)")

    async def current_version(self) -> int | None:
        raw = await self.redis.get("sp:{model}:current")
        return int(raw) if raw else None

    async def load(self, version: int | None = None) -> ModelBundle | None:
        version = version if version is not None else await self.current_version()
        if version is None:
            return None
        blob: bytes | None = await self.redis.get(f"sp:{{model}}:v:{version}")  # type: ignore[assignment]
        return ModelBundle.loads(verified_payload(self.signing_key, version, blob)) if blob else None

    async def versions(self) -> list[int]:
        found = [int(k.decode().rsplit(":", 1)[1]) async for k in self.redis.scan_iter("sp:{model}:v:*", count=100)]
        return sorted(found)

    async def set_current(self, version: int) -> None:
        bundle = await self.load(version)
        if bundle is None:
            raise KeyError(f"no stored model version {version}")
        pipe = self.redis.pipeline(transaction=True)
        pipe.set("sp:{model}:current", version)
        pipe.set("sp:{model}:summary", checkpoint_summary(bundle))
        await pipe.execute()

    async def summary(self) -> dict[str, Any] | None:
        raw = await self.redis.get("sp:{model}:summary")
        return orjson.loads(raw) if raw else None
