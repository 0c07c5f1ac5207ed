"""Usage cuts: instants at which an organization's usage is split exactly, whatever the window grid.

A subscription's periods start and end (and it is canceled or changes plan) at any second, while
usage_records holds whole windows. A cut at instant c inside a window W keeps one number per
metric and window size: the part of W at or after c (`usage_cut_totals`). Billing then totals
[S, E) as the windows that start in [S, E), plus the part of S's window after S, minus the part of
E's window after E (services/billing/usage_totals.py), so every event lands in the one period its
timestamp falls in and the parts of a window always add up to the window.

Who keeps a cut's totals:
  - registration (billing, before it bills across the cut) computes them from the event ledger
    under the organization's usage lock, so no batch is half applied;
  - from then on every live batch adds the events at or after a cut in the cut's window
    (services/aggregator/service.py), in the transaction of its ledger rows and windows;
  - replay recomputes the cuts of the range it rebuilds from the events it counts.
Usage without ledger content (rows recorded before the ledger kept it, or written to
usage_records directly) is not in any cut total, so it is billed by its window's start, as before.

Meter-priced lines cannot subtract a part (max, latest and distinct counts do not subtract): the
same writers keep the pieces of a cut's meter windows (shared.meter_pieces) beside its totals.

A cut at a UTC midnight lies on a window boundary for every window size (they divide a day):
such cuts split nothing and are never registered.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared.db import array_literal
from shared.events import SUM_CONTEXT
from shared.meter_pieces import recompute_meter_pieces
from shared.usage_locks import lock_shared_for_batch

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY_SECONDS = 86400


@dataclass(frozen=True, slots=True, order=True)
class Cut:
    organization_id: uuid.UUID
    at: datetime


@dataclass(frozen=True, slots=True)
class CutPart:
    """The part of a cut's window at or after the cut, for one metric and window size."""

    metric: str
    window_seconds: int
    quantity: Decimal
    event_count: int


@dataclass(frozen=True, slots=True)
class CutEvent:
    """What a counted event contributes to the cuts in its window."""

    organization_id: uuid.UUID
    timestamp: datetime
    window_start: datetime
    metric: str
    quantity: Decimal


@dataclass(frozen=True, slots=True)
class CutDelta:
    cut: Cut
    metric: str
    window_seconds: int
    quantity: Decimal
    event_count: int


def splits_windows(at: datetime) -> bool:
    """Whether a cut at `at` can fall inside a window of some size (it is not a UTC midnight)."""
    offset = at - EPOCH
    return offset.seconds != 0 or offset.microseconds != 0


def cut_deltas(
    events: Iterable[CutEvent], cuts: Iterable[Cut], window_seconds: int
) -> list[CutDelta]:
    """What these events add to these cuts: each event at or after a cut inside its own window.
    Pure; the cuts are the ones the batch's windows hold (cuts_within_windows)."""
    by_organization: dict[uuid.UUID, list[datetime]] = defaultdict(list)
    for cut in cuts:
        by_organization[cut.organization_id].append(cut.at)
    quantity: dict[tuple[Cut, str], Decimal] = defaultdict(Decimal)
    count: dict[tuple[Cut, str], int] = defaultdict(int)
    for event in events:
        for at in by_organization.get(event.organization_id, ()):
            if event.window_start < at <= event.timestamp:
                key = (Cut(event.organization_id, at), event.metric)
                quantity[key] = SUM_CONTEXT.add(quantity[key], event.quantity)
                count[key] += 1
    return [
        CutDelta(cut, metric, window_seconds, quantity[(cut, metric)], count[(cut, metric)])
        for cut, metric in sorted(quantity)
    ]


# Every aggregator batch asks this for each of its windows, so the arrays go in PostgreSQL's
# binary format (run with exec_driver_sql): dumped as text, they cost more than the query.
_CUTS_WITHIN = (
    "SELECT DISTINCT c.organization_id, c.cut_at FROM usage_cuts AS c"
    " JOIN unnest(%(orgs)b::uuid[], %(starts)b::timestamptz[]) AS w(org, start)"
    "   ON c.organization_id = w.org AND c.cut_at > w.start"
    "  AND c.cut_at < w.start + make_interval(secs => %(window_seconds)b::integer)"
)


