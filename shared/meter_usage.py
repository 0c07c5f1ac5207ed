"""Writing and reading the usage of metered metrics: meter_windows and meter_values.

The aggregator adds (record_meter_usage), replay sets and deletes (set_meter_windows,
delete_meter_windows, insert/delete_meter_values); every statement is set-based, one per call,
inside the caller's transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from shared.events import SUM_CONTEXT
from shared.meters import MeterDefinition, dimensions_key

MeterWindowKey = tuple[uuid.UUID, uuid.UUID | None, uuid.UUID | None, str, str, datetime]
"""(organization, project, api key, metric, dimension values as canonical JSON, window start)."""

MeterValueKey = tuple[uuid.UUID, uuid.UUID | None, uuid.UUID | None, str, str, datetime, str]
"""A meter window's key and one distinct value of its unique_count property."""


@dataclass(frozen=True, slots=True)
class MeterTotal:
    quantity: Decimal
    event_count: int
    max_quantity: Decimal
    min_quantity: Decimal
    latest_quantity: Decimal
    latest_at: datetime
    latest_event_id: str

    @staticmethod
    def of(quantity: Decimal, at: datetime, event_id: str) -> MeterTotal:
        return MeterTotal(quantity, 1, quantity, quantity, quantity, at, event_id)

    def merge(self, other: MeterTotal) -> MeterTotal:
        later = (other.latest_at, other.latest_event_id) > (self.latest_at, self.latest_event_id)
        return MeterTotal(
            quantity=SUM_CONTEXT.add(self.quantity, other.quantity),
            event_count=self.event_count + other.event_count,
            max_quantity=max(self.max_quantity, other.max_quantity),
            min_quantity=min(self.min_quantity, other.min_quantity),
            latest_quantity=other.latest_quantity if later else self.latest_quantity,
            latest_at=other.latest_at if later else self.latest_at,
            latest_event_id=other.latest_event_id if later else self.latest_event_id,
        )


@dataclass(slots=True)
class MeterUsage:
    """What a set of counted events adds to the meter tables."""

    windows: dict[MeterWindowKey, MeterTotal]
    values: set[MeterValueKey]


