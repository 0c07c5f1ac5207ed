"""Billing periods: which periods of a subscription a run at `as_of` must invoice. Pure."""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime

    def closed_at(self, as_of: datetime) -> bool:
        return as_of >= self.end


def add_interval(moment: datetime, interval: str) -> datetime:
    """One month or year later, clamped to the month's last day (Jan 31 -> Feb 28), as Stripe."""
    months = 12 if interval == "year" else 1
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def periods_to_bill(
    current: Period, interval: str, as_of: datetime, *, renews: bool
) -> list[Period]:
    """The current period and every period closed since it began, oldest first.

    A subscription that does not renew (canceled) has no period after its current one.
    A subscription whose period has not begun yet has nothing to bill.
    """
    if as_of < current.start:
        return []
    periods = [current]
    while renews and periods[-1].closed_at(as_of):
        last = periods[-1]
        periods.append(Period(last.end, add_interval(last.end, interval)))
    return periods
