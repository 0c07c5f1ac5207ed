"""Dead letters as an operator sees them: the latest letters of the DLQ topic with their reasons,
how many there are, and re-publishing one retryable letter to the events topic.

Re-publishing all retryable letters is dlq_replay.replay_dead_letters (`meterline replay dlq`);
re-publishing one here does not move that command's offsets, so a later run of it may send the
same letter again, which is safe: the ledger counts an event id once.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from services.aggregator.dlq_replay import dlq_group, storable_payload
from services.aggregator.schemas import DeadLetterRecord, decode_dead_letter
from services.aggregator.topic_reader import STALL_SECONDS, broker_errors
from shared.errors import BrokerUnavailable, Conflict, NotFound
from shared.events import EnvelopeError, decode_envelope
from shared.kafka import create_consumer, create_producer
from shared.logs import log_event
from shared.settings import Settings

logger = logging.getLogger("meterline.replay")

REQUEST_TIMEOUT_MS = 10_000


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    partition: int
    offset: int
    code: str
    reason: str
    retryable: bool
    failed_at: datetime | None
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None
    organization_id: uuid.UUID | None  # from the payload's envelope, when it is readable
    event_ids: tuple[str, ...]  # the first few event ids of the payload
    event_count: int

    @property
    def reference(self) -> str:
        """How a person or a URL names one letter: `<partition>:<offset>`."""
        return f"{self.partition}:{self.offset}"


@dataclass(frozen=True, slots=True)
class PartitionLetters:
    partition: int
    start: int  # the log start: letters before it were removed by retention
    end: int
    replayed_to: int | None  # `replay dlq`'s committed offset; None before its first run

    @property
    def retained(self) -> int:
        return self.end - self.start

    @property
    def pending(self) -> int:
        """Letters `replay dlq` has not looked at yet."""
        return self.end - max(self.start, self.replayed_to or 0)


@dataclass(frozen=True, slots=True)
class DeadLetterListing:
    letters: list[DeadLetterView]  # newest first
    partitions: list[PartitionLetters]
    by_code: dict[str, int] = field(default_factory=dict)  # over the letters listed

    @property
    def retained(self) -> int:
        return sum(p.retained for p in self.partitions)

    @property
    def pending(self) -> int:
        return sum(p.pending for p in self.partitions)


@dataclass(frozen=True, slots=True)
class RepublishedLetter:
    letter: DeadLetterView
    topic: str
    partition: int
    offset: int


def parse_reference(reference: str) -> tuple[int, int]:
    from shared.errors import InvalidInput

    partition, _, offset = reference.partition(":")
    if not (partition.isdigit() and offset.isdigit()) or len(reference) > 40:
        raise InvalidInput(f"dead letter {reference!r}: expected <partition>:<offset>, e.g. 0:42")
    return int(partition), int(offset)


def _consumer(settings: Settings, group_id: str | None = None) -> Any:
    # The group's id only to read `replay dlq`'s committed offsets: partitions are assigned, so
    # this reader never joins that group.
    return create_consumer(
        settings,
        client_id="meterline-console-dlq-reader",
        group_id=group_id,
        auto_offset_reset="earliest",
        request_timeout_ms=REQUEST_TIMEOUT_MS,
    )


def _view(partition: int, offset: int, record: DeadLetterRecord | None) -> DeadLetterView:
    if record is None:
        return DeadLetterView(
            partition, offset, "unreadable_dead_letter", "not a dead-letter record", False,
            None, None, None, None, None, (), 0,
        )  # fmt: skip
    organization_id: uuid.UUID | None = None
    event_ids: tuple[str, ...] = ()
    count = 0
    try:
        envelope = decode_envelope(record.payload_bytes())
        organization_id = envelope.organization_id
        count = len(envelope.events)
        event_ids = tuple(event.id for event in envelope.events[:5])
    except (EnvelopeError, ValueError):
        pass
    return DeadLetterView(
        partition=partition,
        offset=offset,
        code=record.code,
        reason=record.reason,
        retryable=record.retryable,
        failed_at=record.failed_at,
        source_topic=record.source.topic,
        source_partition=record.source.partition,
        source_offset=record.source.offset,
        organization_id=organization_id,
        event_ids=event_ids,
        event_count=count,
    )


def _decode(value: bytes | None) -> DeadLetterRecord | None:
    try:
        return decode_dead_letter(value or b"")
    except (msgspec.DecodeError, ValueError):
        return None


def _read(consumer: Any, tp: Any, start: int, end: int) -> list[Any]:
    """The messages of [start, end) of one partition, in offset order."""
    if start >= end:
        return []
    consumer.assign([tp])
    consumer.seek(tp, start)
    messages: list[Any] = []
    last_progress = time.monotonic()
    while consumer.position(tp) < end:
        polled = consumer.poll(timeout_ms=500).get(tp, [])
        if polled:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > STALL_SECONDS:
            raise BrokerUnavailable(f"reading {tp.topic}[{tp.partition}] stalled")
        messages += [m for m in polled if start <= m.offset < end]
    return messages


def list_dead_letters(settings: Settings, *, limit: int = 100) -> DeadLetterListing:
    """The newest `limit` letters of each partition, merged newest first and cut to `limit`,
    with every partition's retained and pending counts."""
    with broker_errors(settings.kafka_bootstrap_servers):
        consumer = _consumer(settings, dlq_group(settings))
        try:
            return _list(consumer, settings, limit, {})
        finally:
            consumer.close()