_KEY_ARRAYS = """
    unnest(CAST(:organization_id AS uuid[]), CAST(:project_id AS uuid[]),
           CAST(:api_key_id AS uuid[]), CAST(:metric AS text[]), CAST(:dimensions AS text[]),
           CAST(:window_start AS timestamptz[]))
"""
_KEY_COLUMNS = "organization_id, project_id, api_key_id, metric, dimensions, window_start"
_CONFLICT = (
    "ON CONFLICT (organization_id, metric, window_start, window_seconds, project_id, api_key_id,"
    " dimensions)"
)
_WINDOW_ROWS = f"""
    INSERT INTO meter_windows AS u
        (id, {_KEY_COLUMNS}, window_seconds, quantity, event_count, max_quantity, min_quantity,
         latest_quantity, latest_at, latest_event_id)
    SELECT gen_random_uuid(), d.organization_id, d.project_id, d.api_key_id, d.metric,
           CAST(d.dimensions AS jsonb), d.window_start, CAST(:window_seconds AS integer),
           d.quantity, d.event_count, d.max_quantity, d.min_quantity, d.latest_quantity,
           d.latest_at, d.latest_event_id
      FROM unnest(CAST(:organization_id AS uuid[]), CAST(:project_id AS uuid[]),
                  CAST(:api_key_id AS uuid[]), CAST(:metric AS text[]),
                  CAST(:dimensions AS text[]), CAST(:window_start AS timestamptz[]),
                  CAST(:quantity AS numeric[]), CAST(:event_count AS bigint[]),
                  CAST(:max_quantity AS numeric[]), CAST(:min_quantity AS numeric[]),
                  CAST(:latest_quantity AS numeric[]), CAST(:latest_at AS timestamptz[]),
                  CAST(:latest_event_id AS text[]))
           AS d(organization_id, project_id, api_key_id, metric, dimensions, window_start,
                quantity, event_count, max_quantity, min_quantity, latest_quantity, latest_at,
                latest_event_id)
    {_CONFLICT}
"""  # noqa: S608 - fixed fragments only
# The latest event wins by (timestamp, event id), ids compared by code point (COLLATE "C"), as
# services/aggregator/meter_windows.py does in Python.
_LATER = (
    '(excluded.latest_at, excluded.latest_event_id COLLATE "C")'
    ' > (u.latest_at, u.latest_event_id COLLATE "C")'
)
# What an upsert of running totals sets on conflict (the existing row aliased `u`): every
# aggregation merged as MeterTotal.merge does; meter pieces (shared.meter_pieces) merge alike.
MERGE_TOTALS = f"""
                  quantity = u.quantity + excluded.quantity,
                  event_count = u.event_count + excluded.event_count,
                  max_quantity = GREATEST(u.max_quantity, excluded.max_quantity),
                  min_quantity = LEAST(u.min_quantity, excluded.min_quantity),
                  latest_quantity = CASE WHEN {_LATER} THEN excluded.latest_quantity
                                         ELSE u.latest_quantity END,
                  latest_event_id = CASE WHEN {_LATER} THEN excluded.latest_event_id
                                         ELSE u.latest_event_id END,
                  latest_at = GREATEST(u.latest_at, excluded.latest_at)
"""
_ADD_SET = f"DO UPDATE SET {MERGE_TOTALS}, updated_at = now()"
_SET = sa.text(
    _WINDOW_ROWS
    + """
    DO UPDATE SET quantity = excluded.quantity, event_count = excluded.event_count,
                  max_quantity = excluded.max_quantity, min_quantity = excluded.min_quantity,
                  latest_quantity = excluded.latest_quantity, latest_at = excluded.latest_at,
                  latest_event_id = excluded.latest_event_id, updated_at = now()
    """
)
_MATCH_KEY = """
       u.organization_id = d.organization_id
   AND u.project_id IS NOT DISTINCT FROM d.project_id
   AND u.api_key_id IS NOT DISTINCT FROM d.api_key_id
   AND u.metric = d.metric AND u.dimensions = CAST(d.dimensions AS jsonb)
   AND u.window_start = d.window_start AND u.window_seconds = :window_seconds
"""
_DELETE_WINDOWS = sa.text(
    f"DELETE FROM meter_windows AS u USING {_KEY_ARRAYS}"  # noqa: S608 - fixed fragments
    f" AS d({_KEY_COLUMNS}) WHERE {_MATCH_KEY}"
)
_INSERT_VALUES = sa.text(
    f"""
    INSERT INTO meter_values ({_KEY_COLUMNS}, window_seconds, value)
    SELECT d.organization_id, d.project_id, d.api_key_id, d.metric,
           CAST(d.dimensions AS jsonb), d.window_start, CAST(:window_seconds AS integer), d.value
      FROM unnest(CAST(:organization_id AS uuid[]), CAST(:project_id AS uuid[]),
                  CAST(:api_key_id AS uuid[]), CAST(:metric AS text[]),
                  CAST(:dimensions AS text[]), CAST(:window_start AS timestamptz[]),
                  CAST(:value AS text[]))
           AS d({_KEY_COLUMNS}, value)
     -- meter_values has no foreign key: the organizations are locked as a key check would lock
     -- them, so that one deleted meanwhile (its trigger removes its values) leaves no row behind.
     WHERE d.organization_id IN (
           SELECT id FROM organizations
            WHERE id = ANY(CAST(:organization_id AS uuid[])) FOR KEY SHARE)
    ON CONFLICT DO NOTHING
    """  # noqa: S608 - fixed fragments only
)
_DELETE_VALUES = sa.text(
    f"""
    DELETE FROM meter_values AS u
     USING unnest(CAST(:organization_id AS uuid[]), CAST(:project_id AS uuid[]),
                  CAST(:api_key_id AS uuid[]), CAST(:metric AS text[]),
                  CAST(:dimensions AS text[]), CAST(:window_start AS timestamptz[]),
                  CAST(:value AS text[]))
           AS d({_KEY_COLUMNS}, value)
     WHERE {_MATCH_KEY} AND u.value = d.value
    """  # noqa: S608 - fixed fragments only
)


