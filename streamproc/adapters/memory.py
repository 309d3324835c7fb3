"""In-memory fakes of the ports, with the Redis adapters' semantics: for tests of the batch step and for the
whole pipeline in one process (``streamproc models train``, benchmarks)."""

from __future__ import annotations

from typing import Any

import orjson

from streamproc.adapters.feature_rows import encode_state
from streamproc.adapters.model_store import checkpoint_summary
from streamproc.domain.models import ModelBundle
from streamproc.ports import (
    AlertClose,
    BatchSideEffects,
    CustomerRef,
    FeatureStore,
    LayoutMismatch,
    Loaded,
    ModelStore,
    SaveResult,
    StaleCheckpoint,
    Update,
)


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
        self.alert_queues: dict[int, dict[str, bytes]] = {}
        self.sent_alerts: dict[int, dict[str, str]] = {}  # partition -> customer -> sent alert not cleared yet
        self.opted_out: set[str] = set()
        self.partitions: int | None = None  # the layout's input partition count (rows are keyed by id alone here)

    async def claim_layout(self, partitions: int) -> None:
        if self.partitions not in (None, partitions):
            raise LayoutMismatch(f"laid out for {self.partitions} input partitions, not {partitions}")
        self.partitions = partitions

    async def layout_partitions(self) -> int | None:
        return self.partitions

    async def alert_queue(self, partition: int) -> dict[str, bytes]:
        return dict(self.alert_queues.get(partition, {}))

    async def open_sent_alerts(self, partition: int, customer_ids: list[str]) -> dict[str, str]:
        sent = self.sent_alerts.get(partition, {})
        return {cid: sent[cid] for cid in customer_ids if cid in sent}

    async def close_alerts(self, close: AlertClose) -> None:
        queue = self.alert_queues.get(close.partition, {})
        for name in close.done:
            queue.pop(name, None)
        sent = self.sent_alerts.setdefault(close.partition, {})
        for cid, alert_id in close.open_sent.items():
            if alert_id is None:
                sent.pop(cid, None)
            else:
                sent[cid] = alert_id
        if close.outbox_field is not None:
            self.outboxes.setdefault(close.partition, {})[close.outbox_field] = close.outputs
        self.marks[close.partition] = close.mark

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

    async def state_blob(self, customer: CustomerRef) -> bytes | None:
        row = self.rows.get(customer.id)
        return row[1] if row else None

    async def population(self) -> dict[str, float]:
        buyers = len(self.hll.get("sp:agg:buyers", set()))
        repeat = len(self.hll.get("sp:agg:repeat", set()))
        return {"buyers": buyers, "repeat_buyers": repeat, "repeat_purchase_rate": repeat / buyers if buyers else 0.0}

    async def load(self, partition: int, customer_ids: list[str], with_features: bool = False) -> dict[str, Loaded]:
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
            if up.queued:
                self.alert_queues.setdefault(up.partition, {}).update(up.queued)
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
            self.rows[up.customer_id] = (current + 1, encode_state(up.state), row)
        return result

    async def census(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for deltas in self.census_counts.values():
            for k, v in deltas.items():
                totals[k] = totals.get(k, 0) + v
        return {k: v for k, v in totals.items() if v}

    async def features(self, customer: CustomerRef) -> dict[str, Any] | None:
        row = self.rows.get(customer.id)
        return orjson.loads(row[2]) if row else None

    async def model_outputs(self, customer: CustomerRef) -> dict[str, Any] | None:
        raw = self.models.get(customer.id)
        return orjson.loads(raw) if raw else None

    async def suppressed(self, customer_ids: list[str]) -> set[str]:
        return {cid for cid in customer_ids if cid in self.opted_out}

    async def set_suppressed(self, customer_id: str, suppressed: bool) -> None:
        if suppressed:
            self.opted_out.add(customer_id)
        else:
            self.opted_out.discard(customer_id)

    async def forget(self, customer: CustomerRef) -> bool:
        customer_id = customer.id
        self.erased.add(customer_id)
        self.opted_out.discard(customer_id)
        self.models.pop(customer_id, None)
        old = self.census_keys.pop(customer_id, None)
        for table in self.census_counts.values():
            if old and table.get(old):
                table[old] -= 1
                break
        for table in [*self.last_seen.values(), *self.label_due.values()]:
            table.pop(customer_id, None)
        for box in [*self.outboxes.values(), *self.alert_queues.values()]:
            for name in [n for n in box if n.startswith((f"{customer_id}:", f"cleared:{customer_id}:"))]:
                del box[name]
        for sent in self.sent_alerts.values():
            sent.pop(customer_id, None)
        return self.rows.pop(customer_id, None) is not None


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
        self._summary = checkpoint_summary(bundle)
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
        self._summary = checkpoint_summary(ModelBundle.loads(self.blobs[version]))

    async def summary(self) -> dict[str, Any] | None:
        return orjson.loads(self._summary) if self._summary else None
