"""The ledger's monthly partitions: which exist, creating the ones a batch needs, dropping the old.

Partitions are by event time, one calendar month (UTC) each. The rule that keeps every event
answered 202 countable, however late the aggregator runs:
  - an event is countable when its timestamp >= its envelope's received_at - lateness horizon
    (ingest's own rule at receipt), never by how late we process it (services/aggregator/batch.py);
  - so a partition may be dropped only when no unprocessed event can fall in it: prune only
    partitions whose range ends before (received time of the oldest record the consumer group has
    not processed, or now when it has none) - horizon - grace. The hourly maintenance and
    `meterline aggregate prune-ledger` read that backlog from Kafka (consumer_lag.py); without
    it they drop nothing, and the CLI refuses while the group lags beyond the grace (unless
    --force).
  - what was dropped is remembered by the floor: one empty partition
    `usage_event_ledger_floor_pYYYYMMDD` covering everything below the oldest kept month, with
    CHECK (false), so nothing is ever written below it. An event below the floor (an operator
    forced a prune) is dead-lettered as `ledger_partition_missing`, retryable: neither counted
    without its dedupe nor dropped.
Who prunes: every aggregator instance hourly (harmless when several do), and the CLI on demand.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from services.aggregator.repository import lock_exclusive
from shared.models.ledger import LEDGER_TABLE
from shared.settings import Settings

_NAME = re.compile(rf"^{LEDGER_TABLE}_p(\d{{8}})$")
_FLOOR = re.compile(rf"^{LEDGER_TABLE}_floor_p(\d{{8}})$")


def ledger_cutoff(now: datetime, settings: Settings) -> datetime:
    """The oldest event time the ledger answers for when the consumer is caught up at `now`:
    the horizon plus a grace. Replay refuses ranges before it."""
    return now - settings.lateness_horizon - timedelta(hours=settings.ledger_grace_hours)


def prune_cutoff(now: datetime, settings: Settings, backlog_start: datetime | None) -> datetime:
    """Partitions ending at or before this may be dropped: no unprocessed event can be older.

    `backlog_start` is when the oldest record the consumer group has not processed was received
    (None: no backlog). Its events are at most the horizon older than that."""
    return ledger_cutoff(min(now, backlog_start) if backlog_start else now, settings)


def month_start(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def next_month(month: datetime) -> datetime:
    return datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)


def partition_name(month: datetime) -> str:
    return f"{LEDGER_TABLE}_p{month:%Y%m%d}"


def months_for(times: Iterable[datetime]) -> set[datetime]:
    return {month_start(t) for t in times}


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    month: datetime

    @property
    def upper(self) -> datetime:
        return next_month(self.month)


def existing_partitions(connection: Connection) -> list[Partition]:
    names = connection.execute(
        sa.text(
            "SELECT c.relname FROM pg_inherits i"
            "  JOIN pg_class c ON c.oid = i.inhrelid"
            "  JOIN pg_class p ON p.oid = i.inhparent"
            " WHERE p.relname = :parent"
        ),
        {"parent": LEDGER_TABLE},
    ).scalars()
    found = []
    for name in names:
        match = _NAME.match(name)
        if match:
            found.append(Partition(name, _date(match[1])))
    return sorted(found, key=lambda p: p.month)


def _date(digits: str) -> datetime:
    return datetime.strptime(digits, "%Y%m%d").replace(tzinfo=UTC)


def ledger_floor(connection: Connection) -> datetime | None:
    """Event times below this were pruned from the ledger (None: nothing was ever pruned)."""
    names = connection.execute(
        sa.text("SELECT relname FROM pg_class WHERE relname LIKE :pattern AND relkind = 'r'"),
        {"pattern": f"{LEDGER_TABLE}_floor_p%"},
    ).scalars()
    floors = [_date(m[1]) for m in map(_FLOOR.match, names) if m]
    return max(floors, default=None)


def _move_floor(connection: Connection, floor: datetime) -> None:
    """Replace the floor partition by one covering everything below `floor`."""
    old = ledger_floor(connection)
    if old is not None:
        if old >= floor:
            return
        connection.execute(sa.text(f'DROP TABLE "{LEDGER_TABLE}_floor_p{old:%Y%m%d}"'))
    connection.execute(
        sa.text(
            f'CREATE TABLE "{LEDGER_TABLE}_floor_p{floor:%Y%m%d}" PARTITION OF {LEDGER_TABLE} '
            "(CONSTRAINT pruned CHECK (false)) "
            f"FOR VALUES FROM (MINVALUE) TO ('{floor.isoformat()}')"
        )
    )


def create_partitions(connection: Connection, months: Iterable[datetime]) -> list[str]:
    """Create the missing monthly partitions; the caller's transaction holds the exclusive lock."""
    lock_exclusive(connection)
    have = {p.month for p in existing_partitions(connection)}
    floor = ledger_floor(connection)
    created = []
    # Never below the floor: those months were pruned and their events are dead-lettered.
    for month in sorted(m for m in set(months) - have if floor is None or m >= floor):
        name = partition_name(month)
        # Bounds are literals of our own making (dates), never input: DDL takes no parameters.
        connection.execute(
            sa.text(
                f'CREATE TABLE "{name}" PARTITION OF {LEDGER_TABLE} '
                f"FOR VALUES FROM ('{month.isoformat()}') TO ('{next_month(month).isoformat()}')"
            )
        )
        created.append(name)
    return created


def drop_partitions_before(
    connection: Connection, cutoff: datetime, *, dry_run: bool = False
) -> list[str]:
    """Drop every partition whose whole range is older than `cutoff`; move the floor above them."""
    lock_exclusive(connection)
    old = [p for p in existing_partitions(connection) if p.upper <= cutoff]
    if not dry_run and old:
        for partition in old:
            connection.execute(sa.text(f'DROP TABLE "{partition.name}"'))
        _move_floor(connection, max(p.upper for p in old))
    return [p.name for p in old]


class PartitionKeeper:
    """Remembers which partitions exist so a batch pays for DDL only when a month is new."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._known: set[datetime] = set()

    def ensure(self, months: Iterable[datetime]) -> list[str]:
        missing = set(months) - self._known
        if not missing:
            return []
        # Its own short transaction, before the batch's: DDL on the parent must not run while
        # this process holds the batch lock shared.
        with self._engine.begin() as connection:
            created = create_partitions(connection, missing)
        self._known |= missing
        return created

    def forget(self) -> None:
        self._known.clear()


def maintain_ledger(
    engine: Engine, now: datetime, *, cutoff: datetime | None, dry_run: bool = False
) -> tuple[list[str], list[str]]:
    """Create this and next month's partitions ahead of time; drop those ending by `cutoff`
    (from prune_cutoff; None when the backlog is unknown: drop nothing)."""
    month = month_start(now)
    created: list[str] = []
    dropped: list[str] = []
    with engine.begin() as connection:
        if not dry_run:
            created = create_partitions(connection, {month, next_month(month)})
        if cutoff is not None:
            dropped = drop_partitions_before(connection, cutoff, dry_run=dry_run)
    return created, dropped
