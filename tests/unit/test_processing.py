import asyncio
import base64
from collections import Counter

import orjson
import pytest

from streamproc.adapters.memory import InMemoryFeatureStore
from streamproc.domain import customer as customer_domain
from streamproc.domain.customer import FoldConfig
from streamproc.domain.events import DecodeLimits
from streamproc.metrics import Metrics
from streamproc.pipeline import store_calls, sweep
from streamproc.pipeline.outbox import recover_outbox
from streamproc.pipeline.records import BatchResult, RawRecord, Watermarks
from streamproc.pipeline.step import BatchProcessor
from streamproc.ports import CustomerRef, Update

T0 = 1_767_261_600_000


def rec(kind, offset, value, partition=0):
    payload = value if isinstance(value, bytes) else orjson.dumps(value)
    stamp = value["ts"] if isinstance(value, dict) else T0  # as if produced at event time
    return RawRecord(kind, kind, partition, offset, b"k", payload, stamp)


def click(i, cid="c1", ts=T0):
    return {"event_id": f"e{i}", "customer_id": cid, "ts": ts, "session_id": "s", "action": "page_view"}


def make(store=None, **kw):
    store = store or InMemoryFeatureStore()
    return store, BatchProcessor(store, Metrics(), DecodeLimits(), FoldConfig(allowed_lateness_ms=3_600_000), **kw)


async def test_valid_events_are_saved_and_bad_ones_become_dead_letters():
    store, proc = make()
    result = await proc.process([rec("clicks", 0, click(0)), rec("clicks", 1, b"{bad"),
                                 rec("clicks", 2, click(2, cid="c2"))])
    assert result.total("applied") == 2
    (letter,) = result.dead_letters
    assert letter.reason == "invalid_json" and letter.offset == 1
    assert base64.b64decode(letter.value_b64) == b"{bad"
    assert (await store.features(CustomerRef(0, "c1")))["clicks"] == 1
    assert (await store.features(CustomerRef(0, "c2")))["clicks"] == 1


async def test_a_replayed_batch_changes_nothing():
    store, proc = make()
    batch = [rec("clicks", i, click(i)) for i in range(4)]
    await proc.process(batch)
    before = dict(store.rows)
    result = await proc.process(batch)
    assert result.total("replayed") == 4 and result.total("applied") == 0
    assert store.rows == before  # not even a version bump


async def test_late_events_follow_the_policy():
    _, proc = make(late_policy="dlq")
    result = await proc.process([rec("clicks", 0, click(0, ts=T0)),
                                 rec("clicks", 1, click(1, ts=T0 - 2 * 3_600_000))])
    assert [d.reason for d in result.dead_letters] == ["late_event"]
    _store, proc = make(late_policy="apply")
    result = await proc.process([rec("clicks", 0, click(0, ts=T0)),
                                 rec("clicks", 1, click(1, ts=T0 - 2 * 3_600_000))])
    assert result.total("applied") == 2
    assert proc.metrics.late_events.labels("apply")._value.get() == 1


async def test_erased_customers_are_not_brought_back():
    store, proc = make()
    await proc.process([rec("clicks", 0, click(0))])
    assert await store.forget(CustomerRef(0, "c1"))
    result = await proc.process([rec("clicks", 1, click(1))])
    assert result.total("erased") == 1
    assert await store.features(CustomerRef(0, "c1")) is None


async def test_a_lost_version_race_is_retried_on_fresh_state():
    class RacingStore(InMemoryFeatureStore):
        raced = False

        async def save(self, updates):
            if not self.raced:  # another writer gets in between our load and save
                self.raced = True
                row = self.rows["c1"]
                self.rows["c1"] = (row[0] + 1, row[1], row[2])
            return await super().save(updates)

    store, proc = make(RacingStore())
    store.raced = True  # no race on the first save
    await proc.process([rec("clicks", 0, click(0))])
    store.raced = False
    await proc.process([rec("clicks", 1, click(1))])
    assert (await store.features(CustomerRef(0, "c1")))["clicks"] == 2
    assert proc.metrics.cas_conflicts._value.get() == 1


