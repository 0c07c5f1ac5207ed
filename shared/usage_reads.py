"""What GET /v1/usage reads: plain metrics from usage_records, metered metrics from their
meter windows (each aggregated as its meter says, grouped and filtered by dimensions)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from shared.errors import InvalidInput
from shared.meter_usage import query_meter_usage
from shared.meters import MeterDefinition, meters_by_metric
from shared.usage import Granularity, GroupBy, UsageRow, query_usage

PLAIN_GROUPS = ("project", "api_key", "metric")


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
    """Rows ordered by start then metric. Dimensions (in group_by or filters) need a metered
    `metric` that has them; without one, every metric is read, metered ones by their meter."""
    meters = meters_by_metric(connection)
    dimensions = [g for g in group_by if g not in PLAIN_GROUPS]
    if dimensions or filters:
        meter = meters.get(metric) if metric is not None else None
        if meter is None:
            raise InvalidInput(
                "invalid usage query",
                details=["group_by/filter by a dimension: needs metric= naming a metered metric"],
            )
        unknown = [d for d in [*dimensions, *filters] if d not in meter.dimensions]
        if unknown:
            raise InvalidInput(
                "invalid usage query",
                details=[
                    f"{', '.join(sorted(set(unknown)))}: not a dimension of {meter.metric} "
                    f"(its dimensions: {', '.join(meter.dimensions) or 'none'})"
                ],
            )
    chosen: list[MeterDefinition] = (
        [meters[metric]]
        if metric is not None and metric in meters
        else ([] if metric is not None else list(meters.values()))
    )
    rows: list[UsageRow] = []
    if metric is None or metric not in meters:
        plain = [g for g in group_by if g in ("project", "api_key")]
        if len(plain) > 1:
            raise InvalidInput(
                "invalid usage query",
                details=["group_by: project or api_key, not both, for metrics without a meter"],
            )
        rows = [
            row
            for row in query_usage(
                connection,
                organization_id,
                start=start,
                end=end,
                metric=metric,
                group_by=_plain_group(plain),
                granularity=granularity,
                project_id=project_id,
                keys_of_user=keys_of_user,
            )
            if row.metric not in meters
        ]
    for meter in chosen:
        rows += [
            UsageRow(
                start=r.start,
                metric=r.metric,
                project_id=r.project_id,
                api_key_id=r.api_key_id,
                quantity=r.quantity,
                event_count=r.event_count,
                dimensions=r.dimensions if dimensions else None,
            )
            for r in query_meter_usage(
                connection,
                organization_id,
                meter,
                start=start,
                end=end,
                granularity=granularity,
                group_by=group_by,
                filters=filters,
                project_id=project_id,
                keys_of_user=keys_of_user,
            )
        ]
    if not chosen:
        return rows
    return sorted(rows, key=lambda r: (r.start, r.metric or ""))


def _plain_group(plain: list[str]) -> GroupBy | None:
    if not plain:
        return None
    return "project" if plain[0] == "project" else "api_key"
