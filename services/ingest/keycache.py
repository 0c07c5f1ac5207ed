"""What ingest remembers about keys and projects so that a hot key costs no database round trip.

Revocation bound: a cached answer is used for at most `ttl` seconds (settings.key_cache_ttl_seconds,
default 2, at most 5) after it was read from the database, so a key revoked at T is refused by
every request that starts after T + ttl (plus one database round trip). Expiry needs no bound: the
cached expires_at is compared with the request's time on every use. Unknown keys are cached too, so
a flood of made-up keys costs one query per key and TTL, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from shared.apikeys import VerifiedKey
from shared.keys import hash_key, parse_prefix
from shared.logs import log_event

logger = logging.getLogger("meterline.ingest")

MAX_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class ProjectInfo:
    organization_id: uuid.UUID
    archived: bool


class KeyCache:
    """Verified keys by keyed hash (the plaintext is never kept), each answer fresh for `ttl`."""

    def __init__(
        self,
        verify: Callable[[str, datetime], Awaitable[VerifiedKey | None]],
        *,
        pepper: bytes,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._verify = verify
        self._pepper = pepper
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[bytes, tuple[float, VerifiedKey | None]] = {}
        self._pending: dict[bytes, asyncio.Future[VerifiedKey | None]] = {}

    async def get(self, plaintext: str, now: datetime) -> VerifiedKey | None:
        """The key if valid at `now`; None if malformed, unknown, revoked or expired."""
        if parse_prefix(plaintext) is None:
            return None
        digest = hash_key(plaintext, self._pepper)
        entry = self._entries.get(digest)
        if entry is not None and self._clock() - entry[0] < self._ttl:
            key = entry[1]
        else:
            key = await self._refresh(digest, plaintext, now)
        if key is None or (key.expires_at is not None and key.expires_at <= now):
            return None
        return key

    async def _refresh(self, digest: bytes, plaintext: str, now: datetime) -> VerifiedKey | None:
        # One query per key however many requests miss at once (a cold start under load).
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[VerifiedKey | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        read_at = self._clock()
        try:
            key = await self._verify(plaintext, now)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so waiters-less failures are not logged twice
            raise
        finally:
            del self._pending[digest]
        future.set_result(key)
        if len(self._entries) >= MAX_ENTRIES:
            self._evict()
        self._entries[digest] = (read_at, key)
        return key

    def _evict(self) -> None:
        horizon = self._clock() - self._ttl
        self._entries = {d: e for d, e in self._entries.items() if e[0] >= horizon}
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()


class ProjectCache:
    """Which organization each project belongs to, and whether it is archived, fresh for `ttl`."""

    def __init__(
        self,
        fetch: Callable[[set[uuid.UUID]], Awaitable[dict[uuid.UUID, ProjectInfo]]],
        *,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[uuid.UUID, tuple[float, ProjectInfo | None]] = {}

    async def get_many(self, project_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, ProjectInfo]:
        now = self._clock()
        found: dict[uuid.UUID, ProjectInfo] = {}
        missing: set[uuid.UUID] = set()
        for project_id in project_ids:
            entry = self._entries.get(project_id)
            if entry is None or now - entry[0] >= self._ttl:
                missing.add(project_id)
            elif entry[1] is not None:
                found[project_id] = entry[1]
        if missing:
            fetched = await self._fetch(missing)
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            for project_id in missing:
                info = fetched.get(project_id)
                self._entries[project_id] = (now, info)
                if info is not None:
                    found[project_id] = info
        return found


class KeyUsageTally:
    """Requests per key since the last flush; flushed every few seconds in one statement."""

    def __init__(
        self, write: Callable[[dict[uuid.UUID, tuple[int, datetime]]], Awaitable[None]]
    ) -> None:
        self._write = write
        self._counts: dict[uuid.UUID, tuple[int, datetime]] = {}

    def record(self, key_id: uuid.UUID, at: datetime) -> None:
        prior = self._counts.get(key_id)
        self._counts[key_id] = (prior[0] + 1, at) if prior else (1, at)

    async def flush(self) -> None:
        counts, self._counts = self._counts, {}
        if not counts:
            return
        try:
            await self._write(counts)
        except Exception as exc:
            # Keep the counts for the next flush: the database may be restarting.
            for key_id, (n, at) in counts.items():
                prior = self._counts.get(key_id)
                self._counts[key_id] = (n + prior[0], max(at, prior[1])) if prior else (n, at)
            log_event(
                logger, "key_usage_flush_failed", logging.WARNING, keys=len(counts), error=str(exc)
            )

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.flush()
