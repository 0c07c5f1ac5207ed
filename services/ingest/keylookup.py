"""Reading keys that are not cached: the misses of concurrent requests share one query.

Every miss waits for a query that reads up to BATCH keyed hashes at once, and at most CONCURRENT
such queries run at a time. So however many made-up keys arrive, key reads hold at most
CONCURRENT of the pool's connections (the change polls, usage flushes and usage reads keep the
rest), and a flood costs one indexed query per BATCH keys instead of one per key. Re-reads of
keys that were valid go before first reads of keys nobody has seen; first reads wait in a
bounded queue, beyond which they are refused at once (RateLimited) rather than queued forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from shared.apikeys import VerifiedKey
from shared.errors import RateLimited
from shared.logs import log_event

logger = logging.getLogger("meterline.ingest")

BATCH = 256
CONCURRENT = 2
MAX_WAITING = 4096

ReadKeys = Callable[[list[bytes]], Awaitable[dict[bytes, VerifiedKey]]]


class KeyLookups:
    def __init__(
        self,
        read: ReadKeys,
        *,
        batch: int = BATCH,
        concurrent: int = CONCURRENT,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self._read = read
        self._batch = batch
        self._concurrent = concurrent
        self._max_waiting = max_waiting
        self._pending: dict[bytes, asyncio.Future[VerifiedKey | None]] = {}
        self._known: deque[bytes] = deque()  # re-reads of keys that were valid: first
        self._unknown: deque[bytes] = deque()
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def lookup(self, digest: bytes, *, known: bool) -> VerifiedKey | None:
        """The unrevoked key with this keyed hash, or None; DatabaseUnavailable if unreadable."""
        future = self._pending.get(digest)
        if future is None:
            if not known and len(self._unknown) >= self._max_waiting:
                raise RateLimited("too many keys are waiting to be checked", retry_after=1.0)
            future = asyncio.get_running_loop().create_future()
            self._pending[digest] = future
            (self._known if known else self._unknown).append(digest)
            self._start_reads()
        # Shielded: a request that gives up does not cancel the answer the others wait for.
        return await asyncio.shield(future)

    def _start_reads(self) -> None:
        while (
            not self._closed and self._running < self._concurrent and (self._known or self._unknown)
        ):
            digests: list[bytes] = []
            for queue in (self._known, self._unknown):
                while queue and len(digests) < self._batch:
                    digests.append(queue.popleft())
            self._running += 1
            task = asyncio.create_task(self._read_batch(digests))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read_batch(self, digests: list[bytes]) -> None:
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
            self._start_reads()

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
