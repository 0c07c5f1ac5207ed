"""Usage recording and querying over usage_records: set-based, one statement per call."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from shared.events import SUM_CONTEXT
from shared.models import ApiKey
from shared.models.usage import UsageDaily

GroupBy = Literal["project", "api_key", "metric"]
Granularity = Literal["hour", "day", "month"]


@dataclass(frozen=True, slots=True)
class UsageDelta:
    """Quantity and events to add to one window."""

    organization_id: uuid.UUID
    project_id: uuid.UUID | None
    api_key_id: uuid.UUID | None
    metric: str
    window_start: datetime
    window_seconds: int
    quantity: Decimal
    event_count: int


@dataclass(frozen=True, slots=True)
class UsageRow:
    start: datetime
    metric: str | None
    project_id: uuid.UUID | None
    api_key_id: uuid.UUID | None
    quantity: Decimal
    event_count: int
    # A metered metric grouped by dimensions: the group's value of each (None: not carried).
    dimensions: dict[str, str | None] | None = None


@dataclass(frozen=True, slots=True)
class UsageWindow:
    """One usage_records row's identity (NULL project or key included, as NULLS NOT DISTINCT)."""

    organization_id: uuid.UUID
    project_id: uuid.UUID | None
    api_key_id: uuid.UUID | None
    metric: str
    window_start: datetime
    window_seconds: int


# The one statement that writes windows: the aggregator (`+=`), replay (`=`) and tests all go
# through record_usage / set_usage below. The arrays go in PostgreSQL's binary format (`%(...)b`,
# run with exec_driver_sql): an aggregator batch of single events writes a window per event,
# and dumping the arrays as text cost it more than the upsert.
_WINDOW_ROWS = """
    INSERT INTO usage_records AS u
        (id, organization_id, project_id, api_key_id, metric, window_start, window_seconds,
         quantity, event_count)
    SELECT gen_random_uuid(), d.organization_id, d.project_id, d.api_key_id, d.metric,
           d.window_start, d.window_seconds, d.quantity, d.event_count
      FROM unnest(%(organization_id)b::uuid[], %(project_id)b::uuid[], %(api_key_id)b::uuid[],
                  %(metric)b::text[], %(window_start)b::timestamptz[],
                  %(window_seconds)b::integer[], %(quantity)b::numeric[],
                  %(event_count)b::bigint[])
           AS d(organization_id, project_id, api_key_id, metric, window_start, window_seconds,
                quantity, event_count)
    ON CONFLICT (organization_id, project_id, api_key_id, metric, window_start, window_seconds)
"""
_ADD = (
    _WINDOW_ROWS
    + """
    DO UPDATE SET quantity = u.quantity + excluded.quantity,
                  event_count = u.event_count + excluded.event_count,
                  updated_at = now()
    """
)
_SET = (
    _WINDOW_ROWS
    + """
    DO UPDATE SET quantity = excluded.quantity,
                  event_count = excluded.event_count,
                  updated_at = now()
    """
)
_DELETE = """
    DELETE FROM usage_records AS u
     USING unnest(%(organization_id)b::uuid[], %(project_id)b::uuid[], %(api_key_id)b::uuid[],
                  %(metric)b::text[], %(window_start)b::timestamptz[],
                  %(window_seconds)b::integer[])
           AS d(organization_id, project_id, api_key_id, metric, window_start, window_seconds)
     WHERE u.organization_id = d.organization_id
       AND u.project_id IS NOT DISTINCT FROM d.project_id
       AND u.api_key_id IS NOT DISTINCT FROM d.api_key_id
       AND u.metric = d.metric AND u.window_start = d.window_start
       AND u.window_seconds = d.window_seconds
    """


def _driver(connection: Connection | Session) -> Connection:
    return connection.connection() if isinstance(connection, Session) else connection


def merge_deltas(deltas: Iterable[UsageDelta]) -> list[UsageDelta]:
    """One delta per window: ON CONFLICT may not touch the same row twice in one statement."""
    merged: dict[tuple[object, ...], UsageDelta] = {}
    for d in deltas:
        key = (
            d.organization_id,
            d.project_id,
            d.api_key_id,
            d.metric,
            d.window_start,
            d.window_seconds,
        )
        prior = merged.get(key)
        if prior is None:
            merged[key] = d
        else:
            merged[key] = UsageDelta(
                *key,
                quantity=SUM_CONTEXT.add(prior.quantity, d.quantity),
                event_count=prior.event_count + d.event_count,
            )
    return list(merged.values())


