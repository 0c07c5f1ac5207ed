"""The slices a replay's range is rebuilt in: consecutive, whole windows, within the budget."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.aggregator.replay_staging import plan_slices

START = datetime(2026, 11, 1, tzinfo=UTC)
END = START + timedelta(hours=10)


def hours(n: int) -> datetime:
    return START + timedelta(hours=n)


def test_slices_cover_the_range_end_to_end_packing_windows_up_to_the_budget() -> None:
    counts = [(hours(0), 40), (hours(1), 40), (hours(2), 30), (hours(5), 90), (hours(7), 10)]

    slices = plan_slices(START, END, counts, 100)

    assert slices == [(START, hours(2)), (hours(2), hours(5)), (hours(5), END)]


def test_a_window_over_the_budget_is_a_slice_alone() -> None:
    counts = [(hours(1), 5), (hours(2), 500), (hours(3), 5)]

    assert plan_slices(START, END, counts, 100) == [
        (START, hours(2)),
        (hours(2), hours(3)),
        (hours(3), END),
    ]


def test_a_range_with_nothing_staged_is_one_slice() -> None:
    assert plan_slices(START, END, [], 100) == [(START, END)]
