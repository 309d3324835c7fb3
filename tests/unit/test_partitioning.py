"""A lookup by id finds a customer's partition with Kafka's default partitioner: the same numbers as the Java client."""

import orjson

from streamproc.adapters.memory import InMemoryFeatureStore
from streamproc.domain.customer import FoldConfig
from streamproc.domain.events import DecodeLimits
from streamproc.metrics import Metrics
from streamproc.partitioning import home_partition
from streamproc.pipeline.records import RawRecord
from streamproc.pipeline.step import BatchProcessor

# org.apache.kafka.common.utils.UtilsTest#testMurmur2: key -> Utils.murmur2(key) (a signed 32-bit int)
JAVA_MURMUR2 = {"21": -973932308, "foobar": -790332482, "a-little-bit-long-string": -985981536,
                "a-little-bit-longer-string": -1486304829, "abc": 479470107,
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}


def test_the_home_partition_is_the_java_clients_choice():
    for key, signed in JAVA_MURMUR2.items():
        for partitions in (1, 3, 4, 12, 64):
            # DefaultPartitioner / BuiltInPartitioner.partitionForKey: toPositive(murmur2(key)) % partitions
            assert home_partition(key, partitions) == (signed & 0x7FFFFFFF) % partitions


async def test_events_a_producer_put_on_another_partition_are_counted():
    store = InMemoryFeatureStore()
    await store.claim_layout(4)
    metrics = Metrics()
    proc = BatchProcessor(store, metrics, DecodeLimits(), FoldConfig())
    ids = [f"c{i}" for i in range(12)]
    records = []
    for offset, cid in enumerate(ids):
        home = home_partition(cid, 4)
        # every third customer's events come on the partition after their home one
        partition = (home + 1) % 4 if offset % 3 == 0 else home
        value = orjson.dumps({"event_id": f"e{offset}", "customer_id": cid, "ts": 1_767_261_600_000 + offset,
                              "session_id": "s", "action": "page_view"})
        records += [RawRecord("clicks", "clicks", partition, offset, cid.encode(), value, None)] * 2
    result = await proc.process(records)
    assert result.total("applied") == 12
    assert metrics.registry.get_sample_value("streamproc_events_off_partition_total") == 8  # 4 customers, 2 events each
