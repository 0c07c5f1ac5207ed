"""One event as the ingest API takes it, encoded once when it is recorded; time-ordered ids.

Pure values in and out: the caller passes the time, nothing here reads a clock or the network.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation

Quantity = int | str | Decimal


def uuid7() -> uuid.UUID:
    """A version 7 UUID: 48 bits of Unix milliseconds, then 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A recorded event waiting to be sent: its id and its JSON encoding (made once)."""

    id: str
    body: bytes

    def document(self) -> dict[str, object]:
        decoded: dict[str, object] = json.loads(self.body)
        return decoded


def quantity_text(quantity: Quantity) -> str:
    """The quantity as a plain decimal string (the API refuses exponents): exact, never a float.

    Raises TypeError for a float and ValueError for text that is not a finite decimal number;
    the service checks the range and the number of places.
    """
    if isinstance(quantity, (bool, float)):
        raise TypeError("pass quantities as int, str or Decimal: floats are not exact")
    if isinstance(quantity, int):
        return str(quantity)
    if isinstance(quantity, str):
        try:
            value = Decimal(quantity)
        except InvalidOperation:
            raise ValueError(f"quantity {quantity!r} is not a decimal number") from None
    elif isinstance(quantity, Decimal):
        value = quantity
    else:
        raise TypeError("pass quantities as int, str or Decimal")
    if not value.is_finite():
        raise ValueError("quantity must be finite")
    # "f" never writes an exponent: Decimal("1E+3") -> "1000", Decimal("1E-7") -> "0.0000001".
    return format(value, "f")


def timestamp_text(timestamp: datetime) -> str:
    """RFC 3339 in UTC with a Z; a naive datetime is refused (its zone would be a guess)."""
    if timestamp.tzinfo is None or timestamp.utcoffset() is None:
        raise ValueError("timestamp needs a time zone (e.g. datetime.now(timezone.utc))")
    return timestamp.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def make_event(
    metric: str,
    quantity: Quantity = 1,
    *,
    timestamp: datetime,
    project_id: uuid.UUID | str | None = None,
    properties: Mapping[str, str] | None = None,
    event_id: str | None = None,
) -> PendingEvent:
    """Build and encode one event; its id (a new UUIDv7 unless given) stays with it for retries."""
    if not isinstance(metric, str) or not metric:
        raise ValueError("metric must be a non-empty string")
    document: dict[str, object] = {
        "id": event_id if event_id is not None else str(uuid7()),
        "metric": metric,
        "quantity": quantity_text(quantity),
        "timestamp": timestamp_text(timestamp),
    }
    if project_id is not None:
        document["project_id"] = str(project_id)
    if properties:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in properties.items()):
            raise TypeError("properties must map strings to strings")
        document["properties"] = dict(properties)
    return PendingEvent(
        id=str(document["id"]),
        body=json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode(),
    )


def encode_documents(events: list[Mapping[str, object]]) -> list[PendingEvent]:
    """Events given as ready-made documents (ids chosen by the caller), encoded as they are."""
    encoded = []
    for document in events:
        event_id = document.get("id")
        if not isinstance(event_id, str):
            raise ValueError("every event needs a string id")
        encoded.append(
            PendingEvent(
                id=event_id,
                body=json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode(),
            )
        )
    return encoded
