"""Subscription lifecycle: create, change plan, cancel (at period end or now), renew, status.

The rules that keep every unit of usage billed once: an organization holds at most one live
subscription (the database's partial unique index, so two concurrent creates cannot both win), a
new subscription starts no earlier than the end of the organization's previous one, a plan change
starts a phase at its instant (billing prices each side on its own plan), and a cancellation ends
billing at its instant. None of them reaches into a period that has ended."""

from __future__ import annotations

import calendar
import functools
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from shared import subscription_repository as repository
from shared.access import require_organization
from shared.errors import Conflict, InvalidInput, NotFound
from shared.models import (
    LIVE_STATUS_VALUES,
    BillingInterval,
    Plan,
    Subscription,
    SubscriptionPhase,
    SubscriptionStatus,
)
from shared.organizations import check_external_id

#: Statuses in which a subscription renews (gets its next period) and is billed: it started and
#: is not over. Not `incomplete`: its first payment never succeeded, so it never started (Stripe
#: bills nothing for it and expires it to incomplete_expired), and it must not accrue periods.
RENEWING_STATUSES = frozenset(
    {
        SubscriptionStatus.TRIALING,
        SubscriptionStatus.ACTIVE,
        SubscriptionStatus.PAST_DUE,
        SubscriptionStatus.UNPAID,
        SubscriptionStatus.PAUSED,
    }
)
#: Statuses in which an organization holds its subscription (one at a time, plan changes
#: allowed): the renewing ones and `incomplete`, which awaits its first payment. The database's
#: unique index is defined over the same values (shared.models.LIVE_STATUS_VALUES).
LIVE_STATUSES = RENEWING_STATUSES | {SubscriptionStatus.INCOMPLETE}
assert {str(status) for status in LIVE_STATUSES} == set(LIVE_STATUS_VALUES)
#: Statuses a billing run invoices: the renewing ones, and a canceled one for its last period.
BILLED_STATUSES = RENEWING_STATUSES | {SubscriptionStatus.CANCELED}


_MONTHS_PER_INTERVAL = {BillingInterval.MONTH: 1, BillingInterval.YEAR: 12}


def _interval_months(interval: BillingInterval | str) -> int:
    try:
        return _MONTHS_PER_INTERVAL[BillingInterval(interval)]
    except ValueError:
        raise InvalidInput(f"unknown billing interval {interval!r}") from None


def _shift_months(anchor: datetime, months: int) -> datetime:
    """`anchor` moved by whole months, its day clamped to the target month's last day."""
    year, month_index = divmod(anchor.month - 1 + months, 12)
    year += anchor.year
    day = min(anchor.day, calendar.monthrange(year, month_index + 1)[1])
    return anchor.replace(year=year, month=month_index + 1, day=day)


def period_bounds(
    anchor: datetime, n: int, interval: BillingInterval | str
) -> tuple[datetime, datetime]:
    """The `n`-th billing period (0 starts at `anchor`; negative counts back) as Stripe anchors
    it: every boundary is the anchor's day and time of day, clamped to the month, always counted
    from the anchor and never from the previous boundary, so Jan 31 -> Feb 28 -> Mar 31."""
    months = _interval_months(interval)
    return _shift_months(anchor, n * months), _shift_months(anchor, (n + 1) * months)


def period_containing(
    anchor: datetime, moment: datetime, interval: BillingInterval | str
) -> tuple[datetime, datetime]:
    """The anchored period with start <= moment < end."""
    months = _interval_months(interval)
    n = ((moment.year - anchor.year) * 12 + moment.month - anchor.month) // months
    start, end = period_bounds(anchor, n, interval)
    # The month arithmetic can be one period off either way (day and time of day within it).
    while moment < start:
        n -= 1
        start, end = period_bounds(anchor, n, interval)
    while end <= moment:
        n += 1
        start, end = period_bounds(anchor, n, interval)
    return start, end


# Pure, and a billing run asks it the same few anchors and ends for every subscription.
@functools.lru_cache(maxsize=4096)
def next_period(
    anchor: datetime, end: datetime, interval: BillingInterval | str
) -> tuple[datetime, datetime]:
    """The period that follows one ending at `end`: from `end` to the next anchored boundary.
    On the anchor's grid that is simply the next anchored period; a period that ended off the
    grid (set by hand or from before the anchor was stored) is brought back onto it."""
    return end, period_containing(anchor, end, interval)[1]


@dataclass(frozen=True)
class Rollover:
    """Where a subscription's periods stand at a moment: its current period, then each period that
    followed it by then (the last one contains the moment), and, when the current period ended
    while set to cancel at period end, the time it was canceled (that period's end) instead."""

    periods: list[tuple[datetime, datetime]]
    canceled_at: datetime | None = None


