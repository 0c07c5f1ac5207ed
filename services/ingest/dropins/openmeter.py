"""OpenMeter's ingest shape: CloudEvents 1.0, one (`application/cloudevents+json`) or a batch
(`application/cloudevents-batch+json`, a JSON array), translated into Meterline events.

`id` -> id, `type` -> metric, `subject` -> customer, `time` -> timestamp, the value at the metric's
value path in `data` (default `data.value`; without one, the event counts 1) -> quantity, the other
`data` fields -> properties. `source`, `datacontenttype`, `dataschema` and extension attributes are
read past: an event is (organization, id) in Meterline, as on /v1/events.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec

from services.ingest.dropins.payloads import text_properties, translate_all
from services.ingest.dropins.values import MISSING, ValuePaths, display, path_parts, value_at
from shared.errors import InvalidInput
from shared.events import MAX_EVENTS_PER_REQUEST

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
DEFAULT_VALUE_PATH = "$.value"
REQUIRED = ("id", "source", "specversion", "type", "subject")
#: The Meterline field names as CloudEvents calls them, for error reasons.
FIELD_NAMES = {
    "id": "id",
    "metric": "type",
    "timestamp": "time",
    "customer": "subject",
    "properties": "data",
    "quantity": "data.value",
}

_decoder = msgspec.json.Decoder(float_hook=Decimal)


def cloudevents(body: bytes, media_type: str) -> list[Any]:
    """The CloudEvents of a request body: a batch is an array, one event an object."""
    try:
        raw = _decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        raise InvalidInput("body is not valid JSON") from None
    if media_type == BATCH and not isinstance(raw, list):
        raise InvalidInput(f"{BATCH} is a JSON array of CloudEvents")
    if media_type == SINGLE and not isinstance(raw, dict):
        raise InvalidInput(f"{SINGLE} is one CloudEvent, a JSON object")
    items = raw if isinstance(raw, list) else [raw]
    if not 1 <= len(items) <= MAX_EVENTS_PER_REQUEST:
        raise InvalidInput(f"a batch holds 1 to {MAX_EVENTS_PER_REQUEST} CloudEvents")
    return items


def translate(items: list[Any], value_paths: ValuePaths) -> list[dict[str, Any]]:
    """Meterline events, one per CloudEvent in order, or InvalidInput naming each CloudEvent
    that is not one (the rules of the events themselves are checked on the /v1/events path)."""
    return translate_all(items, lambda item: _event(item, value_paths), "CloudEvents")


def _event(item: Any, value_paths: ValuePaths) -> dict[str, Any] | str:
    if not isinstance(item, dict):
        return "a CloudEvent is a JSON object"
    missing = [name for name in REQUIRED if item.get(name) in (None, "")]
    if missing:
        return f"{', '.join(missing)}: required"
    if item["specversion"] != "1.0":
        return "specversion: must be 1.0"
    data = item.get("data")
    if isinstance(data, str):
        try:
            data = _decoder.decode(data)
        except (msgspec.DecodeError, RecursionError):
            return "data: a JSON object (or its JSON text)"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return "data: a JSON object (or its JSON text)"
    metric = item["type"]
    event: dict[str, Any] = {"id": item["id"], "metric": metric, "customer": item["subject"]}
    if item.get("time") is not None:
        event["timestamp"] = item["time"]
    path = value_paths(metric) if isinstance(metric, str) else None
    quantity = value_at(data, path or DEFAULT_VALUE_PATH)
    if quantity is MISSING:
        if path is not None:
            return f"{display(path, 'data')}: required (the value path of metric {metric!r})"
        # No meter names a path and the payload has no data.value: a count, as OpenMeter's
        # COUNT meters take it.
        quantity = 1
    event["quantity"] = quantity
    # The quantity's own field is not a property too (a nested one stays in its parent's text).
    parts = path_parts(path or DEFAULT_VALUE_PATH)
    properties = text_properties(data, leave_out=parts[0] if len(parts) == 1 else None)
    if properties:
        event["properties"] = properties
    return event
