"""What GET /v1/usage reads: plain metrics from usage_records, metered metrics from their
meter windows (each aggregated as its meter says, grouped and filtered by dimensions).

A dimension a metric's meter does not keep (or any dimension of a metric without a meter) is
unknown for its events: grouping by it shows null, and a filter on it matches nothing. A
dimension no meter (of the asked metric) keeps at all is refused as invalid input, naming it: it
is a typo, not a question with an empty answer.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import cast

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from shared.errors import InvalidInput
from shared.meter_usage import query_meter_usage
from shared.meters import MeterDefinition, meters_by_metric
from shared.usage import Granularity, GroupBy, UsageRow, query_usage

PLAIN_GROUPS = ("project", "api_key", "metric")


def known_dimensions(meters: Iterable[MeterDefinition]) -> list[str]:
    """The dimensions these meters keep, but project, api_key and metric (groups of their own)."""
    return sorted({name for m in meters for name in m.dimensions if name not in PLAIN_GROUPS})


def check_dimensions(
    meters: Iterable[MeterDefinition], metric: str | None, asked: Sequence[tuple[str, str]]
) -> None:
    """InvalidInput naming each asked (field, dimension) that no meter (of `metric`) keeps."""
    if not asked:
        return
    chosen = [m for m in meters if metric is None or m.metric == metric]
    known = known_dimensions(chosen)
    if metric is None:
        scope = "any meter"
    else:
        scope = f"the meter of {metric!r}" if chosen else f"{metric!r}, which has no meter"
    problems = [
        f"{field}: {name!r} is no dimension of {scope} (known: {', '.join(known) or 'none'})"
        for field, name in asked
        if name not in known
    ]
    if problems:
        raise InvalidInput("invalid usage query: " + "; ".join(problems), details=problems)


def read_usage(
    connection: Connection | Session,
    organization_id: uuid.UUID,
    *,
    start: datetime,
    end: datetime,
    metric: str | None,
    group_by: Sequence[str],
    filters: Mapping[str, str],
    granularity: Granularity,
    project_id: uuid.UUID | None = None,
    keys_of_user: uuid.UUID | None = None,
) -> list[UsageRow]:
    """Rows ordered by start then metric: every metric (or `metric`), metered ones by their
    meter, grouped by `group_by` (project, api_key, metric and dimensions)."""
    meters = meters_by_metric(connection)
    dimensions = [g for g in group_by if g not in PLAIN_GROUPS]
    check_dimensions(
        meters.values(),
        metric,
        [("group_by", name) for name in dimensions] + [(f"filter[{n}]", n) for n in filters],
    )
    unknown = dict.fromkeys(dimensions) if dimensions else None
    chosen = [m for m in meters.values() if metric is None or m.metric == metric]
    rows: list[UsageRow] = []
    if not filters and (metric is None or metric not in meters):
        plain = cast(list[GroupBy], [g for g in group_by if g in ("project", "api_key")])
        rows = [
            UsageRow(
                r.start, r.metric, r.project_id, r.api_key_id, r.quantity, r.event_count, unknown
            )
            for r in query_usage(
                connection,
                organization_id,
                start=start,
                end=end,
                metric=metric,
                group_by=plain,
                granularity=granularity,
                project_id=project_id,
                keys_of_user=keys_of_user,
            )
            if r.metric not in meters
        ]
    for meter in chosen:
        if any(name not in meter.dimensions for name in filters):
            continue
        kept = [g for g in group_by if g in PLAIN_GROUPS or g in meter.dimensions]
        rows += [
            UsageRow(
                start=r.start,
                metric=r.metric,
                project_id=r.project_id,
                api_key_id=r.api_key_id,
                quantity=r.quantity,
                event_count=r.event_count,
                dimensions={d: r.dimensions.get(d) for d in dimensions} if dimensions else None,
            )
            for r in query_meter_usage(
                connection,
                organization_id,
                meter,
                start=start,
                end=end,
                granularity=granularity,
                group_by=kept,
                filters=filters,
                project_id=project_id,
                keys_of_user=keys_of_user,
            )
        ]
    if not chosen:
        return rows
    return sorted(rows, key=lambda r: (r.start, r.metric or ""))
