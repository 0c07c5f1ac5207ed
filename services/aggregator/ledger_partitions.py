"""The ledger's monthly partitions: which exist, creating the ones a batch needs, dropping the old.

Partitions are by event time, one calendar month (UTC) each, so the lateness horizon (35 days plus
the grace) spans two or three of them and the dedupe lookup probes only those. Pruning drops whole
partitions whose upper bound is behind the cutoff; an event older than the cutoff is sent to the
DLQ rather than counted, so a dropped partition is never needed again. Who prunes: every aggregator
instance hourly (harmless when several do), and `meterline aggregate prune-ledger` on demand.
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


def ledger_cutoff(now: datetime, settings: Settings) -> datetime:
    """The oldest event time the ledger still answers for: the horizon plus a grace for lag."""
    return now - settings.lateness_horizon - timedelta(hours=settings.ledger_grace_hours)


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
            found.append(Partition(name, datetime.strptime(match[1], "%Y%m%d").replace(tzinfo=UTC)))
    return sorted(found, key=lambda p: p.month)


def create_partitions(connection: Connection, months: Iterable[datetime]) -> list[str]:
    """Create the missing monthly partitions; the caller's transaction holds the exclusive lock."""
    lock_exclusive(connection)
    have = {p.month for p in existing_partitions(connection)}
    created = []
    for month in sorted(set(months) - have):
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
    """Drop every partition whose whole range is older than `cutoff`."""
    lock_exclusive(connection)
    old = [p for p in existing_partitions(connection) if p.upper <= cutoff]
    if not dry_run:
        for partition in old:
            connection.execute(sa.text(f'DROP TABLE "{partition.name}"'))
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
    engine: Engine, settings: Settings, now: datetime, *, dry_run: bool = False
) -> tuple[list[str], list[str]]:
    """Create this and next month's partitions ahead of time; drop those past the cutoff."""
    month = month_start(now)
    created: list[str] = []
    with engine.begin() as connection:
        if not dry_run:
            created = create_partitions(connection, {month, next_month(month)})
        dropped = drop_partitions_before(connection, ledger_cutoff(now, settings), dry_run=dry_run)
    return created, dropped