def _window_columns(rows: Sequence[UsageDelta | UsageWindow]) -> dict[str, list[object]]:
    return {
        "organization_id": [r.organization_id for r in rows],
        "project_id": [r.project_id for r in rows],
        "api_key_id": [r.api_key_id for r in rows],
        "metric": [r.metric for r in rows],
        "window_start": [r.window_start for r in rows],
        "window_seconds": [r.window_seconds for r in rows],
    }


def _delta_columns(rows: Sequence[UsageDelta]) -> dict[str, list[object]]:
    return {
        **_window_columns(rows),
        "quantity": [r.quantity for r in rows],
        "event_count": [r.event_count for r in rows],
    }


def record_usage(connection: Connection | Session, deltas: Sequence[UsageDelta]) -> int:
    """Add deltas to their windows (`quantity += q, event_count += n`); returns windows touched."""
    rows = merge_deltas(deltas)
    if not rows:
        return 0
    _driver(connection).exec_driver_sql(_ADD, _delta_columns(rows))
    return len(rows)


def set_usage(connection: Connection | Session, totals: Sequence[UsageDelta]) -> int:
    """Set windows to exactly these totals (`quantity = q, event_count = n`), as replay does;
    two totals for one window are merged first. Returns windows written."""
    rows = merge_deltas(totals)
    if not rows:
        return 0
    _driver(connection).exec_driver_sql(_SET, _delta_columns(rows))
    return len(rows)


def delete_usage(connection: Connection | Session, windows: Sequence[UsageWindow]) -> int:
    """Delete these windows (those replay found no events for); returns rows deleted."""
    if not windows:
        return 0
    result = _driver(connection).exec_driver_sql(_DELETE, _window_columns(windows))
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True, slots=True)
class UsageScope:
    """Which of an organization's usage a reader may see: all of it, or only one project's, or
    only what one member's own (user-scoped) keys recorded; both limits may apply at once."""

    organization_id: uuid.UUID
    project_id: uuid.UUID | None = None
    keys_of_user: uuid.UUID | None = None


def query_usage(
    connection: Connection | Session,
    organization_id: uuid.UUID,
    *,
    start: datetime,
    end: datetime,
    metric: str | None = None,
    group_by: GroupBy | Sequence[GroupBy] | None = None,
    granularity: Granularity = "hour",
    project_id: uuid.UUID | None = None,
    keys_of_user: uuid.UUID | None = None,
) -> list[UsageRow]:
    """Totals of one organization in [start, end), bucketed by hour or day; only `project_id`'s
    and only the usage of `keys_of_user`'s keys when those are given (a UsageScope).

    Rows are ordered by start then metric and always split by metric; `group_by` adds the
    project or the key, or both (grouping by metric alone is the default). Daily totals by metric
    read the whole UTC days inside the range from the daily rollup (usage_daily, exact: kept by
    triggers) and only the partial days at its ends from usage_records. The rollup holds no
    project or key, so a scoped read (project_id, keys_of_user) always reads usage_records."""
    scoped = project_id is not None or keys_of_user is not None
    groups = {group_by} if isinstance(group_by, str) else set(group_by or ())
    if granularity == "day" and not groups & {"project", "api_key"} and not scoped:
        return _daily_by_metric(connection, organization_id, start, end, metric)
    return _from_records(
        connection,
        organization_id,
        start,
        end,
        metric,
        group_by,
        granularity,
        project_id=project_id,
        keys_of_user=keys_of_user,
    )


def _whole_days(start: datetime, end: datetime) -> tuple[datetime, datetime] | None:
    """The UTC midnights [first, last) of the whole days inside [start, end), if any."""
    first = _midnight(start)
    if first < start:
        first += timedelta(days=1)
    last = _midnight(end)
    return (first, last) if first < last else None


def _midnight(moment: datetime) -> datetime:
    utc = moment.astimezone(UTC)
    return datetime(utc.year, utc.month, utc.day, tzinfo=UTC)


def _daily_by_metric(
    connection: Connection | Session,
    organization_id: uuid.UUID,
    start: datetime,
    end: datetime,
    metric: str | None,
) -> list[UsageRow]:
    days = _whole_days(start, end)
    if days is None:
        return _from_records(connection, organization_id, start, end, metric, None, "day")
    first, last = days
    rows = [
        UsageRow(datetime.combine(d.day, time(), UTC), d.metric, None, None, d.quantity,
                 d.event_count)
        for d in daily_usage(connection, start=first.date(), end=last.date(), metric=metric,
                             organization_id=organization_id)
    ]  # fmt: skip
    # The partial days at the ends are days of their own: no bucket is in two parts.
    if start < first:
        rows += _from_records(connection, organization_id, start, first, metric, None, "day")
    if last < end:
        rows += _from_records(connection, organization_id, last, end, metric, None, "day")
    return sorted(rows, key=lambda r: (r.start, r.metric or ""))