def cuts_within_windows(
    connection: Connection, windows: Iterable[tuple[uuid.UUID, datetime]], window_seconds: int
) -> list[Cut]:
    """The registered cuts strictly inside these (organization, window start) windows: usually
    none, and then a batch adds nothing else."""
    distinct = set(windows)  # in no order: the query joins them
    if not distinct:
        return []
    rows = connection.exec_driver_sql(
        _CUTS_WITHIN,
        {
            "orgs": [org for org, _ in distinct],
            "starts": [start for _, start in distinct],
            "window_seconds": window_seconds,
        },
    )
    return [Cut(row[0], row[1]) for row in rows]


_ADD = sa.text(
    "INSERT INTO usage_cut_totals AS t"
    " (organization_id, cut_at, metric, window_seconds, quantity, event_count)"
    " SELECT * FROM unnest(CAST(:orgs AS uuid[]), CAST(:ats AS timestamptz[]),"
    "   CAST(:metrics AS text[]), CAST(:sizes AS integer[]), CAST(:quantities AS numeric[]),"
    "   CAST(:counts AS bigint[]))"
    " ON CONFLICT (organization_id, cut_at, metric, window_seconds) DO UPDATE"
    " SET quantity = t.quantity + excluded.quantity,"
    "     event_count = t.event_count + excluded.event_count, updated_at = now()"
)


def _delta_columns(deltas: Sequence[CutDelta]) -> dict[str, list[object]]:
    return {
        "orgs": [d.cut.organization_id for d in deltas],
        "ats": [d.cut.at for d in deltas],
        "metrics": [d.metric for d in deltas],
        "sizes": [d.window_seconds for d in deltas],
        "quantities": [d.quantity for d in deltas],
        "counts": [d.event_count for d in deltas],
    }


def add_cut_totals(connection: Connection, deltas: Sequence[CutDelta]) -> None:
    """Add a batch's deltas to their cuts (`quantity += q, event_count += n`)."""
    if deltas:
        connection.execute(_ADD, _delta_columns(deltas))


def cuts_between(
    connection: Connection,
    start: datetime,
    end: datetime,
    organization_id: uuid.UUID | None = None,
) -> list[Cut]:
    """The registered cuts in [start, end), of one organization or all."""
    rows = connection.execute(
        sa.text(
            "SELECT organization_id, cut_at FROM usage_cuts"
            " WHERE cut_at >= :start AND cut_at < :end"
            "   AND (CAST(:org AS uuid) IS NULL OR organization_id = CAST(:org AS uuid))"
        ),
        {"start": start, "end": end, "org": organization_id},
    )
    return [Cut(row[0], row[1]) for row in rows]


def replace_cut_totals(
    connection: Connection,
    cuts: Sequence[Cut],
    totals: Sequence[CutDelta],
    *,
    window_seconds: int,
    metric: str | None,
) -> None:
    """Set the totals of these cuts (for one window size, and one metric or all) to exactly
    `totals`, as replay does with the windows it rebuilds."""
    if not cuts:
        return
    connection.execute(
        sa.text(
            "DELETE FROM usage_cut_totals AS t"
            " USING unnest(CAST(:orgs AS uuid[]), CAST(:ats AS timestamptz[])) AS c(org, at)"
            " WHERE t.organization_id = c.org AND t.cut_at = c.at"
            "   AND t.window_seconds = :window_seconds"
            "   AND (CAST(:metric AS text) IS NULL OR t.metric = CAST(:metric AS text))"
        ),
        {
            "orgs": [c.organization_id for c in cuts],
            "ats": [c.at for c in cuts],
            "window_seconds": window_seconds,
            "metric": metric,
        },
    )
    add_cut_totals(connection, totals)


# Events of the ledger at or after each cut, inside the cut's window for their own window size
# (none when the cut is that window's start: the whole window then starts after the cut). A cut
# more than two hours ahead is not looked up: ingest refuses timestamps more than an hour (at most,
# METERLINE_MAX_FUTURE_SECONDS) ahead, so no event can lie at or after it yet.
# The range on event_time lets the planner skip every monthly partition but the cut's.
_FROM_LEDGER = sa.text(
    "SELECT c.org, c.at, l.metric, l.window_seconds, sum(l.quantity), count(*)"
    " FROM (SELECT * FROM unnest(CAST(:orgs AS uuid[]), CAST(:ats AS timestamptz[])) AS u(org, at)"
    "       WHERE u.at <= now() + interval '2 hours') AS c"
    " JOIN usage_event_ledger AS l ON l.organization_id = c.org"
    "  AND l.event_time >= c.at AND l.event_time < c.at + interval '1 day'"
    "  AND l.metric IS NOT NULL"
    "  AND date_bin(make_interval(secs => l.window_seconds), c.at,"
    "      TIMESTAMPTZ '1970-01-01 00:00:00+00') < c.at"
    "  AND l.event_time < date_bin(make_interval(secs => l.window_seconds), c.at,"
    "      TIMESTAMPTZ '1970-01-01 00:00:00+00') + make_interval(secs => l.window_seconds)"
    " GROUP BY c.org, c.at, l.metric, l.window_seconds"
)