async def test_poison_event_goes_to_the_dlq_and_the_rest_is_applied(monkeypatch):
    original = customer_domain._apply_one

    def explode_on_e13(state, event, cfg):
        if event.event_id == "e13":
            raise ZeroDivisionError("feature math blew up")
        original(state, event, cfg)

    monkeypatch.setattr(customer_domain, "_apply_one", explode_on_e13)
    store, proc = make()
    batch = [rec("clicks", i, click(10 + i)) for i in range(5)]
    result = await proc.process(batch)
    (letter,) = result.dead_letters
    assert letter.reason == "processing_error" and "ZeroDivisionError" in letter.detail
    assert (await store.features(CustomerRef(0, "c1")))["clicks"] == 4
    # a replay does not retry the poison event either
    again = await proc.process(batch)
    assert again.dead_letters == [] and again.total("replayed") == 5


def purchase(i, cid="c1", ts=T0, amount=10.0):
    return {"event_id": f"t{i}", "customer_id": cid, "ts": ts, "order_id": f"o{i}", "type": "purchase",
            "amount": amount, "currency": "EUR",
            "items": [{"product_id": "p1", "category": "books", "quantity": 1, "unit_price": amount}]}


async def test_a_crash_between_the_save_and_the_side_effects_loses_nothing(monkeypatch):
    """kill -9 after the customer save but before the population writes: the redelivered batch is all
    replays, yet last-seen times, HLLs and census end as in an uninterrupted run, and outputs parked in the
    outbox by the lost run are there to re-send."""
    original = customer_domain._apply_one

    def explode_on_e3(state, event, cfg):
        if event.event_id == "e3":
            raise ZeroDivisionError("boom")
        original(state, event, cfg)

    monkeypatch.setattr(customer_domain, "_apply_one", explode_on_e3)
    batch = [rec("clicks", 0, click(0)), rec("clicks", 1, click(1, cid="c2")), rec("clicks", 3, click(3)),
             rec("transactions", 0, purchase(0, cid="c2"))]

    baseline_store, baseline = make()
    await baseline.process(batch)

    class CrashingStore(InMemoryFeatureStore):
        crash = True

        async def after_batch(self, effects):
            if self.crash:
                raise KeyboardInterrupt("killed")  # the process dies here
            await super().after_batch(effects)

    store, first = make(CrashingStore())
    with pytest.raises(KeyboardInterrupt):
        await first.process(batch)
    assert store.last_seen == {} and store.hll == {}
    store.crash = False
    _, restarted = make(store)  # a new process: nothing in memory
    parked = await recover_outbox(restarted.store, 0)
    assert [d.reason for d in parked.dead_letters] == ["processing_error"]
    again = await restarted.process(batch)
    assert again.total("replayed") == 4 and again.dead_letters == []
    assert store.last_seen == baseline_store.last_seen
    assert store.hll == baseline_store.hll
    assert await store.census() == await baseline_store.census() == {"new|low|": 2}
    await store.clear_outbox(parked.outbox)
    assert await store.outbox(0) == {}


async def test_in_memory_store_version_check():
    store = InMemoryFeatureStore()
    state = customer_domain.CustomerState("c1")
    assert (await store.save([Update("c1", 0, state, {})])).failed == []
    assert (await store.save([Update("c1", 0, state, {})])).failed == ["c1"]


@pytest.mark.parametrize("n", [1, 50])
async def test_many_customers_in_one_batch(n):
    store, proc = make()
    batch = [rec("clicks", i, click(i, cid=f"c{i % n}")) for i in range(200)]
    await proc.process(batch)
    totals = [(await store.features(CustomerRef(0, f"c{i}")))["clicks"] for i in range(n)]
    assert sum(totals) == 200
    await asyncio.sleep(0)


