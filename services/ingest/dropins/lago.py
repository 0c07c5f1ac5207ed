"""Lago's event shape (`{"event": {...}}`, or `{"events": [...]}` for a batch), translated into
Meterline events, and the event documents Lago answers with.

`transaction_id` -> id, `external_subscription_id` -> customer (looked up among subscriptions'
external ids), `code` -> metric, `timestamp` (Unix seconds, fractions allowed) -> timestamp,
`properties` -> properties. The quantity is the property the metric's meter names as its value
(`value_property`), or 1 when it names none: Lago's count. `precise_total_amount_cents` is not a
Meterline concept and is read past.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from services.ingest.dropins.payloads import text_properties, translate_all
from services.ingest.dropins.values import MISSING, ValuePaths, display, value_at
from shared.errors import InvalidInput
from shared.events import MAX_EVENTS_PER_REQUEST

#: The Meterline field names as Lago calls them, for error reasons.
FIELD_NAMES = {
    "id": "transaction_id",
    "metric": "code",
    "timestamp": "timestamp",
    "customer": "external_subscription_id",
    "properties": "properties",
    "quantity": "properties",
}
EVENT_FIELDS = frozenset(
    {
        "transaction_id",
        "external_subscription_id",
        "code",
        "timestamp",
        "precise_total_amount_cents",
        "properties",
    }
)

_decoder = msgspec.json.Decoder(float_hook=Decimal)


def lago_events(body: bytes, *, batch: bool) -> list[Any]:
    """The events of a Lago request body: `{"event": {...}}`, or `{"events": [...]}` (batch)."""
    try:
        raw = _decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        raise InvalidInput("body is not valid JSON") from None
    root = "events" if batch else "event"
    if not isinstance(raw, dict) or root not in raw:
        shape = '{"events": [...]}' if batch else '{"event": {...}}'
        raise InvalidInput(f"the body is {shape}")
    if not batch:
        return [raw[root]]
    items = raw[root]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_EVENTS_PER_REQUEST:
        raise InvalidInput(f"events: a list of 1 to {MAX_EVENTS_PER_REQUEST} events")
    return items


def translate(items: list[Any], value_paths: ValuePaths) -> list[dict[str, Any]]:
    """Meterline events, one per Lago event in order, or InvalidInput naming each Lago event
    that is not one (the rules of the events themselves are checked on the /v1/events path)."""
    return translate_all(items, lambda item: _event(item, value_paths), "events")


def _event(item: Any, value_paths: ValuePaths) -> dict[str, Any] | str:
    if not isinstance(item, dict):
        return "an event is a JSON object"
    unknown = item.keys() - EVENT_FIELDS
    if unknown:
        return f"unknown field(s): {', '.join(sorted(map(str, unknown)))}"
    if item.get("external_subscription_id") is None:
        return "external_subscription_id: required"
    properties = item.get("properties") or {}
    if not isinstance(properties, dict):
        return "properties: an object"
    metric = item.get("code")
    event: dict[str, Any] = {
        "id": item.get("transaction_id"),
        "metric": metric,
        "customer": item["external_subscription_id"],
    }
    if item.get("timestamp") is not None:
        timestamp = _from_seconds(item["timestamp"])
        if timestamp is None:
            return "timestamp: Unix seconds (a number, or its text)"
        event["timestamp"] = timestamp
    path = value_paths(metric) if isinstance(metric, str) else None
    if path is None:
        event["quantity"] = 1
    else:
        quantity = value_at(properties, path)
        if quantity is MISSING:
            return f"{display(path, 'properties')}: required (the value of metric {metric!r})"
        event["quantity"] = quantity
    texts = text_properties(properties)
    if texts:
        event["properties"] = texts
    return event


#: Unix seconds a datetime can hold (years 1 to 9999), checked before `int()`: turning a number
#: such as 1e999999 into an int spends minutes of the event loop's CPU before it overflows.
MAX_SECONDS = Decimal(253_402_300_800)


def _from_seconds(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        return None
    try:
        seconds = Decimal(value)
        if not (seconds.is_finite() and -MAX_SECONDS < seconds < MAX_SECONDS):
            return None
        instant = datetime.fromtimestamp(int(seconds), UTC).replace(
            microsecond=int((seconds % 1) * 1_000_000)
        )
    except (InvalidOperation, ValueError, OverflowError, OSError):
        return None
    return instant.isoformat().replace("+00:00", "Z")


def event_document(item: dict[str, Any], received_at: datetime) -> dict[str, Any]:
    """The event as Lago answers it (its EventResponse). Meterline keeps no per-event row, so
    the Lago ids are null; the timestamp is the one the client sent, else the time received."""
    seconds = item.get("timestamp")
    when = _from_seconds(seconds) if seconds is not None else None
    return {
        "lago_id": None,
        "transaction_id": item.get("transaction_id"),
        "lago_customer_id": None,
        "lago_subscription_id": None,
        "external_subscription_id": item.get("external_subscription_id"),
        "code": item.get("code"),
        "timestamp": when or received_at.isoformat().replace("+00:00", "Z"),
        "precise_total_amount_cents": item.get("precise_total_amount_cents"),
        "properties": item.get("properties") or {},
        "created_at": received_at.isoformat().replace("+00:00", "Z"),
    }
