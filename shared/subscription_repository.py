"""SQL of the subscription lifecycle: subscriptions, their phases and plans, read and locked, and
new rows written. The rules are in shared/subscriptions.py.

Every function takes the caller's Session; none commits.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.models import (
    LIVE_STATUS_VALUES,
    Organization,
    Plan,
    Subscription,
    SubscriptionPhase,
    SubscriptionStatus,
)

#: The partial unique index that holds an organization to one live subscription.
LIVE_INDEX = "uq_subscriptions_one_live_per_organization"


def lock_organization(session: Session, organization_id: uuid.UUID) -> None:
    """Hold the organization's row until the transaction ends: its subscription changes queue."""
    session.get(Organization, organization_id, with_for_update=True)


def plan_by_id(session: Session, plan_id: uuid.UUID) -> Plan | None:
    return session.get(Plan, plan_id)


def plans_by_id(session: Session, plan_ids: set[uuid.UUID]) -> dict[uuid.UUID, Plan]:
    return {plan.id: plan for plan in session.scalars(sa.select(Plan).where(Plan.id.in_(plan_ids)))}


def subscription_by_id(
    session: Session, subscription_id: uuid.UUID, *, for_update: bool = False
) -> Subscription | None:
    return session.get(Subscription, subscription_id, with_for_update=for_update)


def subscription_by_external_id(session: Session, external_id: str) -> uuid.UUID | None:
    """The id of the subscription with this external id, if any."""
    found: uuid.UUID | None = session.scalar(
        sa.select(Subscription.id).where(Subscription.external_id == external_id)
    )
    return found


def live_subscription(
    session: Session, organization_id: uuid.UUID, *, for_update: bool = False
) -> Subscription | None:
    """The organization's live subscription, if any (at most one: the unique index)."""
    query = sa.select(Subscription).where(
        Subscription.organization_id == organization_id,
        Subscription.status.in_(LIVE_STATUS_VALUES),
    )
    return session.scalar(query.with_for_update() if for_update else query)


def canceled_subscriptions(session: Session, organization_id: uuid.UUID) -> list[Subscription]:
    return list(
        session.scalars(
            sa.select(Subscription).where(
                Subscription.organization_id == organization_id,
                Subscription.status == SubscriptionStatus.CANCELED,
            )
        )
    )


def phases_of(session: Session, subscription_id: uuid.UUID) -> list[SubscriptionPhase]:
    """The subscription's plan phases, oldest first."""
    return list(
        session.scalars(
            sa.select(SubscriptionPhase)
            .where(SubscriptionPhase.subscription_id == subscription_id)
            .order_by(SubscriptionPhase.starts_at)
        )
    )


def list_subscriptions(
    session: Session,
    *,
    organization_id: uuid.UUID | None = None,
    status: SubscriptionStatus | None = None,
    limit: int = 1000,
) -> list[Subscription]:
    """Subscriptions, newest first, of one organization or all, in one status or any."""
    query = sa.select(Subscription).order_by(Subscription.created_at.desc()).limit(limit)
    if organization_id is not None:
        query = query.where(Subscription.organization_id == organization_id)
    if status is not None:
        query = query.where(Subscription.status == status)
    return list(session.scalars(query))


def insert_subscription(session: Session, subscription: Subscription) -> bool:
    """Write a new subscription; False (and nothing written) when the one-live index refuses it
    because a concurrent create won. A savepoint keeps the session usable after the refusal."""
    session.add(subscription)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        if LIVE_INDEX in str(exc.orig):
            return False
        raise
    return True


def add_phase(session: Session, phase: SubscriptionPhase) -> None:
    session.add(phase)


def save(session: Session) -> None:
    """Write the changed subscriptions and phases (inside the caller's transaction)."""
    session.flush()
