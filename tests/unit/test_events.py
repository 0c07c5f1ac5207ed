"""The event rules and the envelope shared by ingest and the aggregator."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.events import (
    ENVELOPE_VERSION,
    Envelope,
    EnvelopeError,
    UsageEvent,
    decode_envelope,
    encode_envelope,
    fingerprint,
    validate_event,
    window_start,
)

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
RULES = {"now": NOW, "horizon": timedelta(days=35), "max_future": timedelta(minutes=5)}


def test_minimal_event_defaults_quantity_and_timestamp() -> None:
    event = validate_event({"id": "req_1", "metric": "api_calls"}, **RULES)
    assert isinstance(event, UsageEvent)
    assert event.quantity == Decimal(1)
    assert event.timestamp == NOW


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"metric": "api_calls"}, "id"),
        ({"id": "", "metric": "api_calls"}, "id"),
        ({"id": "x" * 129, "metric": "api_calls"}, "id"),
        ({"id": "a", "metric": "API"}, "metric"),
        ({"id": "a", "metric": "a" * 65}, "metric"),
        ({"id": "a", "metric": "m", "quantity": -1}, "quantity"),
        ({"id": "a", "metric": "m", "quantity": "1e13"}, "quantity"),
        ({"id": "a", "metric": "m", "quantity": "NaN"}, "quantity"),
        ({"id": "a", "metric": "m", "quantity": True}, "quantity"),
        ({"id": "a", "metric": "m", "timestamp": "2026-11-24T10:06:00Z"}, "timestamp"),
        ({"id": "a", "metric": "m", "timestamp": "2026-10-01T00:00:00Z"}, "timestamp"),
        ({"id": "a", "metric": "m", "timestamp": "2026-11-24T10:00:00"}, "timestamp"),
        ({"id": "a", "metric": "m", "project_id": "nope"}, "project_id"),
        ({"id": "a", "metric": "m", "properties": {str(i): "v" for i in range(17)}}, "properties"),
        ({"id": "a", "metric": "m", "properties": {"k": 1}}, "properties"),
        ({"id": "a", "metric": "m", "extra": 1}, "unknown field"),
    ],
)
def test_invalid_event_names_the_field(raw: dict[str, object], field: str) -> None:
    problems = validate_event(raw, **RULES)
    assert isinstance(problems, list)
    assert any(problem.startswith(field) for problem in problems), problems


def test_every_problem_is_listed() -> None:
    problems = validate_event({"metric": "BAD", "quantity": -5}, **RULES)
    assert isinstance(problems, list) and len(problems) == 3


def test_float_quantity_is_exact_shortest_decimal() -> None:
    event = validate_event({"id": "a", "metric": "m", "quantity": 0.1}, **RULES)
    assert isinstance(event, UsageEvent) and event.quantity == Decimal("0.1")


def _event_strategy() -> st.SearchStrategy[UsageEvent]:
    return st.builds(
        UsageEvent,
        id=st.text(min_size=1, max_size=128),
        metric=st.from_regex(r"\A[a-z][a-z0-9_.-]{0,63}\Z"),
        quantity=st.decimals(min_value=0, max_value=10**12, allow_nan=False, places=6),
        timestamp=st.datetimes(timezones=st.just(UTC)),
        project_id=st.one_of(st.none(), st.uuids()),
        properties=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=16),
        timestamp_defaulted=st.booleans(),
    )


@given(
    st.lists(_event_strategy(), min_size=1, max_size=5),
    st.uuids(),
    st.one_of(st.none(), st.uuids()),
)
def test_envelope_round_trips(
    events: list[UsageEvent], org: uuid.UUID, key: uuid.UUID | None
) -> None:
    envelope = Envelope(
        v=ENVELOPE_VERSION, organization_id=org, api_key_id=key, received_at=NOW, events=events
    )
    decoded = decode_envelope(encode_envelope(envelope))
    assert decoded == envelope
    assert [fingerprint(e) for e in decoded.events] == [fingerprint(e) for e in events]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "malformed"),
        (b'{"v": 99, "organization_id": "x"}', "unknown envelope version"),
        (b"[]", "malformed"),
        (b"[" * 100_000 + b"]" * 100_000, "malformed"),
        (b'{"v": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "malformed"),
    ],
)
def test_unreadable_envelope_gives_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError, match=reason):
        decode_envelope(data)


def test_quantity_with_more_than_twelve_places_is_refused() -> None:
    problems = validate_event({"id": "a", "metric": "m", "quantity": "0.0000000000001"}, **RULES)
    assert isinstance(problems, list) and "decimal places" in problems[0]
    event = validate_event({"id": "a", "metric": "m", "quantity": "2.500000000000000"}, **RULES)
    assert isinstance(event, UsageEvent) and event.quantity == Decimal("2.5")


def test_negative_quantity_in_envelope_is_refused() -> None:
    envelope = Envelope(
        v=1,
        organization_id=uuid.uuid4(),
        api_key_id=None,
        received_at=NOW,
        events=[UsageEvent(id="a", metric="m", quantity=Decimal(-1), timestamp=NOW)],
    )
    with pytest.raises(EnvelopeError, match="quantity"):
        decode_envelope(encode_envelope(envelope))


def test_fingerprint_differs_when_content_differs() -> None:
    base = UsageEvent(id="a", metric="m", quantity=Decimal("1.0"), timestamp=NOW)
    same = UsageEvent(
        id="a", metric="m", quantity=Decimal("1"), timestamp=NOW, properties={"x": "y"}
    )
    other = UsageEvent(id="a", metric="m", quantity=Decimal("2"), timestamp=NOW)
    assert fingerprint(base) == fingerprint(same)
    assert fingerprint(base) != fingerprint(other)


@given(
    st.datetimes(min_value=datetime(2000, 1, 1), timezones=st.just(UTC)),
    st.sampled_from([60, 300, 3600, 86400]),
)
def test_window_holds_its_timestamp(timestamp: datetime, seconds: int) -> None:
    start = window_start(timestamp, seconds)
    assert start <= timestamp < start + timedelta(seconds=seconds)
    assert int(start.timestamp()) % seconds == 0
