"""The Redis adapter honours the same contract as the in-memory one, on a real Redis."""

import orjson
import pytest
import redis

from streamproc.adapters.feature_rows import FEATURE_SCHEMAS_KEY, customer_key, feature_schema_id, read_features
from streamproc.adapters.redis_store import RedisFeatureStore
from streamproc.domain.customer import CustomerState, FoldConfig
from streamproc.domain.features import features
from streamproc.ports import CustomerRef, LayoutMismatch, Update

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(settings):
    s = RedisFeatureStore.from_url(settings.redis_url)
    await s.claim_layout(1)  # one input partition: every customer's home is partition 0
    yield s
    await s.close()


async def test_save_is_a_compare_and_set_on_the_version(store):
    state = CustomerState("a", clicks=3)
    assert (await store.save([Update("a", 0, state, {"clicks": 3})])).failed == []
    loaded = (await store.load(0, ["a", "b"]))
    assert loaded["a"].version == 1 and loaded["a"].pristine("a").clicks == 3
    assert loaded["b"].version == 0 and loaded["b"].blob is None
    # a writer holding the old version loses; one holding the new one wins
    state.clicks = 4
    result = await store.save([Update("a", 0, state, {"clicks": 4}), Update("b", 0, state, {"x": 1})])
    assert result.failed == ["a"] and result.previous_census == {"b": None}
    assert (await store.features(CustomerRef(0, "a"))) == {"clicks": 3}
    assert (await store.save([Update("a", 1, state, {"clicks": 4})])).previous_census == {"a": "||"}
    assert (await store.features(CustomerRef(0, "a"))) == {"clicks": 4}
    assert await store.redis.hget(customer_key(0, "a"), "_v") == b"2"


async def test_feature_rows_store_values_once_and_names_once(store, settings):
    state = CustomerState("a", clicks=3, first_event_ts=1_700_000_000_000, last_event_ts=1_700_000_000_000)
    feats = features(state, 1_700_000_100_000, FoldConfig())
    other = {"clicks": 1, "value_tier": "low"}  # a second schema in the same save
    assert (await store.save([Update("a", 0, state, feats), Update("b", 0, state, other)])).failed == []
    raw = await store.redis.hget(customer_key(0, "a"), "f")
    schema_id, *values = orjson.loads(raw)
    assert schema_id == feature_schema_id(tuple(feats)) and values == list(feats.values())
    assert b"monetary_total" not in raw  # names are not repeated per customer
    assert orjson.loads(await store.redis.hget(FEATURE_SCHEMAS_KEY, schema_id)) == list(feats)
    assert await store.redis.hlen(FEATURE_SCHEMAS_KEY) == 2
    # every reader gets the dict back: the adapter (from a cold cache), the sync helper
    cold = RedisFeatureStore.from_url(settings.redis_url)
    try:
        assert await cold.features(CustomerRef(0, "a")) == feats and await cold.features(CustomerRef(0, "b")) == other
    finally:
        await cold.close()
    sync = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        assert read_features(sync, "a") == feats
        # a row of the earlier form (a JSON object) still reads
        sync.hset(customer_key(0, "old"), "f", orjson.dumps({"clicks": 7}))
        assert read_features(sync, "old") == {"clicks": 7}
    finally:
        sync.close()
    assert await store.features(CustomerRef(0, "old")) == {"clicks": 7}


async def test_forget_erases_and_remembers(store):
    await store.save([Update("a", 0, CustomerState("a"), {"clicks": 1})])
    assert await store.forget(CustomerRef(0, "a")) is True
    assert await store.redis.exists(customer_key(0, "a")) == 0
    assert (await store.load(0, ["a"]))["a"].erased
    assert await store.forget(CustomerRef(0, "never-seen")) is False


