"""Meter pieces: the meter windows a usage cut splits, kept per piece so that a meter-priced line
bills every event in the period its timestamp falls in, for every aggregation.

A window that holds registered cuts is also kept (for each metered metric and dimension values,
summed over projects and keys) as pieces [window start or a cut, next cut or window end), each
with every aggregation at once (sum, count, max, min, latest) and, for a unique_count meter, its
distinct values. Max, min, latest and distinct counts do not subtract, so the usage-cut rule
"minus the part after the end" cannot serve them; pieces merge instead (MeterTotal.merge, value
unions): a segment [S, E) is the meter windows wholly inside it plus the pieces of the windows S
or E cuts whose start is in [S, E) (`segment_parts`).

Who keeps the pieces (the same three writers as the usage cuts' totals, shared.usage_cuts):
  - registering a cut recomputes the pieces of its window from the event ledger (which keeps
    each metered event's dimension values and unique_count value), under the usage lock;
  - every live batch adds each metered event in a window with cuts to the piece holding its
    timestamp, in the transaction of its ledger rows and windows (services/aggregator/service.py);
  - replay recomputes the pieces of the windows it rebuilds from the events it counts.
A cut window whose pieces do not hold all of its events (events the ledger counted before it kept
their dimension values, or a boundary that is not a registered cut) is billed by its start.
"""

from __future__ import annotations

import bisect
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared.meter_usage import MERGE_TOTALS, MeterTotal
from shared.meters import dimensions_key

if TYPE_CHECKING:
    from shared.usage_cuts import Cut

PieceKey = tuple[uuid.UUID, str, str, datetime, int, datetime]
"""(organization, metric, dimension values as canonical JSON, window start, window seconds,
piece start)."""


@dataclass(frozen=True, slots=True)
class PieceEvent:
    """What a counted event of a metered metric contributes to a piece."""

    organization_id: uuid.UUID
    metric: str
    dimensions: str
    window_start: datetime
    timestamp: datetime
    event_id: str
    quantity: Decimal
    value: str | None


@dataclass(slots=True)
class MeterPieces:
    """Pieces and their distinct values (the piece's key and one value)."""

    pieces: dict[PieceKey, MeterTotal]
    values: set[tuple[PieceKey, str]]


def piece_start(cuts: Sequence[datetime], window_start: datetime, at: datetime) -> datetime:
    """The start of the piece holding `at`: the last of the window's cuts (sorted) at or before
    it, or the window's start. Pure."""
    index = bisect.bisect_right(cuts, at)
    return cuts[index - 1] if index and cuts[index - 1] > window_start else window_start


def pieces_of(
    events: Iterable[PieceEvent], cuts: Iterable[Cut], window_seconds: int
) -> MeterPieces:
    """What these events add to the pieces of the windows (of `window_seconds`) that hold some
    of these cuts; events in windows without a cut add nothing. Pure."""
    size = timedelta(seconds=window_seconds)
    by_organization: dict[uuid.UUID, list[datetime]] = defaultdict(list)
    for cut in cuts:
        by_organization[cut.organization_id].append(cut.at)
    for sorting in by_organization.values():
        sorting.sort()
    found = MeterPieces({}, set())
    for event in events:
        ats = by_organization.get(event.organization_id, [])
        inside = [at for at in ats if event.window_start < at < event.window_start + size]
        if not inside:
            continue
        start = piece_start(inside, event.window_start, event.timestamp)
        key = (event.organization_id, event.metric, event.dimensions, event.window_start,
               window_seconds, start)  # fmt: skip
        one = MeterTotal.of(event.quantity, event.timestamp, event.event_id)
        prior = found.pieces.get(key)
        found.pieces[key] = one if prior is None else prior.merge(one)
        if event.value is not None:
            found.values.add((key, event.value))
    return found


@dataclass(frozen=True, slots=True)
class WindowPart:
    """A meter window (or a piece of one) of one set of dimension values, summed over projects
    and keys: its totals and, for unique_count meters, its distinct values."""

    dimensions: str
    window_start: datetime
    window_seconds: int
    start: datetime
    total: MeterTotal
    values: frozenset[str] = frozenset()

    @property
    def end(self) -> datetime:
        return self.window_start + timedelta(seconds=self.window_seconds)


