"""The OpenAPI 3.1 document of the ingest API: what the validator does, stated in its own terms.

Every limit comes from the constants the validator uses (shared.events, service.py), so the two
cannot drift apart. Rules that JSON Schema cannot state (the timestamp window relative to the time
a request arrives, the usage range across two parameters, the body size) are written in the
descriptions and, for tools, in `x-meterline-*` extensions. The document is committed as
services/ingest/openapi.json (`meterline ingest openapi --output ...` refreshes it) and a test keeps
the file, this function and GET /openapi.json equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.ingest.service import MAX_USAGE_RANGE
from shared.events import (
    MAX_BODY_BYTES,
    MAX_CUSTOMER,
    MAX_EVENTS_PER_REQUEST,
    MAX_ID,
    MAX_PROPERTIES,
    MAX_PROPERTY_KEY,
    MAX_PROPERTY_VALUE,
    MAX_QUANTITY,
    MAX_QUANTITY_PLACES,
    METRIC_PATTERN,
    QUANTITY_TEXT_PATTERN,
    TIMESTAMP_PATTERN,
    UUID_PATTERN,
)

Schema = dict[str, Any]

#: The committed copy of the document, for integrators and the test that keeps it true.
DOCUMENT_FILE = Path(__file__).with_name("openapi.json")
NO_NUL = "Text must not contain U+0000 (NUL) or unpaired surrogates."
# Defaults of the settings behind the timestamp window (shared.settings); a deployment may change
# them, which the descriptions say.
DEFAULT_MAX_FUTURE_SECONDS = 300
DEFAULT_LATENESS_HORIZON_DAYS = 35
PLATFORM_CUSTOMER = (
    "The organization this is for, named by a platform key: the organization's external_id, "
    "else its id. An unknown one is 422 (code `unknown_customer`) naming it."
)


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _event_schema() -> Schema:
    places = f"at most {MAX_QUANTITY_PLACES} decimal places"
    return {
        "type": "object",
        "description": "One usage event. An event is (organization, id): the first accepted "
        "version wins and a resend is a duplicate, counted once.",
        "additionalProperties": False,
        "required": ["id", "metric"],
        "properties": {
            "id": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_ID,
                "description": f"The idempotency key, unique per organization. {NO_NUL}",
            },
            "metric": {"type": "string", "pattern": METRIC_PATTERN},
            "quantity": {
                "description": f"A JSON number or a decimal string, 0 to 1e12, {places}; kept "
                "exact (never a float). A string is plain decimal notation: no sign, exponent, "
                "spaces or leading zeros (trailing zeros after the point are fine). Default 1.",
                "default": 1,
                "anyOf": [
                    {
                        "type": "number",
                        "minimum": 0,
                        "maximum": int(MAX_QUANTITY),
                        "multipleOf": float(f"1e-{MAX_QUANTITY_PLACES}"),
                    },
                    {"type": "string", "pattern": QUANTITY_TEXT_PATTERN},
                ],
            },
            "timestamp": {
                "type": ["string", "null"],
                "format": "date-time",
                "pattern": TIMESTAMP_PATTERN,
                "description": "RFC 3339 with seconds and a time zone (Z or +hh:mm; fractions up "
                "to 9 digits, kept to the microsecond; no leap second). At most "
                f"METERLINE_MAX_FUTURE_SECONDS (default {DEFAULT_MAX_FUTURE_SECONDS}) seconds "
                "after the time ingest receives the request and not older than "
                f"METERLINE_LATENESS_HORIZON_DAYS (default {DEFAULT_LATENESS_HORIZON_DAYS}) days "
                "before it; otherwise 422. Absent or null: the time received.",
                "x-meterline-window": {
                    "relative_to": "the time ingest receives the request",
                    "max_future_seconds": DEFAULT_MAX_FUTURE_SECONDS,
                    "max_age_days": DEFAULT_LATENESS_HORIZON_DAYS,
                },
            },
            "project_id": {
                "type": ["string", "null"],
                "format": "uuid",
                "pattern": UUID_PATTERN,
                "description": "A project of the key's organization (a project-scoped key: its "
                "own project, which is also the default); another one is 403.",
            },
            "properties": {
                "type": ["object", "null"],
                "maxProperties": MAX_PROPERTIES,
                "propertyNames": {"maxLength": MAX_PROPERTY_KEY},
                "additionalProperties": {"type": "string", "maxLength": MAX_PROPERTY_VALUE},
                "description": f"At most {MAX_PROPERTIES} string -> string pairs (keys at most "
                f"{MAX_PROPERTY_KEY} characters, values at most {MAX_PROPERTY_VALUE}). {NO_NUL}",
            },
            "customer": {
                "type": ["string", "null"],
                "minLength": 1,
                "maxLength": MAX_CUSTOMER,
                "description": PLATFORM_CUSTOMER + " Required with a platform key; any other "
                f"key naming a customer is 403. {NO_NUL}",
            },
        },
    }


def _components() -> Schema:
    return {
        "Event": _event_schema(),
        "EventBatch": {
            "type": "object",
            "additionalProperties": False,
            "required": ["events"],
            "properties": {
                "events": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_EVENTS_PER_REQUEST,
                    "items": _ref("Event"),
                }
            },
        },
        "Accepted": {
            "type": "object",
            "additionalProperties": False,
            "required": ["accepted"],
            "properties": {
                "accepted": {"type": "integer", "minimum": 1, "maximum": MAX_EVENTS_PER_REQUEST}
            },
        },
        "EventProblem": {
            "type": "object",
            "additionalProperties": False,
            "required": ["index", "reason"],
            "properties": {
                "index": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "position in the request (0 for a single event)",
                },
                "reason": {"type": "string", "description": "every problem, each naming its field"},
            },
        },
        "Error": {
            "type": "object",
            "additionalProperties": False,
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string", "description": "stable, for machines"},
                        "message": {"type": "string", "description": "for a person"},
                        "details": {
                            "type": "array",
                            "description": "events: one entry per bad event, by index; usage "
                            "queries: one line per bad parameter",
                            "items": {"anyOf": [_ref("EventProblem"), {"type": "string"}]},
                        },
                    },
                }
            },
        },
        "UsageRow": {
            "type": "object",
            "additionalProperties": False,
            "required": ["start", "metric", "quantity", "event_count"],
            "properties": {
                "start": {"type": "string", "format": "date-time"},
                "metric": {"type": "string"},
                "quantity": {
                    "type": "string",
                    "pattern": r"^[0-9]+(?:\.[0-9]+)?$",
                    "description": "exact decimal, plain notation",
                },
                "event_count": {"type": "integer", "minimum": 0},
                "project_id": {
                    "type": ["string", "null"],
                    "format": "uuid",
                    "description": "only when grouped by project",
                },
                "api_key_id": {
                    "type": ["string", "null"],
                    "format": "uuid",
                    "description": "only when grouped by api_key",
                },
                "dimensions": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "null"]},
                    "description": "only when a metered metric is grouped by dimensions: the "
                    "group's value of each (null: the events carried none)",
                },
            },
        },
        "Usage": {
            "type": "object",
            "additionalProperties": False,
            "required": ["from", "to", "granularity", "data"],
            "properties": {
                "from": {"type": "string", "format": "date-time"},
                "to": {"type": "string", "format": "date-time"},
                "granularity": {"enum": ["hour", "day", "month"]},
                "data": {
                    "type": "array",
                    "items": _ref("UsageRow"),
                    "description": "ordered by start then metric",
                },
            },
        },
    }


def _error(description: str, code: str, headers: Schema | None = None) -> Schema:
    response: Schema = {
        "description": f"{description} (code `{code}`)",
        "content": {"application/json": {"schema": _ref("Error")}},
    }
    if headers:
        response["headers"] = headers
    return response


RETRY_AFTER = {
    "Retry-After": {
        "required": True,
        "description": "seconds to wait before retrying (with the same event ids)",
        "schema": {"type": "integer", "minimum": 1},
    }
}
UNAUTHENTICATED = _error(
    "missing, unknown, revoked or expired API key (one message for all)",
    "unauthenticated",
    {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}},
)
RATE_LIMITED = _error("over the key's rate limit", "rate_limited", RETRY_AFTER)


def _events_operation() -> Schema:
    return {
        "summary": f"Record one usage event, or a batch of up to {MAX_EVENTS_PER_REQUEST}",
        "description": "All or nothing: 202 only after the broker acknowledged every event "
        "(acks=all); one invalid event refuses the whole request with the reason of each bad "
        "event, and nothing is published. Retry a 429 or 503 with the same ids: each id "
        f"counts once. The body is at most {MAX_BODY_BYTES} bytes (1 MiB).",
        "operationId": "postEvents",
        "requestBody": {
            "required": True,
            "description": "application/json or any application/*+json media type",
            "content": {
                "application/json": {"schema": {"oneOf": [_ref("Event"), _ref("EventBatch")]}}
            },
            "x-meterline-max-body-bytes": MAX_BODY_BYTES,
        },
        "responses": {
            "202": {
                "description": "every event acknowledged by the broker",
                "content": {"application/json": {"schema": _ref("Accepted")}},
            },
            "401": UNAUTHENTICATED,
            "403": _error(
                "a project outside the event's organization, or outside a project-scoped key's "
                "project, or a customer named by a key that is not a platform key; details name "
                "each event by index",
                "forbidden",
            ),
            "413": _error(f"the body is larger than {MAX_BODY_BYTES} bytes", "payload_too_large"),
            "415": _error("the body is not JSON (Content-Type)", "unsupported_media_type"),
            "422": _error(
                "not valid JSON, not an event or batch, invalid events, or (a platform key) an "
                "event naming no customer or an unknown one; details name each bad event by "
                "index with every reason",
                "invalid, unknown_customer",
            ),
            "429": RATE_LIMITED,
            "503": _error(
                "the broker did not acknowledge in time, or the database is unreachable; the "
                "events may still be counted later, so retry with the same ids",
                "broker_unavailable, database_unavailable",
                RETRY_AFTER,
            ),
        },
    }


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": f"{description} Given at most once.",
    }


def _usage_operation() -> Schema:
    days = MAX_USAGE_RANGE.days
    instant = {"type": "string", "format": "date-time", "pattern": TIMESTAMP_PATTERN}
    return {
        "summary": "Usage the key may see, from usage_records and the meters' windows",
        "description": "A platform key reads the usage of the organization `customer` names; "
        "an organization key reads its organization's usage; a project-scoped key "
        "only its project's; a user-scoped key what its member's role may see at the time of the "
        "request: owners, admins and billing members the organization's, a plain member only what "
        "its own user-scoped keys recorded (a key that is both keeps both limits). Rows outside "
        "the scope are never returned, and grouping by project or api_key shows only ids inside "
        f"it. `from` must be before `to` and at most {days} days before it; without `to`, now; "
        "without `from`, one day before `to`. Rows are ordered by start then metric.",
        "operationId": "getUsage",
        "parameters": [
            _query("metric", {"type": "string", "pattern": METRIC_PATTERN}, "Only this metric."),
            _query("from", instant, "Range start (inclusive), RFC 3339."),
            _query("to", instant, "Range end (exclusive), RFC 3339."),
            {
                "name": "group_by",
                "in": "query",
                "required": False,
                "style": "form",
                "explode": True,
                "schema": {
                    "type": "array",
                    "uniqueItems": True,
                    "items": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_PROPERTY_KEY,
                        "pattern": r"^[^,\u0000]+$",
                    },
                },
                "description": "Split rows by project, api_key, and by dimensions: a metered "
                "metric's rows by its meter's dimension values (rows are always split by "
                "metric; a dimension a metric does not keep shows null, and one that no meter of "
                "the asked metrics keeps is refused with 422 naming it). May be given several "
                "times, or as a comma-separated list; each name at most once.",
            },
            {
                "name": "filter",
                "in": "query",
                "required": False,
                "style": "deepObject",
                "explode": True,
                "schema": {
                    "type": "object",
                    "propertyNames": {
                        "minLength": 1,
                        "maxLength": MAX_PROPERTY_KEY,
                        "pattern": r"^[^\u0000]+$",
                    },
                    "additionalProperties": {"type": "string", "pattern": r"^[^\u0000]*$"},
                },
                "description": "`filter[<dimension>]=value`: only the usage of events whose "
                "dimension has that value (only metered metrics keep dimension values: a "
                "filter matches no event of a metric whose meter lacks that dimension; a dimension "
                "no meter of the asked metrics keeps is refused with 422 naming it).",
            },
            _query(
                "granularity",
                {"type": "string", "enum": ["hour", "day", "month"], "default": "hour"},
                "Bucket size (UTC hours, days or calendar months). A metered metric's quantity "
                "is its meter's aggregation over each bucket, exact: a unique_count is the "
                "number of distinct values in the bucket; latest is the value of the bucket's "
                "event with the latest timestamp, ties to the greatest event id.",
            ),
            _query(
                "customer",
                {"type": "string", "minLength": 1, "maxLength": MAX_CUSTOMER},
                PLATFORM_CUSTOMER + " Required with a platform key; any other key naming one "
                "is 403.",
            ),
        ],
        "x-meterline-range": {"max_days": days, "default_days": 1, "from_before_to": True},
        "responses": {
            "200": {
                "description": "the usage rows",
                "content": {"application/json": {"schema": _ref("Usage")}},
            },
            "401": UNAUTHENTICATED,
            "403": _error(
                "a user-scoped key whose member has left the organization, or a customer named "
                "by a key that is not a platform key",
                "forbidden",
            ),
            "422": _error(
                f"a bad parameter, an unknown one, one given twice, `from` not before `to`, a "
                f"range over {days} days, or (a platform key) no customer or an unknown one; "
                "details name each problem",
                "invalid, unknown_customer",
            ),
            "429": RATE_LIMITED,
            "503": _error("the database is unreachable", "database_unavailable", RETRY_AFTER),
        },
    }


def _open(summary: str, responses: Schema) -> Schema:
    return {"get": {"summary": summary, "security": [], "responses": responses}}


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document served at /openapi.json."""
    ready = {
        "type": "object",
        "required": ["database", "broker"],
        "properties": {
            "database": {"enum": ["ok", "unreachable"]},
            "broker": {"enum": ["ok", "unreachable"]},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Meterline ingest",
            "version": "1",
            "description": "Usage events in, usage out. Every error is "
            '{"error": {"code", "message", "details"}}; bad input never gets a 5xx.',
        },
        "components": {
            "schemas": _components(),
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A Meterline API key (ml_live_... or ml_test_...) as the "
                    "bearer token: Authorization: Bearer <key>.",
                }
            },
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/events": {"post": _events_operation()},
            "/v1/usage": {"get": _usage_operation()},
            "/healthz": _open(
                "The process answers",
                {
                    "200": _json(
                        "alive", {"type": "object", "properties": {"status": {"const": "ok"}}}
                    )
                },
            ),
            "/readyz": _open(
                "The database and the broker are reachable",
                {
                    "200": _json("both reachable", ready),
                    "503": _json("a dependency is unreachable", ready),
                },
            ),
            "/metrics": _open(
                "Prometheus metrics, summed across workers",
                {
                    "200": {
                        "description": "the text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            ),
            "/openapi.json": _open(
                "This document", {"200": _json("OpenAPI 3.1", {"type": "object"})}
            ),
        },
    }


def openapi_text() -> str:
    """The document as the committed file holds it: indented JSON, one trailing newline."""
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"
