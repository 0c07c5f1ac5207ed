"""One conformance test for every DeadLetterSink: the Kafka one and the in-memory one hold every
message once send_all returns, whatever the volume, and refuse with BrokerUnavailable when the
broker cannot acknowledge."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest

from services.aggregator.batch import ReadRules, SourceRecord, conflict_letter, read_records
from services.aggregator.dlq_sink import DeadLetterSink, InMemoryDeadLetterSink, KafkaDeadLetterSink
from services.aggregator.schemas import (
    DeadLetterMessage,
    dead_letter_messages,
    decode_dead_letter,
)
from shared.errors import BrokerUnavailable
from shared.events import decode_envelope
from shared.settings import Settings
from tests.aggregator_support import create_topics, envelope_bytes, event
from tests.kafka_support import free_port, read_topic

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
RULES = ReadRules(
    lateness_horizon=timedelta(days=35), max_future=timedelta(minutes=5), window_seconds=3600
)
Held = Callable[[int], list[tuple[bytes | None, bytes, dict[str, bytes]]]]
Harness = tuple[DeadLetterSink, Held]


@asynccontextmanager
async def in_memory(settings: Settings) -> AsyncIterator[Harness]:
    sink = InMemoryDeadLetterSink(settings.dlq_topic)

    def held(expect: int) -> list[tuple[bytes | None, bytes, dict[str, bytes]]]:
        return [(m.key, m.value, dict(m.headers)) for m in sink.messages]

    yield sink, held
    await sink.close(wait_seconds=1)


@asynccontextmanager
async def kafka(settings: Settings) -> AsyncIterator[Harness]:
    create_topics(settings.kafka_bootstrap_servers, [settings.dlq_topic], partitions=2)
    sink = KafkaDeadLetterSink(settings)

    def held(expect: int) -> list[tuple[bytes | None, bytes, dict[str, bytes]]]:
        return [
            (r.key, r.value, dict(r.headers or []))
            for r in read_topic(
                settings.kafka_bootstrap_servers,
                settings.dlq_topic,
                timeout=60,
                enough=lambda found: len(found) >= expect,
            )
        ]

    try:
        yield sink, held
    finally:
        await sink.close(wait_seconds=5)


def storm_messages(records: int, events_per_record: int) -> list[DeadLetterMessage]:
    """The DLQ records of `records` requests whose every event conflicts, and one unreadable."""
    organization_id = uuid.uuid4()
    sources = [
        SourceRecord(
            "t.usage.events",
            n % 2,
            n,
            None,
            str(organization_id).encode(),
            envelope_bytes(
                organization_id,
                [event(f"r{n}-{i}", timestamp=NOW) for i in range(events_per_record)],
                received_at=NOW,
            ),
        )
        for n in range(records)
    ]
    events, _ = read_records(sources, RULES)
    letters = [conflict_letter(e) for e in events]
    unreadable = read_records([SourceRecord("t.usage.events", 0, 999, None, b"k", b"{")], RULES)
    return dead_letter_messages(letters + unreadable[1], NOW)


def test_dead_letters_of_one_record_are_coalesced_into_one_message() -> None:
    messages = storm_messages(records=3, events_per_record=100)

    assert [(m.code, m.letters) for m in messages] == [("conflicting_duplicate", 100)] * 3 + [
        ("malformed", 1)
    ]
    record = decode_dead_letter(messages[0].value)
    assert record.event_ids == [f"r0-{i}" for i in range(100)]
    assert [e.id for e in decode_envelope(record.payload_bytes()).events] == record.event_ids
    assert decode_dead_letter(messages[-1].value).payload_bytes() == b"{"


def test_dead_letters_of_a_large_record_are_split_to_stay_under_the_broker_limit() -> None:
    # 5,000 events with long ids: one envelope of them is far over the 1 MB message limit.
    organization_id = uuid.uuid4()
    events = [event(f"{'x' * 100}-{i}", timestamp=NOW) for i in range(5000)]
    source = SourceRecord("t", 0, 7, None, b"k", envelope_bytes(organization_id, events))
    letters = [conflict_letter(e) for e in read_records([source], RULES)[0]]

    messages = dead_letter_messages(letters, NOW)

    assert len(messages) > 1
    assert all(len(m.value) < 1024 * 1024 for m in messages)
    ids = [i for m in messages for i in decode_dead_letter(m.value).event_ids]
    assert ids == [e.id for e in events]
    assert sum(m.letters for m in messages) == 5000


@pytest.mark.parametrize("implementation", [in_memory, kafka], ids=["in-memory", "kafka"])
def test_sink_holds_every_message_of_a_large_batch_once_send_all_returns(
    implementation: Callable[..., object], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(topic_prefix=f"t{uuid.uuid4().hex[:8]}")
    # 20,000 messages: a burst far past the producer's batch and in-flight bounds.
    messages = storm_messages(records=20_000, events_per_record=1)

    async def scenario() -> list[tuple[bytes | None, bytes, dict[str, bytes]]]:
        async with implementation(settings) as (sink, held):  # type: ignore[attr-defined]
            await sink.send_all(messages)
            return await asyncio.to_thread(held, len(messages))

    held = asyncio.run(scenario())

    assert sorted(value for _, value, _ in held) == sorted(m.value for m in messages)
    assert {headers["meterline-dlq-code"] for _, _, headers in held} == {
        b"conflicting_duplicate",
        b"malformed",
    }


@asynccontextmanager
async def unavailable_in_memory(settings: Settings) -> AsyncIterator[DeadLetterSink]:
    yield InMemoryDeadLetterSink(settings.dlq_topic, available=False)


@asynccontextmanager
async def unavailable_kafka(settings: Settings) -> AsyncIterator[DeadLetterSink]:
    sink = KafkaDeadLetterSink(settings, send_timeout=2.0)
    try:
        yield sink
    finally:
        await sink.close(wait_seconds=1)


@pytest.mark.parametrize(
    "implementation", [unavailable_in_memory, unavailable_kafka], ids=["in-memory", "kafka"]
)
def test_sink_refuses_with_broker_unavailable_when_nothing_acknowledges(
    implementation: Callable[..., object], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")

    async def scenario() -> None:
        async with implementation(settings) as sink:  # type: ignore[attr-defined]
            await sink.send_all(storm_messages(records=2, events_per_record=3))

    with pytest.raises(BrokerUnavailable):
        asyncio.run(scenario())
