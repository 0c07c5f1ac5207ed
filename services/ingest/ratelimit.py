"""Per-key token bucket: `rate` requests per second with bursts up to `burst`, per worker process.

The buckets live in each worker's memory, so N workers admit up to N times the rate; that is the
price of answering without a shared store; it still bounds abuse well enough for a front door.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

MAX_BUCKETS = 100_000


class RateLimiter:
    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[uuid.UUID, list[float]] = {}

    def acquire(self, key_id: uuid.UUID, cost: float = 1.0) -> float:
        """0 if the request may go now (and its tokens are taken); else seconds until it may."""
        now = self._clock()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_full(now)
            bucket = self._buckets[key_id] = [self._burst, now]
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens >= cost:
            bucket[0] = tokens - cost
            return 0.0
        bucket[0] = tokens
        return (cost - tokens) / self._rate

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket at all.
        refill = self._burst / self._rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b[1] < refill}
