"""Billing periods and their segments: which stretches of time a run at `as_of` invoices. Pure.

Periods roll forward on the subscription's billing cycle anchor (shared.subscriptions), the same
arithmetic renew_period uses, so billing and the subscription lifecycle never disagree on a bound.
A subscription canceled at an instant is billed up to that instant: its last period is cut there
(`end`), and keeps its anchored end (`scheduled_end`) for the proration of its flat fee. A period
is split into segments at every plan change inside it; each segment is priced on its own plan.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from shared.subscriptions import next_period, roll_periods


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime
    # The anchored end when the period was cut short by a cancellation (None: `end` is it).
    scheduled_end: datetime | None = None

    @property
    def anchored_end(self) -> datetime:
        return self.scheduled_end or self.end

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
    ends_at: datetime | None = None,
) -> ToBill:
    """The current period and every period begun since, up to `as_of`, oldest first.

    `anchor` is the subscription's billing cycle anchor (None: the current period's start).
    `ends_at` is when billing of the subscription ends (its cancellation): periods continue up to
    it (even past a current period that no run moved on), and the one it falls in is cut there.
    A subscription set to cancel at period end has no period after its current one
    (shared.subscriptions.roll_periods, the rule renew_period uses); one that does not renew and
    has no end is billed for its current period. A period not begun yet has nothing to bill.
    """
    if as_of < current.start:
        return ToBill([])
    if ends_at is None:
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
    if ends_at <= current.start:
        return ToBill([])
    bounds = [(current.start, current.end)]
    while bounds[-1][1] <= as_of and bounds[-1][1] < ends_at:
        bounds.append(next_period(anchor or current.start, bounds[-1][1], interval))
    periods = [Period(start, end) for start, end in bounds]
    last = periods[-1]
    if ends_at < last.end:
        periods[-1] = Period(last.start, ends_at, scheduled_end=last.end)
    return ToBill(periods)


@dataclass(frozen=True)
class Phase:
    """From `starts_at` on, the subscription is on `plan_id` (until the next phase)."""

    starts_at: datetime
    plan_id: uuid.UUID


@dataclass(frozen=True)
class Segment:
    start: datetime
    end: datetime
    plan_id: uuid.UUID


def plan_at(phases: Sequence[Phase], moment: datetime, default: uuid.UUID) -> uuid.UUID:
    """The plan in effect at `moment`: the last phase begun by then (before the first phase, the
    first phase's plan; with no phases, the subscription's own plan)."""
    if not phases:
        return default
    plan = phases[0].plan_id
    for phase in phases:
        if phase.starts_at > moment:
            break
        plan = phase.plan_id
    return plan


def segments_of(period: Period, phases: Sequence[Phase], default: uuid.UUID) -> list[Segment]:
    """The period split at every plan change strictly inside it, oldest first; consecutive
    phases on the same plan make one segment."""
    cuts = [p.starts_at for p in phases if period.start < p.starts_at < period.end]
    bounds = [period.start, *cuts, period.end]
    segments: list[Segment] = []
    for start, end in itertools.pairwise(bounds):
        plan = plan_at(phases, start, default)
        if segments and segments[-1].plan_id == plan:
            segments[-1] = Segment(segments[-1].start, end, plan)
        else:
            segments.append(Segment(start, end, plan))
    return segments
