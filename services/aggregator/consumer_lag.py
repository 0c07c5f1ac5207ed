"""How far behind the aggregator's consumer group is, read from Kafka (kafka-python): its
committed offsets against the end offsets, and when the oldest unprocessed record was received.

The one Kafka adapter of ledger pruning (what may be dropped) and the stall watchdog (is there
work the worker is not doing).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.errors import BrokerUnavailable
from shared.events import EnvelopeError, decode_envelope
from shared.kafka import create_consumer
from shared.settings import Settings

REQUEST_TIMEOUT_MS = 10_000
READ_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Backlog:
    messages: int  # between the group's committed offsets and the partitions' ends
    oldest_received_at: datetime | None  # of the first unprocessed record; None when caught up
    by_partition: dict[int, int]


def group_backlog(
    settings: Settings, group_id: str, topic: str, *, with_age: bool = True
) -> Backlog:
    """The group's backlog on `topic`; a partition it never committed counts from its log start
    (the aggregator reads from the earliest offset). `with_age=False` skips reading the oldest
    record (oldest_received_at is then None). Raises BrokerUnavailable."""
    from kafka import TopicPartition
    from kafka.errors import KafkaError

    try:
        # The group's id only to read its committed offsets: without subscribe() this consumer
        # never joins the group, so the aggregator's assignment is left alone.
        consumer: Any = create_consumer(
            settings,
            client_id="meterline-lag-reader",
            group_id=group_id,
            request_timeout_ms=REQUEST_TIMEOUT_MS,
        )
        try:
            tps = [
                TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            if not tps:
                return Backlog(0, None, {})
            ends = consumer.end_offsets(tps)
            starts = consumer.beginning_offsets(tps)
            by_partition: dict[int, int] = {}
            oldest: datetime | None = None
            for tp in tps:
                committed = consumer.committed(tp)
                position = max(committed if committed is not None else 0, starts[tp])
                if position >= ends[tp]:
                    continue
                by_partition[tp.partition] = ends[tp] - position
                if with_age:
                    received = _received_at(consumer, tp, position)
                    oldest = received if oldest is None else min(oldest, received)
            return Backlog(sum(by_partition.values()), oldest, by_partition)
        finally:
            consumer.close()
    except KafkaError as exc:
        raise BrokerUnavailable(
            f"cannot read the backlog of {group_id} on {topic}: {exc}"
        ) from None


def _received_at(consumer: Any, tp: Any, offset: int) -> datetime:
    """When ingest received the record at `offset`: its envelope's received_at, or the record's
    own timestamp when it is not a readable envelope (whichever is earlier)."""
    consumer.assign([tp])
    consumer.seek(tp, offset)
    deadline = time.monotonic() + READ_SECONDS
    while time.monotonic() < deadline:
        for message in consumer.poll(timeout_ms=500).get(tp, []):
            stamped = datetime.fromtimestamp(message.timestamp / 1000, tz=UTC)
            try:
                return min(stamped, decode_envelope(message.value or b"").received_at)
            except EnvelopeError:
                return stamped
    raise BrokerUnavailable(f"could not read {tp.topic}[{tp.partition}] at offset {offset}")


@dataclass(frozen=True, slots=True)
class PartitionLag:
    partition: int
    committed: int | None  # the group's committed offset; None before its first commit
    end: int

    @property
    def lag(self) -> int:
        return max(self.end - (self.committed or 0), 0)


class PartitionLagReader:
    """Every partition of `topic` with the group's committed offset and the end offset (the
    console's per-partition view; group_backlog above answers "how much, how old"), read again
    and again through one consumer kept open (a new Kafka client per reading costs tens of
    milliseconds of Python), used by one caller at a time and rebuilt after a broker error.
    read() raises BrokerUnavailable."""

    def __init__(self, settings: Settings, group_id: str, topic: str) -> None:
        self._settings = settings
        self._group_id = group_id
        self._topic = topic
        self._lock = threading.Lock()
        self._consumer: Any = None

    def read(self) -> list[PartitionLag]:
        from kafka import TopicPartition
        from kafka.errors import KafkaError

        with self._lock:
            try:
                if self._consumer is None:
                    # Assigned, never subscribed: the group's id only to read its committed
                    # offsets (fetched from the group's coordinator on every call).
                    self._consumer = create_consumer(
                        self._settings,
                        client_id="meterline-console-lag-reader",
                        group_id=self._group_id,
                        request_timeout_ms=REQUEST_TIMEOUT_MS,
                    )
                consumer = self._consumer
                tps = [
                    TopicPartition(self._topic, p)
                    for p in sorted(consumer.partitions_for_topic(self._topic) or ())
                ]
                ends = consumer.end_offsets(tps) if tps else {}
                return [PartitionLag(tp.partition, consumer.committed(tp), ends[tp]) for tp in tps]
            except KafkaError as exc:
                self._close()
                raise BrokerUnavailable(
                    f"cannot read the offsets of {self._group_id} on {self._topic}: {exc}"
                ) from None
            except BaseException:
                self._close()
                raise

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close()
