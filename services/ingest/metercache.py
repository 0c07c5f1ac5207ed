"""The meters ingest checks events against, re-read from the database so that a change is in force
within `ttl`, without a request ever waiting for that read while the meters it has are current.

The table is small (one row per metered metric), so the whole of it is read at once. Once half of
`ttl` has passed since the last read, the next request starts a re-read in the background and goes
on with the meters it has; only a request that finds them `ttl` old or more (the re-read is slow,
or there was none yet) waits, for the one re-read in flight, never for one of its own. (Every
request used to read them itself once `ttl` had passed: during a flood of made-up keys, with the
event loop and the database slow, the real requests of that moment queued for their own reads,
hundreds of milliseconds, the client's whole tail.) If a re-read fails (the database is down, or
anything else: logged as meters_read_failed) the meters last read stay in force: ingest keeps
accepting what it accepted a moment ago, and tries again half a `ttl` later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from shared.errors import DatabaseUnavailable
from shared.logs import log_event
from shared.meters import MeterDefinition

logger = logging.getLogger("meterline.ingest")


class MeterCache:
    def __init__(
        self,
        fetch: Callable[[], Awaitable[dict[str, MeterDefinition]]],
        *,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._meters: dict[str, MeterDefinition] = {}
        self._read_at: float | None = None
        self._reading: asyncio.Task[None] | None = None

    async def get(self) -> dict[str, MeterDefinition]:
        now = self._clock()
        age = float("inf") if self._read_at is None else now - self._read_at
        if age < self._ttl / 2:
            return self._meters
        reading = self._reading
        if reading is None:
            reading = self._reading = asyncio.create_task(self._read(now))
            reading.add_done_callback(_retrieved)
        if age < self._ttl:
            return self._meters
        await asyncio.shield(reading)
        return self._meters

    async def _read(self, started: float) -> None:
        try:
            self._meters = await self._fetch()
        except DatabaseUnavailable as exc:
            log_event(logger, "meters_read_failed", logging.WARNING, error=exc.message)
        except Exception as exc:
            # Not an outage (a bug, a schema being changed): said loudly, and tried again half a
            # ttl later like an outage, not by every request meanwhile.
            log_event(logger, "meters_read_failed", logging.ERROR, error=repr(exc)[:300])
        finally:
            self._reading = None
        self._read_at = started

    def value_path(self, metric: str) -> str | None:
        """The value path of `metric`'s meter, as last read (the drop-ins' ValuePaths): read
        get() first for a fresh answer."""
        meter = self._meters.get(metric)
        return meter.value_property if meter is not None else None


def _retrieved(task: asyncio.Task[None]) -> None:
    # A failure nobody waited for is not logged as unretrieved: the next request reads again.
    if not task.cancelled():
        task.exception()
