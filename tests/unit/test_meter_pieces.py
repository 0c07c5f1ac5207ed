"""The pure core of meter pieces: which piece an event falls in, and what of a cut window a
segment bills (shared.meter_pieces)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from shared.meter_pieces import (
    PieceEvent,
    WindowPart,
    merge_parts,
    piece_start,
    pieces_of,
    segment_parts,
)
from shared.meter_usage import MeterTotal
from shared.usage_cuts import Cut

ORG = uuid.UUID("01a236cf-0000-7000-8000-000000000001")
HOUR = datetime(2026, 11, 3, 10, tzinfo=UTC)
CUT = HOUR + timedelta(minutes=17, seconds=33)


def event(at: datetime, quantity: str, event_id: str, value: str | None = None) -> PieceEvent:
    return PieceEvent(ORG, "seats", '{"region":"eu"}', HOUR, at, event_id, Decimal(quantity), value)


def test_an_event_at_a_cut_starts_the_piece_after_it_and_one_before_stays_in_the_first() -> None:
    cuts = [CUT, CUT + timedelta(minutes=20)]
    assert piece_start(cuts, HOUR, CUT - timedelta(seconds=1)) == HOUR
    assert piece_start(cuts, HOUR, CUT) == CUT
    assert piece_start(cuts, HOUR, CUT + timedelta(minutes=25)) == cuts[1]


def test_events_of_a_window_without_a_cut_make_no_piece() -> None:
    other = Cut(ORG, HOUR + timedelta(hours=2, minutes=5))
    assert pieces_of([event(CUT, "3", "a")], [other], 3600).pieces == {}


def test_pieces_hold_every_aggregation_and_the_distinct_values_of_their_side() -> None:
    events = [
        event(HOUR + timedelta(minutes=1), "9", "a", "u1"),
        event(CUT - timedelta(seconds=1), "2", "b", "u2"),
        event(CUT, "4", "c", "u1"),
        event(CUT + timedelta(seconds=1), "1", "d", "u3"),
    ]
    found = pieces_of(events, [Cut(ORG, CUT)], 3600)
    key = (ORG, "seats", '{"region":"eu"}', HOUR, 3600)
    before = found.pieces[(*key, HOUR)]
    after = found.pieces[(*key, CUT)]
    assert (before.quantity, before.event_count, before.max_quantity) == (Decimal(11), 2, 9)
    assert (before.latest_quantity, before.latest_event_id) == (Decimal(2), "b")
    assert (after.quantity, after.min_quantity, after.latest_quantity) == (Decimal(5), 1, 1)
    assert {v for k, v in found.values if k[5] == CUT} == {"u1", "u3"}


def part(start: datetime, total: MeterTotal, values: frozenset[str] = frozenset()) -> WindowPart:
    return WindowPart('{"region":"eu"}', HOUR, 3600, start, total, values)


WINDOW = MeterTotal(Decimal(7), 3, Decimal(4), Decimal(1), Decimal(1), CUT, "z")
FIRST = MeterTotal(Decimal(6), 2, Decimal(4), Decimal(2), Decimal(2), HOUR, "y")
SECOND = MeterTotal(Decimal(1), 1, Decimal(1), Decimal(1), Decimal(1), CUT, "z")


def test_a_segment_starting_at_a_registered_cut_takes_the_pieces_after_it() -> None:
    pieces = [part(HOUR, FIRST, frozenset({"u1"})), part(CUT, SECOND, frozenset({"u2"}))]
    end = CUT + timedelta(days=30)
    billed = segment_parts([part(HOUR, WINDOW)], pieces, CUT, end, frozenset({CUT}))
    assert billed == [pieces[1]]
    before = segment_parts([part(HOUR, WINDOW)], pieces, HOUR - timedelta(days=30), CUT,
                           frozenset({CUT}))  # fmt: skip
    assert before == [pieces[0]]


def test_a_cut_window_whose_pieces_miss_events_is_billed_by_its_start() -> None:
    pieces = [part(CUT, SECOND)]  # the events before the cut are not in the ledger
    end = CUT + timedelta(days=30)
    assert segment_parts([part(HOUR, WINDOW)], pieces, CUT, end, frozenset({CUT})) == []
    earlier = segment_parts([part(HOUR, WINDOW)], pieces, HOUR, CUT, frozenset({CUT}))
    assert earlier == [part(HOUR, WINDOW)]


def test_a_boundary_that_is_not_a_registered_cut_bills_the_window_by_its_start() -> None:
    pieces = [part(HOUR, FIRST), part(CUT, SECOND)]
    end = CUT + timedelta(days=30)
    assert segment_parts([part(HOUR, WINDOW)], pieces, CUT, end, frozenset()) == []


def test_a_window_wholly_inside_the_segment_is_billed_whole() -> None:
    window = part(HOUR, WINDOW)
    billed = segment_parts([window], [], HOUR, HOUR + timedelta(days=1), frozenset())
    assert billed == [window]


def aggregate(events: list[PieceEvent]) -> tuple[Decimal, int, Decimal, Decimal, Decimal]:
    quantities = [e.quantity for e in events]
    latest = max(events, key=lambda e: (e.timestamp, e.event_id))
    return (
        sum(quantities, Decimal(0)),
        len(events),
        max(quantities),
        min(quantities),
        latest.quantity,
    )


@given(
    seconds=st.lists(st.integers(0, 3599), min_size=1, max_size=30),
    quantities=st.lists(st.integers(0, 500), min_size=30, max_size=30),
    cut_second=st.integers(1, 3599),
    boundary_is_end=st.booleans(),
)
def test_merged_pieces_of_each_side_equal_the_aggregations_of_that_sides_events(
    seconds: list[int], quantities: list[int], cut_second: int, boundary_is_end: bool
) -> None:
    cut = HOUR + timedelta(seconds=cut_second)
    events = [
        event(HOUR + timedelta(seconds=s), str(quantities[i]), f"e{i}", f"u{quantities[i] % 4}")
        for i, s in enumerate(seconds)
    ]
    found = pieces_of(events, [Cut(ORG, cut)], 3600)
    pieces = []
    for key, total in found.pieces.items():
        values = frozenset(v for k, v in found.values if k == key)
        pieces.append(part(key[5], total, values))
    window_total = pieces[0].total
    for piece in pieces[1:]:
        window_total = window_total.merge(piece.total)
    window = part(HOUR, window_total)
    if boundary_is_end:
        start, end = HOUR - timedelta(days=1), cut
        side = [e for e in events if e.timestamp < cut]
    else:
        start, end = cut, cut + timedelta(days=1)
        side = [e for e in events if e.timestamp >= cut]
    merged = merge_parts(segment_parts([window], pieces, start, end, frozenset({cut})))
    if not side:
        assert merged == {}
        return
    ((total, values),) = merged.values()
    assert (
        total.quantity, total.event_count, total.max_quantity, total.min_quantity,
        total.latest_quantity,
    ) == aggregate(side)  # fmt: skip
    assert values == {e.value for e in side}
