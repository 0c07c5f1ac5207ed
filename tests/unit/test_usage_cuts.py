"""Usage cuts, the pure part: which events a cut's part holds, which instants split windows."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from shared.events import window_start
from shared.usage_cuts import Cut, CutEvent, cut_deltas, splits_windows

ORG = uuid.UUID(int=1)
OTHER = uuid.UUID(int=2)
HOUR = datetime(2026, 11, 3, 13, tzinfo=UTC)


def at(seconds: float, organization: uuid.UUID = ORG, quantity: str = "1") -> CutEvent:
    moment = HOUR + timedelta(seconds=seconds)
    return CutEvent(
        organization, moment, window_start(moment, 3600), "api_calls", Decimal(quantity)
    )


def test_a_cut_holds_the_events_at_or_after_it_in_its_window_only() -> None:
    cut = Cut(ORG, HOUR + timedelta(minutes=27, seconds=45))
    events = [
        at(27 * 60 + 44.999999, quantity="1"),  # just before: not in the cut's part
        at(27 * 60 + 45, quantity="2"),  # exactly at the cut: in it
        at(3599.999999, quantity="4"),  # the window's last instant: in it
        at(3600, quantity="8"),  # the next window: not in it
        at(27 * 60 + 50, organization=OTHER, quantity="16"),  # another organization
    ]

    [delta] = cut_deltas(events, [cut], 3600)

    assert (delta.cut, delta.metric, delta.quantity, delta.event_count) == (
        cut,
        "api_calls",
        Decimal(6),
        2,
    )


def test_a_cut_at_a_window_start_holds_nothing() -> None:
    assert cut_deltas([at(0), at(10)], [Cut(ORG, HOUR)], 3600) == []


def test_two_cuts_in_one_window_each_hold_what_follows_them() -> None:
    first, second = (Cut(ORG, HOUR + timedelta(minutes=m)) for m in (10, 40))
    events = [at(5 * 60), at(20 * 60, quantity="3"), at(50 * 60, quantity="5")]

    deltas = {d.cut: d.quantity for d in cut_deltas(events, [second, first], 3600)}

    assert deltas == {first: Decimal(8), second: Decimal(5)}


def test_only_utc_midnights_split_no_window() -> None:
    assert not splits_windows(datetime(2026, 11, 3, tzinfo=UTC))
    assert splits_windows(datetime(2026, 11, 3, 13, tzinfo=UTC))
    assert splits_windows(datetime(2026, 11, 3, 0, 0, 0, 1, tzinfo=UTC))


@given(
    st.lists(st.integers(min_value=0, max_value=3 * 3600 - 1), max_size=40),
    st.integers(min_value=1, max_value=3 * 3600 - 1),
)
def test_the_parts_before_and_after_a_cut_add_up_to_its_window(
    offsets: list[int], cut_offset: int
) -> None:
    cut = Cut(ORG, HOUR + timedelta(seconds=cut_offset))
    events = [at(offset) for offset in offsets]
    window = window_start(cut.at, 3600)
    in_window = [e for e in events if e.window_start == window]

    after = sum((d.quantity for d in cut_deltas(events, [cut], 3600)), Decimal(0))

    assert after == sum(e.quantity for e in in_window if e.timestamp >= cut.at)
    assert after <= sum((e.quantity for e in in_window), Decimal(0))
