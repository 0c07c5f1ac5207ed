"""Wire shapes of the ingest API: request bodies decoded in C by msgspec, and responses.

`EventIn` carries the structural rules of an event (types, lengths, the patterns of shared.events,
no unknown fields); the rules that need values or a clock (quantity, calendar dates, the timestamp
window) are checked in service.py with the same functions the slow path uses. Anything these
shapes refuse is re-checked by shared.events.validate_event, which names every problem, so the
fast decoder never has to explain itself. The OpenAPI document is in openapi.py.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated

import msgspec

from shared.events import (
    MAX_CUSTOMER,
    MAX_EVENTS_PER_REQUEST,
    MAX_ID,
    MAX_PROPERTIES,
    MAX_PROPERTY_KEY,
    MAX_PROPERTY_VALUE,
    METRIC_PATTERN,
    TIMESTAMP_PATTERN,
    UUID_PATTERN,
)

EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID)]
Metric = Annotated[str, msgspec.Meta(pattern=METRIC_PATTERN)]
Timestamp = Annotated[str, msgspec.Meta(pattern=TIMESTAMP_PATTERN)]
ProjectId = Annotated[str, msgspec.Meta(pattern=UUID_PATTERN)]
Customer = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CUSTOMER)]
Properties = Annotated[
    dict[
        Annotated[str, msgspec.Meta(max_length=MAX_PROPERTY_KEY)],
        Annotated[str, msgspec.Meta(max_length=MAX_PROPERTY_VALUE)],
    ],
    msgspec.Meta(max_length=MAX_PROPERTIES),
]


class EventIn(msgspec.Struct, forbid_unknown_fields=True):
    id: EventId
    metric: Metric
    # Raw: a number and a decimal string follow different rules (a string may not use an
    # exponent), which a decoded Decimal no longer tells apart.
    quantity: msgspec.Raw = msgspec.Raw(b"1")
    timestamp: Timestamp | None = None
    project_id: ProjectId | None = None
    properties: Properties | None = None
    customer: Customer | None = None


class BatchIn(msgspec.Struct, forbid_unknown_fields=True):
    events: Annotated[list[EventIn], msgspec.Meta(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)]


class Accepted(msgspec.Struct):
    accepted: int


class UsageRowOut(msgspec.Struct, omit_defaults=True):
    start: datetime
    metric: str | None
    quantity: str
    event_count: int
    project_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET
    api_key_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET
    # A metered metric grouped by dimensions: each dimension's value (null: not carried).
    dimensions: dict[str, str | None] | msgspec.UnsetType = msgspec.UNSET


class UsageOut(msgspec.Struct, rename={"start": "from", "end": "to"}):
    start: datetime
    end: datetime
    granularity: str
    data: list[UsageRowOut]


batch_decoder = msgspec.json.Decoder(BatchIn)
event_decoder = msgspec.json.Decoder(EventIn)
# The lenient decoder behind error reports: numbers stay exact Decimals, nothing is typed.
generic_decoder = msgspec.json.Decoder(float_hook=Decimal)
encoder = msgspec.json.Encoder(decimal_format="string")
