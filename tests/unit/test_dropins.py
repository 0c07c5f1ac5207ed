"""The drop-in translations: OpenMeter's CloudEvents and Lago's events into Meterline events, and
the value-path lookup that meter definitions will feed."""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest

from services.ingest.dropins import lago, openmeter
from services.ingest.dropins.payloads import renamed
from services.ingest.dropins.values import MISSING, no_value_paths, value_at
from shared.errors import InvalidInput


def cloudevent(**fields: object) -> dict[str, object]:
    return {
        "id": "e1",
        "source": "backend",
        "specversion": "1.0",
        "type": "api_calls",
        "subject": "cus_1",
        **fields,
    }


def test_openmeter_default_value_path_is_data_value_and_the_rest_are_properties() -> None:
    [event] = openmeter.translate(
        [
            cloudevent(
                time="2026-12-01T10:00:00Z", data={"value": Decimal("2.5"), "n": 3, "ok": True}
            )
        ],
        no_value_paths,
    )
    assert event == {
        "id": "e1",
        "metric": "api_calls",
        "customer": "cus_1",
        "timestamp": "2026-12-01T10:00:00Z",
        "quantity": Decimal("2.5"),
        "properties": {"n": "3", "ok": "true"},
    }


def test_openmeter_event_without_data_value_counts_one() -> None:
    [event] = openmeter.translate([cloudevent(data={"region": "eu"})], no_value_paths)
    assert event["quantity"] == 1 and event["properties"] == {"region": "eu"}


def test_openmeter_follows_the_value_path_a_meter_names() -> None:
    paths = {"api_calls": "$.usage.tokens"}.get
    [event] = openmeter.translate([cloudevent(data={"usage": {"tokens": 40}, "model": "m"})], paths)
    assert event["quantity"] == 40
    with pytest.raises(InvalidInput) as caught:
        openmeter.translate([cloudevent(data={"value": 1})], paths)
    assert caught.value.details == [
        {"index": 0, "reason": "data.usage.tokens: required (the value path of metric 'api_calls')"}
    ]


def test_openmeter_refuses_what_is_not_a_cloudevent_by_index() -> None:
    with pytest.raises(InvalidInput) as caught:
        openmeter.translate(
            [cloudevent(), cloudevent(specversion="0.3"), {"id": "x"}], no_value_paths
        )
    assert caught.value.details == [
        {"index": 1, "reason": "specversion: must be 1.0"},
        {"index": 2, "reason": "source, specversion, type, subject: required"},
    ]


def test_openmeter_batch_media_type_needs_an_array() -> None:
    body = msgspec.json.encode(cloudevent())
    with pytest.raises(InvalidInput):
        openmeter.cloudevents(body, openmeter.BATCH)
    assert len(openmeter.cloudevents(body, openmeter.SINGLE)) == 1


def test_lago_counts_one_per_event_and_reads_seconds() -> None:
    [event] = lago.translate(
        [
            {
                "transaction_id": "tx",
                "external_subscription_id": "sub_1",
                "code": "api_calls",
                "timestamp": Decimal("1764583200.5"),
                "properties": {"region": "eu", "tokens": 12},
            }
        ],
        no_value_paths,
    )
    assert event == {
        "id": "tx",
        "metric": "api_calls",
        "customer": "sub_1",
        "timestamp": "2025-12-01T10:00:00.500000Z",
        "quantity": 1,
        "properties": {"region": "eu", "tokens": "12"},
    }


def test_lago_quantity_is_the_value_property_a_meter_names() -> None:
    item = {"transaction_id": "tx", "external_subscription_id": "s", "code": "api_calls",
            "properties": {"tokens": "12.5"}}  # fmt: skip
    [event] = lago.translate([item], {"api_calls": "tokens"}.get)
    assert event["quantity"] == "12.5"


def test_lago_refuses_a_timestamp_that_is_not_seconds() -> None:
    item = {"transaction_id": "tx", "external_subscription_id": "s", "code": "c",
            "timestamp": "yesterday"}  # fmt: skip
    with pytest.raises(InvalidInput) as caught:
        lago.translate([item], no_value_paths)
    assert caught.value.details == [
        {"index": 0, "reason": "timestamp: Unix seconds (a number, or its text)"}
    ]


def test_errors_name_fields_as_the_client_does() -> None:
    error = InvalidInput(
        "bad", details=[{"index": 0, "reason": "metric: must match; id: required"}]
    )
    assert renamed(error, lago.FIELD_NAMES).details == [
        {"index": 0, "reason": "code: must match; transaction_id: required"}
    ]


def test_value_at_follows_dotted_paths() -> None:
    assert value_at({"a": {"b": 3}}, "$.a.b") == 3
    assert value_at({"a": {"b": 3}}, "a.b") == 3
    assert value_at({"a": 1}, "$.a.b") is MISSING
