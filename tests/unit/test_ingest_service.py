"""The pure decisions of ingest: parsing and validation, projects, envelopes, caches, rate limit."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest.keycache import ProjectInfo
from services.ingest.service import (
    MAX_MESSAGE_BYTES,
    build_envelopes,
    check_projects,
    parse_bearer,
    parse_events,
)
from shared.apikeys import VerifiedKey
from shared.errors import Forbidden, InvalidInput
from shared.events import decode_envelope, validate_event

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
HORIZON = timedelta(days=35)
FUTURE = timedelta(minutes=5)
ORG = uuid.uuid4()
PROJECT = uuid.uuid4()


def parse(body: object, default_project: uuid.UUID | None = None) -> list:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_events(
        data, now=NOW, horizon=HORIZON, max_future=FUTURE, default_project=default_project
    )


def key(project_id: uuid.UUID | None = None) -> VerifiedKey:
    return VerifiedKey(
        id=uuid.uuid4(), organization_id=ORG, project_id=project_id, user_id=None, expires_at=None
    )


def test_single_event_gets_defaults() -> None:
    [event] = parse({"id": "a", "metric": "api_calls"})
    assert event.quantity == Decimal(1)
    assert event.timestamp == NOW
    assert event.project_id is None
    assert event.properties == {}


def test_quantities_stay_exact() -> None:
    body = (
        b'{"events": [{"id": "a", "metric": "m", "quantity": 0.100000000001},'
        b'{"id": "b", "metric": "m", "quantity": "12.5"},'
        b'{"id": "c", "metric": "m", "quantity": 0}]}'
    )
    assert [e.quantity for e in parse(body)] == [
        Decimal("0.100000000001"),
        Decimal("12.5"),
        Decimal(0),
    ]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # More places than NUMERIC sums keep exact, or than PostgreSQL stores at all.
        (b'{"id": "a", "metric": "m", "quantity": 0.0000000000001}', "decimal places"),
        (b'{"id": "a", "metric": "m", "quantity": "1E-20000"}', "decimal places"),
        (b'{"id": "a", "metric": "m", "quantity": 1e-999999999}', "decimal places"),
        # Valid RFC 3339 whose UTC instant falls outside what a datetime holds.
        (b'{"id": "a", "metric": "m", "timestamp": "9999-12-31T23:59:59-23:59"}', "out of range"),
        (b'{"id": "a", "metric": "m", "timestamp": "0001-01-01T00:00:00+01:00"}', "out of range"),
    ],
)
def test_uncountable_values_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        parse(body)
    assert reason in str(raised.value.details)


# JSON spells NUL as \u0000 and a lone surrogate as \ud800; both parse, neither can be stored.
UNSTORABLE_BODIES = {
    "id-nul": (rb'{"id": "a\u0000b", "metric": "m"}', "id: contains U+0000"),
    "id-surrogate": (rb'{"id": "a\ud800", "metric": "m"}', "id: contains a lone UTF-16"),
    "metric-nul": (rb'{"id": "a", "metric": "m\u0000"}', "metric: contains U+0000"),
    "project-nul": (
        rb'{"id": "a", "metric": "m", "project_id": "\u0000"}',
        "project_id: contains U+0000",
    ),
    "property-name-nul": (
        rb'{"id": "a", "metric": "m", "properties": {"k\u0000": "v"}}',
        "properties: the name 'k\\x00' contains U+0000",
    ),
    "property-value-surrogate": (
        rb'{"id": "a", "metric": "m", "properties": {"region": "\udc00"}}',
        "properties.region: contains a lone UTF-16",
    ),
}


@pytest.mark.parametrize(("body", "reason"), UNSTORABLE_BODIES.values(), ids=UNSTORABLE_BODIES)
def test_text_postgresql_cannot_store_is_refused_naming_the_field(body: bytes, reason: str) -> None:
    batch = b'{"events": [{"id": "fine", "metric": "m"}, ' + body + b"]}"
    with pytest.raises(InvalidInput) as raised:
        parse(batch)
    assert raised.value.details == [{"index": 1, "reason": raised.value.details[0]["reason"]}]
    assert raised.value.details[0]["reason"].startswith(reason)


def test_escapes_that_are_storable_text_are_accepted() -> None:
    [emoji, backslash] = parse(
        rb'{"events": [{"id": "\ud83d\ude00", "metric": "m"}, {"id": "\\u0000", "metric": "m"}]}'
    )
    assert (emoji.id, backslash.id) == ("\U0001f600", "\\u0000")


def test_deeply_nested_body_is_invalid_input_not_a_crash() -> None:
    with pytest.raises(InvalidInput, match="nested too deeply"):
        parse(b"[" * 100_000 + b"]" * 100_000)


def test_event_without_project_takes_the_default_project() -> None:
    [event] = parse({"id": "a", "metric": "m"}, default_project=PROJECT)
    assert event.project_id == PROJECT


def test_every_bad_event_is_listed_by_index() -> None:
    with pytest.raises(InvalidInput) as raised:
        parse({"events": [{"id": "a", "metric": "m"}, {"id": "", "metric": "m"}, 7]})
    assert [d["index"] for d in raised.value.details] == [1, 2]


def test_metric_with_trailing_newline_is_refused() -> None:
    with pytest.raises(InvalidInput):
        parse({"id": "a", "metric": "api_calls\n"})


@pytest.mark.parametrize(
    "stamp",
    ["2026-11-24T12:05:01Z", "2026-10-20T11:59:59Z"],
    ids=["past-future-bound", "past-horizon"],
)
def test_timestamps_outside_the_window_are_refused(stamp: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        parse({"id": "a", "metric": "m", "timestamp": stamp})
    assert raised.value.details[0]["reason"].startswith("timestamp:")


def test_offset_timestamps_are_normalised_to_utc() -> None:
    [event] = parse({"id": "a", "metric": "m", "timestamp": "2026-11-24T13:00:00+02:00"})
    assert event.timestamp == datetime(2026, 11, 24, 11, tzinfo=UTC)
    assert event.timestamp.utcoffset() == timedelta(0)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**13), max_value=10**13),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["1.5", "NaN", "-0", "1e12", "1e13", " 2 ", "Infinity", "0.000"]),
)
stamps = st.one_of(
    st.datetimes(
        min_value=datetime(2026, 10, 1),
        max_value=datetime(2026, 12, 31),
        timezones=st.sampled_from([UTC]),
    ).map(lambda d: d.isoformat()),
    st.sampled_from(
        ["2026-11-24T10:00:00", "2026-11-24", "yesterday", "2026-11-24T10:00:00+05:30"]
    ),
)
raw_events = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=130), json_scalars),
        "metric": st.one_of(st.from_regex(r"\A[a-z][a-z0-9_.-]{0,64}\n?\Z"), json_scalars),
        "quantity": json_scalars,
        "timestamp": st.one_of(stamps, json_scalars),
        "project_id": st.one_of(st.uuids().map(str), st.just("nope"), st.none()),
        "properties": st.one_of(
            st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=17),
            st.lists(st.integers(), max_size=1),
            st.none(),
        ),
        "extra": st.integers(),
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(raw_events, min_size=1, max_size=4))
def test_fast_path_and_validate_event_agree(items: list[dict[str, object]]) -> None:
    """Whatever the request, ingest accepts exactly what shared.events.validate_event accepts,
    with the same values (the C decoder is an optimisation, not a second rulebook)."""
    body = msgspec.json.encode({"events": items})
    lenient = msgspec.json.Decoder(float_hook=Decimal).decode(body)["events"]
    expected = [
        validate_event(item, now=NOW, horizon=HORIZON, max_future=FUTURE) for item in lenient
    ]
    if any(isinstance(result, list) for result in expected):
        with pytest.raises(InvalidInput):
            parse(body)
    else:
        assert parse(body) == expected


def test_scoped_key_may_not_write_another_project() -> None:
    other = uuid.uuid4()
    [event] = parse({"id": "a", "metric": "m", "project_id": str(other)}, PROJECT)
    with pytest.raises(Forbidden):
        check_projects([event], key(PROJECT), {other: ProjectInfo(ORG, False)})


def test_project_of_another_organization_or_archived_is_forbidden() -> None:
    foreign, archived, own = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    events = parse(
        {
            "events": [
                {"id": str(i), "metric": "m", "project_id": str(p)}
                for i, p in enumerate([own, foreign, archived])
            ]
        }
    )
    projects = {
        own: ProjectInfo(ORG, False),
        foreign: ProjectInfo(uuid.uuid4(), False),
        archived: ProjectInfo(ORG, True),
    }
    with pytest.raises(Forbidden) as raised:
        check_projects(events, key(), projects)
    assert [d["index"] for d in raised.value.details] == [1, 2]


def test_large_request_is_split_into_envelopes_under_the_message_limit() -> None:
    verified = key()
    big = "x" * 256
    events = parse(
        {
            "events": [
                {"id": f"{i:0128d}", "metric": "m", "properties": {f"k{j}": big for j in range(16)}}
                for i in range(300)
            ]
        }
    )
    values = build_envelopes(verified, events, NOW)
    assert len(values) > 1
    assert all(len(v) <= MAX_MESSAGE_BYTES for v in values)
    decoded = [decode_envelope(v) for v in values]
    assert [e.id for d in decoded for e in d.events] == [e.id for e in events]
    assert {d.organization_id for d in decoded} == {ORG}


def test_bearer_header_parsing() -> None:
    assert parse_bearer("Bearer abc") == "abc"
    assert parse_bearer("bearer  abc ") == "abc"
    assert parse_bearer("Basic abc") is None
    assert parse_bearer("Bearer ") is None
    assert parse_bearer(None) is None
