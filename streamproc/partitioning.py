"""Which input partition a customer's events land on: Kafka's default partitioner, murmur2 of the message key
(the customer id's UTF-8 bytes) as the Java client, kafka-python and aiokafka all compute it.

Customer state is stored per input partition (``streamproc.adapters.feature_rows``), so a lookup or an erasure by
id goes straight to the customer's keys with this instead of scanning. Producers must therefore key events by
customer id with the default partitioner, as Kafka Streams requires of co-partitioned inputs; a worker counts
events that arrive elsewhere (``streamproc_events_off_partition_total``).
"""

from __future__ import annotations

from aiokafka.partitioner import murmur2

from streamproc.topics import declared_input_partitions


def home_partition(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner sends ``key`` to, among ``partitions``."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def customer_partition(customer_id: str, laid_out: int | None) -> int:
    """The input partition a (raw) customer id is stored under, in a store laid out for ``laid_out`` partitions
    (None: nothing laid out yet, the declared count stands in)."""
    return home_partition(customer_id, laid_out or declared_input_partitions())
