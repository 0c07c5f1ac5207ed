"""Wire shapes of the ingest API: request bodies decoded in C by msgspec, responses, OpenAPI.

`EventIn` carries the structural rules of an event (types, lengths, the metric pattern, no unknown
fields); the rules that need values or a clock (quantity range, timestamp window) live in
service.py. Anything these shapes refuse is re-checked by shared.events.validate_event, which
names every problem, so the fast decoder never has to explain itself.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

import msgspec

from shared.events import (
    MAX_EVENTS_PER_REQUEST,
    MAX_PROPERTIES,
    MAX_PROPERTY_KEY,
    MAX_PROPERTY_VALUE,
)

# shared.events.METRIC_RE, written so that JSON Schema (ECMA 262) reads it too: Python's `$` also
# matches before a trailing newline, which the lookahead refuses.
METRIC_PATTERN = r"^[a-z][a-z0-9_.-]{0,63}(?!\n)$"

EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Metric = Annotated[str, msgspec.Meta(pattern=METRIC_PATTERN)]
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
    quantity: Decimal = Decimal(1)
    timestamp: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    project_id: uuid.UUID | None = None
    properties: Properties | None = None


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


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "details": {},
                },
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document served at /openapi.json."""
    (event_schema, batch_schema, accepted_schema, usage_schema), components = (
        msgspec.json.schema_components(
            [EventIn, BatchIn, Accepted, UsageOut], ref_template="#/components/schemas/{name}"
        )
    )
    components["Error"] = _error_schema()
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}

    def errors(*codes: int) -> dict[str, Any]:
        return {str(code): {"description": "error", "content": error} for code in codes}

    retry_after = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Meterline ingest", "version": "1"},
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/events": {
                "post": {
                    "summary": "Record one usage event or a batch of up to 1000",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"oneOf": [event_schema, batch_schema]}}
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "every event acknowledged by the broker",
                            "content": {"application/json": {"schema": accepted_schema}},
                        },
                        **errors(401, 403, 413, 415, 422),
                        "429": {
                            "description": "over the key's rate limit",
                            "headers": retry_after,
                            "content": error,
                        },
                        "503": {
                            "description": "the broker did not acknowledge in time",
                            "headers": retry_after,
                            "content": error,
                        },
                    },
                }
            },
            "/v1/usage": {
                "get": {
                    "summary": "Usage of the key's organization from usage_records",
                    "parameters": [
                        {"name": "metric", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "from",
                            "in": "query",
                            "schema": {"type": "string", "format": "date-time"},
                        },
                        {
                            "name": "to",
                            "in": "query",
                            "schema": {"type": "string", "format": "date-time"},
                        },
                        {
                            "name": "group_by",
                            "in": "query",
                            "schema": {"enum": ["project", "api_key", "metric"]},
                        },
                        {
                            "name": "granularity",
                            "in": "query",
                            "schema": {"enum": ["hour", "day"]},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "usage rows ordered by start then metric",
                            "content": {"application/json": {"schema": usage_schema}},
                        },
                        **errors(401, 422, 503),
                        "429": {"description": "rate limited", "headers": retry_after},
                    },
                }
            },
            "/healthz": {"get": {"security": [], "responses": {"200": {"description": "alive"}}}},
            "/readyz": {
                "get": {
                    "security": [],
                    "responses": {
                        "200": {"description": "database and broker reachable"},
                        "503": {"description": "a dependency is unreachable"},
                    },
                }
            },
            "/metrics": {
                "get": {"security": [], "responses": {"200": {"description": "Prometheus"}}}
            },
        },
    }
