"""meterline_client.AsyncMeterlineClient against the real ingest service and broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.engine import Engine

from meterline_client import AsyncMeterlineClient, EventsRejected, RejectedEvent
from shared.settings import Settings
from tests.ingest_support import IngestServer, Tenant, event_ids_on_topic, make_tenant, run_ingest


@pytest.fixture(scope="module")
def server(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IngestServer]:
    with run_ingest(service_env, tmp_path_factory.mktemp("aclient") / "ingest.log") as running:
        yield running


@pytest.fixture
def tenant(engine: Engine) -> Tenant:
    return make_tenant(engine)


def on_topic(settings: Settings, tenant: Tenant, expect: int) -> list[str]:
    return event_ids_on_topic(
        settings.kafka_bootstrap_servers,
        settings.events_topic,
        tenant.organization_id,
        expect=expect,
    )


def test_many_tasks_recording_at_once_lose_and_duplicate_nothing(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    async def main() -> list[str]:
        async with AsyncMeterlineClient(
            server.url, tenant.key, batch_size=100, flush_interval=0.05
        ) as client:

            async def task(n: int) -> list[str]:
                ids = []
                for i in range(250):
                    ids.append(await client.record("api_calls", quantity=str(n)))
                    if i % 50 == 0:
                        await asyncio.sleep(0)  # let the background flush interleave
                return ids

            per_task = await asyncio.gather(*(task(n) for n in range(20)))
        return [event_id for ids in per_task for event_id in ids]

    recorded = asyncio.run(main())
    seen = on_topic(settings, tenant, len(recorded))
    assert len(recorded) == 5000
    assert Counter(seen) == Counter(recorded)  # each once: none lost, none sent twice


def test_leaving_the_block_by_an_exception_flushes_then_reraises(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    ids: list[str] = []

    async def main() -> None:
        async with AsyncMeterlineClient(server.url, tenant.key, flush_interval=None) as client:
            ids.extend([await client.record("api_calls") for _ in range(3)])
            raise RuntimeError("the caller's own error")

    with pytest.raises(RuntimeError, match="the caller's own error"):
        asyncio.run(main())
    assert on_topic(settings, tenant, 3) == ids


def test_the_background_task_flushes_within_the_interval(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    async def main() -> tuple[str, int]:
        client = AsyncMeterlineClient(server.url, tenant.key, flush_interval=0.2)
        event_id = await client.record("api_calls")
        for _ in range(200):
            if client.pending == 0:
                break
            await asyncio.sleep(0.05)
        left = client.pending
        await client.aclose()
        return event_id, left

    event_id, left = asyncio.run(main())
    assert left == 0
    assert on_topic(settings, tenant, 1) == [event_id]


def test_refused_events_are_reported_and_the_rest_sent(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    rejected: list[RejectedEvent] = []

    async def main() -> tuple[str, str, str]:
        async with AsyncMeterlineClient(
            server.url, tenant.key, flush_interval=None, on_rejected=rejected.extend
        ) as client:
            good = await client.record("api_calls")
            stale = await client.record(
                "api_calls", timestamp=datetime.now(UTC) - timedelta(days=60)
            )
            last = await client.record("api_calls")
        return good, stale, last

    good, stale, last = asyncio.run(main())
    assert [r.id for r in rejected] == [stale]
    assert on_topic(settings, tenant, 2) == [good, last]


def test_without_a_callback_refused_events_are_raised_once_by_flush(
    server: IngestServer, tenant: Tenant
) -> None:
    async def main() -> tuple[str, list[str], int]:
        client = AsyncMeterlineClient(server.url, tenant.key, flush_interval=None)
        stale = await client.record("api_calls", timestamp=datetime.now(UTC) - timedelta(days=60))
        await client.record("api_calls")
        try:
            await client.flush()
        except EventsRejected as exc:
            raised = [r.id for r in exc.rejected]
        again = await client.flush()
        await client.aclose()
        return stale, raised, again

    stale, raised, again = asyncio.run(main())
    assert raised == [stale] and again == 0


def test_interpreter_exit_sends_what_an_unclosed_async_client_buffered(
    server: IngestServer, tenant: Tenant, settings: Settings
) -> None:
    script = (
        "import asyncio, sys\n"
        "from meterline_client import AsyncMeterlineClient\n"
        "async def main():\n"
        "    client = AsyncMeterlineClient(sys.argv[1], sys.argv[2], flush_interval=3600)\n"
        "    print(','.join([await client.record('api_calls') for _ in range(3)]))\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, server.url, tenant.key],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    ids = done.stdout.strip().split(",")
    assert on_topic(settings, tenant, 3) == ids
