"""Meters: what each metered metric aggregates and groups by, as `meterline meters list` lists
them (shared.meters.list_meters). Meters are applied from a meter file with the CLI."""

from __future__ import annotations

from services.console.routing import Call, Operation, Page, Render
from services.console.schemas import Document, obj
from shared.meters import MeterDefinition, list_meters

METER_SCHEMA = obj(
    {
        "metric": {"type": "string"},
        "aggregation": {
            "type": "string",
            "enum": ["sum", "count", "max", "min", "latest", "unique_count"],
        },
        "dimensions": {"type": "array", "items": {"type": "string"}},
        "property": {
            "type": ["string", "null"],
            "description": "unique_count: the property whose distinct values are counted",
        },
        "value_property": {
            "type": ["string", "null"],
            "description": "the property an event may carry its value in",
        },
    }
)


def meter_document(meter: MeterDefinition) -> Document:
    return {
        "metric": meter.metric,
        "aggregation": meter.aggregation,
        "dimensions": list(meter.dimensions),
        "property": meter.property,
        "value_property": meter.value_property,
    }


def meters(call: Call) -> Document:
    return {"items": [meter_document(meter) for meter in list_meters(call.session)]}


operations = [
    Operation(
        "GET",
        "/meters",
        "listMeters",
        "List meters",
        "meters",
        meters,
        obj({"items": {"type": "array", "items": METER_SCHEMA}}),
        description="Every meter by metric, as `meterline meters list` lists them.",
    ),
]


def _page(call: Call) -> Render:
    return Render("meters.html", {"meters": meters(call)["items"]})


pages = [Page("GET", "/meters", _page)]
