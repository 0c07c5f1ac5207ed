"""The aggregator's pure core: window bucketing, reading records, first-accepted-wins dedupe."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext

from hypothesis import given
from hypothesis import strategies as st

from services.aggregator.batch import (
    ReadRules,
    SourceRecord,
    counted_version,
    read_records,
    select_new_events,
    split_at_ledger_floor,
    sum_windows,
)
from services.aggregator.ledger_partitions import month_start, next_month, partition_name
from services.aggregator.replay import aligned_range, metric_changes
from shared.events import Envelope, UsageEvent, decode_envelope, encode_envelope, window_start

NOW = datetime(2026, 11, 24, 10, 30, tzinfo=UTC)
RULES = ReadRules(
    lateness_horizon=timedelta(days=35), max_future=timedelta(minutes=5), window_seconds=3600
)
ORG = uuid.UUID("00000000-0000-0000-0000-0000000000aa")

instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
window_sizes = st.sampled_from([60, 300, 900, 3600, 86400]) | st.integers(60, 86400)


@given(instants, window_sizes)
def test_window_holds_its_timestamp_and_is_aligned(moment: datetime, seconds: int) -> None:
    start = window_start(moment, seconds)
    assert start <= moment < start + timedelta(seconds=seconds)
    assert int(start.timestamp()) % seconds == 0


@given(instants, window_sizes)
def test_every_instant_of_a_window_buckets_to_the_same_start(
    moment: datetime, seconds: int
) -> None:
    start = window_start(moment, seconds)
    assert window_start(start, seconds) == start
    assert (
        window_start(start + timedelta(seconds=seconds) - timedelta(microseconds=1), seconds)
        == start
    )


@given(instants, instants, window_sizes)
def test_aligned_range_covers_the_request_with_whole_windows(
    a: datetime, b: datetime, seconds: int
) -> None:
    start, end = sorted((a, b))
    if start == end:
        return
    first, last = aligned_range(start, end, seconds)
    assert first <= start and end <= last
    assert int(first.timestamp()) % seconds == 0 and int(last.timestamp()) % seconds == 0
    assert last - first < (end - start) + timedelta(seconds=2 * seconds)


@given(instants)
def test_each_event_time_has_exactly_one_monthly_partition(moment: datetime) -> None:
    month = month_start(moment)
    assert month <= moment < next_month(month)
    assert partition_name(month) == f"usage_event_ledger_p{month:%Y%m}01"


def usage(event_id: str, quantity: str = "1", timestamp: datetime = NOW) -> UsageEvent:
    return UsageEvent(
        id=event_id, metric="api_calls", quantity=Decimal(quantity), timestamp=timestamp
    )


def source(events: list[UsageEvent], offset: int = 0, received_at: datetime = NOW) -> SourceRecord:
    value = encode_envelope(
        Envelope(v=1, organization_id=ORG, api_key_id=None, received_at=received_at, events=events)
    )
    return SourceRecord("t", 0, offset, None, None, value)


def test_first_version_of_an_id_wins_within_a_batch() -> None:
    events, _ = read_records(
        [source([usage("a", "1")], 0), source([usage("a", "1"), usage("a", "2")], 1)], RULES
    )

    selection = select_new_events(events, {})

    assert [e.event.quantity for e in selection.new] == [Decimal(1)]
    assert selection.duplicates == 1
    assert [e.event.quantity for e in selection.conflicts] == [Decimal(2)]


def test_ledger_version_wins_over_the_batch() -> None:
    events, _ = read_records([source([usage("a", "5"), usage("b")])], RULES)
    ledger = {(ORG, "a"): counted_version(events[0])}

    selection = select_new_events(events, ledger)

    assert [e.event.id for e in selection.new] == ["b"]
    assert selection.duplicates == 1


@given(st.lists(st.tuples(st.sampled_from("abcde"), st.sampled_from(["1", "2"])), max_size=40))
def test_selection_keeps_one_event_per_id_and_accounts_for_every_event(
    pairs: list[tuple[str, str]],
) -> None:
    events, _ = read_records([source([usage(i, q) for i, q in pairs])] if pairs else [], RULES)

    selection = select_new_events(events, {})

    assert sorted(e.event.id for e in selection.new) == sorted({i for i, _ in pairs})
    assert len(selection.new) + selection.duplicates + len(selection.conflicts) == len(pairs)


def test_unreadable_record_becomes_a_dead_letter_with_its_bytes() -> None:
    events, dead = read_records([SourceRecord("t", 3, 42, None, b"k", b"\x00garbage")], RULES)

    assert events == []
    assert [(d.code, d.source.partition, d.source.offset, d.payload) for d in dead] == [
        ("malformed", 3, 42, b"\x00garbage")
    ]


def test_only_the_too_old_event_of_an_envelope_is_dead_lettered() -> None:
    old = usage("old", timestamp=NOW - timedelta(days=40))

    events, dead = read_records([source([old, usage("fresh")])], RULES)

    assert [e.event.id for e in events] == ["fresh"]
    assert [d.code for d in dead] == ["too_old"]
    assert [e.id for e in decode_envelope(dead[0].payload).events] == ["old"]


def test_event_far_ahead_of_its_received_time_is_dead_lettered() -> None:
    ahead = usage("ahead", timestamp=NOW + timedelta(minutes=6))

    events, dead = read_records([source([ahead], received_at=NOW)], RULES)

    assert events == [] and [d.code for d in dead] == ["too_far_ahead"]


def test_window_of_1e12_and_1e_minus_12_sums_exactly_whatever_the_ambient_precision() -> None:
    events, _ = read_records(
        [source([usage("big", "1000000000000"), usage("tiny", "1e-12")])], RULES
    )

    with localcontext() as narrow:
        narrow.prec = 12
        [total] = sum_windows(events).values()

    assert total.quantity == Decimal("1000000000000.000000000001")
    assert total.event_count == 2


def test_ten_thousand_events_of_1e12_and_one_of_1e_minus_12_sum_exactly() -> None:
    events, _ = read_records(
        [source([usage("big", "1000000000000"), usage("tiny", "1e-12")])], RULES
    )
    big, tiny = events

    [total] = sum_windows([big] * 10_000 + [tiny]).values()

    assert total.quantity == Decimal("10000000000000000.000000000001")
    assert total.event_count == 10_001


def test_replay_change_report_sums_exactly() -> None:
    events, _ = read_records(
        [source([usage("big", "1000000000000"), usage("tiny", "1e-12")])], RULES
    )
    big, tiny = (sum_windows([e]) for e in events)
    many_windows = {
        (k[0], k[1], k[2], k[3], k[4] + timedelta(hours=n)): v
        for n in range(1, 10_001)
        for k, v in big.items()
    }

    [change] = metric_changes({}, {**many_windows, **tiny})

    assert change.quantity_after == Decimal("10000000000000000.000000000001")


def test_event_ingest_accepted_at_the_horizon_counts_however_late_it_is_read() -> None:
    received = NOW - timedelta(days=90)  # read long after an outage: no clock is involved
    edge = usage("edge", timestamp=received - timedelta(days=35))

    events, dead = read_records([source([edge], received_at=received)], RULES)

    assert [e.event.id for e in events] == ["edge"] and dead == []


def test_event_below_the_ledger_floor_is_a_retryable_dead_letter() -> None:
    floor = datetime(2026, 11, 1, tzinfo=UTC)
    events, _ = read_records(
        [source([usage("pruned", timestamp=floor - timedelta(hours=1)), usage("kept")])], RULES
    )

    kept, dead = split_at_ledger_floor(events, floor)

    assert [e.event.id for e in kept] == ["kept"]
    assert [(d.code, d.retryable) for d in dead] == [("ledger_partition_missing", True)]
    assert "pruned" in dead[0].reason