async def test_each_partition_keeps_its_own_keys_and_the_layout_is_claimed_once(store):
    # one save spanning two partitions: each customer's hash and its partition's census carry that partition's tag
    updates = [Update("a", 0, CustomerState("a"), {"value_tier": "low"}, partition=0),
               Update("b", 0, CustomerState("b"), {"value_tier": "low"}, partition=3)]
    assert (await store.save(updates)).failed == []
    assert await store.redis.exists(customer_key(0, "a"), customer_key(3, "b")) == 2
    assert await store.redis.hgetall("sp:{p3}:census") == {b"|low|": b"1"}
    assert (await store.load(3, ["b"]))["b"].version == 1 and (await store.load(0, ["b"]))["b"].version == 0
    # erasure is recorded in the customer's partition, and the load of that partition sees it
    assert await store.forget(CustomerRef(3, "b")) is True
    assert (await store.load(3, ["b"]))["b"].erased and not (await store.load(0, ["b"]))["b"].erased
    assert await store.census() == {"|low|": 1}
    # another partition count is refused, and so is a database in the first layout
    await store.claim_layout(1)
    with pytest.raises(LayoutMismatch, match=r"laid out for 1 input partitions.*have 4"):
        await store.claim_layout(4)
    await store.redis.delete("sp:layout")
    await store.redis.hset("sp:sweep", "0", "1")
    with pytest.raises(LayoutMismatch, match="first layout"):
        await store.claim_layout(1)


async def test_model_store_contract_on_redis(settings):
    import redis.asyncio as aioredis

    from streamproc.adapters.model_store import RedisModelStore
    from tests.unit.test_churn_and_models import model_store_contract

    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        await model_store_contract(RedisModelStore(client))
    finally:
        await client.aclose()


async def test_commands_are_packed_in_c_to_the_same_bytes(store):
    from redis.asyncio.connection import Connection

    conn_class = store.redis.connection_pool.connection_class
    assert conn_class.__name__ == "PackInCConnection" and issubclass(conn_class, Connection)
    ours, theirs = conn_class(), Connection()
    for args in [("EVALSHA", "abc", 2, "cust:{p0}:ü", b"\x00\xff", 12345678901234, 1.5, b""),
                 ("CONFIG GET", "maxmemory"), (b"CLIENT SETNAME", "x"), ("SET", "k", memoryview(b"view"))]:
        assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args)), args
    # and the store works through it: a batch save and load round trip
    updates = [Update(f"c{i}", 0, CustomerState(f"c{i}", clicks=i), {"clicks": i}) for i in range(300)]
    assert (await store.save(updates)).failed == []
    loaded = await store.load(0, [f"c{i}" for i in range(300)])
    assert [loaded[f"c{i}"].pristine(f"c{i}").clicks for i in range(300)] == list(range(300))


async def test_a_save_can_keep_the_stored_feature_row(store):
    state = CustomerState("a", clicks=1)
    assert (await store.save([Update("a", 0, state, {"clicks": 1, "as_of_ts": 5})])).failed == []
    assert (await store.load(0, ["a"], with_features=True))["a"].features == {"clicks": 1, "as_of_ts": 5}
    assert (await store.load(0, ["a"]))["a"].features is None  # only read when asked for
    assert (await store.load(0, ["nobody"], with_features=True))["nobody"].features is None
    state.clicks = 2
    kept = Update("a", 1, state, {"clicks": 1, "as_of_ts": 5}, features_unchanged=True)
    assert (await store.save([kept])).failed == []
    loaded = (await store.load(0, ["a"], with_features=True))["a"]
    assert loaded.version == 2 and loaded.pristine("a").clicks == 2  # the rest of the save applied
    assert loaded.features == {"clicks": 1, "as_of_ts": 5}
    # without the flag the row is rewritten
    assert (await store.save([Update("a", 2, state, {"clicks": 2, "as_of_ts": 6})])).failed == []
    assert await store.features(CustomerRef(0, "a")) == {"clicks": 2, "as_of_ts": 6}