def _from_records(
    connection: Connection | Session,
    organization_id: uuid.UUID,
    start: datetime,
    end: datetime,
    metric: str | None,
    group_by: GroupBy | Sequence[GroupBy] | None,
    granularity: Granularity,
    *,
    project_id: uuid.UUID | None = None,
    keys_of_user: uuid.UUID | None = None,
) -> list[UsageRow]:
    bucket = sa.func.date_trunc(granularity, sa.column("window_start"), "UTC").label("start")
    groups = {group_by} if isinstance(group_by, str) else set(group_by or ())
    project = sa.column("project_id") if "project" in groups else sa.null()
    api_key = sa.column("api_key_id") if "api_key" in groups else sa.null()
    records = sa.table(
        "usage_records",
        sa.column("organization_id"),
        sa.column("project_id"),
        sa.column("api_key_id"),
        sa.column("metric"),
        sa.column("window_start"),
        sa.column("quantity"),
        sa.column("event_count"),
    )
    query = (
        sa.select(
            bucket,
            records.c.metric,
            project.label("project_id"),
            api_key.label("api_key_id"),
            sa.func.sum(records.c.quantity).label("quantity"),
            sa.func.sum(records.c.event_count).label("event_count"),
        )
        .select_from(records)
        .where(
            records.c.organization_id == organization_id,
            records.c.window_start >= start,
            records.c.window_start < end,
        )
        .group_by(sa.text("1"), records.c.metric)
        .order_by(sa.text("1"), records.c.metric)
    )
    if "project" in groups:
        query = query.group_by(records.c.project_id).order_by(records.c.project_id)
    if "api_key" in groups:
        query = query.group_by(records.c.api_key_id).order_by(records.c.api_key_id)
    if metric is not None:
        query = query.where(records.c.metric == metric)
    if project_id is not None:
        query = query.where(records.c.project_id == project_id)
    if keys_of_user is not None:
        users_keys = sa.select(ApiKey.id).where(
            ApiKey.organization_id == organization_id, ApiKey.user_id == keys_of_user
        )
        query = query.where(records.c.api_key_id.in_(users_keys))
    # A month of hours is thousands of rows: fetched at once and unpacked by position.
    return [
        UsageRow(start_, metric_, project_, key_, Decimal(quantity), int(events))
        for start_, metric_, project_, key_, quantity, events in connection.execute(query).all()
    ]


def usage_totals(
    connection: Connection | Session,
    organization_id: uuid.UUID,
    *,
    start: datetime,
    end: datetime,
    by: Literal["metric", "project", "api_key"] = "metric",
) -> dict[object, Decimal]:
    """Total quantity in [start, end) keyed by metric, project id or key id."""
    column = {"metric": "metric", "project": "project_id", "api_key": "api_key_id"}[by]
    result = connection.execute(
        sa.text(
            f"""
            SELECT {column} AS k, sum(quantity) AS q FROM usage_records
             WHERE organization_id = :org AND window_start >= :start AND window_start < :end
             GROUP BY {column}
            """  # noqa: S608 - column comes from the fixed mapping above
        ),
        {"org": organization_id, "start": start, "end": end},
    )
    return {row.k: Decimal(row.q) for row in result}


@dataclass(frozen=True, slots=True)
class DailyUsage:
    day: date
    metric: str
    quantity: Decimal
    event_count: int


def daily_usage(
    connection: Connection | Session,
    *,
    start: date,
    end: date,
    metric: str | None = None,
    organization_id: uuid.UUID | None = None,
) -> list[DailyUsage]:
    """Totals per UTC day and metric over [start, end), of everyone or one organization."""
    # Only the filters asked for are in the statement: "(:x IS NULL OR column = :x)" would give
    # a prepared statement's generic plan no index to use for one organization.
    daily = UsageDaily.__table__.c
    query = (
        sa.select(
            daily.day,
            daily.metric,
            sa.func.sum(daily.quantity).label("q"),
            sa.func.sum(daily.event_count).label("n"),
        )
        .where(daily.day >= start, daily.day < end)
        .group_by(daily.day, daily.metric)
        .order_by(daily.day, daily.metric)
    )
    if metric is not None:
        query = query.where(daily.metric == metric)
    if organization_id is not None:
        query = query.where(daily.organization_id == organization_id)
    return [DailyUsage(r.day, r.metric, Decimal(r.q), int(r.n)) for r in connection.execute(query)]
