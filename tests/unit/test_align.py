"""Stream-time alignment of the input topics (pure: no Kafka)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc.pipeline.align import TopicAligner
from streamproc.pipeline.records import RawRecord

KINDS = ("clicks", "transactions")


def rec(kind: str, ts: int, partition: int = 0, offset: int = 0) -> tuple[RawRecord, str]:
    return RawRecord(kind, kind, partition, offset, b"k", b"{}", ts), f"{kind}@{ts}"


def never(kind: str, partition: int) -> bool:
    return False


def test_live_records_go_at_once_in_timestamp_order():
    aligner: TopicAligner[str] = TopicAligner(KINDS)
    aligner.push([rec("clicks", 5), rec("clicks", 9), rec("transactions", 7)])
    assert [p for _, p in aligner.release(never, 0.0)] == ["clicks@5", "transactions@7", "clicks@9"]
    assert aligner.held() == 0


def test_a_topic_behind_on_the_broker_holds_the_other_back_until_it_arrives():
    aligner: TopicAligner[str] = TopicAligner(KINDS, max_wait_s=5.0)
    behind = {("transactions", 0)}
    aligner.push([rec("clicks", t) for t in (10, 20, 30)])
    assert aligner.release(lambda k, p: (k, p) in behind, 0.0) == []
    assert aligner.held(0) == 3
    behind.clear()
    aligner.push([rec("transactions", 15), rec("transactions", 25)])
    released = [p for _, p in aligner.release(lambda k, p: (k, p) in behind, 1.0)]
    assert released == ["clicks@10", "transactions@15", "clicks@20", "transactions@25", "clicks@30"]


def test_with_both_topics_queued_only_the_prefix_up_to_the_trailing_topic_goes():
    aligner: TopicAligner[str] = TopicAligner(KINDS, max_wait_s=5.0)
    aligner.push([rec("clicks", t) for t in (10, 20, 30)] + [rec("transactions", 15)])
    released = [p for _, p in aligner.release(lambda k, p: k == "transactions", 0.0)]
    # after transactions@15 the transactions queue is empty and more is on the broker: clicks 20 and 30 wait
    assert released == ["clicks@10", "transactions@15"]
    assert aligner.held() == 2


def test_holding_ends_after_the_maximum_wait_or_at_the_hold_limit():
    aligner: TopicAligner[str] = TopicAligner(KINDS, max_wait_s=2.0, hold_limit=100)
    aligner.push([rec("clicks", 1), rec("clicks", 2)])
    always = lambda k, p: True  # noqa: E731
    assert aligner.release(always, 10.0) == []
    assert aligner.release(always, 11.9) == []
    assert [p for _, p in aligner.release(always, 12.0)] == ["clicks@1", "clicks@2"]
    # a new hold starts its own wait
    aligner.push([rec("clicks", 3)])
    assert aligner.release(always, 12.5) == []
    small: TopicAligner[str] = TopicAligner(KINDS, max_wait_s=60.0, hold_limit=3)
    small.push([rec("clicks", t) for t in range(5)])
    # never more than the limit held: the oldest go first, down to below the limit
    assert [p for _, p in small.release(always, 0.0)] == ["clicks@0", "clicks@1", "clicks@2"]
    assert small.held() == 2


def test_partitions_are_aligned_independently_and_pause_when_far_ahead():
    aligner: TopicAligner[str] = TopicAligner(KINDS, pause_at=3)
    aligner.push([rec("clicks", t, partition=0) for t in range(4)] + [rec("clicks", 7, partition=1)])
    released = aligner.release(lambda k, p: p == 0 and k == "transactions", 0.0)
    assert [p for _, p in released] == ["clicks@7"]
    assert aligner.should_pause(0, "clicks") and not aligner.should_pause(1, "clicks")
    assert len(aligner.clear()) == 4 and aligner.held() == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 1000)), max_size=60), st.integers(1, 8),
       st.randoms(use_true_random=False))
def test_arrival_in_chunks_releases_everything_once_in_merged_order(events, chunks, rnd: random.Random):
    """Each topic arrives in its own order, the two interleaved arbitrarily; with the trailing topic known to
    be behind until its last record came, the output is the merged timestamp order."""
    per_kind = {k: sorted(ts for kind, ts in events if kind == k) for k in KINDS}
    stream = {k: [rec(k, ts, offset=i) for i, ts in enumerate(per_kind[k])] for k in KINDS}
    pending = {k: list(v) for k, v in stream.items()}
    aligner: TopicAligner[str] = TopicAligner(KINDS, max_wait_s=1e9)
    out: list[tuple[RawRecord, str]] = []
    while any(pending.values()):
        kind = rnd.choice([k for k in KINDS if pending[k]])
        take = rnd.randint(1, chunks)
        aligner.push(pending[kind][:take])
        pending[kind] = pending[kind][take:]
        out += aligner.release(lambda k, p: bool(pending[k]), 0.0)
    out += aligner.release(never, 0.0)
    assert aligner.held() == 0
    assert sorted(p for _, p in out) == sorted(p for v in stream.values() for _, p in v)
    stamps = [r.timestamp_ms for r, _ in out]
    assert stamps == sorted(stamps)


def reference_release(aligner: TopicAligner[str], behind, now: float) -> list[tuple[RawRecord, str]]:
    """The release rule written record by record: before each record, hold if a topic with nothing queued is
    behind on the broker (below the hold limit, within the wait); else the smallest (timestamp, kind) head goes."""
    out: list[tuple[RawRecord, str]] = []
    for partition, queues in aligner.queues.items():
        nonempty = [kind for kind, q in queues.items() if q]
        held = sum(len(queues[kind]) for kind in nonempty)
        while nonempty:
            if len(nonempty) < len(queues):
                trailing = [kind for kind, q in queues.items() if not q and kind in aligner.kinds]
                if trailing and held < aligner.hold_limit and any(behind(kind, partition) for kind in trailing):
                    since = aligner.waiting_since.setdefault(partition, now)
                    if now - since < aligner.max_wait_s:
                        break
            kind = min(nonempty, key=lambda k: (queues[k][0][0].timestamp_ms or 0, k))
            out.append(queues[kind].popleft())
            held -= 1
            if not queues[kind]:
                nonempty.remove(kind)
        else:
            aligner.waiting_since.pop(partition, None)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from((*KINDS, "other")), st.integers(0, 40), st.integers(0, 2)), max_size=80),
       st.sets(st.tuples(st.sampled_from(KINDS), st.integers(0, 2))), st.integers(1, 30),
       st.sampled_from([0.0, 1.0, 5.0]), st.dictionaries(st.integers(0, 2), st.sampled_from([-10.0, -0.5, 0.0])))
def test_release_in_runs_matches_the_record_by_record_rule(records, behind_set, hold_limit, max_wait, since):
    """Records go in runs, and the broker is asked once per partition and set of empty topics: the same records
    in the same order, held the same way, as the rule applied record by record (unsorted arrivals, timestamp
    ties, a third input kind, any hold limit and wait)."""
    aligners = []
    for _ in range(2):
        aligner: TopicAligner[str] = TopicAligner(KINDS, max_wait_s=max_wait, hold_limit=hold_limit)
        aligner.push([rec(kind, ts, partition, i) for i, (kind, ts, partition) in enumerate(records)])
        aligner.waiting_since.update(since)
        aligners.append(aligner)
    fast, slow = aligners
    asked: list[tuple[str, int]] = []

    def behind(kind: str, partition: int) -> bool:
        asked.append((kind, partition))
        return (kind, partition) in behind_set

    released = fast.release(behind, 0.0)
    assert [(r.kind, r.partition, r.offset) for r, _ in released] == [
        (r.kind, r.partition, r.offset) for r, _ in reference_release(slow, lambda k, p: (k, p) in behind_set, 0.0)]
    assert fast.waiting_since == slow.waiting_since
    assert fast.held() == slow.held()
    assert len(asked) <= 2 * len(KINDS) * 3
