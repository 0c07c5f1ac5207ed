"""The identity rule: an event is (organization, id); a conflict is only a difference in what the
client sent. A timestamp that ingest filled in (the client sent none) never makes a conflict."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import pytest

from services.aggregator.batch import (
    CountableEvent,
    CountedVersion,
    ReadRules,
    SourceRecord,
    counted_version,
    is_repeat,
    read_records,
    select_new_events,
)
from services.ingest.service import parse_events
from shared.events import (
    Envelope,
    UsageEvent,
    decode_envelope,
    encode_envelope,
    fingerprint,
    identity_digest,
    validate_event,
)

ORG = uuid.UUID("00000000-0000-0000-0000-0000000000aa")
PROJECT = uuid.UUID("00000000-0000-0000-0000-0000000000bb")
OTHER_PROJECT = uuid.UUID("00000000-0000-0000-0000-0000000000cc")
FIRST_RECEIVED = datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=UTC)
RESENT = FIRST_RECEIVED + timedelta(seconds=7, microseconds=5)
CLIENT_TIME = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)
RULES = ReadRules(
    lateness_horizon=timedelta(days=35), max_future=timedelta(minutes=5), window_seconds=3600
)
LIMITS = {"horizon": timedelta(days=35), "max_future": timedelta(minutes=5)}


def sent(
    *,
    received_at: datetime,
    timestamp: datetime | None = None,
    quantity: str = "1",
    metric: str = "api_calls",
    project_id: uuid.UUID | None = PROJECT,
    properties: dict[str, str] | None = None,
) -> CountableEvent:
    """Event "e1" as the aggregator reads it after ingest accepted it at `received_at`;
    `timestamp=None`: the client sent none."""
    usage = UsageEvent(
        id="e1",
        metric=metric,
        quantity=Decimal(quantity),
        timestamp=timestamp or received_at,
        project_id=project_id,
        properties=properties or {},
        timestamp_defaulted=timestamp is None,
    )
    value = encode_envelope(
        Envelope(v=2, organization_id=ORG, api_key_id=None, received_at=received_at, events=[usage])
    )
    (event,), _ = read_records([SourceRecord("t", 0, 0, None, None, value)], RULES)
    return event


def test_resend_without_timestamp_is_a_duplicate() -> None:
    first = sent(received_at=FIRST_RECEIVED)
    resend = sent(received_at=RESENT)

    assert resend.event.timestamp != first.event.timestamp
    assert is_repeat(counted_version(first), resend)


def test_first_sent_with_timestamp_then_resent_without_is_a_duplicate() -> None:
    first = sent(received_at=FIRST_RECEIVED, timestamp=CLIENT_TIME)

    assert is_repeat(counted_version(first), sent(received_at=RESENT))


def test_first_sent_without_timestamp_then_resent_with_one_is_a_duplicate() -> None:
    first = sent(received_at=FIRST_RECEIVED)

    assert is_repeat(counted_version(first), sent(received_at=RESENT, timestamp=CLIENT_TIME))


def test_resend_with_the_same_explicit_timestamp_is_a_duplicate() -> None:
    first = sent(received_at=FIRST_RECEIVED, timestamp=CLIENT_TIME)

    assert is_repeat(counted_version(first), sent(received_at=RESENT, timestamp=CLIENT_TIME))


@pytest.mark.parametrize(
    "change",
    [
        {"quantity": "2"},
        {"metric": "storage_gb"},
        {"timestamp": CLIENT_TIME - timedelta(microseconds=1)},
        {"project_id": OTHER_PROJECT},
        {"project_id": None},
    ],
    ids=["quantity", "metric", "timestamp", "project", "no-project"],
)
def test_resend_with_other_explicit_content_is_a_conflict(change: dict[str, object]) -> None:
    first = sent(received_at=FIRST_RECEIVED, timestamp=CLIENT_TIME)
    resend = sent(**{"received_at": RESENT, "timestamp": CLIENT_TIME, **change})  # type: ignore[arg-type]

    assert not is_repeat(counted_version(first), resend)


@pytest.mark.parametrize(
    "change",
    [{"quantity": "2"}, {"metric": "storage_gb"}, {"project_id": OTHER_PROJECT}],
    ids=["quantity", "metric", "project"],
)
@pytest.mark.parametrize("first_timestamp", [None, CLIENT_TIME], ids=["untimed", "timed"])
def test_resend_without_timestamp_but_other_content_is_still_a_conflict(
    change: dict[str, object], first_timestamp: datetime | None
) -> None:
    first = sent(received_at=FIRST_RECEIVED, timestamp=first_timestamp)
    resend = sent(**{"received_at": RESENT, **change})  # type: ignore[arg-type]

    assert not is_repeat(counted_version(first), resend)


def test_properties_are_not_part_of_the_identity() -> None:
    first = sent(received_at=FIRST_RECEIVED, timestamp=CLIENT_TIME, properties={"region": "eu"})
    resend = sent(received_at=RESENT, timestamp=CLIENT_TIME, properties={"region": "us"})

    assert fingerprint(first.event) == fingerprint(resend.event)
    assert is_repeat(counted_version(first), resend)


def test_a_storm_of_untimed_resends_counts_the_first_and_conflicts_with_nothing() -> None:
    versions = [sent(received_at=FIRST_RECEIVED + timedelta(seconds=n)) for n in range(50)]

    selection = select_new_events(versions, {})

    assert (len(selection.new), selection.duplicates, selection.conflicts) == (1, 49, [])
    assert selection.new[0].event.timestamp == FIRST_RECEIVED


def test_ledger_row_written_before_the_flag_existed_still_matches_an_untimed_resend() -> None:
    # Before timestamp_defaulted, ingest's time was hashed like a client's: the ledger row holds
    # the digest at the first receipt time, and that time as its event_time.
    legacy = CountedVersion(
        identity_digest(sent(received_at=FIRST_RECEIVED).event, FIRST_RECEIVED), FIRST_RECEIVED
    )

    assert is_repeat(legacy, sent(received_at=RESENT))
    assert not is_repeat(legacy, sent(received_at=RESENT, quantity="3"))


def test_explicit_timestamp_fingerprint_is_unchanged_from_envelope_v1() -> None:
    event = sent(received_at=FIRST_RECEIVED, timestamp=CLIENT_TIME).event

    assert fingerprint(event) == identity_digest(event, CLIENT_TIME)
    assert fingerprint(event) != identity_digest(event, None)


def test_envelope_v1_without_the_field_reads_as_client_sent_timestamps() -> None:
    v1 = (
        b'{"v":1,"organization_id":"' + str(ORG).encode() + b'","api_key_id":null,'
        b'"received_at":"2026-11-24T10:00:00Z","events":[{"id":"e1","metric":"api_calls",'
        b'"quantity":"1","timestamp":"2026-11-24T10:00:00Z","project_id":null,"properties":{}}]}'
    )

    (event,) = decode_envelope(v1).events

    assert event.timestamp_defaulted is False


def test_envelope_carries_the_flag_only_when_ingest_filled_the_timestamp_in() -> None:
    timed = sent(received_at=FIRST_RECEIVED, timestamp=CLIENT_TIME).event
    untimed = sent(received_at=FIRST_RECEIVED).event

    assert b"timestamp_defaulted" not in msgspec.json.encode(timed)
    assert b'"timestamp_defaulted":true' in msgspec.json.encode(untimed)


@pytest.mark.parametrize(
    ("body", "defaulted"),
    [
        (b'{"id": "a", "metric": "api_calls"}', [True]),
        (b'{"id": "a", "metric": "api_calls", "timestamp": null}', [True]),
        (b'{"id": "a", "metric": "api_calls", "timestamp": "2026-11-24T09:30:00Z"}', [False]),
        (
            b'{"events": [{"id": "a", "metric": "m"}, '
            b'{"id": "b", "metric": "m", "timestamp": "2026-11-24T09:30:00+00:00"}]}',
            [True, False],
        ),
    ],
)
def test_ingest_marks_the_timestamps_it_fills_in(body: bytes, defaulted: list[bool]) -> None:
    events = parse_events(body, now=FIRST_RECEIVED, **LIMITS)

    assert [e.timestamp_defaulted for e in events] == defaulted
    assert all(e.timestamp == FIRST_RECEIVED for e in events if e.timestamp_defaulted)


@pytest.mark.parametrize(
    ("raw", "defaulted"),
    [
        ({"id": "a", "metric": "m", "quantity": "1.50"}, True),
        ({"id": "a", "metric": "m", "timestamp": "2026-11-24t09:30:00z"}, False),
    ],
)
def test_validation_marks_the_timestamps_it_fills_in(
    raw: dict[str, object], defaulted: bool
) -> None:
    event = validate_event(raw, now=FIRST_RECEIVED, **LIMITS)

    assert isinstance(event, UsageEvent) and event.timestamp_defaulted is defaulted