async def test_a_batch_is_saved_in_chunks_with_the_same_result_as_one_save(monkeypatch):
    class CountingStore(InMemoryFeatureStore):
        def __init__(self):
            super().__init__()
            self.calls = []

        async def save(self, updates):
            self.calls.append(len(updates))
            await asyncio.sleep(0)  # a round trip: the next chunk is computed meanwhile
            return await super().save(updates)

    batch = [rec("clicks", i, click(i, cid=f"c{i % 23}", ts=T0 + i * 1000)) for i in range(300)]
    one, proc = make(CountingStore())
    await proc.process(batch)
    monkeypatch.setattr(store_calls, "SAVE_CHUNK", 5)
    chunked, proc = make(CountingStore())
    result = await proc.process(batch)
    assert one.calls == [23] and chunked.calls == [5, 5, 5, 5, 3]
    assert result.total("applied") == 300
    assert chunked.rows == one.rows


async def test_chunked_saves_retry_what_lost_a_race_and_settle_before_an_error(monkeypatch):
    monkeypatch.setattr(store_calls, "SAVE_CHUNK", 4)

    class FlakyStore(InMemoryFeatureStore):
        mode = ""
        in_flight = 0
        seen_in_flight_at_error = None

        async def save(self, updates):
            self.in_flight += 1
            try:
                await asyncio.sleep(0.01 if updates[0].customer_id == "c0" else 0)
                if self.mode == "race" and any(up.customer_id == "c5" for up in updates):
                    self.mode = ""
                    row = self.rows["c5"]  # another writer got in between our load and this chunk's save
                    self.rows["c5"] = (row[0] + 1, row[1], row[2])
                if self.mode == "fail" and updates[0].customer_id != "c0":
                    raise ConnectionError("redis went away")
                return await super().save(updates)
            finally:
                self.in_flight -= 1

    store, proc = make(FlakyStore())
    await proc.process([rec("clicks", i, click(i, cid=f"c{i}")) for i in range(10)])
    store.mode = "race"
    await proc.process([rec("clicks", 10 + i, click(10 + i, cid=f"c{i}")) for i in range(10)])
    assert proc.metrics.cas_conflicts._value.get() == 1
    assert [(await store.features(CustomerRef(0, f"c{i}")))["clicks"] for i in range(10)] == [2] * 10

    store.mode = "fail"
    batch = [rec("clicks", 20 + i, click(20 + i, cid=f"c{i}")) for i in range(10)]
    with pytest.raises(ConnectionError):
        await proc.process(batch)
    assert store.in_flight == 0  # the slow first chunk had ended before the error was raised
    assert (await store.features(CustomerRef(0, "c0")))["clicks"] == 3  # that chunk was saved
    store.mode = ""
    result = await proc.process(batch)  # the retry: the saved chunk is fenced, the rest applied once
    assert result.total("replayed") == 4 and result.total("applied") == 6
    assert [(await store.features(CustomerRef(0, f"c{i}")))["clicks"] for i in range(10)] == [3] * 10


async def test_loads_go_out_in_chunks_folded_as_they_arrive_and_a_failed_one_settles_every_call(monkeypatch):
    monkeypatch.setattr(store_calls, "LOAD_CHUNK", 4)
    monkeypatch.setattr(store_calls, "SAVE_CHUNK", 3)

    class SlowLoads(InMemoryFeatureStore):
        def __init__(self):
            super().__init__()
            self.log, self.in_flight, self.fail_chunk, self.loads = [], 0, None, 0

        async def load(self, partition, customer_ids, with_features=False):
            self.loads += 1
            chunk = self.loads
            self.in_flight += 1
            try:
                await asyncio.sleep(0.01 * chunk)  # each chunk answers later than the one before
                if chunk == self.fail_chunk:
                    raise ConnectionError("redis went away")
                loaded = await super().load(partition, customer_ids, with_features)
                self.log.append(("loaded", len(customer_ids)))
                return loaded
            finally:
                self.in_flight -= 1

        async def save(self, updates):
            self.log.append(("save", len(updates)))
            self.in_flight += 1
            try:
                await asyncio.sleep(0.005)
                return await super().save(updates)
            finally:
                self.in_flight -= 1

    batch = [rec("clicks", i, click(i, cid=f"c{i}")) for i in range(10)]
    reference, proc = make()
    await proc.process(batch)

    store, proc = make(SlowLoads())
    await proc.process(batch)
    assert [n for what, n in store.log if what == "loaded"] == [4, 4, 2]
    # the first chunk was folded and its first save sent before the last chunk's load had answered
    assert store.log.index(("save", 3)) < store.log.index(("loaded", 2))
    assert store.rows == reference.rows

    store, proc = make(SlowLoads())
    store.fail_chunk = 3
    with pytest.raises(ConnectionError):
        await proc.process(batch)
    assert store.in_flight == 0  # the saves of the chunks before had ended before the error was raised
    assert 0 < len(store.rows) < 10
    store.fail_chunk = None
    result = await proc.process(batch)  # the retry: what was saved is fenced, the rest applied once
    assert result.total("applied") + result.total("replayed") == 10
    assert store.rows == reference.rows


