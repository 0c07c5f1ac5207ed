"""`meterline replay dlq`: re-publish dead letters whose reason a fix can cure to the events topic.

Progress is the offsets of its own consumer group, committed after the re-published records are
acknowledged, so each run handles the letters that arrived since the last one. Re-publishing is
safe whatever happened before: the ledger counts an event id once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from services.aggregator.schemas import decode_dead_letter
from services.aggregator.topic_reader import STALL_SECONDS, broker_errors
from shared.errors import BrokerUnavailable
from shared.events import EnvelopeError, decode_envelope, encode_envelope, stored_text_problem
from shared.kafka import create_consumer, create_producer
from shared.logs import log_event
from shared.settings import Settings

logger = logging.getLogger("meterline.replay")


@dataclass(frozen=True, slots=True)
class RefusedEvent:
    """An event of a retryable letter that no fix can make storable: reported, not re-sent."""

    partition: int
    offset: int
    event_id: str
    reason: str

    def line(self) -> str:
        return (
            f"not re-published: event {self.event_id!r} of the dead letter at partition "
            f"{self.partition}, offset {self.offset}: {self.reason}"
        )


@dataclass(slots=True)
class DlqReplayReport:
    read: int = 0
    republished: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    refused: list[RefusedEvent] = field(default_factory=list)
    dry_run: bool = False


def _to_republish(message: Any, report: DlqReplayReport) -> bytes | None:
    """What to send back to the events topic for one DLQ message (None: nothing), counted."""
    try:
        letter = decode_dead_letter(message.value or b"")
    except (msgspec.DecodeError, ValueError):
        report.skipped["unreadable_dead_letter"] += 1
        return None
    if not letter.retryable:
        report.skipped[letter.code] += 1
        return None

    def refuse(event_id: str, reason: str) -> None:
        report.refused.append(RefusedEvent(message.partition, message.offset, event_id, reason))

    value = storable_payload(letter.payload_bytes(), refuse)
    if value is None:
        report.skipped["unstorable_text"] += 1
        return None
    report.republished += 1
    return value


def storable_payload(payload: bytes, refused: Callable[[str, str], None]) -> bytes | None:
    """The payload to re-publish: a letter written before ingest checked text may hold a whole
    request with one event PostgreSQL cannot store. That event is reported through `refused`
    and left out; the rest goes back (None if nothing is left). A payload that is not a
    readable envelope is re-published as it is: the aggregator dead-letters it again."""
    try:
        envelope = decode_envelope(payload)
    except EnvelopeError:
        return payload
    keep = []
    for event in envelope.events:
        problem = stored_text_problem(event)
        if problem:
            refused(event.id, problem)
        else:
            keep.append(event)
    if len(keep) == len(envelope.events):
        return payload
    if not keep:
        return None
    return encode_envelope(msgspec.structs.replace(envelope, events=keep))


def dlq_group(settings: Settings) -> str:
    return f"{settings.topic_prefix}-dlq-replay"


def replay_dead_letters(settings: Settings, *, dry_run: bool = False) -> DlqReplayReport:
    with broker_errors(settings.kafka_bootstrap_servers):
        return _replay_dead_letters(settings, dry_run=dry_run)


def _replay_dead_letters(settings: Settings, *, dry_run: bool) -> DlqReplayReport:
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    report = DlqReplayReport(dry_run=dry_run)
    consumer: Any = create_consumer(
        settings,
        client_id="meterline-dlq-replay",
        group_id=dlq_group(settings),
        auto_offset_reset="earliest",
    )
    producer: Any = (
        None
        if dry_run
        else create_producer(
            settings, client_id="meterline-dlq-replay", acks="all", enable_idempotence=True
        )
    )
    try:
        partitions = consumer.partitions_for_topic(settings.dlq_topic) or set()
        tps = [TopicPartition(settings.dlq_topic, p) for p in sorted(partitions)]
        if not tps:
            return report
        consumer.assign(tps)
        end = consumer.end_offsets(tps)
        for tp in tps:
            committed = consumer.committed(tp)
            if committed is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)
        pending: list[Any] = []  # futures of the re-published records
        last_progress = time.monotonic()
        while any(consumer.position(tp) < end[tp] for tp in tps):
            polled = consumer.poll(timeout_ms=1000)
            if polled:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > STALL_SECONDS:
                # The broker went away mid-read: stop before committing anything.
                raise BrokerUnavailable(
                    f"reading {settings.dlq_topic} stalled for {STALL_SECONDS:.0f}s"
                )
            for tp, messages in polled.items():
                for message in messages:
                    if message.offset >= end[tp]:
                        break
                    report.read += 1
                    value = _to_republish(message, report)
                    if value is not None and producer is not None:
                        pending.append(
                            producer.send(settings.events_topic, key=message.key, value=value)
                        )
        if producer is not None:
            producer.flush(timeout=60)
            for future in pending:
                future.get(timeout=60)  # raises if any record was not acknowledged
            # Exactly the end offsets taken at the start: letters read past them are not handled.
            consumer.commit({tp: OffsetAndMetadata(end[tp], None, -1) for tp in tps})
    finally:
        consumer.close()
        if producer is not None:
            producer.close(timeout=10)
    log_event(
        logger,
        "dead_letters_replayed",
        read=report.read,
        republished=report.republished,
        skipped=dict(report.skipped),
        refused=len(report.refused),
        dry_run=dry_run,
    )
    return report
