"""The worker's intake alone: a real `streamproc worker` (Faust, the `streamproc://` bulk consumer, the topic
aligner, acks and commits, the outbox check, the metrics) whose batch step only counts the records it is handed,
with no decoding, no Redis state, no models and no outputs. Its rate bounds what any batch step can reach inside
this runtime on this machine: a worker's cost per event is the intake's plus the batch step's.

Run by ``bench/throughput.py --intake-floor`` (same topics, same records, same measurement); not a test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamproc.cli import main  # noqa: E402
from streamproc.pipeline.records import BatchResult, RawRecord  # noqa: E402
from streamproc.pipeline.step import BatchProcessor  # noqa: E402


async def count_only(self: BatchProcessor, records: list[RawRecord]) -> BatchResult:
    """Every record counted as applied (the figure the benchmark scrapes), nothing else."""
    result = BatchResult()
    count = result.outcome.count
    for rec in records:
        count(rec.source, "applied")
    self._count(result)
    return result


async def no_sweep(self: BatchProcessor, emit: Any = None, budget: int | None = None) -> int:
    return 0


if __name__ == "__main__":
    BatchProcessor.process = count_only  # type: ignore[method-assign]
    BatchProcessor.sweep = no_sweep  # type: ignore[method-assign]
    sys.exit(main(["worker"]))
