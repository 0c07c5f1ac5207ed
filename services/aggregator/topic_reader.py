"""Reading the events topic by time for replay (kafka-python): offsets by timestamp, bounded reads.

The one Kafka adapter of replay; it hands out SourceRecords and knows nothing of events.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from services.aggregator.batch import SourceRecord
from shared.errors import BrokerUnavailable, InvalidInput

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


class TopicReader:
    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        from kafka import KafkaConsumer

        self.topic = topic
        self._servers = bootstrap_servers
        with broker_errors(bootstrap_servers):
            self._consumer: Any = KafkaConsumer(
                bootstrap_servers=bootstrap_servers.split(","),
                enable_auto_commit=False,
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
        """The first offset of each partition whose record timestamp is at or after `moment`."""
        millis = int(moment.timestamp() * 1000)
        with broker_errors(self._servers):
            found = self._consumer.offsets_for_times({tp: millis for tp in self._tps()})
        ends = self.end_offsets()
        return {
            tp.partition: (found[tp].offset if found.get(tp) is not None else ends[tp.partition])
            for tp in self._tps()
        }

    def oldest_retained(self) -> dict[int, tuple[int, int | None]]:
        """For each partition whose log start moved past 0: (log start offset, its timestamp)."""
        retained = {}
        for partition, start in self.beginning_offsets().items():
            if start > 0:
                first = next(iter(self.read({partition: start}, {partition: start + 1})), None)
                retained[partition] = (start, first.timestamp_ms if first else None)
        return retained

    def read(
        self,
        start: Offsets,
        end: Offsets,
        on_record: Callable[[], None] | None = None,
    ) -> Iterator[SourceRecord]:
        """Every record in [start, end) of each partition, in offset order per partition."""
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
