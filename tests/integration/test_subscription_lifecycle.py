"""Subscription rules against real PostgreSQL: one live subscription per organization, kept by the
database even against concurrent creates; no overlap after a cancellation; no plan change or
cancellation reaching into a period that has ended."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db import unit_of_work
from shared.errors import Conflict, InvalidInput
from shared.models import BillingInterval, SubscriptionPhase, SubscriptionStatus
from shared.subscriptions import (
    cancel_at_period_end,
    cancel_now,
    change_plan,
    create_subscription,
)
from tests import factories

START = datetime(2026, 10, 3, 13, 27, 45, tzinfo=UTC)


def _organization_and_plans(engine: Engine) -> tuple[Any, Any, Any]:
    with unit_of_work(engine) as session:
        organization = factories.make_organization(session)
        one = factories.make_plan(session, price_monthly=1000)
        two = factories.make_plan(session, price_monthly=3000)
        return organization.id, one.id, two.id


def _create(session: Session, organization_id: Any, plan_id: Any, now: datetime = START) -> Any:
    return create_subscription(
        session,
        organization_id=organization_id,
        plan_id=plan_id,
        interval=BillingInterval.MONTH,
        now=now,
    )


def test_two_concurrent_creates_one_wins_the_other_gets_a_clear_error(engine: Engine) -> None:
    organization_id, plan_id, _ = _organization_and_plans(engine)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def create() -> None:
        barrier.wait()
        try:
            with unit_of_work(engine) as session:
                _create(session, organization_id, plan_id)
            outcomes.append("created")
        except Conflict as exc:
            outcomes.append(exc.message)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    refused = [outcome for outcome in outcomes if outcome != "created"]
    assert outcomes.count("created") == 1
    assert len(refused) == 1
    assert refused[0].startswith(f"organization {organization_id} already has a live")
    with engine.connect() as connection:
        live = connection.execute(
            sa.text(
                "SELECT count(*) FROM subscriptions WHERE organization_id = :org"
                " AND status IN ('active', 'trialing')"
            ),
            {"org": organization_id},
        ).scalar_one()
    assert live == 1


def test_the_database_refuses_a_second_live_subscription_however_it_is_written(
    db: Session,
) -> None:
    organization = factories.make_organization(db)
    plan = factories.make_plan(db)
    factories.make_subscription(db, organization, plan)

    with pytest.raises(IntegrityError, match="uq_subscriptions_one_live_per_organization"):
        factories.make_subscription(db, organization, plan, status=SubscriptionStatus.PAST_DUE)


def test_a_canceled_subscription_leaves_room_for_a_new_one_from_its_cancel_instant(
    db: Session,
) -> None:
    organization = factories.make_organization(db)
    plan = factories.make_plan(db)
    first = _create(db, organization.id, plan.id)
    canceled_at = START + timedelta(days=3, seconds=7)
    cancel_now(db, first.id, now=canceled_at)

    with pytest.raises(Conflict, match="cannot start before"):
        _create(db, organization.id, plan.id, now=canceled_at - timedelta(microseconds=1))
    second = _create(db, organization.id, plan.id, now=canceled_at)

    assert (second.billing_cycle_anchor, second.status) == (canceled_at, "active")


def test_a_subscription_ended_at_its_period_end_gives_way_to_a_new_one(db: Session) -> None:
    organization = factories.make_organization(db)
    plan = factories.make_plan(db)
    first = _create(db, organization.id, plan.id)
    cancel_at_period_end(db, first.id)

    second = _create(db, organization.id, plan.id, now=first.current_period_end)

    assert (first.status, first.canceled_at) == ("canceled", first.current_period_end)
    assert second.status == "active"


def test_a_plan_change_starts_a_phase_at_its_instant(db: Session) -> None:
    organization = factories.make_organization(db)
    one, two = factories.make_plan(db), factories.make_plan(db)
    subscription = _create(db, organization.id, one.id)
    changed_at = START + timedelta(days=9, hours=2, seconds=1)

    change_plan(db, subscription.id, plan_id=two.id, now=changed_at)

    phases = db.execute(
        sa.select(SubscriptionPhase.plan_id, SubscriptionPhase.starts_at)
        .where(SubscriptionPhase.subscription_id == subscription.id)
        .order_by(SubscriptionPhase.starts_at)
    ).all()
    assert [tuple(phase) for phase in phases] == [(one.id, START), (two.id, changed_at)]
    assert subscription.plan_id == two.id


def test_a_plan_change_cannot_reach_into_an_ended_period(db: Session) -> None:
    organization = factories.make_organization(db)
    one, two = factories.make_plan(db), factories.make_plan(db)
    subscription = _create(db, organization.id, one.id)

    with pytest.raises(InvalidInput, match="never re-priced"):
        change_plan(db, subscription.id, plan_id=two.id, now=START - timedelta(seconds=1))


def test_a_plan_in_another_currency_or_another_interval_is_refused(db: Session) -> None:
    organization = factories.make_organization(db)
    usd = factories.make_plan(db)
    eur = factories.make_plan(db, currency="eur")
    subscription = _create(db, organization.id, usd.id)
    later = START + timedelta(days=1)

    with pytest.raises(InvalidInput, match="cannot mix currencies"):
        change_plan(db, subscription.id, plan_id=eur.id, now=later)
    with pytest.raises(InvalidInput, match="interval"):
        change_plan(db, subscription.id, plan_id=usd.id, now=later, interval=BillingInterval.YEAR)


def test_canceling_twice_is_refused(db: Session) -> None:
    organization = factories.make_organization(db)
    plan = factories.make_plan(db)
    subscription = _create(db, organization.id, plan.id)
    cancel_now(db, subscription.id, now=START + timedelta(days=1))

    with pytest.raises(Conflict, match="not live"):
        cancel_now(db, subscription.id, now=START + timedelta(days=2))
