"""Billing periods: which periods of a subscription a run at `as_of` must invoice. Pure.

Periods roll forward on the subscription's billing cycle anchor (shared.subscriptions), the same
arithmetic renew_period uses, so billing and the subscription lifecycle never disagree on a bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from shared.subscriptions import next_period


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime

    def closed_at(self, as_of: datetime) -> bool:
        return as_of >= self.end


def periods_to_bill(
    current: Period,
    interval: str,
    as_of: datetime,
    *,
    renews: bool,
    anchor: datetime | None = None,
) -> list[Period]:
    """The current period and every period closed since it began, oldest first.

    `anchor` is the subscription's billing cycle anchor (None: the current period's start).
    A subscription that does not renew (canceled) has no period after its current one.
    A subscription whose period has not begun yet has nothing to bill.
    """
    if as_of < current.start:
        return []
    anchor = anchor or current.start
    periods = [current]
    while renews and periods[-1].closed_at(as_of):
        periods.append(Period(*next_period(anchor, periods[-1].end, interval)))
    return periods