def sim_records(customers=40, days=120, seed=3):
    from streamproc.tools.simulate import SimulationConfig, Simulator

    sim = Simulator(SimulationConfig(customers=customers, days=days, seed=seed))
    offsets = {}
    out = []
    for topic, key, payload in sim.payloads():
        partition = int(key[-1:]) % 2
        off = offsets.get((topic, partition), 0)
        offsets[(topic, partition)] = off + 1
        out.append(RawRecord(topic, topic, partition, off, key, payload, None))
    return out


async def run_in_batches(records, sizes, sweep_budget=None):
    store, proc = make(sweep_budget=sweep_budget)
    i = 0
    k = 0
    while i < len(records):
        n = sizes[k % len(sizes)]
        await proc.process(records[i : i + n])
        await proc.sweep()
        i += n
        k += 1
    while proc.sweep_pending:  # the worker's timer finishes a spread pass once the stream goes quiet
        await proc.sweep()
    return store


def stored_features(store):
    return {cid: row[2] for cid, row in store.rows.items()}, {cid: row[1] for cid, row in store.rows.items()}


async def test_stored_features_do_not_depend_on_batching_or_sweep_timing():
    records = sim_records()
    one = await run_in_batches(records, [len(records)])
    many = await run_in_batches(records, [1, 7, 300, 64])
    assert stored_features(one) == stored_features(many)
    assert one.last_seen == many.last_seen and one.hll == many.hll
    # a sweep spread over many batches (at most 3 customers per call) stores the same
    spread = await run_in_batches(records, [40], sweep_budget=3)
    assert stored_features(one) == stored_features(spread)
    assert await one.census() == await spread.census()


async def test_the_sweep_ages_silent_customers_on_event_time():
    # only clicks here: with a maximum skew the silent transactions topic holds the watermark back 6 h at most
    store, proc = make(max_source_skew_ms=6 * 3_600_000)
    day = 86_400_000
    await proc.process([rec("clicks", 0, click(0, cid="quiet", ts=T0)),
                        rec("clicks", 1, click(1, cid="busy", ts=T0))])
    await proc.sweep()
    assert (await store.features(CustomerRef(0, "quiet")))["lifecycle_stage"] == "new"
    # 40 days later, only "busy" sends events; the watermark passes quiet's 30-day at-risk boundary
    await proc.process([rec("clicks", 2 + i, click(2 + i, cid="busy", ts=T0 + i * day)) for i in range(1, 41)])
    touched = await proc.sweep()
    assert touched >= 1
    quiet = await store.features(CustomerRef(0, "quiet"))
    assert quiet["lifecycle_stage"] == "at_risk"
    assert quiet["as_of_ts"] == T0 + 30 * day  # materialised as of the boundary, not of "now"
    assert quiet["clicks_7d"] == 0


async def test_population_aggregates_count_each_customer_once():
    store, proc = make()

    def buy(i, cid, ts):
        return {"event_id": f"b{i}", "customer_id": cid, "ts": ts, "order_id": f"o{i}", "type": "purchase",
                "amount": 10, "currency": "EUR", "items": []}

    batch = [rec("transactions", 0, buy(0, "a", T0)), rec("transactions", 1, buy(1, "a", T0 + 1)),
             rec("transactions", 2, buy(2, "b", T0))]
    await proc.process(batch)
    await proc.process(batch)  # a replay adds nothing
    pop = await store.population()
    assert pop["buyers"] == 2 and pop["repeat_buyers"] == 1 and pop["repeat_purchase_rate"] == 0.5


