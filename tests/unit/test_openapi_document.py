"""The OpenAPI document and the validator say the same thing: the committed file is the generated
document, and for any event the schema accepts exactly what ingest accepts (the timestamp window,
which the schema states in words, aside)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import jsonschema_rs  # comes with schemathesis; the same validator its checks use
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest.openapi import DOCUMENT_FILE, openapi_document, openapi_text
from services.ingest.service import parse_events
from shared.errors import InvalidInput
from shared.events import UsageEvent, validate_event

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
RULES = {"now": NOW, "horizon": timedelta(days=35), "max_future": timedelta(minutes=5)}
EVENT_SCHEMA = openapi_document()["components"]["schemas"]["Event"]
schema_accepts = jsonschema_rs.Draft202012Validator(EVENT_SCHEMA, validate_formats=True).is_valid


def test_the_committed_document_is_the_generated_one() -> None:
    """If this fails, run: meterline ingest openapi --output services/ingest/openapi.json"""
    assert DOCUMENT_FILE.read_text() == openapi_text()


def test_every_response_of_every_operation_documents_an_error_body_and_the_security_scheme() -> (
    None
):
    document = openapi_document()
    assert document["components"]["securitySchemes"]["apiKey"] == {
        **document["components"]["securitySchemes"]["apiKey"],
        "type": "http",
        "scheme": "bearer",
    }
    for path in ("/v1/events", "/v1/usage"):
        for operation in document["paths"][path].values():
            errors = {s: r for s, r in operation["responses"].items() if int(s) >= 400}
            assert {"401", "422", "429", "503"} <= errors.keys()
            for status, response in errors.items():
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (path, status)
                if status in ("429", "503"):
                    assert response["headers"]["Retry-After"]["required"] is True


def ingest_accepts(event: object) -> bool:
    return isinstance(validate_event(event, **RULES), UsageEvent)


def fast_path_accepts(event: object) -> bool:
    try:
        parse_events(msgspec.json.encode(event), now=NOW, **_window())
    except InvalidInput:
        return False
    return True


def _window() -> dict[str, timedelta]:
    return {"horizon": RULES["horizon"], "max_future": RULES["max_future"]}


IN_WINDOW = "2026-11-24T09:00:00Z"
QUANTITIES = [
    0, 1, 12.5, 0.1, 1e-12, 3e-12, 1e12, 10**12, -0.0, 0.123456789012, 999999999999.5,
    1e-13, 1e12 + 1, -1, 2.5e-5, True, None, [], {},
    "0", "1", "12.5", "1.000000000000000", "0.000000000001", "1000000000000", "1000000000000.00",
    "01", "1e3", " 1", "1 ", "+1", "-0", ".5", "5.", "0.0000000000001", "1000000000000.1",
    "NaN", "Infinity", "1_000", "١", "", "1\n",
]  # fmt: skip
TIMESTAMPS = [
    IN_WINDOW, "2026-11-24t09:00:00z", "2026-11-24T10:04:00+00:00", "2026-11-24T11:00:00+02:00",
    "2026-11-24T09:00:00.1Z", "2026-11-24T09:00:00.123456789Z", "2026-11-24T09:00:00-00:00",
    None, "2026-11-24T09:00:00.1234567890Z", "2026-11-24 09:00:00Z", "2026-11-24T09:00Z",
    "2026-11-24T09:00:00+0100", "2026-11-24T09:00:00", "2026-11-23T23:59:60Z",
    "2026-02-30T09:00:00Z", " 2026-11-24T09:00:00Z", "2026-11-24T09:00:00Z\n", 5, "",
]  # fmt: skip
PROJECTS = [
    str(uuid.UUID(int=1)), str(uuid.UUID(int=2**127)).upper(), None, uuid.UUID(int=3).hex,
    "{" + str(uuid.UUID(int=4)) + "}", "urn:uuid:" + str(uuid.UUID(int=5)), "nope", 5, "",
]  # fmt: skip
PROPERTIES = [
    None, {}, {"region": "eu"}, {"k" * 64: "v" * 256}, {"k" * 65: "v"}, {"k": "v" * 257},
    {str(i): "v" for i in range(16)}, {str(i): "v" for i in range(17)}, {"k": 1}, {"": ""},
    False, 0, "", [], True, "region=eu",
]  # fmt: skip
IDS = ["a", "x" * 128, "x" * 129, "", 5, None, "é" * 128, "请求"]
METRICS = ["api_calls", "a", "a" * 64, "a" * 65, "API", "api calls", "api_calls\n", "9x", 5]

events = st.fixed_dictionaries(
    {"id": st.sampled_from(IDS), "metric": st.sampled_from(METRICS)},
    optional={
        "quantity": st.sampled_from(QUANTITIES),
        "timestamp": st.sampled_from(TIMESTAMPS),
        "project_id": st.sampled_from(PROJECTS),
        "properties": st.sampled_from(PROPERTIES),
        "extra": st.just(1),
    },
)


@settings(max_examples=400, deadline=None)
@given(events)
def test_the_schema_accepts_exactly_what_ingest_accepts(event: dict[str, object]) -> None:
    assert schema_accepts(event) == ingest_accepts(event) == fast_path_accepts(event), event


@pytest.mark.parametrize("field", ["quantity", "timestamp", "project_id", "properties"])
def test_each_listed_value_is_judged_alike(field: str) -> None:
    values = {
        "quantity": QUANTITIES,
        "timestamp": TIMESTAMPS,
        "project_id": PROJECTS,
        "properties": PROPERTIES,
    }[field]
    disagreements = [
        value
        for value in values
        if schema_accepts({"id": "a", "metric": "m", field: value})
        != ingest_accepts({"id": "a", "metric": "m", field: value})
    ]
    assert disagreements == []


def test_a_schema_valid_timestamp_outside_the_window_is_refused_as_the_document_says() -> None:
    described = EVENT_SCHEMA["properties"]["timestamp"]
    window = described["x-meterline-window"]
    too_new = NOW + timedelta(seconds=window["max_future_seconds"] + 1)
    too_old = NOW - timedelta(days=window["max_age_days"], seconds=1)
    for instant in (too_new, too_old):
        event = {"id": "a", "metric": "m", "timestamp": instant.isoformat()}
        assert schema_accepts(event) and not ingest_accepts(event)


def test_json_numbers_keep_their_exact_value() -> None:
    [event] = parse_events(b'{"id": "a", "metric": "m", "quantity": 0.1}', now=NOW, **_window())
    assert event.quantity == Decimal("0.1")
    document = json.loads(DOCUMENT_FILE.read_text())
    number = document["components"]["schemas"]["Event"]["properties"]["quantity"]["anyOf"][0]
    assert number["multipleOf"] == 1e-12
