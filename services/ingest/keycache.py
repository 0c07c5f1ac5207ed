"""What ingest remembers about keys and projects so that a hot key costs no database round trip,
and a stranger's made-up keys cost almost nothing.

Revocation bound (`ttl` = settings.key_cache_ttl_seconds, default 2, at most 5): every ttl/2 a
poll reads the keys changed since the previous poll (api_keys.updated_at or revoked_at, and the
api_key_deletions tombstones that a trigger writes for every deleted key, including those of a
deleted organization; with a 30-second margin for transactions that commit late) and drops them
from the cache. A cached answer is used only while it is known current: read from the database,
or confirmed by a poll that began after it was cached, less than `ttl` ago. So a key revoked or
deleted at T is refused by every request that starts after T + ttl, and if the polls fail
(database down) entries go stale after `ttl` and are read again, never trusted longer. Expiry
needs no bound: the cached expires_at is compared with each request's time. An entry is read
again after MAX_AGE whatever the polls say: the backstop for a revoking transaction that took
longer than the margin to commit.

Strangers: verified keys and unknown ones (not found, revoked) are kept apart, each in its own
least-recently-used map of at most MAX_ENTRIES, so made-up keys can never push a verified key
out, and eviction drops one entry at a time, never the whole cache. An unknown key is
remembered (under the same rules as a verified one) and refused without a query while that
holds. A key not cached at all is read through KeyLookups (batched, at most two connections),
and only after the client's address takes a token from the failed-authentication bucket
(given back if the key proves valid): a client over it gets 429 without any database work.
The front door takes that token, and a stranger's place in the strangers' budget, when it lets
the request through (`screen`), and `get` given its Admission does not take them again.
The polls also keep a PrefixFilter of the stored keys' public prefixes (all of them at the first
poll, then those of keys created since), so a key whose prefix no stored key has is read as a
stranger: last, and within the strangers' budget (keylookup.py). A key created a moment ago is
a stranger until the next poll (ttl/2), so during a flood it may get 429 for that long.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Generic, Literal, TypeVar

from services.ingest.keylookup import KeyLookups, Standing
from services.ingest.ratelimit import RateLimiter, client_bucket
from shared.apikeys import VerifiedKey
from shared.errors import RateLimited
from shared.keys import hash_key, parse_prefix
from shared.logs import log_event

logger = logging.getLogger("meterline.ingest")

MAX_ENTRIES = 100_000
FAILED_FROM_ADDRESS = "too many failed authentications from this address"
MAX_AGE = 60.0
CHANGE_MARGIN = timedelta(seconds=30)

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class ProjectInfo:
    organization_id: uuid.UUID
    archived: bool


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """Keyed hashes of the keys changed or deleted since a point in time, the public prefixes of
    the keys created since then (of every key when there was no point in time), and the
    database's time now."""

    key_hashes: list[bytes]
    as_of: datetime
    prefixes: list[str] = field(default_factory=list)


