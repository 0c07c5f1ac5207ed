"""The meters the aggregator applies, re-read at most every `ttl` (the key-cache TTL).

Reading them on every batch was one more round trip per batch for a table that changes when an
operator runs `meterline meters apply`. So a meter applied (or changed) at T shapes the batches
that begin after T + ttl; an event counted before then keeps the definition read before, as an
event counted before the meter existed does, until a replay of its range rewrites its rows.
The re-read runs on the batch's own connection, inside its transaction: if it fails, the batch
fails with it and is retried, as for any other read of the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy.engine import Connection

from shared.meters import MeterDefinition, meters_by_metric


class MeterCache:
    def __init__(self, *, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._meters: dict[str, MeterDefinition] = {}
        self._read_at: float | None = None

    def get(self, connection: Connection) -> dict[str, MeterDefinition]:
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self._ttl:
            self._meters = meters_by_metric(connection)
            self._read_at = now
        return self._meters