async def test_stored_features_do_not_depend_on_how_the_two_input_topics_interleave():
    records = sim_records(customers=30, days=120, seed=8)
    clicks = [r for r in records if r.kind == "clicks"]
    txns = [r for r in records if r.kind == "transactions"]
    interleaved = await run_in_batches(records, [50])
    # the transactions topic lags far behind the clicks topic (as in a fast replay), and the other way round
    clicks_first = await run_in_batches(clicks + txns, [50])
    txns_first = await run_in_batches(txns + clicks, [333])
    assert stored_features(interleaved) == stored_features(clicks_first) == stored_features(txns_first)


async def test_census_counts_customers_by_stage_and_tier_as_they_move():
    store, proc = make(max_source_skew_ms=0)
    day = 86_400_000
    await proc.process([rec("clicks", 0, click(0, cid="a", ts=T0)), rec("clicks", 1, click(1, cid="b", ts=T0))])
    assert await store.census() == {"new|low|": 2}
    await proc.process([rec("clicks", 2 + i, click(2 + i, cid="b", ts=T0 + i * day)) for i in range(1, 41)])
    await proc.sweep()
    assert await store.census() == {"at_risk|low|": 1, "active|low|": 1}
    await store.forget(CustomerRef(0, "a"))
    assert await store.census() == {"active|low|": 1}


async def test_alerts_and_recommendation_ids_do_not_depend_on_batching_under_one_model():
    from streamproc.settings import Settings
    from streamproc.tools.simulate import SimulationConfig, Simulator
    from streamproc.training.offline import run_offline

    payloads = list(Simulator(SimulationConfig(customers=60, days=150, seed=12)).payloads())
    settings = Settings(_env_file=None)
    bundle, _, _ = await run_offline(payloads, settings)
    assert bundle.churn_examples > 0
    records = sim_records(customers=60, days=150, seed=12)

    async def outputs(sizes, sweep_budget=None):
        from streamproc.config import churn_config

        store = InMemoryFeatureStore()
        proc = BatchProcessor(store, Metrics(), DecodeLimits(), FoldConfig(allowed_lateness_ms=3_600_000),
                              churn=churn_config(settings), sweep_budget=sweep_budget)
        proc.bundle = bundle
        alerts, recs = {}, set()
        i = k = 0
        while i < len(records):
            n = sizes[k % len(sizes)]
            result = await proc.process(records[i : i + n])
            await proc.sweep()
            result.absorb(proc.sweep_outputs)
            alerts.update({a.alert_id: (a.probability, a.value_tier, a.lifecycle_stage, a.clv)
                           for a in result.alerts})
            recs.update(r.recommendation_id for r in result.recommendations)
            i += n
            k += 1
        while proc.sweep_pending:
            await proc.sweep()
            alerts.update({a.alert_id: (a.probability, a.value_tier, a.lifecycle_stage, a.clv)
                           for a in proc.sweep_outputs.alerts})
            recs.update(r.recommendation_id for r in proc.sweep_outputs.recommendations)
        return alerts, recs

    one_alerts, one_recs = await outputs([5000])
    many_alerts, many_recs = await outputs([3, 250, 41])
    assert one_alerts, "the model raised no alert: nothing was compared"
    assert one_alerts == many_alerts  # same alerts, same contents
    assert one_recs == many_recs
    spread_alerts, spread_recs = await outputs([97], sweep_budget=5)  # the sweep spread over batches
    assert spread_alerts == one_alerts
    assert spread_recs == one_recs


async def test_the_sweep_hands_over_its_outputs_chunk_by_chunk(monkeypatch):
    monkeypatch.setattr(sweep, "SWEEP_CHUNK", 2)
    _, proc = make(max_source_skew_ms=0)
    day = 86_400_000
    await proc.process([rec("clicks", i, click(i, cid=f"quiet{i}", ts=T0)) for i in range(5)])
    await proc.process([rec("clicks", 10 + i, click(10 + i, cid="busy", ts=T0 + i * day)) for i in range(1, 20)])
    chunks = []

    async def emit(chunk):
        chunks.append(chunk)

    touched = await proc.sweep(emit)
    assert touched >= 5
    assert len(chunks) >= 3  # five quiet customers in chunks of two, handed over as each is saved
    assert proc.sweep_outputs.examples == [] and proc.sweep_outputs.alerts == []


