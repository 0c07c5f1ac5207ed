"""Meter definitions: what a metered metric aggregates and groups by, read from a meter file,
checked against events, and stored in `meters` (`meterline meters apply`, `meters list`).

A metric without a meter keeps the plain rule (its windows sum quantities, usage_records alone).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from shared.errors import InvalidInput
from shared.events import MAX_PROPERTIES, MAX_PROPERTY_KEY, METRIC_RE
from shared.models.meters import Meter

Aggregation = Literal["sum", "count", "max", "min", "latest", "unique_count"]
AGGREGATIONS: tuple[Aggregation, ...] = ("sum", "count", "max", "min", "latest", "unique_count")
_FIELDS = frozenset({"metric", "aggregation", "dimensions", "property", "value_property"})


@dataclass(frozen=True, slots=True)
class MeterDefinition:
    metric: str
    aggregation: Aggregation
    dimensions: tuple[str, ...] = ()
    # unique_count only: the property whose distinct values are counted.
    property: str | None = None
    # Where an event shape that carries its value among its properties keeps it.
    value_property: str | None = None

    def required_properties(self) -> tuple[str, ...]:
        """The properties every event of this meter must carry."""
        if self.property is not None and self.property not in self.dimensions:
            return (*self.dimensions, self.property)
        return self.dimensions

    def missing_properties(self, properties: Mapping[str, str]) -> list[str]:
        return [name for name in self.required_properties() if name not in properties]

    def dimension_values(self, properties: Mapping[str, str]) -> dict[str, str]:
        """The event's values of the meter's dimensions (a missing one is left out: events
        accepted before the meter existed still count, under no value)."""
        return {name: properties[name] for name in self.dimensions if name in properties}

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "metric": self.metric,
            "aggregation": self.aggregation,
            "dimensions": list(self.dimensions),
        }
        if self.property is not None:
            doc["property"] = self.property
        if self.value_property is not None:
            doc["value_property"] = self.value_property
        return doc


def dimensions_key(values: Mapping[str, str]) -> str:
    """The canonical JSON text of dimension values: one spelling per set of values, so that
    equal values land in one row whatever order the event listed its properties in."""
    return json.dumps(dict(sorted(values.items())), separators=(",", ":"), ensure_ascii=False)


def read_meter_file(path: Path) -> list[MeterDefinition]:
    """Parse a JSON or YAML meter file and validate every meter in it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    return parse_meter_text(text, source=str(path), as_json=path.suffix.lower() == ".json")


def parse_meter_text(text: str, *, source: str, as_json: bool = False) -> list[MeterDefinition]:
    import yaml

    try:
        document = json.loads(text) if as_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidInput(f"{source}: not valid JSON or YAML: {first}") from None
    return validate_meter_document(document)


def validate_meter_document(document: Any) -> list[MeterDefinition]:
    """The meters of `{meters: [...]}` (or a bare list), or InvalidInput naming every bad field
    by its path (`meters[1].aggregation: ...`)."""
    items = document.get("meters") if isinstance(document, dict) else document
    if isinstance(document, dict) and set(document) - {"meters"}:
        extra = ", ".join(sorted(map(str, set(document) - {"meters"})))
        raise InvalidInput(f"a meter file is {{meters: [...]}}; unknown field(s): {extra}")
    if not isinstance(items, list):
        raise InvalidInput("meters: must be a list of meters")
    problems: list[str] = []
    meters: list[MeterDefinition] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        path = f"meters[{index}]"
        meter = _validate_meter(item, path, problems)
        if meter is None:
            continue
        if meter.metric in seen:
            problems.append(f"{path}.metric: {meter.metric!r} is also meters[{seen[meter.metric]}]")
            continue
        seen[meter.metric] = index
        meters.append(meter)
    if problems:
        raise InvalidInput("invalid meter file: " + "; ".join(problems), details=problems)
    return meters


