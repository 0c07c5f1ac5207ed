"""Reading the events topic by time for replay: one small Protocol, a kafka-python implementation
and an in-memory one (tests/integration/test_topic_reader.py runs both through the same spec).

The one Kafka adapter of replay; it hands out SourceRecords and knows nothing of events.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from services.aggregator.batch import SourceRecord
from shared.errors import BrokerUnavailable, InvalidInput
from shared.kafka import create_consumer
from shared.settings import Settings
from shared.topics import TopicRetention, describe_retention

Offsets = dict[int, int]
"""partition -> offset"""

POLL_MS = 500
STALL_SECONDS = 30.0


@contextmanager
def broker_errors(servers: str) -> Iterator[None]:
    """Kafka's errors (no brokers, timeouts) as one BrokerUnavailable line, never a traceback."""
    from kafka.errors import KafkaError

    try:
        yield
    except KafkaError as exc:
        raise BrokerUnavailable(
            f"Kafka at {servers} is unavailable: {type(exc).__name__}: {exc}".strip(": ")
        ) from None


class RecordReader(Protocol):
    """Bounded, time-addressed reads of one topic."""

    topic: str
    partitions: list[int]

    def end_offsets(self) -> Offsets:
        """The next offset of each partition (what a read to "now" stops at)."""
        ...

    def beginning_offsets(self) -> Offsets:
        """The first offset each partition still holds."""
        ...

    def offsets_since(self, moment: datetime) -> Offsets:
        """The first offset of each partition whose record timestamp is at or after `moment`
        (the end offset where there is none)."""
        ...

    def oldest_retained(self) -> dict[int, tuple[int, int | None]]:
        """For each partition whose log start moved past 0: (log start offset, its timestamp)."""
        ...

    def retention(self) -> TopicRetention: ...

    def read(
        self, start: Offsets, end: Offsets, on_record: Callable[[], None] | None = None
    ) -> Iterator[SourceRecord]:
        """Every record in [start, end) of each partition, in offset order per partition."""
        ...

    def close(self) -> None: ...


@dataclass
class InMemoryTopicReader:
    """A topic held in lists: `append` adds a record (offsets count from `log_start`)."""

    topic: str
    partitions: list[int]
    log_start: dict[int, int] = field(default_factory=dict)
    retention_ms: int = -1
    cleanup_policy: str = "delete"
    records: dict[int, list[SourceRecord]] = field(default_factory=dict)
    closed: bool = False

    def append(
        self, partition: int, value: bytes, *, timestamp_ms: int, key: bytes | None = None
    ) -> None:
        held = self.records.setdefault(partition, [])
        offset = self.log_start.get(partition, 0) + len(held)
        held.append(SourceRecord(self.topic, partition, offset, timestamp_ms, key, value))

    def end_offsets(self) -> Offsets:
        return {p: self.log_start.get(p, 0) + len(self.records.get(p, [])) for p in self.partitions}

    def beginning_offsets(self) -> Offsets:
        return {p: self.log_start.get(p, 0) for p in self.partitions}

    def offsets_since(self, moment: datetime) -> Offsets:
        millis = int(moment.timestamp() * 1000)
        ends = self.end_offsets()
        found = {}
        for p in self.partitions:
            later = [r.offset for r in self.records.get(p, []) if (r.timestamp_ms or 0) >= millis]
            found[p] = later[0] if later else ends[p]
        return found

    def oldest_retained(self) -> dict[int, tuple[int, int | None]]:
        retained = {}
        for p in self.partitions:
            start = self.log_start.get(p, 0)
            if start > 0:
                held = self.records.get(p, [])
                retained[p] = (start, held[0].timestamp_ms if held else None)
        return retained

    def retention(self) -> TopicRetention:
        return TopicRetention(self.retention_ms, self.cleanup_policy)

    def read(
        self, start: Offsets, end: Offsets, on_record: Callable[[], None] | None = None
    ) -> Iterator[SourceRecord]:
        for partition in start:
            for record in self.records.get(partition, []):
                if start[partition] <= record.offset < end[partition]:
                    if on_record:
                        on_record()
                    yield record

    def close(self) -> None:
        self.closed = True