async def test_the_sweep_keeps_stored_features_only_where_recomputing_gives_the_same():
    """A snapshot-instant refresh between two silence boundaries keeps the stored feature row; the result must
    be exactly what recomputing every time gives (features, state and every output)."""
    from streamproc.settings import Settings
    from streamproc.tools.simulate import SimulationConfig, Simulator
    from streamproc.training.offline import run_offline

    payloads = list(Simulator(SimulationConfig(customers=80, days=160, seed=21)).payloads())
    settings = Settings(_env_file=None)

    class NeverKeeps(InMemoryFeatureStore):
        async def load(self, partition, customer_ids, with_features=False):
            return await super().load(partition, customer_ids)  # no stored features: the sweep recomputes them all

    kept = 0

    class Counting(InMemoryFeatureStore):
        async def save(self, updates):
            nonlocal kept
            kept += sum(up.features_unchanged for up in updates)
            return await super().save(updates)

    async def run(store_cls):
        outputs = []
        import streamproc.training.offline as offline

        original = offline.InMemoryFeatureStore
        offline.InMemoryFeatureStore = store_cls
        try:
            _, _, store = await run_offline(payloads, settings, 700, 5, lambda r: outputs.append(
                (r.alerts, r.recommendations, r.examples, r.segment_moves)))
        finally:
            offline.InMemoryFeatureStore = original
        return store.rows, orjson.dumps(outputs, option=orjson.OPT_SORT_KEYS)

    reference_rows, reference_outputs = await run(NeverKeeps)
    rows, outputs = await run(Counting)
    assert kept > 100, "no refresh kept its features: nothing was compared"
    assert rows == reference_rows  # features and state blobs, byte for byte
    assert outputs == reference_outputs


def test_a_silent_topic_does_not_hold_the_watermark_back_and_one_that_speaks_late_does_not_move_it_back():
    day = 86_400_000
    marks = Watermarks(allowed_lateness_ms=0)
    marks.observe("transactions:0", T0)
    assert marks.by_partition() == {}  # the clicks topic may still speak: wait for it
    marks.silent = frozenset({"clicks:0"})  # the broker holds no click of partition 0, and none was read
    assert marks.by_partition() == {0: T0}
    marks.observe("transactions:0", T0 + 10 * day)
    assert marks.by_partition() == {0: T0 + 10 * day}
    # the clicks topic starts speaking: it counts from now on, and time stays where it was until it catches up
    marks.silent = frozenset()
    marks.observe("clicks:0", T0 + 2 * day)
    assert marks.by_partition() == {0: T0 + 10 * day}
    marks.observe("transactions:0", T0 + 12 * day)
    assert marks.by_partition() == {0: T0 + 10 * day}
    marks.observe("clicks:0", T0 + 11 * day)
    assert marks.by_partition() == {0: T0 + 11 * day}
    # a source that was heard from counts, whatever the worker says of it
    marks.silent = frozenset({"clicks:0"})
    assert marks.by_partition() == {0: T0 + 11 * day}


async def test_snapshots_and_labels_come_from_a_transactions_only_history_with_default_settings():
    records = [r for r in sim_records(customers=40, days=200, seed=5) if r.kind == "transactions"]
    outputs = []
    for silent in (frozenset(), frozenset({"clicks:0", "clicks:1"})):
        _, proc = make()
        proc.note_silent_sources(silent)
        got = BatchResult()
        for start in range(0, len(records), 200):
            got.absorb(await proc.process(records[start : start + 200]))
            await proc.sweep()
            got.absorb(proc.sweep_outputs)
        outputs.append(Counter(e.kind for e in got.examples))
    waiting, told = outputs
    # nothing said about the clicks topic: it may still speak, so time waits for it (baskets are not time-driven)
    assert not waiting["segment"] and not waiting["churn"], waiting
    assert told["segment"] > 100 and told["churn"] > 20, told
