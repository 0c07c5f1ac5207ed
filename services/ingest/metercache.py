"""The meters ingest checks events against, re-read from the database at most every `ttl`.

The table is small (one row per metered metric), so the whole of it is read at once. If a
re-read fails (the database is down) the meters last read stay in force: ingest keeps
accepting what it accepted a moment ago, and tries again on the next request after `ttl`.
"""

from __future__ import annotations

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

    async def get(self) -> dict[str, MeterDefinition]:
        now = self._clock()
        if self._read_at is not None and now - self._read_at < self._ttl:
            return self._meters
        try:
            self._meters = await self._fetch()
        except DatabaseUnavailable as exc:
            log_event(logger, "meters_read_failed", logging.WARNING, error=exc.message)
        self._read_at = now
        return self._meters

    def value_path(self, metric: str) -> str | None:
        """The value path of `metric`'s meter, as last read (the drop-ins' ValuePaths): read
        get() first for a fresh answer."""
        meter = self._meters.get(metric)
        return meter.value_property if meter is not None else None