def ledger_cut_parts(connection: Connection, cuts: Sequence[Cut]) -> dict[Cut, tuple[CutPart, ...]]:
    """Each cut's parts as the ledger holds them now (read only)."""
    parts: dict[Cut, list[CutPart]] = defaultdict(list)
    if cuts:
        rows = connection.execute(
            _FROM_LEDGER,
            {"orgs": [c.organization_id for c in cuts], "ats": [c.at for c in cuts]},
        )
        for org, at, metric, size, quantity, count in rows:
            parts[Cut(org, at)].append(CutPart(metric, size, Decimal(quantity), int(count)))
    return {cut: tuple(found) for cut, found in parts.items()}


def registered_cut_parts(
    connection: Connection, cuts: Sequence[Cut]
) -> tuple[set[Cut], dict[Cut, tuple[CutPart, ...]]]:
    """Which of these cuts are registered, and the parts of those that are."""
    if not cuts:
        return set(), {}
    columns = {
        "orgs": array_literal(c.organization_id for c in cuts),
        "ats": array_literal(c.at for c in cuts),
    }
    registered = {
        Cut(row[0], row[1])
        for row in connection.execute(
            sa.text(
                "SELECT c.organization_id, c.cut_at FROM usage_cuts AS c"
                " JOIN unnest(CAST(:orgs AS uuid[]), CAST(:ats AS timestamptz[])) AS w(org, at)"
                "   ON c.organization_id = w.org AND c.cut_at = w.at"
            ),
            columns,
        )
    }
    parts: dict[Cut, list[CutPart]] = defaultdict(list)
    rows = connection.execute(
        sa.text(
            "SELECT t.organization_id, t.cut_at, t.metric, t.window_seconds, t.quantity,"
            " t.event_count FROM usage_cut_totals AS t"
            " JOIN unnest(CAST(:orgs AS uuid[]), CAST(:ats AS timestamptz[])) AS w(org, at)"
            "   ON t.organization_id = w.org AND t.cut_at = w.at"
        ),
        columns,
    )
    for org, at, metric, size, quantity, count in rows:
        parts[Cut(org, at)].append(CutPart(metric, size, Decimal(quantity), int(count)))
    return registered, {cut: tuple(found) for cut, found in parts.items()}


def register_cuts(connection: Connection, cuts: Iterable[Cut]) -> list[Cut]:
    """Register the cuts not registered yet, with their totals and the pieces of their meter
    windows (shared.meter_pieces) from the ledger; returns them.

    Under the organizations' usage locks (as a live batch holds them): a batch either committed
    before, and its events are in the ledger read here, or runs after, and sees the cut."""
    wanted = sorted({cut for cut in cuts if splits_windows(cut.at)})
    if not wanted:
        return []
    lock_shared_for_batch(connection, (cut.organization_id for cut in wanted))
    rows = connection.execute(
        sa.text(
            "INSERT INTO usage_cuts (organization_id, cut_at)"
            " SELECT * FROM unnest(CAST(:orgs AS uuid[]), CAST(:ats AS timestamptz[]))"
            " ON CONFLICT DO NOTHING RETURNING organization_id, cut_at"
        ),
        {"orgs": [c.organization_id for c in wanted], "ats": [c.at for c in wanted]},
    )
    new = sorted(Cut(row[0], row[1]) for row in rows)
    parts = ledger_cut_parts(connection, new)
    add_cut_totals(
        connection,
        [
            CutDelta(cut, part.metric, part.window_seconds, part.quantity, part.event_count)
            for cut in new
            for part in parts.get(cut, ())
        ],
    )
    recompute_meter_pieces(connection, new)
    return new


def touch_usage_versions(connection: Connection, organization_ids: Iterable[uuid.UUID]) -> None:
    """Mark these organizations' usage as changed (what usage_records' trigger does for writes
    to windows), for writers that change cut totals alone."""
    orgs = sorted(set(organization_ids))
    if orgs:
        connection.execute(
            sa.text(
                "INSERT INTO usage_versions (organization_id, version)"
                " SELECT o, nextval('usage_version_seq') FROM unnest(CAST(:orgs AS uuid[])) AS o"
                " ON CONFLICT (organization_id) DO UPDATE SET version = excluded.version"
            ),
            {"orgs": orgs},
        )
