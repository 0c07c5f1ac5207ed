"""Subscription renewal on the stored billing cycle anchor, against real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session

from shared.models import BillingInterval, SubscriptionStatus
from shared.subscriptions import cancel_at_period_end, create_subscription, renew_period
from tests import factories

JAN_31 = datetime(2027, 1, 31, 12, 0, tzinfo=UTC)


def _subscribe(db: Session, now: datetime, interval: BillingInterval = BillingInterval.MONTH):
    organization = factories.make_organization(db)
    plan = factories.make_plan(db, price_monthly=1000)
    return create_subscription(
        db, organization_id=organization.id, plan_id=plan.id, interval=interval, now=now
    )


def test_a_new_subscription_is_anchored_on_its_start(db: Session) -> None:
    subscription = _subscribe(db, JAN_31)

    db.expire_all()
    assert subscription.billing_cycle_anchor == JAN_31
    assert subscription.current_period_end == datetime(2027, 2, 28, 12, 0, tzinfo=UTC)


def test_renewal_from_jan_31_keeps_the_anchor_day_instead_of_drifting(db: Session) -> None:
    subscription = _subscribe(db, JAN_31)

    renew_period(db, subscription.id, now=datetime(2027, 3, 5, tzinfo=UTC))

    db.expire_all()
    assert subscription.current_period_start == datetime(2027, 2, 28, 12, 0, tzinfo=UTC)
    assert subscription.current_period_end == datetime(2027, 3, 31, 12, 0, tzinfo=UTC)


def test_renewal_over_many_closed_periods_lands_on_the_period_holding_now(db: Session) -> None:
    subscription = _subscribe(db, JAN_31)

    renew_period(db, subscription.id, now=datetime(2027, 9, 30, 13, 0, tzinfo=UTC))

    db.expire_all()
    assert subscription.current_period_start == datetime(2027, 9, 30, 12, 0, tzinfo=UTC)
    assert subscription.current_period_end == datetime(2027, 10, 31, 12, 0, tzinfo=UTC)


def test_a_row_without_an_anchor_renews_on_its_current_period_start(db: Session) -> None:
    organization = factories.make_organization(db)
    plan = factories.make_plan(db)
    subscription = factories.make_subscription(
        db,
        organization,
        plan,
        period_start=datetime(2027, 3, 31, tzinfo=UTC),
        period_end=datetime(2027, 4, 30, tzinfo=UTC),
    )
    assert subscription.billing_cycle_anchor is None

    renew_period(db, subscription.id, now=datetime(2027, 5, 1, tzinfo=UTC))

    db.expire_all()
    assert subscription.current_period_start == datetime(2027, 4, 30, tzinfo=UTC)
    assert subscription.current_period_end == datetime(2027, 5, 31, tzinfo=UTC)


def test_a_subscription_set_to_cancel_is_canceled_at_period_end_not_renewed(db: Session) -> None:
    subscription = _subscribe(db, JAN_31, BillingInterval.YEAR)
    cancel_at_period_end(db, subscription.id)

    renew_period(db, subscription.id, now=datetime(2028, 2, 1, tzinfo=UTC))

    db.expire_all()
    assert subscription.status == SubscriptionStatus.CANCELED
    assert subscription.canceled_at == datetime(2028, 1, 31, 12, 0, tzinfo=UTC)
    assert subscription.current_period_end == datetime(2028, 1, 31, 12, 0, tzinfo=UTC)


def test_an_incomplete_subscription_is_not_renewed_as_it_never_started(db: Session) -> None:
    subscription = _subscribe(db, JAN_31)
    subscription.status = SubscriptionStatus.INCOMPLETE
    db.flush()

    renew_period(db, subscription.id, now=datetime(2027, 5, 1, tzinfo=UTC))

    db.expire_all()
    assert (subscription.status, subscription.current_period_start) == ("incomplete", JAN_31)
