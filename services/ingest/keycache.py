"""What ingest remembers about keys and projects so that a hot key costs no database round trip.

Revocation bound (`ttl` = settings.key_cache_ttl_seconds, default 2, at most 5): every ttl/2 a
poll reads the keys changed since the previous poll (api_keys.updated_at or revoked_at, with a
30-second margin for transactions that commit late) and drops them from the cache. A cached answer
is used only while it is known current: read from the database, or confirmed by a poll that began
after it was cached, less than `ttl` ago. So a key revoked at T is refused by every request that
starts after T + ttl, and if the polls fail (database down) entries go stale after `ttl` and are
read again, never trusted longer. Expiry needs no bound: the cached expires_at is compared with
each request's time. Unknown keys are cached too, so made-up keys cost one query per key and poll
period, not one per request. An entry is read again after MAX_AGE whatever the polls say: the
backstop for a revoking transaction that took longer than the margin to commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.apikeys import VerifiedKey
from shared.keys import hash_key, parse_prefix
from shared.logs import log_event

logger = logging.getLogger("meterline.ingest")

MAX_ENTRIES = 100_000
MAX_AGE = 60.0
CHANGE_MARGIN = timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class ProjectInfo:
    organization_id: uuid.UUID
    archived: bool


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """Keyed hashes of the keys changed since a point in time, and the database's time now."""

    key_hashes: list[bytes]
    as_of: datetime


@dataclass(slots=True)
class _Entry:
    key: VerifiedKey | None
    read_at: float
    inserted_at: float


class KeyCache:
    """Verified keys by keyed hash (the plaintext is never kept), trusted as the module says."""

    def __init__(
        self,
        verify: Callable[[str, datetime], Awaitable[VerifiedKey | None]],
        *,
        pepper: bytes,
        ttl: float,
        changes: Callable[[datetime | None], Awaitable[KeyChanges]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._verify = verify
        self._changes = changes
        self._pepper = pepper
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[bytes, _Entry] = {}
        self._pending: dict[bytes, asyncio.Future[VerifiedKey | None]] = {}
        self._last_poll_started = float("-inf")  # of the last poll that completed
        self._mark: datetime | None = None

    async def get(self, plaintext: str, now: datetime) -> VerifiedKey | None:
        """The key if valid at `now`; None if malformed, unknown, revoked or expired."""
        if parse_prefix(plaintext) is None:
            return None
        digest = hash_key(plaintext, self._pepper)
        entry = self._entries.get(digest)
        if entry is not None and self._current(entry):
            key = entry.key
        else:
            key = await self._refresh(digest, plaintext, now)
        if key is None or (key.expires_at is not None and key.expires_at <= now):
            return None
        return key

    def _current(self, entry: _Entry) -> bool:
        clock = self._clock()
        if clock - entry.read_at >= MAX_AGE:
            return False
        known_at = entry.read_at
        if self._last_poll_started > entry.inserted_at:
            # A poll that began after the entry was cached would have dropped it on a change.
            known_at = max(known_at, self._last_poll_started)
        return clock - known_at < self._ttl

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
            future.exception()  # retrieved here, so a failure nobody awaited is not logged
            raise
        finally:
            del self._pending[digest]
        future.set_result(key)
        if len(self._entries) >= MAX_ENTRIES:
            self._evict()
        self._entries[digest] = _Entry(key, read_at, self._clock())
        return key

    def _evict(self) -> None:
        self._entries = {d: e for d, e in self._entries.items() if self._current(e)}
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()

    async def poll(self) -> int:
        """Drop the keys changed since the last poll; how many cached ones were dropped."""
        assert self._changes is not None
        started = self._clock()
        since = None if self._mark is None else self._mark - CHANGE_MARGIN
        changes = await self._changes(since)
        dropped = 0
        for key_hash in changes.key_hashes:
            if self._entries.pop(key_hash, None) is not None:
                dropped += 1
        self._mark = changes.as_of
        self._last_poll_started = started
        return dropped

    async def run_polls(self) -> None:
        # Polls start every ttl/2 whatever each one took, so a slow database eats into the
        # margin only once and a hot key stays cached while polls keep succeeding.
        while True:
            started = self._clock()
            try:
                dropped = await self.poll()
            except Exception as exc:
                log_event(logger, "key_poll_failed", logging.WARNING, error=str(exc)[:200])
            else:
                if dropped:
                    log_event(logger, "keys_dropped_from_cache", count=dropped)
            await asyncio.sleep(max(0.0, self._ttl / 2 - (self._clock() - started)))


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
