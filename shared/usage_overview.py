"""Every organization's usage over a range of UTC days (the console's usage overview): its
whole months from usage_monthly and its other days from usage_daily, both exact rollups."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from shared.usage import DailyUsage

# Events are accepted up to 5 minutes ahead of the clock: tomorrow may hold usage, the day after
# may not. Only where reading is cheaper depends on it, never what is read.
_AHEAD = timedelta(days=2)


@dataclass(frozen=True, slots=True)
class OrganizationUsage:
    organization_id: uuid.UUID
    organization_slug: str | None
    metric: str
    quantity: Decimal
    event_count: int


@dataclass(frozen=True, slots=True)
class UsageOverview:
    """Every organization's usage over a range of UTC days: one page of (organization, metric)
    totals, largest first, how many such pairs there are, and the totals per day and metric."""

    items: list[OrganizationUsage]
    total: int
    daily: list[DailyUsage]


@dataclass(frozen=True, slots=True)
class RangeParts:
    """A range of days as rollup rows to sum: whole months, plus (sign 1) or minus (sign -1)
    runs of days [start, end)."""

    months: tuple[date, ...]
    days: tuple[tuple[date, date, int], ...]


def _next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def _days_with_usage(start: date, end: date, today: date) -> int:
    """How many days of [start, end) may hold usage: none after tomorrow."""
    return max(0, (min(end, today + _AHEAD) - start).days)


def range_parts(start: date, end: date, today: date) -> RangeParts:
    """The rollup rows that sum to the days [start, end): each month the range covers whole is
    its usage_monthly row; a month it covers in part is either the days inside, or the month
    minus the days outside, whichever reads fewer days that may hold usage (`today` bounds
    those), so a 30-day range ending today reads a month minus a day or two, plus a few days."""
    months: list[date] = []
    days: list[tuple[date, date, int]] = []
    month = date(start.year, start.month, 1)
    while month < end:
        following = _next_month(month)
        first, last = max(start, month), min(end, following)
        inside = _days_with_usage(first, last, today)
        outside = _days_with_usage(month, first, today) + _days_with_usage(last, following, today)
        if first == month and last == following:
            months.append(month)
        elif 1 + outside < inside:
            months.append(month)
            days += [(a, b, -1) for a, b in ((month, first), (last, following)) if a < b]
        else:
            days.append((first, last, 1))
        month = following
    return RangeParts(tuple(months), tuple(days))


# Both statements cut the page of pairs, and join its slugs, in the same statement. {metric} and
# {d_metric} are empty or a fixed condition (see shared.usage.daily_usage on why not
# "(:metric IS NULL OR ...)").
_PAGE = """
    page AS (
        SELECT organization_id, metric, q, n FROM pairs
         ORDER BY q DESC, organization_id, metric LIMIT :limit OFFSET :offset
    )
    SELECT 'pair' AS kind, p.organization_id, o.slug, p.metric, CAST(NULL AS date) AS day, p.q, p.n
      FROM page AS p LEFT JOIN organizations AS o ON o.id = p.organization_id
    UNION ALL
    SELECT 'total', NULL, NULL, NULL, NULL, NULL, count(*) FROM pairs
    UNION ALL
"""

# A range without a whole month (7 days, say): one pass over the rollup's days of the range (an
# index-only scan of ix_usage_daily_day_totals) feeds both groupings.
_FROM_DAYS = (
    """
    WITH sums AS MATERIALIZED (
        SELECT organization_id, metric, day, GROUPING(organization_id) AS per_day,
               sum(quantity) AS q, sum(event_count) AS n
          FROM usage_daily
         WHERE day >= :start AND day < :end {metric}
         GROUP BY GROUPING SETS ((organization_id, metric), (day, metric))
    ), pairs AS (
        SELECT organization_id, metric, q, n FROM sums WHERE per_day = 0
    ),"""  # noqa: S608 - built from the constant fragments here
    + _PAGE
    + """
    SELECT 'day', NULL, NULL, metric, day, q, n FROM sums WHERE per_day = 1
    """
)

# A range with months: the pairs are summed from the months and the signed runs of days
# (daily_rows and the days' signs count the rollup rows inside the range, so a pair with none is
# not listed); the totals per day still read every day of the range from usage_daily.
_FROM_MONTHS = (
    """
    WITH parts AS (
        SELECT organization_id, metric, quantity AS q, event_count AS n, daily_rows AS r
          FROM usage_monthly
         WHERE month = ANY(CAST(:months AS date[])) {metric}
        UNION ALL
        SELECT d.organization_id, d.metric, s.sign * d.quantity, s.sign * d.event_count, s.sign
          FROM unnest(CAST(:day_starts AS date[]), CAST(:day_ends AS date[]),
                      CAST(:signs AS integer[])) AS s(day_start, day_end, sign)
          JOIN usage_daily AS d ON d.day >= s.day_start AND d.day < s.day_end {d_metric}
    ), pairs AS MATERIALIZED (
        SELECT organization_id, metric, sum(q) AS q, sum(n) AS n FROM parts
         GROUP BY organization_id, metric HAVING sum(r) > 0
    ),"""  # noqa: S608 - built from the constant fragments here
    + _PAGE
    + """
    SELECT 'day', NULL, NULL, d.metric, d.day, sum(d.quantity), sum(d.event_count)
      FROM usage_daily AS d WHERE d.day >= :start AND d.day < :end {d_metric}
     GROUP BY d.day, d.metric
    """
)


def usage_overview(
    connection: Connection | Session,
    *,
    start: date,
    end: date,
    now: datetime,
    metric: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> UsageOverview:
    """Usage of every organization over the UTC days [start, end), from the monthly and daily
    rollups, in one statement; `now` only chooses which rollup rows are fewer to read."""
    parts = range_parts(start, end, now.date())
    statement = sa.text(
        (_FROM_MONTHS if parts.months else _FROM_DAYS).format(
            metric="AND metric = :metric" if metric is not None else "",
            d_metric="AND d.metric = :metric" if metric is not None else "",
        )
    )
    result = connection.execute(
        statement,
        {
            "start": start,
            "end": end,
            "months": list(parts.months),
            "day_starts": [a for a, _, _ in parts.days],
            "day_ends": [b for _, b, _ in parts.days],
            "signs": [sign for _, _, sign in parts.days],
            "limit": limit,
            "offset": offset,
        }
        | ({"metric": metric} if metric is not None else {}),
    ).all()
    # A UNION keeps no order: the page's own (largest first; uuids compare as PostgreSQL's do).
    pairs = sorted(
        (r for r in result if r.kind == "pair"),
        key=lambda r: (-Decimal(r.q), r.organization_id, r.metric),
    )
    days = sorted((r for r in result if r.kind == "day"), key=lambda r: (r.day, r.metric))
    total = next((int(r.n) for r in result if r.kind == "total"), 0)
    return UsageOverview(
        [
            OrganizationUsage(r.organization_id, r.slug, r.metric, Decimal(r.q), int(r.n))
            for r in pairs
        ],
        total,
        [DailyUsage(r.day, r.metric, Decimal(r.q), int(r.n)) for r in days],
    )
