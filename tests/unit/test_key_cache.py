"""Ingest's key cache: hot keys cost no read, revocation within the bound, strangers cost little."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from services.ingest.keycache import (
    FAILED_FROM_ADDRESS,
    NOTHING_TAKEN,
    Admission,
    KeyCache,
    KeyChanges,
    ProjectCache,
    ProjectInfo,
)
from services.ingest.keylookup import KeyLookups
from services.ingest.ratelimit import RateLimiter
from shared.apikeys import VerifiedKey
from shared.errors import RateLimited
from shared.keys import generate_key, hash_key, parse_prefix

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
PEPPER = b"p" * 16
ORG = uuid.uuid4()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def verified(expires_at: datetime | None = None) -> VerifiedKey:
    return VerifiedKey(uuid.uuid4(), ORG, None, None, expires_at)


class Database:
    """The keys table as the cache sees it: keyed hash -> key; every read recorded."""

    def __init__(self, keys: dict[str, VerifiedKey] | None = None) -> None:
        self.keys = {hash_key(text, PEPPER): key for text, key in (keys or {}).items()}
        self.reads: list[list[bytes]] = []

    async def read(self, hashes: list[bytes]) -> dict[bytes, VerifiedKey]:
        self.reads.append(hashes)
        await asyncio.sleep(0)
        return {h: self.keys[h] for h in hashes if h in self.keys}

    @property
    def hashes_read(self) -> int:
        return sum(len(batch) for batch in self.reads)


def cache(
    database: Database,
    clock: FakeClock,
    *,
    ttl: float = 2.0,
    changes: Callable[[datetime | None], Awaitable[KeyChanges]] | None = None,
    failures: RateLimiter[str] | None = None,
    max_entries: int = 1000,
) -> KeyCache:
    return KeyCache(
        KeyLookups(database.read),
        pepper=PEPPER,
        ttl=ttl,
        changes=changes,
        failures=failures,
        max_entries=max_entries,
        clock=clock,
    )


def made_up_keys(n: int) -> list[str]:
    return [generate_key().plaintext for _ in range(n)]


def test_hot_key_is_read_once_per_ttl() -> None:
    clock = FakeClock()
    plaintext, key = generate_key().plaintext, verified()
    database = Database({plaintext: key})

    async def scenario() -> None:
        keys = cache(database, clock)
        assert await asyncio.gather(*(keys.get(plaintext, NOW) for _ in range(10))) == [key] * 10
        clock.now = 1.9
        await keys.get(plaintext, NOW)
        assert len(database.reads) == 1
        clock.now = 2.0
        await keys.get(plaintext, NOW)
        assert len(database.reads) == 2

    asyncio.run(scenario())


def test_expired_key_is_refused_at_once_and_malformed_keys_without_a_read() -> None:
    plaintext = generate_key().plaintext
    database = Database({plaintext: verified(expires_at=NOW + timedelta(seconds=1))})

    async def scenario() -> None:
        keys = cache(database, FakeClock(), ttl=5.0)
        assert await keys.get(plaintext, NOW) is not None
        assert await keys.get(plaintext, NOW + timedelta(seconds=1)) is None
        assert await keys.get("ml_live_not_a_key", NOW) is None

    asyncio.run(scenario())
    assert database.hashes_read == 1


def test_polls_keep_a_hot_key_cached_and_drop_a_changed_or_deleted_one() -> None:
    clock = FakeClock()
    plaintext = generate_key().plaintext
    database = Database({plaintext: verified()})
    changed: list[bytes] = []

    async def changes(since: datetime | None) -> KeyChanges:
        return KeyChanges(list(changed), NOW)

    async def scenario() -> None:
        keys = cache(database, clock, changes=changes)
        await keys.get(plaintext, NOW)
        for step in range(1, 20):  # a poll every second vouches for the entry: no re-read
            clock.now = float(step)
            await keys.poll()
            await keys.get(plaintext, NOW)
        assert len(database.reads) == 1
        # The key is deleted: its tombstone's hash comes with the next poll.
        del database.keys[hash_key(plaintext, PEPPER)]
        changed.append(hash_key(plaintext, PEPPER))
        clock.now = 20.0
        await keys.poll()
        assert await keys.get(plaintext, NOW) is None
        assert len(database.reads) == 2

    asyncio.run(scenario())


def test_entries_go_stale_after_ttl_when_polls_fail() -> None:
    clock = FakeClock()
    plaintext = generate_key().plaintext
    database = Database({plaintext: verified()})

    async def scenario() -> None:
        keys = cache(database, clock)
        await keys.get(plaintext, NOW)
        clock.now = 1.9
        await keys.get(plaintext, NOW)
        assert len(database.reads) == 1
        clock.now = 2.1
        await keys.get(plaintext, NOW)
        assert len(database.reads) == 2

    asyncio.run(scenario())


def test_unknown_key_is_remembered_and_refused_without_another_read() -> None:
    clock = FakeClock()
    [stranger] = made_up_keys(1)
    database = Database()

    async def scenario() -> None:
        keys = cache(database, clock)
        assert [await keys.get(stranger, NOW, "10.0.0.1") for _ in range(50)] == [None] * 50

    asyncio.run(scenario())
    assert database.hashes_read == 1


def test_made_up_keys_never_push_a_verified_key_out() -> None:
    clock = FakeClock()
    plaintext, key = generate_key().plaintext, verified()
    database = Database({plaintext: key})

    async def scenario() -> None:
        keys = cache(database, clock, max_entries=10)
        await keys.get(plaintext, NOW)
        for stranger in made_up_keys(500):
            assert await keys.get(stranger, NOW) is None
        reads = database.hashes_read
        assert await keys.get(plaintext, NOW) == key
        assert database.hashes_read == reads  # still cached

    asyncio.run(scenario())


def test_verified_keys_are_evicted_least_recently_used_one_at_a_time() -> None:
    clock = FakeClock()
    plaintexts = [generate_key().plaintext for _ in range(4)]
    database = Database({text: verified() for text in plaintexts})
    first, second, third, fourth = plaintexts

    async def scenario() -> None:
        keys = cache(database, clock, max_entries=3)
        for text in (first, second, third):
            await keys.get(text, NOW)
        await keys.get(first, NOW)  # used again: `second` is now the least recent
        await keys.get(fourth, NOW)
        reads = database.hashes_read
        for text in (first, third, fourth):
            await keys.get(text, NOW)
        assert database.hashes_read == reads
        await keys.get(second, NOW)
        assert database.hashes_read == reads + 1

    asyncio.run(scenario())


def test_failed_authentications_are_limited_per_address_before_any_read() -> None:
    clock = FakeClock()
    plaintext, key = generate_key().plaintext, verified()
    database = Database({plaintext: key})
    failures: RateLimiter[str] = RateLimiter(rate=1, burst=3, clock=clock)

    async def scenario() -> None:
        keys = cache(database, clock, failures=failures)
        assert await keys.get(plaintext, NOW, "10.0.0.1") == key  # cached before the flood
        strangers = made_up_keys(10)
        for stranger in strangers[:3]:
            assert await keys.get(stranger, NOW, "10.0.0.1") is None
        reads = database.hashes_read
        for stranger in strangers[3:]:
            with pytest.raises(RateLimited) as refused:
                await keys.get(stranger, NOW, "10.0.0.1")
            assert refused.value.retry_after > 0
        assert database.hashes_read == reads
        # The address's verified key still works; another address is not held back.
        assert await keys.get(plaintext, NOW, "10.0.0.1") == key
        assert await keys.get(strangers[3], NOW, "10.0.0.2") is None
        # A valid key gives its token back.
        clock.now = 1.0
        fresh = generate_key().plaintext
        database.keys[hash_key(fresh, PEPPER)] = verified()
        assert await keys.get(fresh, NOW, "10.0.0.1") is not None
        assert await keys.get(strangers[4], NOW, "10.0.0.1") is None

    asyncio.run(scenario())


def test_concurrent_misses_share_a_few_reads_and_at_most_two_run_at_once() -> None:
    clock = FakeClock()
    running = 0
    most = 0
    batches: list[int] = []

    async def read(hashes: list[bytes]) -> dict[bytes, VerifiedKey]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        batches.append(len(hashes))
        await asyncio.sleep(0.01)
        running -= 1
        return {}

    async def scenario() -> None:
        keys = KeyCache(KeyLookups(read), pepper=PEPPER, ttl=2.0, clock=clock)
        results = await asyncio.gather(*(keys.get(k, NOW) for k in made_up_keys(1000)))
        assert results == [None] * 1000

    asyncio.run(scenario())
    assert most == 2
    assert sum(batches) == 1000
    assert len(batches) <= 8  # 1 + 1, then batches of up to 256


def test_first_reads_beyond_the_waiting_bound_are_refused_at_once() -> None:
    async def read(hashes: list[bytes]) -> dict[bytes, VerifiedKey]:
        await asyncio.sleep(0.01)
        return {}

    async def scenario() -> list[object]:
        lookups = KeyLookups(read, concurrent=1, max_waiting=10)
        keys = KeyCache(lookups, pepper=PEPPER, ttl=2.0, clock=FakeClock())
        return await asyncio.gather(
            *(keys.get(k, NOW) for k in made_up_keys(50)), return_exceptions=True
        )

    results = asyncio.run(scenario())
    assert results.count(None) == 11  # the one being read and the ten waiting
    assert all(isinstance(r, RateLimited) for r in results if r is not None)


def test_made_up_project_ids_never_push_a_known_project_out() -> None:
    clock = FakeClock()
    project, info = uuid.uuid4(), ProjectInfo(ORG, archived=False)
    fetched: list[set[uuid.UUID]] = []

    async def fetch(ids: set[uuid.UUID]) -> dict[uuid.UUID, ProjectInfo]:
        fetched.append(ids)
        return {project: info} if project in ids else {}

    async def scenario() -> None:
        projects = ProjectCache(fetch, ttl=2.0, max_entries=10, clock=clock)
        assert await projects.get_many([project]) == {project: info}
        for _ in range(100):
            assert await projects.get_many([uuid.uuid4()]) == {}
        before = len(fetched)
        assert await projects.get_many([project]) == {project: info}
        assert len(fetched) == before

    asyncio.run(scenario())


def test_rate_limiter_allows_the_burst_then_asks_to_wait() -> None:
    clock = FakeClock()
    limiter: RateLimiter[uuid.UUID] = RateLimiter(rate=10, burst=3, clock=clock)
    key_id = uuid.uuid4()
    assert [limiter.acquire(key_id) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire(key_id)
    assert wait == pytest.approx(0.1)
    clock.now = 0.1
    assert limiter.acquire(key_id) == 0.0
    assert limiter.acquire(uuid.uuid4()) == 0.0  # other keys have their own bucket


def test_failed_authentications_of_one_ipv6_host_share_its_64() -> None:
    clock = FakeClock()
    database = Database()
    failures: RateLimiter[str] = RateLimiter(rate=1, burst=2, clock=clock)

    async def scenario() -> None:
        keys = cache(database, clock, failures=failures)
        strangers = made_up_keys(3)
        assert await keys.get(strangers[0], NOW, "2001:db8:1:2::1") is None
        assert await keys.get(strangers[1], NOW, "2001:db8:1:2:ffff::9") is None
        with pytest.raises(RateLimited):
            await keys.get(strangers[2], NOW, "2001:db8:1:2:aaaa:bbbb:cccc:dddd")
        assert await keys.get(strangers[2], NOW, "2001:db8:1:3::1") is None  # another /64

    asyncio.run(scenario())


def prefix_of(plaintext: str) -> str:
    prefix = parse_prefix(plaintext)
    assert prefix is not None
    return prefix


def test_strangers_reads_are_budgeted_and_real_keys_never_refused_for_them() -> None:
    clock = FakeClock()
    real, key = generate_key().plaintext, verified()
    database = Database({real: key})

    async def changes(since: datetime | None) -> KeyChanges:
        return KeyChanges([], NOW, [prefix_of(real)])

    async def scenario() -> None:
        lookups = KeyLookups(database.read, strangers=RateLimiter(rate=1, burst=20, clock=clock))
        keys = KeyCache(lookups, pepper=PEPPER, ttl=2.0, changes=changes, clock=clock)
        await keys.poll()
        results = await asyncio.gather(
            *(keys.get(k, NOW) for k in made_up_keys(100)), return_exceptions=True
        )
        assert results.count(None) == 20  # the budget's worth are read
        assert all(isinstance(r, RateLimited) for r in results if r is not None)
        reads = database.hashes_read
        # The budget is spent, yet a real key, never read before, is read and accepted.
        assert await keys.get(real, NOW) == key
        assert database.hashes_read == reads + 1

    asyncio.run(scenario())


def test_a_key_created_after_the_last_poll_is_read_as_a_stranger_then_as_plausible() -> None:
    clock = FakeClock()
    created: list[str] = []
    database = Database()

    async def changes(since: datetime | None) -> KeyChanges:
        return KeyChanges([], NOW, list(created))

    async def scenario() -> None:
        lookups = KeyLookups(database.read, strangers=RateLimiter(rate=1, burst=1, clock=clock))
        keys = KeyCache(lookups, pepper=PEPPER, ttl=2.0, changes=changes, clock=clock)
        await keys.poll()
        assert await keys.get(made_up_keys(1)[0], NOW) is None  # the strangers' budget, spent
        fresh, key = generate_key().plaintext, verified()
        database.keys[hash_key(fresh, PEPPER)] = key
        # Before a poll has seen it, the new key waits for the strangers' budget...
        with pytest.raises(RateLimited):
            await keys.get(fresh, NOW)
        # ...and once a poll brings its prefix, it is read at once.
        created.append(prefix_of(fresh))
        await keys.poll()
        assert await keys.get(fresh, NOW) == key

    asyncio.run(scenario())


def test_verified_re_reads_never_wait_behind_strangers_queries() -> None:
    clock = FakeClock()
    real, key = generate_key().plaintext, verified()
    stranger_read_started = asyncio.Event()
    release = asyncio.Event()
    known = {hash_key(real, PEPPER)}

    async def read(hashes: list[bytes]) -> dict[bytes, VerifiedKey]:
        if known.isdisjoint(hashes):
            stranger_read_started.set()
            await release.wait()  # a strangers' query that hangs
            return {}
        return {hash_key(real, PEPPER): key}

    async def changes(since: datetime | None) -> KeyChanges:
        return KeyChanges([], NOW, [prefix_of(real)])

    async def scenario() -> None:
        lookups = KeyLookups(read, concurrent=2)
        keys = KeyCache(lookups, pepper=PEPPER, ttl=2.0, changes=changes, clock=clock)
        await keys.poll()
        strangers = [asyncio.create_task(keys.get(k, NOW)) for k in made_up_keys(600)]
        await stranger_read_started.wait()
        assert await asyncio.wait_for(keys.get(real, NOW), 1) == key
        clock.now = 100.0  # past MAX_AGE: the next request re-reads it, beside the strangers
        assert await asyncio.wait_for(keys.get(real, NOW), 1) == key
        release.set()
        await asyncio.gather(*strangers, return_exceptions=True)

    asyncio.run(scenario())


def test_screen_answers_like_get_without_waiting_and_takes_a_token_once() -> None:
    clock = FakeClock()
    real, key = generate_key().plaintext, verified()
    database = Database({real: key})
    failures: RateLimiter[str] = RateLimiter(rate=1, burst=2, clock=clock)

    async def scenario() -> None:
        keys = cache(database, clock, failures=failures)
        assert keys.screen("ml_live_not_a_key", "10.0.0.1") == "unknown"
        first, second, third = made_up_keys(3)
        admitted = keys.screen(first, "10.0.0.1")  # it needs a read: the address's token taken
        assert admitted == Admission("10.0.0.1", False)
        assert await keys.get(first, NOW, "10.0.0.1", admitted) is None
        assert keys.screen(first, "10.0.0.1") == "unknown"  # remembered, no token taken
        admitted = keys.screen(second, "10.0.0.1")
        assert isinstance(admitted, Admission)
        # get does not take the token screen took: the bucket (burst 2) had room for both.
        assert await keys.get(second, NOW, "10.0.0.1", admitted) is None
        refused = keys.screen(third, "10.0.0.1")
        assert isinstance(refused, RateLimited) and refused.retry_after > 0
        assert refused.message == FAILED_FROM_ADDRESS
        with pytest.raises(RateLimited):
            await keys.get(third, NOW, "10.0.0.1")  # without an admission, get takes its own
        # A verified key is let through whatever its address's bucket says, taking nothing.
        assert await keys.get(real, NOW, "10.0.0.2") == key
        assert keys.screen(real, "10.0.0.1") is NOTHING_TAKEN

    asyncio.run(scenario())


def test_screen_lets_through_only_as_many_strangers_as_the_budget_has_room_for() -> None:
    clock = FakeClock()
    real, key = generate_key().plaintext, verified()
    database = Database({real: key})

    async def changes(since: datetime | None) -> KeyChanges:
        return KeyChanges([], NOW, [prefix_of(real)])

    async def scenario() -> None:
        lookups = KeyLookups(database.read, strangers=RateLimiter(rate=1, burst=5, clock=clock))
        keys = KeyCache(lookups, pepper=PEPPER, ttl=2.0, changes=changes, clock=clock)
        await keys.poll()
        strangers = made_up_keys(100)
        # Screened one after another before any is read, as in one turn of the event loop.
        screened = [keys.screen(k, f"10.0.{i // 250}.{i % 250}") for i, k in enumerate(strangers)]
        admitted = [
            (k, s) for k, s in zip(strangers, screened, strict=True) if isinstance(s, Admission)
        ]
        assert len(admitted) == 5
        assert all(s.stranger_read for _, s in admitted)
        refused = [s for s in screened if not isinstance(s, Admission)]
        assert all(isinstance(s, RateLimited) for s in refused) and len(refused) == 95
        # Those let through are read, not refused again for the budget they already hold.
        results = await asyncio.gather(*(keys.get(k, NOW, None, s) for k, s in admitted))
        assert results == [None] * 5
        assert database.hashes_read == 5
        # The budget is spent, yet a real key, never read before, is let through and accepted.
        let_through = keys.screen(real, "10.9.9.9")
        assert isinstance(let_through, Admission) and not let_through.stranger_read
        assert await keys.get(real, NOW, "10.9.9.9", let_through) == key

    asyncio.run(scenario())
