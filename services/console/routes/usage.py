"""Usage: totals by organization and metric over days (from the monthly and daily rollups), and
one organization's usage over time by metric, project, key or a meter's dimension, filtered by
dimension values, with charts. One organization's usage is read as GET /v1/usage reads it
(shared.usage_reads.read_usage: plain metrics from usage_records and the daily rollup, metered
ones from their meter windows)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from services.console.charts import Series, line_chart
from services.console.routing import PAGING, Call, Operation, Page, Param, Render
from services.console.schemas import Document, obj
from shared.errors import InvalidInput
from shared.meters import list_meters
from shared.models import ApiKey, Project
from shared.organizations import find_organization
from shared.usage import Granularity
from shared.usage_overview import usage_overview
from shared.usage_reads import check_dimensions, known_dimensions, read_usage

DEFAULT_DAYS = 7
MAX_DAYS = {"hour": 31, "day": 366}

FROM = Param(
    "from", "Range start: RFC 3339, or a date (its UTC midnight); default 7 days ago.", "date-time"
)
TO = Param("to", "Range end, exclusive: RFC 3339 or a date; default now.", "date-time")
METRIC = Param("metric", "Only this metric.")
GROUP_BY = Param(
    "group_by",
    "Split by project or API key as well as metric.",
    enum=("metric", "project", "api_key"),
)
DIMENSION = Param(
    "dimension",
    "Split by this dimension of a meter as well (events of other metrics show none).",
)
FILTER = Param(
    "filter",
    "`filter[<dimension>]=value`: only the usage of metered events that carried this value "
    "(as GET /v1/usage filters).",
    "object",
)
GRANULARITY = Param("granularity", "Bucket size.", enum=("hour", "day"), default="hour")
ORGANIZATION = Param("organization", "Organization id or slug.", location="path", required=True)


def time_range(call: Call, granularity: str) -> tuple[datetime, datetime]:
    """[from, to) with the defaults, refused when empty or longer than the granularity allows
    (an hourly series of years is a mistake, not a page)."""
    end = call.arg("to") or call.now
    start = call.arg("from") or end - timedelta(days=DEFAULT_DAYS)
    if end <= start:
        raise InvalidInput("to: must be after from")
    if end - start > timedelta(days=MAX_DAYS[granularity]):
        raise InvalidInput(
            f"from/to: at most {MAX_DAYS[granularity]} days at {granularity} granularity"
        )
    return start, end


def _days(start: datetime, end: datetime) -> tuple[date, date]:
    """The UTC days that hold [start, end): the rollup's resolution."""
    first = start.astimezone(UTC).date()
    last = (end - timedelta(microseconds=1)).astimezone(UTC).date()
    return first, last + timedelta(days=1)


def _metric(call: Call) -> str | None:
    metric: str | None = call.arg("metric") or None
    return metric


def overview(call: Call) -> Document:
    start, end = time_range(call, "day")
    first, stop = _days(start, end)
    found = usage_overview(
        call.session,
        start=first,
        end=stop,
        now=call.now,
        metric=_metric(call),
        limit=call.arg("limit"),
        offset=call.arg("offset"),
    )
    return {
        "from": datetime.combine(first, datetime.min.time(), UTC),
        "to": datetime.combine(stop, datetime.min.time(), UTC),
        "total": found.total,
        "limit": call.arg("limit"),
        "offset": call.arg("offset"),
        "items": [
            {
                "organization_id": r.organization_id,
                "organization_slug": r.organization_slug,
                "metric": r.metric,
                "quantity": r.quantity,
                "event_count": r.event_count,
            }
            for r in found.items
        ],
        "daily": [
            {
                "day": d.day.isoformat(),
                "metric": d.metric,
                "quantity": d.quantity,
                "event_count": d.event_count,
            }
            for d in found.daily
        ],
    }


def _check_dimensions(
    call: Call, metric: str | None, dimension: str | None, filters: dict[str, str]
) -> None:
    """InvalidInput naming each asked dimension that no meter (of `metric`) keeps, by the
    console's own field names."""
    asked = ([("dimension", dimension)] if dimension else []) + [
        (f"filter[{name}]", name) for name in filters
    ]
    if asked:
        check_dimensions(list_meters(call.session), metric, asked)


def organization_usage(call: Call) -> Document:
    found = find_organization(call.session, call.path["organization"])
    granularity: Granularity = call.arg("granularity") or "hour"
    start, end = time_range(call, granularity)
    group_by = call.arg("group_by")
    dimension: str | None = call.arg("dimension") or None
    filters: dict[str, str] = call.arg("filter") or {}
    _check_dimensions(call, _metric(call), dimension, filters)
    groups = [group_by] if group_by in ("project", "api_key") else []
    rows = read_usage(
        call.session,
        found.id,
        start=start,
        end=end,
        metric=_metric(call),
        group_by=groups + ([dimension] if dimension else []),
        filters=filters,
        granularity=granularity,
    )
    return {
        "organization_id": found.id,
        "organization_slug": found.slug,
        "from": start,
        "to": end,
        "granularity": granularity,
        "group_by": group_by or "metric",
        "dimension": dimension,
        "filters": filters,
        "data": [
            {
                "start": r.start,
                "metric": r.metric,
                "project_id": r.project_id,
                "api_key_id": r.api_key_id,
                "dimensions": r.dimensions,
                "quantity": r.quantity,
                "event_count": r.event_count,
            }
            for r in rows
        ],
    }