class PrefixFilter:
    """Which public prefixes stored keys may have: one bit per hash of a prefix, in a fixed 1 MiB
    whatever the number of keys. A prefix that was added is always found; one that was not is
    found with a chance of (prefixes added) / BITS, and then only read sooner than a stranger.
    Bits are never cleared: a revoked or deleted key's prefix costs a little of that chance."""

    BITS = 1 << 23

    def __init__(self, prefixes: Iterable[str] = ()) -> None:
        self._bits = bytearray(self.BITS // 8)
        self.add(prefixes)

    def add(self, prefixes: Iterable[str]) -> None:
        for prefix in prefixes:
            slot = hash(prefix) & (self.BITS - 1)
            self._bits[slot >> 3] |= 1 << (slot & 7)

    def __contains__(self, prefix: str) -> bool:
        slot = hash(prefix) & (self.BITS - 1)
        return bool(self._bits[slot >> 3] & (1 << (slot & 7)))


@dataclass(frozen=True, slots=True)
class Admission:
    """What `screen` took for a request that it lets through to `get`: a token of the client's
    failed-authentication bucket (`bucket`, None if none was taken) and a stranger's place in the
    strangers' budget (`stranger_read`). `get` given it does not take them again.

    Taking them when the request is let through, not when it is read, bounds what a flood gets
    past the front door to the tokens there are. (Peeking at the buckets there and taking later
    let every request of a turn of the event loop through while one token was left: during a
    flood from many addresses most made-up keys then went on to the app, to be refused there
    one by one, at twice a refusal's cost, each a task ahead of the real requests' steps.)"""

    bucket: str | None = None
    stranger_read: bool = False


NOTHING_TAKEN = Admission()


@dataclass(slots=True)
class _Entry:
    key: VerifiedKey | None
    read_at: float
    inserted_at: float


class RecentlyUsed(Generic[K, V]):
    """A bounded map that forgets its least recently used entry first, one at a time."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class KeyCache:
    """Verified keys by keyed hash (the plaintext is never kept), trusted as the module says."""

    def __init__(
        self,
        lookups: KeyLookups,
        *,
        pepper: bytes,
        ttl: float,
        changes: Callable[[datetime | None], Awaitable[KeyChanges]] | None = None,
        failures: RateLimiter[str] | None = None,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookups = lookups
        self._changes = changes
        self._failures = failures
        self._pepper = pepper
        self._ttl = ttl
        self._clock = clock
        self._verified: RecentlyUsed[bytes, _Entry] = RecentlyUsed(max_entries)
        self._unknown: RecentlyUsed[bytes, _Entry] = RecentlyUsed(max_entries)
        self._last_poll_started = float("-inf")  # of the last poll that completed
        self._mark: datetime | None = None
        self._prefixes: PrefixFilter | None = None  # until the first poll

    async def get(
        self,
        plaintext: str,
        now: datetime,
        client: str | None = None,
        admission: Admission | None = None,
    ) -> VerifiedKey | None:
        """The key if valid at `now`; None if malformed, unknown, revoked or expired.

        RateLimited if the key is not known and `client` is over its failed-authentication
        bucket (or too many first reads are already waiting). `admission`: what `screen` took
        for this request, not taken again."""
        prefix = parse_prefix(plaintext)
        if prefix is None:
            return None
        digest = hash_key(plaintext, self._pepper)
        entry = self._verified.get(digest)
        if entry is not None:
            if admission is not None and admission.bucket is not None and self._failures:
                self._failures.refund(admission.bucket)  # verified meanwhile: not a failure
            key = entry.key if self._current(entry) else await self._read(digest, Standing.VERIFIED)
        else:
            unknown = self._unknown.get(digest)
            if unknown is not None and self._current(unknown):
                return None
            key = await self._read_unknown(
                digest, client, self._standing(prefix), admission or NOTHING_TAKEN
            )
        if key is None or (key.expires_at is not None and key.expires_at <= now):
            return None
        return key

    def screen(
        self, plaintext: str, client: str | None
    ) -> Literal["unknown"] | RateLimited | Admission:
        """For the front door, without waiting on anything: "unknown" for a malformed or
        remembered unknown key and RateLimited for a key that `get` would refuse before its read
        (taking nothing); else the Admission to hand to `get`: nothing taken for a verified key,
        and for a key to read the address's token and, for a stranger, its place in the
        strangers' budget."""
        prefix = parse_prefix(plaintext)
        if prefix is None:
            return "unknown"
        digest = hash_key(plaintext, self._pepper)
        if self._verified.get(digest) is not None:
            return NOTHING_TAKEN
        unknown = self._unknown.get(digest)
        if unknown is not None and self._current(unknown):
            return "unknown"
        bucket = client_bucket(client) if self._failures is not None and client else None
        if self._failures is not None and bucket is not None:
            wait = self._failures.waiting(bucket)
            if wait > 0:
                return RateLimited(FAILED_FROM_ADDRESS, retry_after=wait)
        reserved = self._lookups.reserve(self._standing(prefix))
        if isinstance(reserved, RateLimited):
            return reserved
        if self._failures is not None and bucket is not None:
            self._failures.acquire(bucket)  # there is a token: `waiting` just said so
        return Admission(bucket, reserved)

    def _standing(self, prefix: str) -> Standing:
        if self._prefixes is None or prefix in self._prefixes:
            return Standing.PLAUSIBLE
        return Standing.STRANGER

    async def _read_unknown(
        self, digest: bytes, client: str | None, standing: Standing, admission: Admission
    ) -> VerifiedKey | None:
        # The token is taken before the read (by `screen`, or here), so a flood from one address
        # is refused without touching the database; a key that proves valid gives it back.
        bucket = admission.bucket
        if bucket is None and self._failures is not None and client:
            bucket = client_bucket(client)
            wait = self._failures.acquire(bucket)
            if wait > 0:
                raise RateLimited(FAILED_FROM_ADDRESS, retry_after=wait)
        key = await self._read(digest, standing, reserved=admission.stranger_read)
        if key is not None and self._failures is not None and bucket is not None:
            self._failures.refund(bucket)
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

    async def _read(
        self, digest: bytes, standing: Standing, *, reserved: bool = False
    ) -> VerifiedKey | None:
        read_at = self._clock()
        key = await self._lookups.lookup(digest, standing, reserved=reserved)
        entry = _Entry(key, read_at, self._clock())
        if key is None:
            self._verified.pop(digest)
            self._unknown.put(digest, entry)
        else:
            self._unknown.pop(digest)
            self._verified.put(digest, entry)
        return key

    async def poll(self) -> int:
        """Drop the keys changed since the last poll; how many cached ones were dropped."""
        assert self._changes is not None
        started = self._clock()
        since = None if self._mark is None else self._mark - CHANGE_MARGIN
        changes = await self._changes(since)
        dropped = 0
        for key_hash in changes.key_hashes:
            if self._verified.pop(key_hash) is not None:
                dropped += 1
            self._unknown.pop(key_hash)
        if since is None or self._prefixes is None:
            self._prefixes = PrefixFilter(changes.prefixes)  # every stored key's
        else:
            self._prefixes.add(changes.prefixes)
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


class FreshCache(Generic[K, V]):
    """What `fetch` answers for each key (a project's organization, a customer's), fresh for
    `ttl`: a deleted or changed row is seen within it. Unknown keys are remembered too, in a
    least-recently-used map of their own, so made-up names never push real entries out."""

    def __init__(
        self,
        fetch: Callable[[set[K]], Awaitable[dict[K, V]]],
        *,
        ttl: float,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._known: RecentlyUsed[K, tuple[float, V]] = RecentlyUsed(max_entries)
        self._unknown: RecentlyUsed[K, float] = RecentlyUsed(max_entries)

    async def get_many(self, keys: Iterable[K]) -> dict[K, V]:
        now = self._clock()
        found: dict[K, V] = {}
        missing: set[K] = set()
        for key in keys:
            known = self._known.get(key)
            if known is not None and now - known[0] < self._ttl:
                found[key] = known[1]
                continue
            unknown_at = self._unknown.get(key)
            if unknown_at is None or now - unknown_at >= self._ttl:
                missing.add(key)
        if missing:
            fetched = await self._fetch(missing)
            for key in missing:
                info = fetched.get(key)
                if info is None:
                    self._known.pop(key)
                    self._unknown.put(key, now)
                else:
                    self._unknown.pop(key)
                    self._known.put(key, (now, info))
                    found[key] = info
        return found


class ProjectCache(FreshCache[uuid.UUID, ProjectInfo]):
    """Which organization each project belongs to, and whether it is archived (a deleted or
    archived project is refused within `ttl`)."""


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