class KafkaTopicReader:
    """RecordReader over kafka-python's consumer (assigned partitions, no group)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self._settings = settings
        self._servers = settings.kafka_bootstrap_servers
        with broker_errors(self._servers):
            self._consumer: Any = create_consumer(
                settings,
                client_id="meterline-replay",
                auto_offset_reset="earliest",
                max_poll_records=5000,
                fetch_max_bytes=64 * 1024 * 1024,
                request_timeout_ms=30_000,
            )
            partitions = self._consumer.partitions_for_topic(topic)
        if not partitions:
            raise InvalidInput(f"topic {topic} does not exist")
        self.partitions = sorted(partitions)

    def _tps(self) -> list[Any]:
        from kafka import TopicPartition

        return [TopicPartition(self.topic, p) for p in self.partitions]

    def end_offsets(self) -> Offsets:
        with broker_errors(self._servers):
            found = self._consumer.end_offsets(self._tps())
        return {tp.partition: o for tp, o in found.items()}

    def beginning_offsets(self) -> Offsets:
        with broker_errors(self._servers):
            found = self._consumer.beginning_offsets(self._tps())
        return {tp.partition: o for tp, o in found.items()}

    def offsets_since(self, moment: datetime) -> Offsets:
        millis = int(moment.timestamp() * 1000)
        with broker_errors(self._servers):
            found = self._consumer.offsets_for_times({tp: millis for tp in self._tps()})
        ends = self.end_offsets()
        return {
            tp.partition: (found[tp].offset if found.get(tp) is not None else ends[tp.partition])
            for tp in self._tps()
        }

    def oldest_retained(self) -> dict[int, tuple[int, int | None]]:
        retained = {}
        for partition, start in self.beginning_offsets().items():
            if start > 0:
                first = next(iter(self.read({partition: start}, {partition: start + 1})), None)
                retained[partition] = (start, first.timestamp_ms if first else None)
        return retained

    def retention(self) -> TopicRetention:
        with broker_errors(self._servers):
            return describe_retention(self._settings, [self.topic])[self.topic]

    def read(
        self,
        start: Offsets,
        end: Offsets,
        on_record: Callable[[], None] | None = None,
    ) -> Iterator[SourceRecord]:
        with broker_errors(self._servers):
            yield from self._read(start, end, on_record)

    def _read(
        self,
        start: Offsets,
        end: Offsets,
        on_record: Callable[[], None] | None,
    ) -> Iterator[SourceRecord]:
        from kafka import TopicPartition

        pending = {p: (start[p], end[p]) for p in start if start[p] < end[p]}
        if not pending:
            return
        tps = [TopicPartition(self.topic, p) for p in pending]
        self._consumer.assign(tps)
        # A partition paused by the previous read stays paused across assign().
        self._consumer.resume(*tps)
        for tp in tps:
            self._consumer.seek(tp, pending[tp.partition][0])
        remaining = set(pending)
        last_progress = time.monotonic()
        while remaining:
            polled = self._consumer.poll(timeout_ms=POLL_MS)
            if not polled:
                for partition in list(remaining):
                    position = self._consumer.position(TopicPartition(self.topic, partition))
                    if position >= pending[partition][1]:
                        remaining.discard(partition)
                if remaining and time.monotonic() - last_progress > STALL_SECONDS:
                    raise BrokerUnavailable(
                        f"reading {self.topic} stalled for {STALL_SECONDS:.0f}s "
                        f"(partitions {sorted(remaining)})"
                    )
                continue
            last_progress = time.monotonic()
            for tp, messages in polled.items():
                stop = pending[tp.partition][1]
                for message in messages:
                    if message.offset >= stop:
                        remaining.discard(tp.partition)
                        break
                    if on_record:
                        on_record()
                    yield SourceRecord(
                        topic=self.topic,
                        partition=tp.partition,
                        offset=message.offset,
                        timestamp_ms=message.timestamp,
                        key=message.key,
                        value=message.value or b"",
                    )
                    if message.offset + 1 >= stop:
                        remaining.discard(tp.partition)
                if tp.partition not in remaining:
                    self._consumer.pause(tp)

    def close(self) -> None:
        with broker_errors(self._servers):
            self._consumer.close()
