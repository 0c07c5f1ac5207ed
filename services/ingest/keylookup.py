"""Reading keys that are not cached: the misses of concurrent requests share one query, and
strangers' keys never hold up a key that was verified.

Every miss waits for a query that reads up to BATCH keyed hashes at once, and at most CONCURRENT
such queries run at a time. So however many made-up keys arrive, key reads hold at most
CONCURRENT of the pool's connections (the change polls, usage flushes and usage reads keep the
rest), and a flood costs one indexed query per BATCH keys instead of one per key.

Each miss has a standing (Standing): re-reads of keys that were verified go first, then keys
whose public prefix some stored key has (or any key while the prefixes are not loaded yet), then
strangers, keys whose prefix no stored key has (made-up keys, or one created less than a poll
ago). Strangers' reads run one query at a time, gathered for STRANGERS_LINGER first, so a slot
is always left for the others, and at most STRANGER_READS_PER_SECOND of their keys are read per
second: a stranger beyond that, or beyond MAX_WAITING_STRANGERS in line, is refused at once
(RateLimited) without any database work. Keys that are not strangers wait in a line of
MAX_WAITING (re-reads: unbounded, there are only as many as cached keys) and are never refused
for strangers' sake.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from services.ingest.ratelimit import RateLimiter
from shared.apikeys import VerifiedKey
from shared.errors import RateLimited
from shared.logs import log_event

logger = logging.getLogger("meterline.ingest")

BATCH = 256
CONCURRENT = 2
MAX_WAITING = 4096
MAX_WAITING_STRANGERS = 512
# A stranger's read costs the worker about 0.1 ms of CPU more than a refusal (queue, query,
# wake-up, the app's answer). Real strangers are only keys created since the last poll (a second
# ago at most), so 100 a second is room enough for them and keeps a flood's reads to about 1% of
# a core per worker (with 1,000 a second, tried first, a flood from many addresses had 2,200
# keys read a second and ingest used 135% of a core).
STRANGER_READS_PER_SECOND = 100
STRANGERS_LINGER = 0.05  # seconds: a flood's reads are a few queries a second, not 100

ReadKeys = Callable[[list[bytes]], Awaitable[dict[bytes, VerifiedKey]]]


def _no_wait(_: None) -> float:
    return 0.0


class Standing(enum.Enum):
    """How likely an uncached key is to be real, which decides whose read goes first."""

    VERIFIED = "verified"  # cached as valid before: a re-read
    PLAUSIBLE = "plausible"  # a stored key has its prefix (or prefixes are not loaded yet)
    STRANGER = "stranger"  # no stored key has its prefix


class KeyLookups:
    def __init__(
        self,
        read: ReadKeys,
        *,
        batch: int = BATCH,
        concurrent: int = CONCURRENT,
        max_waiting: int = MAX_WAITING,
        max_waiting_strangers: int = MAX_WAITING_STRANGERS,
        strangers: RateLimiter[None] | None = None,
    ) -> None:
        self._read = read
        self._batch = batch
        self._concurrent = concurrent
        self._max_waiting = max_waiting
        self._max_waiting_strangers = max_waiting_strangers
        self._stranger_reads = strangers or RateLimiter(
            STRANGER_READS_PER_SECOND, STRANGER_READS_PER_SECOND
        )
        self._pending: dict[bytes, asyncio.Future[VerifiedKey | None]] = {}
        self._lines: dict[Standing, deque[bytes]] = {standing: deque() for standing in Standing}
        self._running = 0
        self._running_strangers = 0
        self._linger: asyncio.TimerHandle | None = None
        self._lingered = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def lookup(
        self, digest: bytes, standing: Standing = Standing.PLAUSIBLE, *, reserved: bool = False
    ) -> VerifiedKey | None:
        """The unrevoked key with this keyed hash, or None; DatabaseUnavailable if unreadable,
        RateLimited if its line is full (never for a VERIFIED re-read). `reserved`: `reserve`
        already took this stranger's place in the budget."""
        future = self._pending.get(digest)
        if future is None:
            self._admit(standing, reserved)
            future = asyncio.get_running_loop().create_future()
            self._pending[digest] = future
            self._lines[standing].append(digest)
            self._start_reads()
        # Shielded: a request that gives up does not cancel the answer the others wait for.
        return await asyncio.shield(future)

    def reserve(self, standing: Standing) -> RateLimited | bool:
        """For the front door, before it hands a request on: what `lookup` of a key not yet
        waiting would refuse at once; else True if a stranger's place in the budget was taken
        (then `lookup(..., reserved=True)` does not take another), False if none is needed."""
        refused = self._refusal(standing, self._stranger_reads.waiting)
        if refused is not None:
            return refused
        if standing is not Standing.STRANGER:
            return False
        self._stranger_reads.acquire(None)  # there is a token: `waiting` just said so
        return True

    def _admit(self, standing: Standing, reserved: bool = False) -> None:
        budget = _no_wait if reserved else self._stranger_reads.acquire
        refused = self._refusal(standing, budget)
        if refused is not None:
            raise refused

    def _refusal(self, standing: Standing, budget: Callable[[None], float]) -> RateLimited | None:
        if standing is Standing.VERIFIED:
            return None
        if standing is Standing.PLAUSIBLE:
            if len(self._lines[standing]) >= self._max_waiting:
                return RateLimited("too many keys are waiting to be checked", retry_after=1.0)
            return None
        if len(self._lines[standing]) >= self._max_waiting_strangers:
            return RateLimited("too many unknown keys are waiting to be checked", retry_after=1.0)
        wait = budget(None)
        if wait > 0:
            return RateLimited("too many unknown keys are being checked", retry_after=wait)
        return None

    def _start_reads(self) -> None:
        verified, plausible = self._lines[Standing.VERIFIED], self._lines[Standing.PLAUSIBLE]
        strangers = self._lines[Standing.STRANGER]
        while not self._closed and self._running < self._concurrent:
            digests: list[bytes] = []
            if verified or plausible:
                for line in (verified, plausible):
                    while line and len(digests) < self._batch:
                        digests.append(line.popleft())
                stranger = False
            elif strangers and self._running_strangers == 0:
                # One strangers' query at a time: the other slot stays free for real keys. The
                # budget lets them in one by one, so they gather for STRANGERS_LINGER first.
                if len(strangers) < self._batch and not self._lingered:
                    if self._linger is None:
                        self._linger = asyncio.get_running_loop().call_later(
                            STRANGERS_LINGER, self._end_linger
                        )
                    return
                self._lingered = False
                while strangers and len(digests) < self._batch:
                    digests.append(strangers.popleft())
                stranger = True
            else:
                return
            self._running += 1
            self._running_strangers += stranger
            task = asyncio.create_task(self._read_batch(digests, stranger))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _end_linger(self) -> None:
        self._linger = None
        self._lingered = True
        self._start_reads()

    async def _read_batch(self, digests: list[bytes], stranger: bool) -> None:
        try:
            found = await self._read(digests)
        except asyncio.CancelledError:
            for digest in digests:
                self._pending.pop(digest).cancel()
            raise
        except Exception as exc:
            for digest in digests:
                future = self._pending.pop(digest)
                future.set_exception(exc)
                future.exception()  # retrieved: a failure nobody awaited is not logged
            log_event(logger, "key_read_failed", logging.WARNING, error=str(exc)[:200])
        else:
            for digest in digests:
                self._pending.pop(digest).set_result(found.get(digest))
        finally:
            self._running -= 1
            self._running_strangers -= stranger
            self._start_reads()

    async def aclose(self) -> None:
        self._closed = True
        if self._linger is not None:
            self._linger.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