_ROW = obj(
    {
        "organization_id": {"type": "string", "format": "uuid"},
        "organization_slug": {"type": ["string", "null"]},
        "metric": {"type": "string"},
        "quantity": {"type": "string"},
        "event_count": {"type": "integer"},
    }
)
_DAY = obj(
    {
        "day": {"type": "string", "format": "date"},
        "metric": {"type": "string"},
        "quantity": {"type": "string"},
        "event_count": {"type": "integer"},
    }
)

operations = [
    Operation(
        "GET",
        "/usage",
        "usageByOrganization",
        "Usage totals by organization and metric, and per day",
        "usage",
        overview,
        obj(
            {
                "from": {"type": "string", "format": "date-time"},
                "to": {"type": "string", "format": "date-time"},
                "total": {"type": "integer"},
                "limit": {"type": "integer"},
                "offset": {"type": "integer"},
                "items": {"type": "array", "items": _ROW},
                "daily": {"type": "array", "items": _DAY},
            }
        ),
        params=(FROM, TO, METRIC, *PAGING),
        description="Whole UTC days (the range is widened to them), from the monthly and daily "
        "rollups; at most 366 days.",
    ),
    Operation(
        "GET",
        "/organizations/{organization}/usage",
        "organizationUsage",
        "One organization's usage over time by metric, project or API key",
        "usage",
        organization_usage,
        obj(
            {
                "organization_id": {"type": "string", "format": "uuid"},
                "organization_slug": {"type": "string"},
                "from": {"type": "string", "format": "date-time"},
                "to": {"type": "string", "format": "date-time"},
                "granularity": {"type": "string"},
                "group_by": {"type": "string"},
                "dimension": {"type": ["string", "null"]},
                "filters": {"type": "object", "additionalProperties": {"type": "string"}},
                "data": {"type": "array", "items": {"$ref": "#/components/schemas/UsageRow"}},
            }
        ),
        params=(ORGANIZATION, FROM, TO, METRIC, GROUP_BY, DIMENSION, FILTER, GRANULARITY),
        description="At most 31 days at hour granularity, 366 at day. Read as GET /v1/usage "
        "reads it: a metered metric by its meter's aggregation. 422 names a dimension or "
        "filter no meter (of the metric) keeps.",
    ),
]


def _series(points: dict[str, dict[datetime, Decimal]]) -> list[Series]:
    return [Series(name, sorted(values.items())) for name, values in sorted(points.items())]


def _overview_page(call: Call) -> Render:
    document = overview(call)
    by_metric: dict[str, dict[datetime, Decimal]] = defaultdict(dict)
    for day in document["daily"]:
        moment = datetime.fromisoformat(day["day"]).replace(tzinfo=UTC)
        by_metric[day["metric"]][moment] = day["quantity"]
    chart = line_chart(_series(by_metric), title="Usage per day, all organizations")
    return Render("usage.html", {"usage": document, "chart": chart, "metric": _metric(call) or ""})


def _labels(call: Call, organization_id: uuid.UUID, group_by: str | None) -> dict[Any, str]:
    if group_by == "project":
        return dict(
            call.session.execute(
                sa.select(Project.id, Project.slug).where(
                    Project.organization_id == organization_id
                )
            ).all()
        )
    if group_by == "api_key":
        return dict(
            call.session.execute(
                sa.select(ApiKey.id, ApiKey.prefix).where(ApiKey.organization_id == organization_id)
            ).all()
        )
    return {}


def _organization_page(call: Call) -> Render:
    document = organization_usage(call)
    group_by = document["group_by"]
    labels = _labels(call, document["organization_id"], group_by)
    lines: dict[str, dict[datetime, Decimal]] = defaultdict(dict)
    totals: dict[tuple[str, str], list[Decimal | int]] = {}
    dimension = document["dimension"]
    for row in document["data"]:
        part = row["project_id"] if group_by == "project" else row["api_key_id"]
        parts = [row["metric"]]
        if group_by in ("project", "api_key"):
            parts.append(labels.get(part, "none") if part else "none")
        if dimension:
            value = (row["dimensions"] or {}).get(dimension)
            parts.append(f"{dimension}: {'none' if value is None else value}")
        name = " · ".join(parts)
        lines[name][row["start"]] = lines[name].get(row["start"], Decimal(0)) + row["quantity"]
        total = totals.setdefault((row["metric"], name), [Decimal(0), 0])
        total[0] += row["quantity"]
        total[1] += row["event_count"]
    chart = line_chart(
        _series(lines),
        title=f"Usage per {document['granularity']} of {document['organization_slug']}",
    )
    rows = [(name, metric, q, n) for (metric, name), (q, n) in sorted(totals.items())]
    return Render(
        "organization_usage.html",
        {
            "usage": document,
            "chart": chart,
            "totals": rows,
            "metric": _metric(call) or "",
            "dimensions": known_dimensions(list_meters(call.session)),
            "from_value": document["from"].strftime("%Y-%m-%d"),
            # The field is a date and `to` is exclusive: show the midnight at or after it, so
            # sending the form again keeps today in range.
            "to_value": _days(document["from"], document["to"])[1].isoformat(),
        },
    )


pages = [
    Page("GET", "/usage", _overview_page, params=(FROM, TO, METRIC, *PAGING)),
    Page(
        "GET",
        "/organizations/{organization}/usage",
        _organization_page,
        params=(FROM, TO, METRIC, GROUP_BY, DIMENSION, FILTER, GRANULARITY),
    ),
]
