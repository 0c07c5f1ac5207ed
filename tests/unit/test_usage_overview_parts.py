"""The usage overview's range as rollup rows, the pure part: whole months and signed runs of days
that count every day of the range once and no other day."""

from __future__ import annotations

from datetime import date, timedelta

from hypothesis import example, given
from hypothesis import strategies as st

from shared.usage_overview import RangeParts, range_parts

DAYS = st.dates(min_value=date(2024, 1, 1), max_value=date(2028, 12, 31))


def _times_counted(parts: RangeParts, day: date) -> int:
    months = sum(1 for m in parts.months if (m.year, m.month) == (day.year, day.month))
    return months + sum(sign for a, b, sign in parts.days if a <= day < b)


@given(DAYS, st.integers(min_value=1, max_value=400), DAYS)
@example(date(2025, 3, 3), 26, date(2028, 1, 1))  # a month less days at both of its ends
def test_every_day_of_the_range_is_counted_once_and_no_other(
    start: date, length: int, today: date
) -> None:
    end = start + timedelta(days=length)

    parts = range_parts(start, end, today)

    month_start = date(start.year, start.month, 1)
    for offset in range(-1, (end - month_start).days + 32):
        day = month_start + timedelta(days=offset)
        assert _times_counted(parts, day) == (1 if start <= day < end else 0), day


def test_thirty_days_ending_tomorrow_read_a_month_less_a_day_and_this_months_days() -> None:
    parts = range_parts(date(2026, 11, 2), date(2026, 12, 3), today=date(2026, 12, 2))

    assert parts.months == (date(2026, 11, 1),)
    assert parts.days == (
        (date(2026, 11, 1), date(2026, 11, 2), -1),
        (date(2026, 12, 1), date(2026, 12, 3), 1),
    )


def test_a_month_read_in_part_past_tomorrow_is_the_month_without_its_first_days() -> None:
    parts = range_parts(date(2026, 12, 3), date(2027, 1, 1), today=date(2026, 12, 20))

    assert parts == RangeParts((date(2026, 12, 1),), ((date(2026, 12, 1), date(2026, 12, 3), -1),))


def test_a_few_days_inside_a_month_are_read_as_days() -> None:
    parts = range_parts(date(2026, 11, 10), date(2026, 11, 14), today=date(2026, 12, 2))

    assert parts == RangeParts((), ((date(2026, 11, 10), date(2026, 11, 14), 1),))


def test_whole_months_are_read_as_months() -> None:
    parts = range_parts(date(2026, 1, 1), date(2026, 4, 1), today=date(2026, 12, 2))

    assert parts == RangeParts((date(2026, 1, 1), date(2026, 2, 1), date(2026, 3, 1)), ())
