"""Small functions that make one thing each: a user, an organization, a key, a plan."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from shared.apikeys import CreatedKey, create_api_key, create_platform_key
from shared.models import (
    BillingInterval,
    Organization,
    OrganizationMember,
    Plan,
    Project,
    Role,
    Subscription,
    SubscriptionStatus,
    User,
)

PEPPER = ("test-pepper-" + "x" * 32).encode()


def _suffix() -> str:
    return secrets.token_hex(4)


def make_user(session: Session, *, email: str | None = None, name: str = "Test User") -> User:
    user = User(email=email or f"user-{_suffix()}@example.com", name=name)
    session.add(user)
    session.flush()
    return user


def make_organization(
    session: Session,
    *,
    owner: User | None = None,
    slug: str | None = None,
    name: str = "Acme",
    external_id: str | None = None,
) -> Organization:
    organization = Organization(name=name, slug=slug or f"org-{_suffix()}", external_id=external_id)
    session.add(organization)
    session.flush()
    owner = owner or make_user(session)
    session.add(
        OrganizationMember(organization_id=organization.id, user_id=owner.id, role=Role.OWNER)
    )
    session.flush()
    return organization


def add_member(
    session: Session, organization: Organization, role: Role, user: User | None = None
) -> User:
    user = user or make_user(session)
    session.add(OrganizationMember(organization_id=organization.id, user_id=user.id, role=role))
    session.flush()
    return user


def make_project(
    session: Session, organization: Organization, *, slug: str | None = None
) -> Project:
    project = Project(
        organization_id=organization.id, name="Project", slug=slug or f"p-{_suffix()}"
    )
    session.add(project)
    session.flush()
    return project


def make_api_key(
    session: Session,
    organization: Organization,
    *,
    project: Project | None = None,
    user: User | None = None,
    expires_at: datetime | None = None,
    pepper: bytes = PEPPER,
) -> CreatedKey:
    return create_api_key(
        session,
        organization_id=organization.id,
        actor_id=None,
        name="test key",
        pepper=pepper,
        project_id=project.id if project else None,
        user_id=user.id if user else None,
        expires_at=expires_at,
    )


def make_platform_key(session: Session, *, pepper: bytes = PEPPER) -> CreatedKey:
    return create_platform_key(session, name="platform test key", pepper=pepper)


def make_plan(
    session: Session,
    *,
    key: str | None = None,
    price_monthly: int = 0,
    price_yearly: int = 0,
    features: dict[str, Any] | None = None,
    currency: str = "usd",
) -> Plan:
    plan = Plan(
        key=key or f"plan-{_suffix()}",
        name="Plan",
        price_monthly=price_monthly,
        price_yearly=price_yearly,
        currency=currency,
        features=features or {},
        active=True,
    )
    session.add(plan)
    session.flush()
    return plan


def make_subscription(
    session: Session,
    organization: Organization,
    plan: Plan,
    *,
    status: SubscriptionStatus = SubscriptionStatus.ACTIVE,
    interval: BillingInterval = BillingInterval.MONTH,
    period_start: datetime | None = None,
    period_end: datetime | None = None,
    stripe_subscription_id: str | None = None,
    external_id: str | None = None,
) -> Subscription:
    start = period_start or datetime(2026, 11, 1, tzinfo=UTC)
    end = period_end or (
        start + (timedelta(days=30) if interval == BillingInterval.MONTH else timedelta(days=365))
    )
    subscription = Subscription(
        organization_id=organization.id,
        plan_id=plan.id,
        status=status,
        billing_interval=interval,
        current_period_start=start,
        current_period_end=end,
        cancel_at_period_end=False,
        stripe_subscription_id=stripe_subscription_id,
        external_id=external_id,
    )
    session.add(subscription)
    session.flush()
    return subscription


def new_id() -> uuid.UUID:
    return uuid.uuid4()
