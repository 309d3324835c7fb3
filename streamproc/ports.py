"""The ports: small interfaces the pipeline and the runtime are written against, and the records that cross them.
The Redis adapters implement them (``streamproc/adapters/redis_store.py``, ``model_store.py``); the in-memory fakes
(``streamproc/adapters/memory.py``) too, for tests and the in-process pipeline."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import orjson

from streamproc.domain.customer import CustomerState
from streamproc.domain.models import ModelBundle


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
    queued: dict[str, bytes] | None = None  # alert decisions for the partition's alert queue (``pipeline.alert_queue``)

    @property
    def outbox_field(self) -> str:
        return f"{self.customer_id}:{self.expected_version + 1}"

    @property
    def census_key(self) -> str:
        """lifecycle_stage|value_tier|segment: what the population gauges count customers by."""
        segment = (self.model or {}).get("segment")
        return (f"{self.features.get('lifecycle_stage', '')}|{self.features.get('value_tier', '')}|"
                f"{'' if segment is None else segment}")


@dataclass(frozen=True, slots=True)
class CustomerRef:
    """Where one customer's state lives: the input partition their events arrive on, and the id stored (the raw id
    or its pseudonym)."""

    partition: int
    id: str


class LayoutMismatch(Exception):
    """The store is laid out for another partition count (or an older layout) than the input topics have."""


@dataclass(slots=True)
class AlertClose:
    """Closing a partition's alert days, written at once: the sweep mark moves to ``mark``, the ``done`` queue entries
    go, each customer's open sent alert is set (an alert id) or dropped (None), and what is sent is parked in the
    outbox (``outbox_field``: None when nothing is)."""

    partition: int
    mark: int
    done: list[str]
    open_sent: dict[str, str | None]
    outbox_field: str | None
    outputs: bytes


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


class CustomerStore(abc.ABC):
    """A customer's stored state and features: load with the version, compare-and-set save, erasure."""

    @abc.abstractmethod
    async def load(self, partition: int, customer_ids: list[str], with_features: bool = False) -> dict[str, Loaded]:
        """Version, state blob, model outputs and erasure of each of a partition's customers (and the stored
        features)."""

    @abc.abstractmethod
    async def save(self, updates: list[Update]) -> SaveResult:
        """Apply updates atomically per customer; say which lost the version check."""

    @abc.abstractmethod
    async def state_blob(self, customer: CustomerRef) -> bytes | None: ...

    @abc.abstractmethod
    async def features(self, customer: CustomerRef) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def model_outputs(self, customer: CustomerRef) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def forget(self, customer: CustomerRef) -> bool:
        """Erase a customer and remember the erasure. True if there was anything to erase."""

    @abc.abstractmethod
    async def claim_layout(self, partitions: int) -> None:
        """Record that the store is laid out for ``partitions`` input partitions, or raise ``LayoutMismatch`` if it
        already holds state laid out otherwise."""

    @abc.abstractmethod
    async def layout_partitions(self) -> int | None:
        """The input partition count the store is laid out for (None: nothing stored yet)."""


class OutboxStore(abc.ABC):
    """Outputs parked with the save that made them, until the broker has them."""

    @abc.abstractmethod
    async def outbox(self, partition: int) -> dict[str, bytes]:
        """Outputs saved with customer state but not yet confirmed sent: field -> JSON."""

    @abc.abstractmethod
    async def clear_outbox(self, fields: dict[int, list[str]]) -> None:
        """Forget outbox entries the broker has confirmed (partition -> fields)."""


class ProgressStore(abc.ABC):
    """Where the stream stands, per partition: watermarks, sweep marks, who is silent since when, labels due."""

    @abc.abstractmethod
    async def load_watermarks(self) -> dict[str, int]: ...

    @abc.abstractmethod
    async def sweep_marks(self) -> dict[int, int]: ...

    @abc.abstractmethod
    async def set_sweep_mark(self, partition: int, watermark: int) -> None: ...

    @abc.abstractmethod
    async def silent_in_ranges(self, partition: int, ranges: list[tuple[int, int]]) -> list[list[str]]:
        """For each (low, high]: the customers of a partition whose last event time falls in it."""

    @abc.abstractmethod
    async def expire(self, partition: int, customer_ids: list[str]) -> None:
        """Drop long-silent customers (event-time expiry): their hash and their last-seen entry."""

    @abc.abstractmethod
    async def overdue_labels(self, marks: dict[int, int]) -> int:
        """Customers whose oldest pending churn label matures at or before their partition's sweep mark in
        ``marks``: labels the sweep should have matured (0 unless something is wrong)."""


class AlertQueueStore(abc.ABC):
    """Per partition: alert decisions waiting for their day to close, and each customer's sent alert not cleared yet
    (saves add to the queue with the customer's state: ``Update.queued``)."""

    @abc.abstractmethod
    async def alert_queue(self, partition: int) -> dict[str, bytes]: ...

    @abc.abstractmethod
    async def open_sent_alerts(self, partition: int, customer_ids: list[str]) -> dict[str, str]: ...

    @abc.abstractmethod
    async def close_alerts(self, close: AlertClose) -> None:
        """Apply a closing atomically (a crash leaves it all undone or all done)."""

    @abc.abstractmethod
    async def suppressed(self, customer_ids: list[str]) -> set[str]:
        """Those of ``customer_ids`` who opted out of retention contact."""

    @abc.abstractmethod
    async def set_suppressed(self, customer_id: str, suppressed: bool) -> None:
        """Record an opt-out (or take it back); erasure removes it too (``forget``)."""


class PopulationStore(abc.ABC):
    """Population-level aggregates: last-seen times, HLLs, the census."""

    @abc.abstractmethod
    async def after_batch(self, effects: BatchSideEffects) -> None: ...

    @abc.abstractmethod
    async def census(self) -> dict[str, int]:
        """Customers by "lifecycle_stage|value_tier", summed over partitions."""

    @abc.abstractmethod
    async def population(self) -> dict[str, float]: ...


class FeatureStore(CustomerStore, OutboxStore, ProgressStore, AlertQueueStore, PopulationStore):
    """Everything the batch step keeps per customer and per partition, in one store."""

    async def close(self) -> None:
        pass


class UntrustedCheckpoint(Exception):
    """A stored checkpoint that is unsigned or does not match its signature: it is never unpickled."""


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

    async def newest_trusted(self, below: int | None = None) -> ModelBundle | None:
        """The newest stored checkpoint (below ``below``) whose signature holds: what to serve when the current
        one is refused."""
        for version in reversed(await self.versions()):
            if below is not None and version >= below:
                continue
            try:
                return await self.load(version)
            except UntrustedCheckpoint:
                continue
        return None