def roll_periods(
    anchor: datetime,
    current: tuple[datetime, datetime],
    interval: BillingInterval | str,
    *,
    now: datetime,
    cancel_at_period_end: bool,
) -> Rollover:
    """The one rule of renewal, for the lifecycle (renew_period) and for billing alike: a period
    that ends is followed by the next anchored one, unless the subscription was set to cancel at
    period end, in which case nothing follows it and the subscription is canceled at its end."""
    periods = [current]
    if cancel_at_period_end:
        return Rollover(periods, current[1] if current[1] <= now else None)
    while periods[-1][1] <= now:
        periods.append(next_period(anchor, periods[-1][1], interval))
    return Rollover(periods)


def _plan(session: Session, plan_id: uuid.UUID) -> Plan:
    plan = repository.plan_by_id(session, plan_id)
    if plan is None:
        raise NotFound(f"plan {plan_id} not found")
    if not plan.active:
        raise InvalidInput(f"plan {plan.key!r} is not active")
    return plan


def _subscription(session: Session, subscription_id: uuid.UUID) -> Subscription:
    subscription = repository.subscription_by_id(session, subscription_id, for_update=True)
    if subscription is None:
        raise NotFound(f"subscription {subscription_id} not found")
    return subscription


def subscription_start(subscription: Subscription) -> datetime:
    """When billing of the subscription began: its anchor (rows from before the anchor was
    stored: their current period's start)."""
    return subscription.billing_cycle_anchor or subscription.current_period_start


def billing_end(subscription: Subscription) -> datetime | None:
    """When billing of the subscription ends or ended: its cancellation (None: it goes on)."""
    if subscription.status == SubscriptionStatus.CANCELED:
        return subscription.canceled_at or subscription.current_period_end
    if subscription.status == SubscriptionStatus.INCOMPLETE_EXPIRED:
        return subscription_start(subscription)
    return None


def _settle_ended(session: Session, live: Subscription, at: datetime) -> bool:
    """A live subscription set to cancel at the end of a period that ended by `at` is over,
    even if no billing run has marked it yet: mark it canceled at that end (the renewal rule)."""
    if live.cancel_at_period_end and live.current_period_end <= at:
        live.status = SubscriptionStatus.CANCELED
        live.canceled_at = live.current_period_end
        live.cancel_at_period_end = False
        repository.save(session)
        return True
    return False


def create_subscription(
    session: Session,
    *,
    organization_id: uuid.UUID,
    plan_id: uuid.UUID,
    interval: BillingInterval,
    now: datetime,
    trial_days: int = 0,
    stripe_subscription_id: str | None = None,
    external_id: str | None = None,
) -> Subscription:
    """A new subscription starting at `now`, anchored there. Conflict if the organization holds
    a live one, or if `now` is before its previous subscription's billing ended (the two would
    bill the same usage), or if another subscription has `external_id`."""
    repository.lock_organization(session, organization_id)
    require_organization(session, organization_id)
    _plan(session, plan_id)
    if trial_days < 0:
        raise InvalidInput("trial days must not be negative")
    if external_id is not None:
        check_external_id(external_id)
        if repository.subscription_by_external_id(session, external_id) is not None:
            raise Conflict(f"a subscription with external id {external_id!r} already exists")
    live = repository.live_subscription(session, organization_id, for_update=True)
    if live is not None and not _settle_ended(session, live, now):
        raise Conflict(
            f"organization {organization_id} already has a live subscription ({live.id}); "
            "cancel it first"
        )
    previous_end = _previous_end(session, organization_id)
    if previous_end is not None and now < previous_end:
        raise Conflict(
            f"a subscription of organization {organization_id} was billed until "
            f"{previous_end.isoformat()}: a new one cannot start before that"
        )
    subscription = Subscription(
        organization_id=organization_id,
        plan_id=plan_id,
        status=SubscriptionStatus.TRIALING if trial_days else SubscriptionStatus.ACTIVE,
        billing_interval=interval,
        current_period_start=now,
        current_period_end=period_bounds(now, 0, interval)[1],
        billing_cycle_anchor=now,
        cancel_at_period_end=False,
        trial_end=now + timedelta(days=trial_days) if trial_days else None,
        stripe_subscription_id=stripe_subscription_id,
        external_id=external_id,
    )
    if not repository.insert_subscription(session, subscription):
        raise Conflict(
            f"organization {organization_id} already has a live subscription "
            "(created concurrently); cancel it first"
        )
    repository.add_phase(
        session, SubscriptionPhase(subscription_id=subscription.id, plan_id=plan_id, starts_at=now)
    )
    repository.save(session)
    return subscription


def _previous_end(session: Session, organization_id: uuid.UUID) -> datetime | None:
    ended = repository.canceled_subscriptions(session, organization_id)
    ends = [end for end in (billing_end(s) for s in ended) if end is not None]
    return max(ends, default=None)


