"""Token buckets: `rate` per second with bursts up to `burst`, per key or address, per worker.

The buckets live in each worker's memory, so N workers admit up to N times the rate; that is the
price of answering without a shared store; it still bounds abuse well enough for a front door.
Ingest keeps two: requests per verified key, and failed authentications per client address.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

MAX_BUCKETS = 100_000

K = TypeVar("K", bound=Hashable)


def client_bucket(address: str) -> str:
    """The unit failed authentications are counted by: an IPv4 address, or an IPv6 /64 (one
    host usually holds a whole /64, so counting single IPv6 addresses would count nothing)."""
    if ":" not in address:
        return address
    try:
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    except ValueError:
        return address


class RateLimiter(Generic[K]):
    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[K, list[float]] = {}

    def acquire(self, key: K, cost: float = 1.0) -> float:
        """0 if the request may go now (and its tokens are taken); else seconds until it may."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_full(now)
            bucket = self._buckets[key] = [self._burst, now]
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens >= cost:
            bucket[0] = tokens - cost
            return 0.0
        bucket[0] = tokens
        return (cost - tokens) / self._rate

    def waiting(self, key: K, cost: float = 1.0) -> float:
        """What `acquire` would answer now, without taking anything."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        tokens = min(self._burst, bucket[0] + (self._clock() - bucket[1]) * self._rate)
        return 0.0 if tokens >= cost else (cost - tokens) / self._rate

    def refund(self, key: K, cost: float = 1.0) -> None:
        """Give back tokens taken for something that turned out not to count against `key`."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket[0] = min(self._burst, bucket[0] + cost)

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket at all; if every bucket is still
        # draining (a flood from more addresses than MAX_BUCKETS), the emptiest half is kept.
        refill = self._burst / self._rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b[1] < refill}
        if len(self._buckets) >= MAX_BUCKETS:
            kept = sorted(self._buckets.items(), key=lambda item: item[1][0])
            self._buckets = dict(kept[: MAX_BUCKETS // 2])