class DeadLetterReader:
    """list_dead_letters for a caller that lists again and again (the console's pages): one
    consumer kept open instead of a new Kafka client per listing (its connection, metadata and
    version probes cost tens of milliseconds of Python each time), used by one caller at a time
    and rebuilt after a broker error. A letter at an offset never changes, so the letters read
    once are kept (the newest MAX_KEPT of each partition) and only new ones are fetched."""

    MAX_KEPT = 1000

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._consumer: Any = None
        self._kept: dict[tuple[int, int], DeadLetterView] = {}

    def listing(self, *, limit: int = 100) -> DeadLetterListing:
        with self._lock, broker_errors(self._settings.kafka_bootstrap_servers):
            if self._consumer is None:
                self._consumer = _consumer(self._settings, dlq_group(self._settings))
            try:
                return _list(self._consumer, self._settings, min(limit, self.MAX_KEPT), self._kept)
            except BaseException:
                self._close()
                raise

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        self._kept.clear()
        if consumer is not None:
            consumer.close()


def _list(
    consumer: Any, settings: Settings, limit: int, kept: dict[tuple[int, int], DeadLetterView]
) -> DeadLetterListing:
    """The listing, reading only the letters `kept` does not hold yet (and keeping them)."""
    from kafka import TopicPartition

    partitions = sorted(consumer.partitions_for_topic(settings.dlq_topic) or ())
    tps = [TopicPartition(settings.dlq_topic, p) for p in partitions]
    if not tps:
        kept.clear()
        return DeadLetterListing([], [])
    ends = consumer.end_offsets(tps)
    starts = consumer.beginning_offsets(tps)
    summary = [
        PartitionLetters(tp.partition, starts[tp], ends[tp], consumer.committed(tp)) for tp in tps
    ]
    letters: list[DeadLetterView] = []
    for tp in tps:
        low, end = max(starts[tp], ends[tp] - limit), ends[tp]
        missing = [o for o in range(low, end) if (tp.partition, o) not in kept]
        if missing:
            for m in _read(consumer, tp, missing[0], end):
                kept[(tp.partition, m.offset)] = _view(tp.partition, m.offset, _decode(m.value))
        letters += [kept[(tp.partition, o)] for o in range(low, end) if (tp.partition, o) in kept]
    # Only what a later listing can ask for stays: the newest MAX_KEPT letters of each partition.
    bounds = {tp.partition: (starts[tp], ends[tp]) for tp in tps}
    for partition, offset in list(kept):
        start, end = bounds.get(partition, (0, 0))
        if not max(start, end - DeadLetterReader.MAX_KEPT) <= offset < end:
            del kept[(partition, offset)]
    letters.sort(key=lambda v: (v.failed_at is not None, v.failed_at, v.offset), reverse=True)
    letters = letters[:limit]
    return DeadLetterListing(letters, summary, dict(Counter(v.code for v in letters)))


def republish_dead_letter(settings: Settings, partition: int, offset: int) -> RepublishedLetter:
    """Send one retryable letter's payload back to the events topic and wait for the broker's
    ack. NotFound when the DLQ no longer holds it; Conflict when its reason is not retryable."""
    with broker_errors(settings.kafka_bootstrap_servers):
        return _republish(settings, partition, offset)


def _republish(settings: Settings, partition: int, offset: int) -> RepublishedLetter:
    from kafka import TopicPartition

    consumer = _consumer(settings)
    try:
        tp = TopicPartition(settings.dlq_topic, partition)
        if partition not in (consumer.partitions_for_topic(settings.dlq_topic) or ()):
            raise NotFound(f"dead letter {partition}:{offset} not found (no such partition)")
        start = consumer.beginning_offsets([tp])[tp]
        end = consumer.end_offsets([tp])[tp]
        if not start <= offset < end:
            raise NotFound(f"dead letter {partition}:{offset} not found (retained: {start}-{end})")
        message = _read(consumer, tp, offset, offset + 1)[0]
    finally:
        consumer.close()
    record = _decode(message.value)
    view = _view(partition, offset, record)
    if record is None or not record.retryable:
        raise Conflict(
            f"dead letter {partition}:{offset} is {view.code}, which a re-publish cannot cure"
        )
    # As `replay dlq` does: an event PostgreSQL cannot store is left out (and logged), the rest
    # goes back; a letter of nothing but such events cannot be cured by a re-publish.
    refused: list[tuple[str, str]] = []
    value = storable_payload(record.payload_bytes(), lambda e, reason: refused.append((e, reason)))
    for event_id, reason in refused:
        log_event(
            logger,
            "dead_letter_event_not_republished",
            partition=partition,
            offset=offset,
            event_id=event_id,
            reason=reason,
        )
    if value is None:
        raise Conflict(
            f"dead letter {partition}:{offset} holds only events PostgreSQL cannot store "
            f"({refused[0][1]}), which a re-publish cannot cure"
        )
    producer: Any = create_producer(settings, client_id="meterline-console-republish", acks="all")
    try:
        sent = producer.send(settings.events_topic, key=message.key, value=value).get(timeout=60)
    finally:
        producer.close(timeout=10)
    log_event(
        logger,
        "dead_letter_republished",
        partition=partition,
        offset=offset,
        code=record.code,
        to_partition=sent.partition,
        to_offset=sent.offset,
    )
    return RepublishedLetter(view, settings.events_topic, sent.partition, sent.offset)