def _key_columns(keys: Sequence[MeterWindowKey | MeterValueKey]) -> dict[str, list[Any]]:
    return {
        "organization_id": [k[0] for k in keys],
        "project_id": [k[1] for k in keys],
        "api_key_id": [k[2] for k in keys],
        "metric": [k[3] for k in keys],
        "dimensions": [k[4] for k in keys],
        "window_start": [k[5] for k in keys],
    }


def _window_columns(
    windows: Sequence[tuple[MeterWindowKey, MeterTotal]], window_seconds: int
) -> dict[str, Any]:
    totals = [t for _, t in windows]
    return {
        **_key_columns([k for k, _ in windows]),
        "window_seconds": window_seconds,
        "quantity": [t.quantity for t in totals],
        "event_count": [t.event_count for t in totals],
        "max_quantity": [t.max_quantity for t in totals],
        "min_quantity": [t.min_quantity for t in totals],
        "latest_quantity": [t.latest_quantity for t in totals],
        "latest_at": [t.latest_at for t in totals],
        "latest_event_id": [t.latest_event_id for t in totals],
    }


def _value_columns(values: Sequence[MeterValueKey], window_seconds: int) -> dict[str, Any]:
    return {
        **_key_columns(values),
        "window_seconds": window_seconds,
        "value": [v[6] for v in values],
    }


# The aggregator's one statement per batch: the windows' upsert and the insert of their distinct
# values. Each value names its window by position (`value_window`, 1-based) instead of repeating
# the window's six key columns, and the parameters go in PostgreSQL's binary format (`%(...)b`):
# dumping the arrays as text (a regular expression per element, escapes for the JSON of the
# dimensions) cost the batch more than PostgreSQL's own work on the rows. `d` is MATERIALIZED so
# that each window's dimensions are cast to JSONB once, for its upsert and its values alike.
_RECORD = f"""
    WITH d AS MATERIALIZED (
        SELECT organization_id, project_id, api_key_id, metric,
               CAST(dimensions AS jsonb) AS dimensions, window_start, quantity, event_count,
               max_quantity, min_quantity, latest_quantity, latest_at, latest_event_id, n
          FROM unnest(
            %(organization_id)b::uuid[], %(project_id)b::uuid[], %(api_key_id)b::uuid[],
            %(metric)b::text[], %(dimensions)b::text[], %(window_start)b::timestamptz[],
            %(quantity)b::numeric[], %(event_count)b::bigint[], %(max_quantity)b::numeric[],
            %(min_quantity)b::numeric[], %(latest_quantity)b::numeric[],
            %(latest_at)b::timestamptz[], %(latest_event_id)b::text[])
        WITH ORDINALITY AS d(organization_id, project_id, api_key_id, metric, dimensions,
                             window_start, quantity, event_count, max_quantity, min_quantity,
                             latest_quantity, latest_at, latest_event_id, n)
    ), windows AS (
        INSERT INTO meter_windows AS u
            (id, organization_id, project_id, api_key_id, metric, dimensions, window_start,
             window_seconds, quantity, event_count, max_quantity, min_quantity,
             latest_quantity, latest_at, latest_event_id)
        SELECT gen_random_uuid(), d.organization_id, d.project_id, d.api_key_id, d.metric,
               d.dimensions, d.window_start, %(window_seconds)b::integer,
               d.quantity, d.event_count, d.max_quantity, d.min_quantity, d.latest_quantity,
               d.latest_at, d.latest_event_id
          FROM d
    {_CONFLICT}
    {_ADD_SET}
    )
    INSERT INTO meter_values (organization_id, project_id, api_key_id, metric, dimensions,
                              window_start, window_seconds, value)
    SELECT d.organization_id, d.project_id, d.api_key_id, d.metric, d.dimensions,
           d.window_start, %(window_seconds)b::integer, v.value
      FROM unnest(%(value_window)b::bigint[], %(value)b::text[]) AS v(n, value)
      JOIN d ON d.n = v.n
    ON CONFLICT DO NOTHING
"""  # noqa: S608 - fixed fragments only


