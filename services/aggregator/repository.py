"""SQL of the aggregator and replay: locks, ledger lookups and inserts, the windows a replay reads.

Windows are written by shared.usage (record_usage, set_usage, delete_usage), the one home of
that upsert.

Every function takes a Connection inside the caller's transaction; none commits.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.aggregator.batch import (
    CountableEvent,
    CountedVersion,
    EventKey,
    WindowKey,
    WindowTotal,
)
from services.aggregator.meter_windows import MeterFacts
from shared.db import array_literal, rows_affected

# The usage locks live with every other writer's; the batch and replay take them through here.
from shared.usage_locks import lock_exclusive, lock_shared_for_batch  # noqa: F401


def counted_versions(
    connection: Connection, keys: Iterable[EventKey]
) -> dict[EventKey, CountedVersion]:
    """The version the ledger counted of each (organization, event id) it holds, at any event
    time: a repeat may carry another timestamp. Pruning keeps the partitions few."""
    distinct = set(keys)
    if not distinct:
        return {}
    organizations, event_ids = zip(*distinct, strict=True)
    # Array literals: for a batch's tens of thousands of keys the driver's list adaptation cost
    # more than the lookup (shared.db.array_literal). Each organization spelled once.
    spelled = {organization: str(organization) for organization in set(organizations)}
    rows = connection.execute(
        sa.text(
            "SELECT l.organization_id, l.event_id, l.fingerprint, l.event_time"
            "  FROM usage_event_ledger AS l"
            "  JOIN unnest(CAST(:orgs AS uuid[]), CAST(:ids AS text[]))"
            "       AS b(organization_id, event_id)"
            "    ON l.organization_id = b.organization_id AND l.event_id = b.event_id"
        ),
        {
            "orgs": array_literal(spelled[organization] for organization in organizations),
            "ids": array_literal(event_ids),
        },
    )
    return {(row[0], row[1]): CountedVersion(bytes(row[2]), row[3]) for row in rows}


@dataclass(frozen=True, slots=True)
class References:
    """Which ids of a batch exist, and the organization each project and key belongs to (None:
    a platform key, which writes for the organization ingest resolved from the event)."""

    organizations: frozenset[uuid.UUID]
    project_owner: dict[uuid.UUID, uuid.UUID]
    key_owner: dict[uuid.UUID, uuid.UUID | None]

    def problem(self, event: CountableEvent) -> str | None:
        if event.organization_id not in self.organizations:
            return f"unknown organization {event.organization_id}"
        project = event.event.project_id
        if project is not None and self.project_owner.get(project) != event.organization_id:
            return f"unknown project {project} for organization {event.organization_id}"
        key = event.api_key_id
        if key is not None and (
            key not in self.key_owner or self.key_owner[key] not in (None, event.organization_id)
        ):
            return f"unknown api key {key} for organization {event.organization_id}"
        return None


def existing_references(connection: Connection, events: Sequence[CountableEvent]) -> References:
    organizations = list({e.organization_id for e in events})
    projects = sorted({e.event.project_id for e in events if e.event.project_id is not None})
    keys = sorted({e.api_key_id for e in events if e.api_key_id is not None})
    found_orgs = connection.exec_driver_sql(
        "SELECT id FROM organizations WHERE id = ANY(%(ids)b::uuid[])", {"ids": organizations}
    ).scalars()
    project_owner: dict[uuid.UUID, uuid.UUID] = {}
    if projects:
        rows = connection.execute(
            sa.text(
                "SELECT id, organization_id FROM projects WHERE id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"ids": projects},
        )
        project_owner = {row[0]: row[1] for row in rows}
    key_owner: dict[uuid.UUID, uuid.UUID | None] = {}
    if keys:
        rows = connection.execute(
            sa.text(
                "SELECT id, organization_id FROM api_keys WHERE id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"ids": keys},
        )
        key_owner = {row[0]: row[1] for row in rows}
    return References(frozenset(found_orgs), project_owner, key_owner)


# Parameters in PostgreSQL's binary format (`%(...)b`, run with exec_driver_sql): dumping these
# arrays as text (a regular expression per element, escapes for each dimensions JSON) cost the
# batch more than PostgreSQL's insert of the rows.
_RECORD_EVENTS = (
    "INSERT INTO usage_event_ledger (organization_id, event_id, event_time, fingerprint,"
    "                                metric, quantity, window_seconds, dimensions, meter_value)"
    " SELECT o, i, t, f, m, q, %(window_seconds)b::integer, CAST(d AS jsonb), v"
    "   FROM unnest(%(orgs)b::uuid[], %(ids)b::text[], %(times)b::timestamptz[],"
    "               %(fingerprints)b::bytea[], %(metrics)b::text[], %(quantities)b::numeric[],"
    "               %(dimensions)b::text[], %(values)b::text[]) AS e(o, i, t, f, m, q, d, v)"
    " ON CONFLICT DO NOTHING"
)


def record_events(
    connection: Connection,
    events: Sequence[CountableEvent],
    window_seconds: int,
    facts: Sequence[MeterFacts],
) -> int:
    """Insert the events into the ledger, with what each added to which window size (a usage
    cut's part is computed from them) and, for metered metrics, what a meter piece needs
    (shared.meter_pieces: `facts`, the events' batch_meter_facts); returns how many were new to
    it (the others are left as they are: first accepted wins)."""
    return rows_affected(send_events(connection, events, window_seconds, facts))


def send_events(
    connection: Connection,
    events: Sequence[CountableEvent],
    window_seconds: int,
    facts: Sequence[MeterFacts],
) -> sa.CursorResult[Any] | None:
    """record_events' insert, for a caller that reads how many rows were new later (with
    shared.db.rows_affected, after its pipelined block); None when there is no event."""
    if not events:
        return None
    return connection.exec_driver_sql(
        _RECORD_EVENTS,
        {
            "orgs": [e.organization_id for e in events],
            "ids": [e.event.id for e in events],
            "times": [e.event.timestamp for e in events],
            "fingerprints": [e.fingerprint for e in events],
            "metrics": [e.event.metric for e in events],
            "quantities": [e.event.quantity for e in events],
            "window_seconds": window_seconds,
            "dimensions": [dimensions for dimensions, _ in facts],
            "values": [value for _, value in facts],
        },
    )


def window_totals(
    connection: Connection,
    *,
    start: datetime,
    end: datetime,
    window_seconds: int,
    organization_id: uuid.UUID | None,
    metric: str | None,
) -> dict[WindowKey, WindowTotal]:
    """The usage_records rows with window_start in [start, end), filtered, locked for update."""
    rows = connection.execute(
        sa.text(
            "SELECT organization_id, project_id, api_key_id, metric, window_start,"
            "       quantity, event_count"
            "  FROM usage_records"
            " WHERE window_start >= :start AND window_start < :end"
            "   AND window_seconds = :window_seconds"
            "   AND (CAST(:org AS uuid) IS NULL OR organization_id = CAST(:org AS uuid))"
            "   AND (CAST(:metric AS text) IS NULL OR metric = CAST(:metric AS text))"
            "   FOR UPDATE"
        ),
        {
            "start": start,
            "end": end,
            "window_seconds": window_seconds,
            "org": organization_id,
            "metric": metric,
        },
    )
    return {
        (row[0], row[1], row[2], row[3], row[4]): WindowTotal(Decimal(row[5]), int(row[6]))
        for row in rows
    }


def organization_exists(connection: Connection, organization_id: uuid.UUID) -> bool:
    return bool(
        connection.execute(
            sa.text("SELECT EXISTS (SELECT 1 FROM organizations WHERE id = :id)"),
            {"id": organization_id},
        ).scalar()
    )


def record_replay_run(
    connection: Connection,
    *,
    start: datetime,
    end: datetime,
    organization_id: uuid.UUID | None,
    metric: str | None,
    dry_run: bool,
    records_read: int,
    windows_changed: int,
    changes: list[dict[str, object]],
    finished_at: datetime,
) -> None:
    """One replay_runs row: the range, filters, outcome and per-metric changes of a replay."""
    connection.execute(
        sa.text(
            "INSERT INTO replay_runs (id, range_start, range_end, organization_id, metric, dry_run,"
            "  status, events_read, windows_changed, changes, finished_at)"
            " VALUES (gen_random_uuid(), :start, :end, :org, :metric, :dry_run, :status,"
            "  :read, :changed, CAST(:changes AS jsonb), :now)"
        ),
        {
            "start": start,
            "end": end,
            "org": organization_id,
            "metric": metric,
            "dry_run": dry_run,
            "status": "dry_run" if dry_run else "applied",
            "read": records_read,
            "changed": windows_changed,
            "changes": json.dumps(changes),
            "now": finished_at,
        },
    )