def segment_parts(
    windows: Iterable[WindowPart],
    pieces: Iterable[WindowPart],
    start: datetime,
    end: datetime,
    split: frozenset[datetime],
) -> list[WindowPart]:
    """What of these meter windows and pieces a segment [start, end) bills. Pure.

    A window wholly inside is billed whole. A window that `start` or `end` cuts is billed as its
    pieces that start in [start, end) when it is kept in pieces split at that boundary (the
    boundary is in `split`, the registered cuts) and its pieces hold all its events; otherwise by
    its start, whole or not at all (what rows without ledger content keep)."""
    by_window: dict[tuple[str, datetime, int], list[WindowPart]] = defaultdict(list)
    for piece in pieces:
        by_window[(piece.dimensions, piece.window_start, piece.window_seconds)].append(piece)
    billed: list[WindowPart] = []
    for window in windows:
        if window.end <= start or window.window_start >= end:
            continue
        cut_by = [at for at in (start, end) if window.window_start < at < window.end]
        if not cut_by:
            billed.append(window)
            continue
        its = by_window.get((window.dimensions, window.window_start, window.window_seconds), [])
        complete = sum(p.total.event_count for p in its) == window.total.event_count
        if complete and all(at in split for at in cut_by):
            billed.extend(p for p in its if start <= p.start < end)
        elif start <= window.window_start:
            billed.append(window)
    return billed


_PIECE_KEY_COLUMNS = (
    "organization_id, metric, dimensions, window_start, window_seconds, piece_start"
)
_PIECE_ROWS = f"""
    INSERT INTO meter_pieces AS u
        ({_PIECE_KEY_COLUMNS}, quantity, event_count, max_quantity, min_quantity,
         latest_quantity, latest_at, latest_event_id)
    SELECT d.organization_id, d.metric, CAST(d.dimensions AS jsonb), d.window_start,
           d.window_seconds, d.piece_start, d.quantity, d.event_count, d.max_quantity,
           d.min_quantity, d.latest_quantity, d.latest_at, d.latest_event_id
      FROM unnest(CAST(:organization_id AS uuid[]), CAST(:metric AS text[]),
                  CAST(:dimensions AS text[]), CAST(:window_start AS timestamptz[]),
                  CAST(:window_seconds AS integer[]), CAST(:piece_start AS timestamptz[]),
                  CAST(:quantity AS numeric[]), CAST(:event_count AS bigint[]),
                  CAST(:max_quantity AS numeric[]), CAST(:min_quantity AS numeric[]),
                  CAST(:latest_quantity AS numeric[]), CAST(:latest_at AS timestamptz[]),
                  CAST(:latest_event_id AS text[]))
           AS d({_PIECE_KEY_COLUMNS}, quantity, event_count, max_quantity, min_quantity,
                latest_quantity, latest_at, latest_event_id)
    ON CONFLICT ON CONSTRAINT pk_meter_pieces
"""  # noqa: S608 - fixed fragments only
_ADD = sa.text(_PIECE_ROWS + f" DO UPDATE SET {MERGE_TOTALS}")
_INSERT_VALUES = sa.text(
    f"""
    INSERT INTO meter_piece_values ({_PIECE_KEY_COLUMNS}, value)
    SELECT d.organization_id, d.metric, CAST(d.dimensions AS jsonb), d.window_start,
           d.window_seconds, d.piece_start, d.value
      FROM unnest(CAST(:organization_id AS uuid[]), CAST(:metric AS text[]),
                  CAST(:dimensions AS text[]), CAST(:window_start AS timestamptz[]),
                  CAST(:window_seconds AS integer[]), CAST(:piece_start AS timestamptz[]),
                  CAST(:value AS text[]))
           AS d({_PIECE_KEY_COLUMNS}, value)
    ON CONFLICT DO NOTHING
    """  # noqa: S608 - fixed fragments only
)


def _key_columns(keys: Sequence[PieceKey]) -> dict[str, list[Any]]:
    return {
        "organization_id": [k[0] for k in keys],
        "metric": [k[1] for k in keys],
        "dimensions": [k[2] for k in keys],
        "window_start": [k[3] for k in keys],
        "window_seconds": [k[4] for k in keys],
        "piece_start": [k[5] for k in keys],
    }