def record_meter_usage(connection: Connection, usage: MeterUsage, window_seconds: int) -> None:
    """Add a batch's meter windows and distinct values, in one statement (none if no window)."""
    if not usage.windows:
        return
    windows = list(usage.windows.items())
    position = {key: n for n, (key, _) in enumerate(windows, start=1)}
    values = [(position[value[:6]], value[6]) for value in usage.values]
    connection.exec_driver_sql(
        _RECORD,
        {
            **_window_columns(windows, window_seconds),
            "value_window": [n for n, _ in values],
            "value": [v for _, v in values],
        },
    )


def set_meter_windows(
    connection: Connection,
    windows: Sequence[tuple[MeterWindowKey, MeterTotal]],
    window_seconds: int,
) -> None:
    if windows:
        connection.execute(_SET, _window_columns(windows, window_seconds))


def delete_meter_windows(
    connection: Connection, keys: Sequence[MeterWindowKey], window_seconds: int
) -> None:
    if keys:
        connection.execute(
            _DELETE_WINDOWS, {**_key_columns(keys), "window_seconds": window_seconds}
        )


def insert_meter_values(
    connection: Connection, values: Sequence[MeterValueKey], window_seconds: int
) -> None:
    if values:
        connection.execute(_INSERT_VALUES, _value_columns(values, window_seconds))


def delete_meter_values(
    connection: Connection, values: Sequence[MeterValueKey], window_seconds: int
) -> None:
    if values:
        connection.execute(_DELETE_VALUES, _value_columns(values, window_seconds))


def meter_usage_between(
    connection: Connection | Session,
    *,
    start: datetime,
    end: datetime,
    window_seconds: int,
    organization_id: uuid.UUID | None,
    metric: str | None,
    lock: bool = False,
) -> MeterUsage:
    """The meter windows and distinct values with window_start in [start, end), filtered (and
    locked for update when `lock`, as replay reads them)."""
    where = (
        " WHERE window_start >= :start AND window_start < :end"
        "   AND window_seconds = :window_seconds"
        "   AND (CAST(:org AS uuid) IS NULL OR organization_id = CAST(:org AS uuid))"
        "   AND (CAST(:metric AS text) IS NULL OR metric = CAST(:metric AS text))"
        + (" FOR UPDATE" if lock else "")
    )
    params = {
        "start": start,
        "end": end,
        "window_seconds": window_seconds,
        "org": organization_id,
        "metric": metric,
    }
    windows: dict[MeterWindowKey, MeterTotal] = {}
    for row in connection.execute(
        sa.text(
            f"SELECT {_KEY_COLUMNS}, quantity, event_count, max_quantity, min_quantity,"  # noqa: S608
            f"       latest_quantity, latest_at, latest_event_id FROM meter_windows{where}"
        ),
        params,
    ):
        key = (row[0], row[1], row[2], row[3], dimensions_key(row[4]), row[5])
        windows[key] = MeterTotal(
            Decimal(row[6]), int(row[7]), Decimal(row[8]), Decimal(row[9]), Decimal(row[10]),
            row[11], row[12],
        )  # fmt: skip
    values: set[MeterValueKey] = {
        (row[0], row[1], row[2], row[3], dimensions_key(row[4]), row[5], row[6])
        for row in connection.execute(
            sa.text(f"SELECT {_KEY_COLUMNS}, value FROM meter_values{where}"),  # noqa: S608
            params,
        )
    }
    return MeterUsage(windows, values)


@dataclass(frozen=True, slots=True)
class MeterUsageRow:
    """One bucket of a metered metric, per group: its aggregation's value over the bucket."""

    start: datetime
    metric: str
    project_id: uuid.UUID | None
    api_key_id: uuid.UUID | None
    dimensions: dict[str, str | None]
    quantity: Decimal
    event_count: int


