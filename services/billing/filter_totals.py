"""The quantities of meter-priced lines (prices per dimension filter, and unfiltered prices of
metrics whose meter does not sum): a segment's meter usage of a metric, grouped by dimension
values, then each group given to the first filter its values match (or to the default) and
aggregated as the metric's meter says.

A segment [S, E) takes the meter windows wholly inside it and, of the windows S or E cuts, the
meter pieces that start in [S, E) (shared.meter_pieces), so every event is billed in the segment
its timestamp falls in, for every aggregation. A cut window without complete pieces (rows without
ledger content) is taken by its start, whole or not at all.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.billing.pricing import PricedFilter, filter_label
from shared.meter_pieces import (
    MeterPieces,
    WindowPart,
    dimension_values,
    edge_pieces,
    merge_parts,
    pieces_as_parts,
    segment_parts,
)
from shared.meter_usage import MeterTotal
from shared.meters import MeterDefinition, dimensions_key, meters_by_metric
from shared.usage_cuts import Cut


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


_INSIDE = """
       organization_id = :org AND metric = :metric
   AND window_start >= :start AND window_start < :end
   AND window_start + make_interval(secs => window_seconds) <= :end
"""
# The windows the segment's start or end cuts (a boundary strictly inside them).
_CUT = """
       organization_id = :org AND metric = :metric
   AND window_start > CAST(:start AS timestamptz) - interval '1 day' AND window_start < :end
   AND ((window_start < :start AND :start < window_start + make_interval(secs => window_seconds))
     OR (window_start < :end AND :end < window_start + make_interval(secs => window_seconds)))
"""
_AGGREGATES = """
    sum(quantity), sum(event_count), max(max_quantity), min(min_quantity),
    (array_agg(latest_quantity ORDER BY latest_at DESC, latest_event_id COLLATE "C" DESC))[1],
    max(latest_at),
    (array_agg(latest_event_id ORDER BY latest_at DESC, latest_event_id COLLATE "C" DESC))[1]
"""
_GROUPS = sa.text(
    f"SELECT dimensions, {_AGGREGATES} FROM meter_windows"  # noqa: S608 - fixed fragments
    f" WHERE {_INSIDE} GROUP BY dimensions"
)
_DISTINCT = sa.text(
    f"SELECT DISTINCT dimensions, value FROM meter_values WHERE {_INSIDE}"  # noqa: S608
)
# Cut windows one by one, each summed over its projects and keys (as its pieces are).
_CUT_WINDOWS = sa.text(
    f"SELECT dimensions, window_start, window_seconds, {_AGGREGATES}"  # noqa: S608
    f" FROM meter_windows WHERE {_CUT} GROUP BY dimensions, window_start, window_seconds"
)
_CUT_DISTINCT = sa.text(
    "SELECT DISTINCT dimensions, window_start, window_seconds, value"  # noqa: S608
    f" FROM meter_values WHERE {_CUT}"
)


@dataclass(frozen=True)
class KnownPieces:
    """Which boundaries the meter pieces are split at: the registered cuts and, in a dry run,
    the cuts not registered yet with their windows' pieces computed from the ledger (they stand
    in for the stored pieces of those windows)."""

    registered: frozenset[Cut] = frozenset()
    unregistered: frozenset[Cut] = frozenset()
    from_ledger: MeterPieces = field(default_factory=lambda: MeterPieces({}, set()))

    def split(self, organization_id: uuid.UUID, *instants: datetime) -> frozenset[datetime]:
        cuts = self.registered | self.unregistered
        return frozenset(at for at in instants if Cut(organization_id, at) in cuts)

    def pieces(
        self, connection: Connection, organization_id: uuid.UUID, metric: str,
        start: datetime, end: datetime,
    ) -> list[WindowPart]:  # fmt: skip
        stored = edge_pieces(connection, organization_id, metric, start, end)
        replaced = [c.at for c in self.unregistered if c.organization_id == organization_id]
        if not replaced:
            return stored
        kept = [p for p in stored if not any(p.window_start < at < p.end for at in replaced)]
        return kept + pieces_as_parts(self.from_ledger, organization_id, metric)


def _total(row: Sequence[Any]) -> MeterTotal:
    return MeterTotal(
        Decimal(row[0]), int(row[1]), Decimal(row[2]), Decimal(row[3]), Decimal(row[4]),
        row[5], row[6],
    )  # fmt: skip


def dimension_groups(
    connection: Connection,
    organization_id: uuid.UUID,
    meter: MeterDefinition,
    start: datetime,
    end: datetime,
    known: KnownPieces | None = None,
) -> list[DimensionGroup]:
    """The segment's meter usage of one metric, one group per set of dimension values: the
    windows wholly inside it, and the parts of the windows its boundaries cut (segment_parts)."""
    known = known or KnownPieces()
    params = {"org": organization_id, "metric": meter.metric, "start": start, "end": end}
    distinct_count = meter.aggregation == "unique_count"
    parts: list[WindowPart] = []
    inside_values: dict[str, set[str]] = defaultdict(set)
    if distinct_count:
        for values, value in connection.execute(_DISTINCT, params):
            inside_values[dimensions_key(values)].add(value)
    for row in connection.execute(_GROUPS, params):
        dimensions = dimensions_key(row[0])
        # The windows wholly inside, merged already: one part per set of values, of no window.
        parts.append(
            WindowPart(dimensions, start, 0, start, _total(row[1:]),
                       frozenset(inside_values.get(dimensions, ())))
        )  # fmt: skip
    cut_values: dict[tuple[str, datetime, int], set[str]] = defaultdict(set)
    if distinct_count:
        for values, window, size, value in connection.execute(_CUT_DISTINCT, params):
            cut_values[(dimensions_key(values), window, int(size))].add(value)
    cut_windows = []
    for row in connection.execute(_CUT_WINDOWS, params):
        key = (dimensions_key(row[0]), row[1], int(row[2]))
        cut_windows.append(
            WindowPart(*key, row[1], _total(row[3:]), frozenset(cut_values.get(key, ())))
        )
    if cut_windows:
        pieces = known.pieces(connection, organization_id, meter.metric, start, end)
        parts += segment_parts(
            cut_windows, pieces, start, end, known.split(organization_id, start, end)
        )
    return [
        DimensionGroup(dimension_values(dimensions), total, values)
        for dimensions, (total, values) in sorted(merge_parts(parts).items())
    ]


def filtered_totals(
    connection: Connection,
    organization_id: uuid.UUID,
    start: datetime,
    end: datetime,
    filters: Sequence[PricedFilter],
    known: KnownPieces | None = None,
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
        groups = dimension_groups(connection, organization_id, meter, start, end, known)
        found.update(filter_quantities(groups, meter, its))
    return found


def metered_totals(
    connection: Connection,
    organization_id: uuid.UUID,
    start: datetime,
    end: datetime,
    meters: Sequence[MeterDefinition],
    known: KnownPieces | None = None,
) -> dict[str, Decimal]:
    """The quantities of unfiltered prices of metrics whose meter does not sum (count, max, min,
    latest, unique_count): the meter's aggregation over the segment, not usage_records' sum."""
    found: dict[str, Decimal] = {}
    for meter in meters:
        whole = PricedFilter(meter.metric, None, ())
        groups = dimension_groups(connection, organization_id, meter, start, end, known)
        quantity = filter_quantities(groups, meter, [whole]).get(filter_label(meter.metric, None))
        if quantity is not None:
            found[meter.metric] = quantity
    return found
