"""One conformance test for every RecordReader: the Kafka one and the in-memory one read the same
records the same way (offsets by time, bounded ranges in offset order, retention)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest

from services.aggregator.topic_reader import InMemoryTopicReader, KafkaTopicReader, RecordReader
from shared.errors import InvalidInput
from shared.kafka import create_producer
from shared.settings import Settings
from tests.aggregator_support import create_topics

BASE = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
# (partition, minutes after BASE, key, value), in the order they are appended.
RECORDS = [
    (0, 0, b"a", b"one"),
    (1, 1, b"b", b"two"),
    (0, 2, b"a", b"three"),
    (0, 5, b"c", b"four"),
    (1, 9, b"b", b"five"),
]
Reader = Callable[[Settings, str], Iterator[RecordReader]]


def millis(minutes: int) -> int:
    return int((BASE + timedelta(minutes=minutes)).timestamp() * 1000)


@contextmanager
def in_memory(settings: Settings, topic: str) -> Iterator[RecordReader]:
    reader = InMemoryTopicReader(topic, [0, 1], retention_ms=86_400_000)
    for partition, minutes, key, value in RECORDS:
        reader.append(partition, value, timestamp_ms=millis(minutes), key=key)
    yield reader


@contextmanager
def kafka(settings: Settings, topic: str) -> Iterator[RecordReader]:
    bootstrap = settings.kafka_bootstrap_servers
    create_topics(bootstrap, [topic], partitions=2, configs={"retention.ms": "86400000"})
    producer = create_producer(settings, client_id="test", acks="all")
    for partition, minutes, key, value in RECORDS:
        producer.send(topic, value, key=key, partition=partition, timestamp_ms=millis(minutes))
    producer.flush(30)
    producer.close()
    reader = KafkaTopicReader(settings, topic)
    try:
        yield reader
    finally:
        reader.close()


@pytest.mark.parametrize("implementation", [in_memory, kafka], ids=["in-memory", "kafka"])
def test_reader_finds_offsets_by_time_and_reads_bounded_ranges_in_order(
    implementation: Reader, settings: Settings
) -> None:
    with implementation(settings, f"t{uuid.uuid4().hex[:8]}.reader") as reader:  # type: ignore[attr-defined]
        assert reader.partitions == [0, 1]
        assert reader.beginning_offsets() == {0: 0, 1: 0}
        assert reader.end_offsets() == {0: 3, 1: 2}
        assert reader.offsets_since(BASE + timedelta(minutes=2)) == {0: 1, 1: 1}
        assert reader.offsets_since(BASE + timedelta(hours=1)) == {0: 3, 1: 2}
        assert reader.oldest_retained() == {}

        seen = []
        read = list(reader.read({0: 1, 1: 0}, {0: 3, 1: 1}, lambda: seen.append(1)))

        assert sorted((r.partition, r.offset, r.timestamp_ms, r.key, r.value) for r in read) == [
            (0, 1, millis(2), b"a", b"three"),
            (0, 2, millis(5), b"c", b"four"),
            (1, 0, millis(1), b"b", b"two"),
        ]
        assert [r.offset for r in read if r.partition == 0] == [1, 2]
        assert len(seen) == 3
        assert list(reader.read({0: 3, 1: 2}, {0: 3, 1: 2})) == []


def test_kafka_reader_reports_the_topic_retention(settings: Settings) -> None:
    with kafka(settings, f"t{uuid.uuid4().hex[:8]}.reader") as reader:
        retention = reader.retention()

    assert (retention.retention_ms, retention.cleanup_policy) == (86_400_000, "delete")
    assert retention.problem(timedelta(days=35)) is not None
    assert retention.problem(timedelta(hours=24)) is None


def test_kafka_reader_of_a_missing_topic_is_one_clear_error(settings: Settings) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        KafkaTopicReader(settings, f"t{uuid.uuid4().hex[:8]}.missing")
