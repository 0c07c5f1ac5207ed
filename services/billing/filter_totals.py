"""The quantities of prices per dimension filter: a segment's meter windows of a metric, grouped
by dimension values, then each group's windows given to the first filter its values match
(or to the default) and aggregated as the metric's meter says.

A segment takes the windows that start in it (no usage cut splits a meter window: a boundary
off the window grid bills the window on the side its start is on).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.billing.pricing import PricedFilter, filter_label
from shared.meter_usage import MeterTotal
from shared.meters import MeterDefinition, meters_by_metric


@dataclass(frozen=True, slots=True)
class DimensionGroup:
    """One set of dimension values over a segment: its windows merged, its distinct values."""

    values: dict[str, str]
    total: MeterTotal
    distinct: frozenset[str]


def filter_quantities(
    groups: Iterable[DimensionGroup], meter: MeterDefinition, filters: Sequence[PricedFilter]
) -> dict[str, Decimal]:
    """Each priced filter's quantity (by filter_label) under the meter's aggregation; a filter
    no group reaches is absent. Pure."""
    merged: dict[str, MeterTotal] = {}
    distinct: dict[str, set[str]] = {}
    for group in groups:
        chosen = next((f for f in filters if f.takes(group.values)), None)
        if chosen is None:
            continue
        label = filter_label(chosen.metric, chosen.match)
        prior = merged.get(label)
        merged[label] = group.total if prior is None else prior.merge(group.total)
        distinct.setdefault(label, set()).update(group.distinct)
    return {label: _aggregate(total, distinct[label], meter) for label, total in merged.items()}


def _aggregate(total: MeterTotal, distinct: set[str], meter: MeterDefinition) -> Decimal:
    match meter.aggregation:
        case "count":
            return Decimal(total.event_count)
        case "max":
            return total.max_quantity
        case "min":
            return total.min_quantity
        case "latest":
            return total.latest_quantity
        case "unique_count":
            return Decimal(len(distinct))
        case _:
            return total.quantity


_GROUPS = sa.text(
    """
    SELECT dimensions, sum(quantity), sum(event_count), max(max_quantity), min(min_quantity),
           (array_agg(latest_quantity ORDER BY latest_at DESC,
                      latest_event_id COLLATE "C" DESC))[1],
           max(latest_at),
           (array_agg(latest_event_id ORDER BY latest_at DESC,
                      latest_event_id COLLATE "C" DESC))[1]
      FROM meter_windows
     WHERE organization_id = :org AND metric = :metric
       AND window_start >= :start AND window_start < :end
     GROUP BY dimensions
    """
)
_DISTINCT = sa.text(
    """
    SELECT DISTINCT dimensions, value FROM meter_values
     WHERE organization_id = :org AND metric = :metric
       AND window_start >= :start AND window_start < :end
    """
)


def dimension_groups(
    connection: Connection,
    organization_id: uuid.UUID,
    meter: MeterDefinition,
    start: datetime,
    end: datetime,
) -> list[DimensionGroup]:
    """The segment's meter windows of one metric, one group per set of dimension values."""
    params = {"org": organization_id, "metric": meter.metric, "start": start, "end": end}
    distinct: dict[str, set[str]] = {}
    if meter.aggregation == "unique_count":
        for values, value in connection.execute(_DISTINCT, params):
            distinct.setdefault(_key(values), set()).add(value)
    groups = []
    for row in connection.execute(_GROUPS, params):
        total = MeterTotal(
            Decimal(row[1]), int(row[2]), Decimal(row[3]), Decimal(row[4]), Decimal(row[5]),
            row[6], row[7],
        )  # fmt: skip
        groups.append(
            DimensionGroup(dict(row[0]), total, frozenset(distinct.get(_key(row[0]), ())))
        )
    return groups


def _key(values: Mapping[str, str]) -> str:
    return repr(sorted(values.items()))


def filtered_totals(
    connection: Connection,
    organization_id: uuid.UUID,
    start: datetime,
    end: datetime,
    filters: Sequence[PricedFilter],
) -> dict[str, Decimal]:
    """The quantities of the priced filters of one segment, over every metric they price."""
    by_metric: dict[str, list[PricedFilter]] = {}
    for priced in filters:
        by_metric.setdefault(priced.metric, []).append(priced)
    meters = meters_by_metric(connection)
    found: dict[str, Decimal] = {}
    for metric, its in sorted(by_metric.items()):
        meter = meters.get(metric)
        if meter is None:
            continue  # no meter keeps its dimension values: nothing to price per filter
        groups = dimension_groups(connection, organization_id, meter, start, end)
        found.update(filter_quantities(groups, meter, its))
    return found


def metered_totals(
    connection: Connection,
    organization_id: uuid.UUID,
    start: datetime,
    end: datetime,
    meters: Sequence[MeterDefinition],
) -> dict[str, Decimal]:
    """The quantities of unfiltered prices of metrics whose meter does not sum (count, max, min,
    latest, unique_count): the meter's aggregation over the segment, not usage_records' sum."""
    found: dict[str, Decimal] = {}
    for meter in meters:
        whole = PricedFilter(meter.metric, None, ())
        groups = dimension_groups(connection, organization_id, meter, start, end)
        quantity = filter_quantities(groups, meter, [whole]).get(filter_label(meter.metric, None))
        if quantity is not None:
            found[meter.metric] = quantity
    return found
