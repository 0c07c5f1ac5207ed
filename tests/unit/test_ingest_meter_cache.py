"""Ingest's meter cache: a change is in force within the TTL, and no request waits for the
database while the meters it has are current."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.ingest.metercache import MeterCache
from shared.errors import DatabaseUnavailable
from shared.meters import MeterDefinition


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Meters:
    """The meters table: each read waits for `release` when it is set up to."""

    def __init__(self) -> None:
        self.reads = 0
        self.version = 0
        self.release: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def fetch(self) -> dict[str, MeterDefinition]:
        self.reads += 1
        if self.release is not None:
            await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return {f"v{self.version}": None}  # type: ignore[dict-item]


def test_requests_never_wait_for_a_re_read_while_the_meters_are_current() -> None:
    clock, meters = FakeClock(), Meters()

    async def scenario() -> None:
        cache = MeterCache(meters.fetch, ttl=2.0, clock=clock)
        assert list(await cache.get()) == ["v0"]  # the first read is waited for
        meters.version, meters.release = 1, asyncio.Event()
        clock.now = 0.9
        assert list(await cache.get()) == ["v0"] and meters.reads == 1  # under half the TTL
        clock.now = 1.2  # past half the TTL: a re-read starts, the requests go on
        answers = [await asyncio.wait_for(cache.get(), 0.5) for _ in range(20)]
        assert all(list(a) == ["v0"] for a in answers)
        assert meters.reads == 2  # one re-read for all of them
        clock.now = 2.1  # the meters are now older than the TTL: wait for that same re-read
        waiting = asyncio.create_task(cache.get())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        meters.release.set()
        assert list(await waiting) == ["v1"] and meters.reads == 2
        clock.now = 2.15  # 0.95 after the re-read started (1.2): current, no read
        assert list(await cache.get()) == ["v1"]
        await asyncio.sleep(0)
        assert meters.reads == 2

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("failure", "level"),
    [
        (DatabaseUnavailable("database down"), logging.WARNING),
        (RuntimeError("column meters.dimensions is gone"), logging.ERROR),
    ],
    ids=["outage", "unexpected"],
)
def test_a_failed_re_read_keeps_the_meters_in_force_and_is_tried_again(
    failure: Exception, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    clock, meters = FakeClock(), Meters()

    async def scenario() -> None:
        cache = MeterCache(meters.fetch, ttl=2.0, clock=clock)
        assert list(await cache.get()) == ["v0"]
        meters.fail = failure
        clock.now = 2.5  # stale: this request waits for the read, which fails
        with caplog.at_level(logging.WARNING, logger="meterline.ingest"):
            assert list(await cache.get()) == ["v0"] and meters.reads == 2
        assert [(r.getMessage(), r.levelno) for r in caplog.records] == [
            ("meters_read_failed", level)
        ]
        clock.now = 3.0  # half a TTL after the failed read started: not yet tried again
        assert list(await cache.get()) == ["v0"]
        await asyncio.sleep(0)
        assert meters.reads == 2
        meters.fail, meters.version = None, 1
        clock.now = 3.6
        await cache.get()  # starts the re-read in the background
        await asyncio.sleep(0)
        assert meters.reads == 3
        assert list(await cache.get()) == ["v1"]

    asyncio.run(scenario())
