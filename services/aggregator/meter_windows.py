"""The pure core of metered usage: what a batch's events add to each meter window and which
distinct values of a unique_count property each window has seen.

Every aggregation of a window is kept at once (sum, count, max, min, latest), so that any of
them over any range is an aggregate of windows: sums add, max and min compare, and the latest
event is the one with the greatest (timestamp, event id): ties in time go to the greater event
id, compared by code point (PostgreSQL compares it COLLATE "C", the same order). A distinct
count does not add, so unique values are kept per window and counted over the range.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from services.aggregator.batch import CountableEvent
from shared.events import SUM_CONTEXT, UsageEvent
from shared.meter_pieces import PieceEvent
from shared.meter_usage import MeterTotal, MeterUsage, MeterValueKey, MeterWindowKey
from shared.meters import MeterDefinition, dimensions_key

# What the ledger keeps of an event for its meter (meter_facts): its dimension values' canonical
# JSON and its unique_count property value; (None, None) for an event of no meter.
MeterFacts = tuple[str | None, str | None]


class DimensionSpellings:
    """The canonical JSON of events' dimension values (dimensions_key), spelled once per metric
    and set of values: a batch repeats few, and spelling one costs more than looking it up."""

    def __init__(self) -> None:
        self._known: dict[tuple[str | None, ...], str] = {}

    def of(self, metric: str, meter: MeterDefinition, properties: Mapping[str, str]) -> str:
        # A property's value is never None, so None stands for a missing dimension here.
        seen = (metric, *map(properties.get, meter.dimensions))
        text = self._known.get(seen)
        if text is None:
            text = self._known[seen] = dimensions_key(meter.dimension_values(properties))
        return text


def meter_usage(
    events: Sequence[CountableEvent],
    meters: Mapping[str, MeterDefinition],
    facts: Sequence[MeterFacts] | None = None,
) -> MeterUsage:
    """The meter windows and distinct values of the events of metered metrics (the others are
    usage_records' alone). `facts`: the events' batch_meter_facts, when the caller has them."""
    values: set[MeterValueKey] = set()
    if not meters:
        return MeterUsage({}, values)
    grouped: dict[MeterWindowKey, list[UsageEvent]] = {}
    for e, (text, value) in zip(events, facts or batch_meter_facts(events, meters), strict=True):
        if text is None:
            continue
        usage = e.event
        key = (e.organization_id, usage.project_id, e.api_key_id, usage.metric, text,
               e.window_start)  # fmt: skip
        group = grouped.get(key)
        if group is None:
            grouped[key] = [usage]
        else:
            group.append(usage)
        if value is not None:
            values.add((*key, value))
    return MeterUsage({key: _total(group) for key, group in grouped.items()}, values)


def _total(events: list[UsageEvent]) -> MeterTotal:
    # One pass, no list or key tuple per event: a batch's windows see every metered event here.
    first = events[0]
    total = largest = smallest = first.quantity
    latest = first
    for e in events[1:]:
        quantity = e.quantity
        total = SUM_CONTEXT.add(total, quantity)
        if quantity > largest:
            largest = quantity
        elif quantity < smallest:
            smallest = quantity
        if e.timestamp > latest.timestamp or (e.timestamp == latest.timestamp and e.id > latest.id):
            latest = e
    return MeterTotal(
        quantity=total,
        event_count=len(events),
        max_quantity=largest,
        min_quantity=smallest,
        latest_quantity=latest.quantity,
        latest_at=latest.timestamp,
        latest_event_id=latest.id,
    )


def meter_facts(
    usage: UsageEvent,
    meters: Mapping[str, MeterDefinition],
    spelled: DimensionSpellings | None = None,
) -> MeterFacts:
    """What the ledger keeps of an event for its meter's pieces: its dimension values (canonical
    JSON) and its unique_count property value; (None, None) for an event of no meter. Pass the
    batch's `spelled` when calling it for many events."""
    meter = meters.get(usage.metric)
    if meter is None:
        return None, None
    value = usage.properties.get(meter.property) if meter.property is not None else None
    return (spelled or DimensionSpellings()).of(usage.metric, meter, usage.properties), value


def batch_meter_facts(
    events: Iterable[CountableEvent], meters: Mapping[str, MeterDefinition]
) -> list[MeterFacts]:
    """meter_facts of each event, in order: worked out once per batch, for the ledger's rows
    and the meter windows alike."""
    spelled = DimensionSpellings()
    return [meter_facts(e.event, meters, spelled) for e in events]


def piece_events(
    events: Iterable[CountableEvent], meters: Mapping[str, MeterDefinition]
) -> list[PieceEvent]:
    """What the events of metered metrics contribute to meter pieces (shared.meter_pieces)."""
    found = []
    spelled = DimensionSpellings()
    for e in events:
        dimensions, value = meter_facts(e.event, meters, spelled)
        if dimensions is not None:
            usage = e.event
            piece = PieceEvent(
                e.organization_id, usage.metric, dimensions, e.window_start, usage.timestamp,
                usage.id, usage.quantity, value,
            )  # fmt: skip
            found.append(piece)
    return found
