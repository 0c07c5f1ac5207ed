"""One conformance test for every EventPublisher: the Kafka one and the in-memory one."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from services.ingest.publisher import EventPublisher, InMemoryPublisher, KafkaPublisher
from shared.errors import BrokerUnavailable
from shared.settings import Settings
from tests.ingest_support import read_topic

Published = Callable[[uuid.UUID, int], list[tuple[bytes, bytes, int]]]
Harness = tuple[EventPublisher, Published]


@asynccontextmanager
async def in_memory(
    settings: Settings,
) -> AsyncIterator[Harness]:
    publisher = InMemoryPublisher()

    def published(organization_id: uuid.UUID, expect: int) -> list[tuple[bytes, bytes, int]]:
        key = str(organization_id).encode()
        return [(r.key, r.value, r.timestamp_ms) for r in publisher.records if r.key == key]

    yield publisher, published


@asynccontextmanager
async def kafka(settings: Settings) -> AsyncIterator[Harness]:
    publisher = KafkaPublisher(settings)
    await asyncio.wait_for(publisher.connect([settings.events_topic]), 60)

    def published(organization_id: uuid.UUID, expect: int) -> list[tuple[bytes, bytes, int]]:
        return [
            (r.key, r.raw_value, r.timestamp_ms)
            for r in read_topic(
                settings.kafka_bootstrap_servers,
                settings.events_topic,
                organization_id,
                expect=expect,
            )
        ]

    try:
        yield publisher, published
    finally:
        await publisher.close()


@pytest.mark.parametrize("implementation", [in_memory, kafka], ids=["in-memory", "kafka"])
def test_publisher_returns_after_every_value_is_held_in_order(
    implementation: Callable[..., object], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(topic_prefix=f"t{uuid.uuid4().hex[:8]}")
    organization_id = uuid.uuid4()
    key = str(organization_id).encode()
    values = [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']

    async def scenario() -> list[tuple[bytes, bytes, int]]:
        async with implementation(settings) as (publisher, published):  # type: ignore[attr-defined]
            assert await publisher.ready()
            await publisher.publish_all(
                settings.events_topic, key, values, 1_700_000_000_123, wait_seconds=10
            )
            return await asyncio.to_thread(published, organization_id, 3)

    assert asyncio.run(scenario()) == [(key, v, 1_700_000_000_123) for v in values]


def test_publishing_never_blocks_the_event_loop_when_send_would(
    make_settings: Callable[..., Settings],
) -> None:
    """kafka-python's send() blocks (up to max_block_ms) while it has no metadata for the topic:
    here the topic is deleted under a connected publisher. Requests are still answered 503 at
    their deadline, and the event loop keeps turning meanwhile."""
    from kafka.admin import KafkaAdminClient

    settings = make_settings(
        topic_prefix=f"t{uuid.uuid4().hex[:8]}", ingest_publish_timeout_seconds=2
    )
    key = str(uuid.uuid4()).encode()

    async def scenario() -> tuple[float, list[tuple[str, float]]]:
        publisher = KafkaPublisher(settings)
        await asyncio.wait_for(publisher.connect([settings.events_topic]), 60)
        await publisher.publish_all(settings.events_topic, key, [b"{}"], 0, wait_seconds=10)
        admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers.split(","))
        try:
            await asyncio.to_thread(admin.delete_topics, [settings.events_topic])
        finally:
            admin.close()
        worst = 0.0
        ticking = True

        async def tick() -> None:
            nonlocal worst
            while ticking:
                started = time.monotonic()
                await asyncio.sleep(0.01)
                worst = max(worst, time.monotonic() - started)

        ticker = asyncio.create_task(tick())
        outcomes = []
        try:
            for _ in range(6):
                started = time.monotonic()
                try:
                    await publisher.publish_all(
                        settings.events_topic, key, [b"{}"], 0, wait_seconds=1
                    )
                    outcome = "acknowledged"
                except BrokerUnavailable:
                    outcome = "unavailable"
                outcomes.append((outcome, time.monotonic() - started))
        finally:
            ticking = False
            await ticker
            await publisher.close()
        return worst, outcomes

    worst, outcomes = asyncio.run(scenario())
    assert worst < 0.5, f"the event loop stalled for {worst:.2f}s"
    assert all(elapsed < 1.5 for _, elapsed in outcomes), outcomes
    assert outcomes[-1][0] == "unavailable"
