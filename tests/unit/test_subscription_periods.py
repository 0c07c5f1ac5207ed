"""Billing periods anchored like Stripe's billing_cycle_anchor: pure arithmetic, property-tested."""

from __future__ import annotations

import calendar
import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.periods import Period, billing_periods
from shared.errors import InvalidInput
from shared.subscriptions import next_period, period_bounds, period_containing

anchors = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
intervals = st.sampled_from(["month", "year"])
counts = st.integers(min_value=-600, max_value=600)


def _months(interval: str) -> int:
    return 12 if interval == "year" else 1


@given(anchors, counts, intervals)
def test_consecutive_periods_meet_without_gap_or_overlap(
    anchor: datetime, n: int, interval: str
) -> None:
    start, end = period_bounds(anchor, n, interval)
    next_start, next_end = period_bounds(anchor, n + 1, interval)

    assert start < end == next_start < next_end


@given(anchors, counts, intervals)
def test_each_end_is_the_anchor_day_clamped_to_its_month(
    anchor: datetime, n: int, interval: str
) -> None:
    _, end = period_bounds(anchor, n, interval)

    month_index = anchor.year * 12 + anchor.month - 1 + (n + 1) * _months(interval)
    assert (end.year, end.month - 1) == divmod(month_index, 12)
    assert end.day == min(anchor.day, calendar.monthrange(end.year, end.month)[1])
    assert end.time() == anchor.time() and end.tzinfo == anchor.tzinfo


@given(anchors, st.integers(min_value=0, max_value=200 * 366 * 24 * 3600), intervals)
def test_the_containing_period_holds_the_moment_and_lies_on_the_grid(
    anchor: datetime, seconds: int, interval: str
) -> None:
    moment = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)

    start, end = period_containing(anchor, moment, interval)

    assert start <= moment < end
    months_apart = (moment.year - anchor.year) * 12 + moment.month - anchor.month
    near = months_apart // _months(interval)
    assert (start, end) in {period_bounds(anchor, n, interval) for n in range(near - 2, near + 3)}


def test_monthly_periods_from_jan_31_keep_the_anchor_day() -> None:
    anchor = datetime(2027, 1, 31, 9, 30, tzinfo=UTC)

    ends = [period_bounds(anchor, n, "month")[1] for n in range(3)]

    assert [end.date().isoformat() for end in ends] == ["2027-02-28", "2027-03-31", "2027-04-30"]
    assert all(end.hour == 9 and end.minute == 30 for end in ends)


def test_a_yearly_period_from_feb_29_ends_on_feb_28_then_returns_to_feb_29() -> None:
    anchor = datetime(2024, 2, 29, tzinfo=UTC)

    ends = [period_bounds(anchor, n, "year")[1].date().isoformat() for n in range(4)]

    assert ends == ["2025-02-28", "2026-02-28", "2027-02-28", "2028-02-29"]


def test_the_period_after_a_clamped_end_returns_to_the_anchor_day() -> None:
    anchor = datetime(2027, 1, 31, tzinfo=UTC)

    start, end = next_period(anchor, datetime(2027, 2, 28, tzinfo=UTC), "month")

    assert (start.day, end) == (28, datetime(2027, 3, 31, tzinfo=UTC))


def test_an_unknown_interval_is_refused() -> None:
    with pytest.raises(InvalidInput):
        period_bounds(datetime(2027, 1, 1, tzinfo=UTC), 0, "week")


def test_billing_rolls_closed_periods_forward_on_the_anchor() -> None:
    anchor = datetime(2027, 1, 31, tzinfo=UTC)
    current = Period(anchor, datetime(2027, 2, 28, tzinfo=UTC))

    periods = billing_periods(
        current, "month", datetime(2027, 4, 1, tzinfo=UTC), renews=True, anchor=anchor
    ).periods

    assert [(p.start.date().isoformat(), p.end.date().isoformat()) for p in periods] == [
        ("2027-01-31", "2027-02-28"),
        ("2027-02-28", "2027-03-31"),
        ("2027-03-31", "2027-04-30"),
    ]


@given(anchors, intervals, st.integers(min_value=0, max_value=40))
def test_billed_periods_tile_time_from_the_current_one_to_as_of(
    anchor: datetime, interval: str, closed: int
) -> None:
    current = Period(*period_bounds(anchor, 0, interval))
    as_of = period_bounds(anchor, closed, interval)[0] + timedelta(seconds=1)

    periods = billing_periods(current, interval, as_of, renews=True, anchor=anchor).periods

    assert periods[0] == current and len(periods) == closed + 1
    assert all(a.end == b.start for a, b in itertools.pairwise(periods))
    assert periods[-1].start <= as_of < periods[-1].end
    assert [(p.start, p.end) for p in periods] == [
        period_bounds(anchor, n, interval) for n in range(closed + 1)
    ]


def test_billing_gives_a_subscription_set_to_cancel_no_next_period_and_cancels_it_at_its_end() -> (
    None
):
    current = Period(datetime(2027, 1, 1, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC))

    open_ = billing_periods(
        current, "month", datetime(2027, 1, 20, tzinfo=UTC), renews=True, cancel_at_period_end=True
    )
    ended = billing_periods(
        current, "month", datetime(2027, 3, 5, tzinfo=UTC), renews=True, cancel_at_period_end=True
    )

    assert (open_.periods, open_.canceled_at) == ([current], None)
    assert (ended.periods, ended.canceled_at) == ([current], current.end)