def add_meter_pieces(connection: Connection, found: MeterPieces) -> None:
    """Add a batch's pieces and distinct values (one statement each, if any)."""
    if found.pieces:
        items = list(found.pieces.items())
        totals = [t for _, t in items]
        connection.execute(
            _ADD,
            {
                **_key_columns([k for k, _ in items]),
                "quantity": [t.quantity for t in totals],
                "event_count": [t.event_count for t in totals],
                "max_quantity": [t.max_quantity for t in totals],
                "min_quantity": [t.min_quantity for t in totals],
                "latest_quantity": [t.latest_quantity for t in totals],
                "latest_at": [t.latest_at for t in totals],
                "latest_event_id": [t.latest_event_id for t in totals],
            },
        )
    if found.values:
        values = sorted(found.values)
        connection.execute(
            _INSERT_VALUES,
            {**_key_columns([k for k, _ in values]), "value": [v for _, v in values]},
        )


def replace_meter_pieces(
    connection: Connection,
    cuts: Sequence[Cut],
    found: MeterPieces,
    *,
    window_seconds: int | None = None,
    metric: str | None = None,
) -> None:
    """Set the pieces of the windows holding these cuts (of one window size, or all; of one
    metric, or all) to exactly `found`."""
    if not cuts:
        return
    for table in ("meter_pieces", "meter_piece_values"):
        connection.execute(
            sa.text(
                f"DELETE FROM {table} AS p"  # noqa: S608 - fixed table names
                " USING unnest(CAST(:orgs AS uuid[]), CAST(:ats AS timestamptz[])) AS c(org, at)"
                " WHERE p.organization_id = c.org AND p.window_start < c.at"
                "   AND c.at < p.window_start + make_interval(secs => p.window_seconds)"
                "   AND (CAST(:size AS integer) IS NULL"
                "        OR p.window_seconds = CAST(:size AS integer))"
                "   AND (CAST(:metric AS text) IS NULL OR p.metric = CAST(:metric AS text))"
            ),
            {
                "orgs": [c.organization_id for c in cuts],
                "ats": [c.at for c in cuts],
                "size": window_seconds,
                "metric": metric,
            },
        )
    add_meter_pieces(connection, found)


# The pieces of the windows holding the given cuts, from the ledger's events of metered metrics
# (those with dimension values), each in its own window size; split at the given cuts and the
# registered ones. The range on event_time lets the planner skip every monthly partition but the
# cuts'; DISTINCT ON keeps an event once when two given cuts share its window.
_FROM_LEDGER = sa.text(
    """
    WITH given AS (
        SELECT * FROM unnest(CAST(:orgs AS uuid[]), CAST(:ats AS timestamptz[])) AS g(org, at)),
    cuts AS (
        SELECT org, at FROM given
        UNION SELECT organization_id, cut_at FROM usage_cuts
         WHERE organization_id = ANY(CAST(:orgs AS uuid[]))),
    events AS (
        SELECT DISTINCT ON (l.organization_id, l.event_id, l.event_time)
               l.organization_id, l.event_id, l.event_time, l.metric, l.quantity,
               l.window_seconds, l.dimensions, l.meter_value,
               date_bin(make_interval(secs => l.window_seconds), l.event_time,
                        TIMESTAMPTZ '1970-01-01 00:00:00+00') AS window_start
          FROM given AS c
          JOIN usage_event_ledger AS l ON l.organization_id = c.org
           AND l.event_time >= c.at - interval '1 day' AND l.event_time < c.at + interval '1 day'
           AND l.dimensions IS NOT NULL
           AND date_bin(make_interval(secs => l.window_seconds), l.event_time,
                        TIMESTAMPTZ '1970-01-01 00:00:00+00')
             = date_bin(make_interval(secs => l.window_seconds), c.at,
                        TIMESTAMPTZ '1970-01-01 00:00:00+00')
           AND date_bin(make_interval(secs => l.window_seconds), c.at,
                        TIMESTAMPTZ '1970-01-01 00:00:00+00') < c.at),
    placed AS (
        SELECT e.*, coalesce(
                   (SELECT max(k.at) FROM cuts AS k
                     WHERE k.org = e.organization_id AND k.at > e.window_start
                       AND k.at <= e.event_time), e.window_start) AS piece_start
          FROM events AS e)
    SELECT organization_id, metric, dimensions, window_start, window_seconds, piece_start,
           sum(quantity), count(*), max(quantity), min(quantity),
           (array_agg(quantity ORDER BY event_time DESC, event_id COLLATE "C" DESC))[1],
           max(event_time),
           (array_agg(event_id ORDER BY event_time DESC, event_id COLLATE "C" DESC))[1],
           array_agg(DISTINCT meter_value) FILTER (WHERE meter_value IS NOT NULL)
      FROM placed
     GROUP BY organization_id, metric, dimensions, window_start, window_seconds, piece_start
    """
)