def change_plan(
    session: Session,
    subscription_id: uuid.UUID,
    *,
    plan_id: uuid.UUID,
    now: datetime,
    interval: BillingInterval | None = None,
) -> Subscription:
    """Switch the plan from `now` on: usage and time before `now` stay on the old plan, after it
    on the new one (billing splits the period there and prorates the flat fees). The billing
    interval cannot change in the middle of a subscription, nor the currency."""
    subscription = _subscription(session, subscription_id)
    if subscription.status not in LIVE_STATUSES:
        raise Conflict(f"subscription {subscription_id} is {subscription.status}, not live")
    if interval is not None and interval != subscription.billing_interval:
        raise InvalidInput(
            "the billing interval of a subscription cannot change: cancel it and create a new "
            f"one on the {interval} interval"
        )
    plan = _plan(session, plan_id)
    current = repository.plan_by_id(session, subscription.plan_id)
    if current is not None and plan.currency != current.currency:
        raise InvalidInput(
            f"plan {plan.key!r} is priced in {plan.currency}, the subscription in "
            f"{current.currency}: one invoice cannot mix currencies"
        )
    phases = repository.phases_of(session, subscription_id)
    latest = phases[-1].starts_at if phases else subscription_start(subscription)
    floor = max(latest, subscription.current_period_start)
    if now < floor:
        raise InvalidInput(
            f"a plan change cannot take effect before {floor.isoformat()} (the current period "
            "or the last change): a period that has ended is never re-priced"
        )
    if plan.id == subscription.plan_id:
        return subscription
    if not phases:
        repository.add_phase(
            session,
            SubscriptionPhase(
                subscription_id=subscription.id,
                plan_id=subscription.plan_id,
                starts_at=subscription_start(subscription),
            ),
        )
    if phases and phases[-1].starts_at == now:
        phases[-1].plan_id = plan.id
    else:
        repository.add_phase(
            session,
            SubscriptionPhase(subscription_id=subscription.id, plan_id=plan.id, starts_at=now),
        )
    subscription.plan_id = plan.id
    repository.save(session)
    return subscription


def cancel_at_period_end(session: Session, subscription_id: uuid.UUID) -> Subscription:
    subscription = _subscription(session, subscription_id)
    if subscription.status not in LIVE_STATUSES:
        raise Conflict(f"subscription {subscription_id} is {subscription.status}, not live")
    subscription.cancel_at_period_end = True
    repository.save(session)
    return subscription


def cancel_now(session: Session, subscription_id: uuid.UUID, *, now: datetime) -> Subscription:
    """End the subscription at `now`: usage until `now` is billed on its last invoice (its flat
    fee prorated to `now`), nothing after it."""
    subscription = _subscription(session, subscription_id)
    if subscription.status not in LIVE_STATUSES:
        raise Conflict(f"subscription {subscription_id} is {subscription.status}, not live")
    floor = subscription.current_period_start
    if now < floor:
        raise InvalidInput(
            f"a cancellation cannot take effect before {floor.isoformat()}, the start of the "
            "current period: a period that has ended is never re-priced"
        )
    subscription.status = SubscriptionStatus.CANCELED
    subscription.canceled_at = now
    subscription.cancel_at_period_end = False
    repository.save(session)
    return subscription


def renew_period(session: Session, subscription_id: uuid.UUID, *, now: datetime) -> Subscription:
    """Roll every period that has ended by `now` forward on the subscription's billing cycle
    anchor; a subscription set to cancel at period end is canceled instead of renewed."""
    subscription = _subscription(session, subscription_id)
    if subscription.status not in RENEWING_STATUSES:
        return subscription
    # Rows from before the anchor was stored are anchored on their current period's start.
    anchor = subscription.billing_cycle_anchor or subscription.current_period_start
    rollover = roll_periods(
        anchor,
        (subscription.current_period_start, subscription.current_period_end),
        subscription.billing_interval,
        now=now,
        cancel_at_period_end=subscription.cancel_at_period_end,
    )
    if rollover.canceled_at is not None:
        subscription.status = SubscriptionStatus.CANCELED
        subscription.canceled_at = rollover.canceled_at
    elif len(rollover.periods) > 1:
        subscription.current_period_start, subscription.current_period_end = rollover.periods[-1]
        if subscription.trial_end and subscription.trial_end <= subscription.current_period_start:
            subscription.status = SubscriptionStatus.ACTIVE
    repository.save(session)
    return subscription


def set_status(
    session: Session, subscription_id: uuid.UUID, status: SubscriptionStatus, *, now: datetime
) -> Subscription:
    subscription = _subscription(session, subscription_id)
    subscription.status = status
    if status == SubscriptionStatus.CANCELED and subscription.canceled_at is None:
        subscription.canceled_at = now
    repository.save(session)
    return subscription


def get_subscription(session: Session, subscription_id: uuid.UUID) -> Subscription:
    subscription = repository.subscription_by_id(session, subscription_id)
    if subscription is None:
        raise NotFound(f"subscription {subscription_id} not found")
    return subscription
