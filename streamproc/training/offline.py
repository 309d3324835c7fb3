"""The whole pipeline in one process, without Kafka or Redis: the batch step over a recorded or simulated
stream in event-time order, and the trainer learning every example as it is emitted, with the scoring side
picking up a fresh checkpoint every few batches (as stale as a worker's would be).

Used to bootstrap a model from history before going live (``streamproc models train``, then the
checkpoint is in Redis for every worker), by ``bench/quality.py`` and by tests that need a trained model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from streamproc.adapters.memory import InMemoryFeatureStore
from streamproc.config import model_config
from streamproc.contracts.outputs import BasketExample, ChurnExample
from streamproc.domain.models import ModelBundle
from streamproc.pipeline.factory import build_processor
from streamproc.pipeline.records import BatchResult, Example, RawRecord
from streamproc.pipeline.step import BatchProcessor
from streamproc.settings import Settings
from streamproc.topics import INPUT_TOPICS


def learn(bundle: ModelBundle, example: Example) -> None:
    """One training example, as the trainer agent learns it."""
    if isinstance(example, ChurnExample):
        bundle.learn_churn(example.x, int(example.label), example.p, customer=example.id.partition(":")[0],
                           instant=example.ts)
    elif isinstance(example, BasketExample):
        bundle.learn_basket(example.ts, example.items, example.segment, example.rec, example.amount)
    else:
        bundle.learn_segment(example.x)
        if example.rfm is not None:
            bundle.rfm.learn(example.ts, *example.rfm)
    bundle.event_time = max(bundle.event_time, int(example.ts))


async def run_offline(
    payloads: Iterable[tuple[str, bytes, bytes]], settings: Settings, batch: int = 2000,
    checkpoint_every: int = 10, on_result: Callable[[BatchResult], None] | None = None,
) -> tuple[ModelBundle, BatchProcessor, InMemoryFeatureStore]:
    """Run ``(topic, key, payload)`` records through the batch step and the trainer; returns the trained
    bundle, the processor and its in-memory store."""
    records = []
    offsets: dict[str, int] = {}
    for topic, key, payload in payloads:
        offsets[topic] = offsets.get(topic, -1) + 1
        records.append(RawRecord(topic, topic, 0, offsets[topic], key, payload, None))
    store = InMemoryFeatureStore()
    proc = build_processor(settings, store)
    proc.sweep_budget = None  # no ingest to keep responsive here: every sweep pass completes within its step
    # an input with no record in the history (a transactions-only shop's clicks) does not hold time back
    proc.note_silent_sources(f"{kind}:0" for kind in INPUT_TOPICS if kind not in offsets)
    trainer = ModelBundle(model_config(settings))
    for n, i in enumerate(range(0, len(records), batch)):
        result = await proc.process(records[i : i + batch])
        await proc.sweep()
        result.absorb(proc.sweep_outputs)
        store.outboxes.clear()  # the outputs are taken here, as a worker's are delivered: nothing to re-send
        if on_result is not None:
            on_result(result)
        for example in result.examples:
            learn(trainer, example)
        if n % checkpoint_every == 0:
            trainer.version += 1
            proc.bundle = ModelBundle.loads(trainer.dumps())  # what a worker loads from a checkpoint
    trainer.version += 1
    return trainer, proc, store
