"""The store calls of a step, timed, with Redis working beside the CPU."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from streamproc.metrics import Metrics
from streamproc.ports import FeatureStore, Loaded, SaveResult, Update

# customers per save call of a batch or sweep step: each chunk is saved while the next one is computed (chunks
# hold different customers, so the order in which their scripts run does not matter)
SAVE_CHUNK = 150
# customers per load call of a batch or sweep step: every chunk is asked for at once and folded as soon as its
# reply is in, so only the first chunk's round trip is waited for (not the whole step's)
LOAD_CHUNK = 250


class StoreCalls:
    def __init__(self, store: FeatureStore, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics

    async def load(self, partition: int, customer_ids: list[str], with_features: bool = False) -> dict[str, Loaded]:
        t0 = time.perf_counter()
        loaded = await self.store.load(partition, customer_ids, with_features)
        self.metrics.redis_seconds.labels("load").observe(time.perf_counter() - t0)
        return loaded

    async def save(self, updates: list[Update]) -> SaveResult:
        t0 = time.perf_counter()
        saved = await self.store.save(updates)
        self.metrics.redis_seconds.labels("save").observe(time.perf_counter() - t0)
        return saved

    async def load_step_save(
        self, customers: dict[str, int], step: Callable[[str, Loaded], Update | None], with_features: bool = False,
    ) -> tuple[list[Update], set[str]]:
        """Load, step and save customers with Redis working beside the CPU: loads go out in chunks all at once and
        each chunk is stepped as soon as its reply is in; updates are saved in chunks while the next ones are
        computed (chunks hold different customers, so the order their scripts run in does not matter). Returns
        the updates and the customers whose save lost the version check. An error is raised once every call in
        flight has ended, so a retry never races a save of this attempt. ``customers``: id -> input partition (a
        load chunk holds one partition's customers: its keys share one hash slot)."""
        by_partition: dict[int, list[str]] = {}
        for cid, partition in customers.items():
            by_partition.setdefault(partition, []).append(cid)
        chunks = [(p, ids[i : i + LOAD_CHUNK])
                  for p, ids in by_partition.items() for i in range(0, len(ids), LOAD_CHUNK)]
        loading = [asyncio.ensure_future(self.load(p, chunk, with_features)) for p, chunk in chunks]
        updates: list[Update] = []
        saving: list[asyncio.Future[SaveResult]] = []
        sent = 0
        try:
            for (_, chunk), load in zip(chunks, loading, strict=True):
                loaded = await load
                for cid in chunk:
                    update = step(cid, loaded[cid])
                    if update is None:
                        continue
                    updates.append(update)
                    if len(updates) - sent >= SAVE_CHUNK:
                        saving.append(asyncio.ensure_future(self.save(updates[sent:])))
                        sent = len(updates)
                        await asyncio.sleep(0)  # lets the save write its command
            if sent < len(updates):
                saving.append(asyncio.ensure_future(self.save(updates[sent:])))
            failed = {cid for saved in await asyncio.gather(*saving) for cid in saved.failed}
        except BaseException:
            await asyncio.gather(*loading, *saving, return_exceptions=True)
            raise
        return updates, failed
