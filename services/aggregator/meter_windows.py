"""The pure core of metered usage: what a batch's events add to each meter window and which
distinct values of a unique_count property each window has seen.

Every aggregation of a window is kept at once (sum, count, max, min, latest), so that any of
them over any range is an aggregate of windows: sums add, max and min compare, and the latest
event is the one with the greatest (timestamp, event id): ties in time go to the greater event
id, compared by code point (PostgreSQL compares it COLLATE "C", the same order). A distinct
count does not add, so unique values are kept per window and counted over the range.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from services.aggregator.batch import CountableEvent
from shared.meter_usage import MeterTotal, MeterUsage, MeterValueKey, MeterWindowKey
from shared.meters import MeterDefinition, dimensions_key


def meter_usage(
    events: Iterable[CountableEvent], meters: Mapping[str, MeterDefinition]
) -> MeterUsage:
    """The meter windows and distinct values of the events of metered metrics (the others are
    usage_records' alone)."""
    windows: dict[MeterWindowKey, MeterTotal] = {}
    values: set[MeterValueKey] = set()
    if not meters:
        return MeterUsage(windows, values)
    for e in events:
        usage = e.event
        meter = meters.get(usage.metric)
        if meter is None:
            continue
        key = (
            e.organization_id,
            usage.project_id,
            e.api_key_id,
            usage.metric,
            dimensions_key(meter.dimension_values(usage.properties)),
            e.window_start,
        )
        total = MeterTotal.of(usage.quantity, usage.timestamp, usage.id)
        prior = windows.get(key)
        windows[key] = total if prior is None else prior.merge(total)
        if meter.property is not None:
            value = usage.properties.get(meter.property)
            if value is not None:
                values.add((*key, value))
    return MeterUsage(windows, values)