def _validate_meter(item: Any, path: str, problems: list[str]) -> MeterDefinition | None:
    if not isinstance(item, dict):
        problems.append(f"{path}: must be an object with metric and aggregation")
        return None
    before = len(problems)
    for name in sorted(set(map(str, item)) - _FIELDS):
        problems.append(f"{path}.{name}: unknown field (known: {', '.join(sorted(_FIELDS))})")
    metric = item.get("metric")
    if not isinstance(metric, str) or not METRIC_RE.match(metric):
        problems.append(f"{path}.metric: required, must match ^[a-z][a-z0-9_.-]{{0,63}}$")
    aggregation = item.get("aggregation", "sum")
    if aggregation not in AGGREGATIONS:
        problems.append(f"{path}.aggregation: one of {', '.join(AGGREGATIONS)}")
    dimensions = item.get("dimensions") or []
    if not isinstance(dimensions, list):
        problems.append(f"{path}.dimensions: must be a list of property names")
        dimensions = []
    elif len(dimensions) > MAX_PROPERTIES:
        problems.append(f"{path}.dimensions: at most {MAX_PROPERTIES}")
    for i, name in enumerate(dimensions):
        if not _property_name(name):
            problems.append(f"{path}.dimensions[{i}]: a property name of 1 to {MAX_PROPERTY_KEY} "
                            "characters")  # fmt: skip
        elif dimensions.index(name) != i:
            problems.append(f"{path}.dimensions[{i}]: {name!r} is listed twice")
    prop = item.get("property")
    if aggregation == "unique_count":
        if not _property_name(prop):
            problems.append(f"{path}.property: required for unique_count, the property whose "
                            "distinct values are counted")  # fmt: skip
    elif prop is not None:
        problems.append(f"{path}.property: only a unique_count meter counts a property")
    value_property = item.get("value_property")
    if value_property is not None and not _property_name(value_property):
        problems.append(f"{path}.value_property: a property name of 1 to {MAX_PROPERTY_KEY} "
                        "characters")  # fmt: skip
    if len(problems) > before:
        return None
    return MeterDefinition(
        metric=cast(str, metric),
        aggregation=cast(Aggregation, aggregation),
        dimensions=tuple(dimensions),
        property=prop,
        value_property=value_property,
    )


def _property_name(value: Any) -> bool:
    return (
        isinstance(value, str)
        and 1 <= len(value) <= MAX_PROPERTY_KEY
        and "\x00" not in value
        and value.isprintable()
    )


def _definition(row: Meter) -> MeterDefinition:
    return MeterDefinition(
        metric=row.metric,
        aggregation=cast(Aggregation, row.aggregation),
        dimensions=tuple(row.dimensions or ()),
        property=row.property,
        value_property=row.value_property,
    )


def apply_meters(session: Session, meters: Iterable[MeterDefinition]) -> list[tuple[str, str]]:
    """Create or update meters by metric; (metric, created | updated | unchanged) for each."""
    outcome = []
    existing = {row.metric: row for row in session.scalars(sa.select(Meter))}
    for meter in meters:
        row = existing.get(meter.metric)
        if row is None:
            session.add(
                Meter(
                    metric=meter.metric,
                    aggregation=meter.aggregation,
                    dimensions=list(meter.dimensions),
                    property=meter.property,
                    value_property=meter.value_property,
                )
            )
            outcome.append((meter.metric, "created"))
        elif _definition(row) == meter:
            outcome.append((meter.metric, "unchanged"))
        else:
            row.aggregation = meter.aggregation
            row.dimensions = list(meter.dimensions)
            row.property = meter.property
            row.value_property = meter.value_property
            outcome.append((meter.metric, "updated"))
    session.flush()
    return outcome


def list_meters(session: Session | Connection) -> list[MeterDefinition]:
    """Every meter, by metric."""
    table = Meter.__table__
    rows = session.execute(
        sa.select(
            table.c.metric,
            table.c.aggregation,
            table.c.dimensions,
            table.c.property,
            table.c.value_property,
        ).order_by(table.c.metric)
    )
    return [
        MeterDefinition(
            metric=r.metric,
            aggregation=cast(Aggregation, r.aggregation),
            dimensions=tuple(r.dimensions or ()),
            property=r.property,
            value_property=r.value_property,
        )
        for r in rows
    ]


def meters_by_metric(session: Session | Connection) -> dict[str, MeterDefinition]:
    return {meter.metric: meter for meter in list_meters(session)}


def check_meter_properties(
    events: Iterable[tuple[str, Mapping[str, str]]], meters: Mapping[str, MeterDefinition]
) -> list[dict[str, Any]]:
    """For each (metric, properties) by index, the reason it fails its meter, if it does: an
    event of a metered metric carries every dimension and the unique_count property."""
    problems: list[dict[str, Any]] = []
    if not meters:
        return problems
    for index, (metric, properties) in enumerate(events):
        meter = meters.get(metric)
        if meter is None:
            continue
        missing = meter.missing_properties(properties)
        if missing:
            problems.append(
                {
                    "index": index,
                    "reason": f"properties: metric {metric!r} is metered "
                    f"({meter.aggregation}) and needs the properties {', '.join(missing)}",
                }
            )
    return problems
