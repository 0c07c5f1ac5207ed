"""Billing periods: which periods of a subscription a run at `as_of` must invoice. Pure.

Periods roll forward on the subscription's billing cycle anchor (shared.subscriptions), the same
arithmetic renew_period uses, so billing and the subscription lifecycle never disagree on a bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from shared.subscriptions import roll_periods


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime

    def closed_at(self, as_of: datetime) -> bool:
        return as_of >= self.end


@dataclass(frozen=True)
class ToBill:
    """The periods a run invoices, oldest first, and when the subscription was canceled if its
    current period ended set to cancel at period end (the run marks it canceled)."""

    periods: list[Period]
    canceled_at: datetime | None = None


def billing_periods(
    current: Period,
    interval: str,
    as_of: datetime,
    *,
    renews: bool,
    anchor: datetime | None = None,
    cancel_at_period_end: bool = False,
) -> ToBill:
    """The current period and every period closed since it began, oldest first.

    `anchor` is the subscription's billing cycle anchor (None: the current period's start).
    A subscription that does not renew (canceled), or is set to cancel at period end, has no
    period after its current one: shared.subscriptions.roll_periods, the rule renew_period uses.
    A subscription whose period has not begun yet has nothing to bill.
    """
    if as_of < current.start:
        return ToBill([])
    if not renews:
        return ToBill([current])
    rollover = roll_periods(
        anchor or current.start,
        (current.start, current.end),
        interval,
        now=as_of,
        cancel_at_period_end=cancel_at_period_end,
    )
    return ToBill([Period(*bounds) for bounds in rollover.periods], rollover.canceled_at)