def ledger_pieces(connection: Connection, cuts: Sequence[Cut]) -> MeterPieces:
    """The pieces of the windows holding these cuts, as the ledger holds their events now (read
    only), split at these cuts and the registered ones."""
    found = MeterPieces({}, set())
    if not cuts:
        return found
    rows = connection.execute(
        _FROM_LEDGER,
        {"orgs": [c.organization_id for c in cuts], "ats": [c.at for c in cuts]},
    )
    for row in rows:
        key = (row[0], row[1], dimensions_key(row[2]), row[3], int(row[4]), row[5])
        found.pieces[key] = MeterTotal(
            Decimal(row[6]), int(row[7]), Decimal(row[8]), Decimal(row[9]), Decimal(row[10]),
            row[11], row[12],
        )  # fmt: skip
        for value in row[13] or ():
            found.values.add((key, value))
    return found


def recompute_meter_pieces(connection: Connection, cuts: Sequence[Cut]) -> None:
    """Set the pieces of the windows holding these (just registered) cuts from the ledger. The
    caller holds the organizations' usage locks, so no batch is half applied."""
    replace_meter_pieces(connection, cuts, ledger_pieces(connection, cuts))


_SEGMENT_PIECES = sa.text(
    """
    SELECT p.dimensions, p.window_start, p.window_seconds, p.piece_start, p.quantity,
           p.event_count, p.max_quantity, p.min_quantity, p.latest_quantity, p.latest_at,
           p.latest_event_id,
           (SELECT array_agg(v.value) FROM meter_piece_values AS v
             WHERE v.organization_id = p.organization_id AND v.metric = p.metric
               AND v.dimensions = p.dimensions AND v.window_start = p.window_start
               AND v.window_seconds = p.window_seconds AND v.piece_start = p.piece_start)
      FROM meter_pieces AS p
     WHERE p.organization_id = :org AND p.metric = :metric
       AND p.window_start > CAST(:start AS timestamptz) - interval '1 day'
       AND p.window_start < :end
       AND ((p.window_start < :start
             AND :start < p.window_start + make_interval(secs => p.window_seconds))
         OR (p.window_start < :end
             AND :end < p.window_start + make_interval(secs => p.window_seconds)))
    """
)


def edge_pieces(
    connection: Connection,
    organization_id: uuid.UUID,
    metric: str,
    start: datetime,
    end: datetime,
) -> list[WindowPart]:
    """The stored pieces of the windows that `start` or `end` cuts."""
    rows = connection.execute(
        _SEGMENT_PIECES, {"org": organization_id, "metric": metric, "start": start, "end": end}
    )
    found = []
    for row in rows:
        total = MeterTotal(
            Decimal(row[4]), int(row[5]), Decimal(row[6]), Decimal(row[7]), Decimal(row[8]),
            row[9], row[10],
        )  # fmt: skip
        values = frozenset(row[11] or ())
        found.append(WindowPart(dimensions_key(row[0]), row[1], int(row[2]), row[3], total, values))
    return found


def pieces_as_parts(
    found: MeterPieces, organization_id: uuid.UUID, metric: str
) -> list[WindowPart]:
    """Pieces computed in memory (a dry run's, from the ledger) in the shape billing reads."""
    values: dict[PieceKey, set[str]] = defaultdict(set)
    for key, value in found.values:
        values[key].add(value)
    return [
        WindowPart(key[2], key[3], key[4], key[5], total, frozenset(values.get(key, ())))
        for key, total in found.pieces.items()
        if key[0] == organization_id and key[1] == metric
    ]


def dimension_values(dimensions: str) -> dict[str, str]:
    """Dimension values back from their canonical JSON text."""
    values: dict[str, str] = json.loads(dimensions)
    return values


def merge_parts(parts: Iterable[WindowPart]) -> dict[str, tuple[MeterTotal, frozenset[str]]]:
    """The parts merged per set of dimension values: every aggregation and the value union."""
    merged: dict[str, tuple[MeterTotal, frozenset[str]]] = {}
    for part in parts:
        prior = merged.get(part.dimensions)
        if prior is None:
            merged[part.dimensions] = (part.total, part.values)
        else:
            merged[part.dimensions] = (prior[0].merge(part.total), prior[1] | part.values)
    return merged
