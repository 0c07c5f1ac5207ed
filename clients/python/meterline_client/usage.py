"""GET /v1/usage: the query string from typed arguments, the answer as typed rows."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from meterline_client.events import timestamp_text


@dataclass(frozen=True, slots=True)
class UsageRow:
    start: datetime
    metric: str | None
    quantity: Decimal
    event_count: int
    project_id: str | None = None
    api_key_id: str | None = None
    # A metered metric grouped by dimensions: each dimension's value (None: not carried).
    dimensions: dict[str, str | None] | None = None


@dataclass(frozen=True, slots=True)
class UsageReport:
    start: datetime
    end: datetime
    granularity: str
    rows: list[UsageRow]


def usage_params(
    *,
    start: datetime | None,
    end: datetime | None,
    metric: str | None,
    group_by: str | Sequence[str] | None,
    granularity: str,
    filters: Mapping[str, str] | None = None,
) -> dict[str, str]:
    params = {"granularity": granularity}
    if start is not None:
        params["from"] = timestamp_text(start)
    if end is not None:
        params["to"] = timestamp_text(end)
    if metric is not None:
        params["metric"] = metric
    if group_by is not None:
        params["group_by"] = group_by if isinstance(group_by, str) else ",".join(group_by)
    for name, value in (filters or {}).items():
        params[f"filter[{name}]"] = value
    return params


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def parse_usage(content: bytes) -> UsageReport:
    body = json.loads(content)
    return UsageReport(
        start=_instant(body["from"]),
        end=_instant(body["to"]),
        granularity=body["granularity"],
        rows=[
            UsageRow(
                start=_instant(row["start"]),
                metric=row.get("metric"),
                quantity=Decimal(row["quantity"]),
                event_count=int(row["event_count"]),
                project_id=row.get("project_id"),
                api_key_id=row.get("api_key_id"),
                dimensions=row.get("dimensions"),
            )
            for row in body["data"]
        ],
    )