# Each aggregation over a bucket's windows; `latest` takes the window whose latest event is the
# greatest (timestamp, event id).
_AGGREGATE = {
    "sum": "sum(quantity)",
    "count": "sum(event_count)",
    "max": "max(max_quantity)",
    "min": "min(min_quantity)",
    "latest": '(array_agg(latest_quantity ORDER BY latest_at DESC, latest_event_id COLLATE "C"'
    " DESC))[1]",
}


def query_meter_usage(
    connection: Connection | Session,
    organization_id: uuid.UUID,
    meter: MeterDefinition,
    *,
    start: datetime,
    end: datetime,
    granularity: str = "hour",
    group_by: Sequence[str] = (),
    filters: Mapping[str, str] | None = None,
    project_id: uuid.UUID | None = None,
    keys_of_user: uuid.UUID | None = None,
) -> list[MeterUsageRow]:
    """A metered metric's usage in [start, end), per bucket (hour, day or month) and group
    (`group_by`: its dimensions, "project", "api_key"), only the windows whose dimension values
    match `filters`. Each value is the meter's aggregation over the bucket's windows, exact: a
    unique_count counts the distinct values of the bucket, not the sum of its windows' counts."""
    dimensions = [g for g in group_by if g not in ("project", "api_key", "metric")]
    columns = ["date_trunc(:granularity, window_start, 'UTC')"]
    columns.append("project_id" if "project" in group_by else "NULL::uuid")
    columns.append("api_key_id" if "api_key" in group_by else "NULL::uuid")
    columns += [f"dimensions ->> :dimension_{i}" for i in range(len(dimensions))]
    params: dict[str, Any] = {
        "org": organization_id,
        "metric": meter.metric,
        "start": start,
        "end": end,
        "granularity": granularity,
        **{f"dimension_{i}": name for i, name in enumerate(dimensions)},
    }
    where = [
        "organization_id = :org",
        "metric = :metric",
        "window_start >= :start",
        "window_start < :end",
    ]
    if filters:
        where.append("dimensions @> CAST(:filters AS jsonb)")
        params["filters"] = json.dumps(dict(filters))
    if project_id is not None:
        where.append("project_id = :project_id")
        params["project_id"] = project_id
    if keys_of_user is not None:
        where.append(
            "api_key_id IN (SELECT id FROM api_keys"
            " WHERE organization_id = :org AND user_id = :keys_of_user)"
        )
        params["keys_of_user"] = keys_of_user
    group = ", ".join(str(i + 1) for i in range(len(columns)))
    select = ", ".join(columns)
    condition = " AND ".join(where)
    aggregate = _AGGREGATE.get(meter.aggregation, "sum(quantity)")
    windows = connection.execute(
        sa.text(
            f"SELECT {select}, {aggregate}, sum(event_count) FROM meter_windows"  # noqa: S608
            f" WHERE {condition} GROUP BY {group}"
        ),
        params,
    ).all()
    distinct: dict[tuple[Any, ...], int] = {}
    if meter.aggregation == "unique_count":
        distinct = {
            tuple(row[:-1]): int(row[-1])
            for row in connection.execute(
                sa.text(
                    f"SELECT {select}, count(DISTINCT value) FROM meter_values"  # noqa: S608
                    f" WHERE {condition} GROUP BY {group}"
                ),
                params,
            )
        }
    rows = []
    width = len(columns)
    for row in windows:
        group_key = tuple(row[:width])
        quantity = (
            Decimal(distinct.get(group_key, 0))
            if meter.aggregation == "unique_count"
            else Decimal(row[width])
        )
        rows.append(
            MeterUsageRow(
                start=row[0],
                metric=meter.metric,
                project_id=row[1],
                api_key_id=row[2],
                dimensions={name: row[3 + i] for i, name in enumerate(dimensions)},
                quantity=quantity,
                event_count=int(row[width + 1]),
            )
        )
    return sorted(
        rows,
        key=lambda r: (
            r.start,
            str(r.project_id or ""),
            str(r.api_key_id or ""),
            tuple((v is None, v or "") for v in r.dimensions.values()),
        ),
    )
