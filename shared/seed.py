"""Sample data for a new installation: plans with metered prices, two organizations, keys."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.apikeys import create_api_key
from shared.models import BillingInterval, Organization, Plan, Role
from shared.organizations import add_member, create_organization, create_project, create_user
from shared.subscriptions import create_subscription

SAMPLE_PLANS: list[dict[str, Any]] = [
    {
        "key": "starter",
        "name": "Starter",
        "description": "Pay as you go",
        "price_monthly": 0,
        "price_yearly": 0,
        "currency": "usd",
        "features": {
            "flags": {"sso": False},
            "limits": {"projects": 3},
            "metered": {
                "api_calls": {
                    "included": 1000,
                    "model": "per_unit",
                    "unit_amount": "0.1",
                    "stripe_meter": "api_calls",
                },
            },
        },
    },
    {
        "key": "pro",
        "name": "Pro",
        "description": "For growing products",
        "price_monthly": 4900,
        "price_yearly": 49000,
        "currency": "usd",
        "features": {
            "flags": {"sso": True},
            "limits": {"projects": 10},
            "metered": {
                "api_calls": {
                    "included": 100000,
                    "model": "graduated",
                    "stripe_meter": "api_calls",
                    "tiers": [
                        {"up_to": 1000000, "unit_amount": "0.05"},
                        {"up_to": None, "unit_amount": "0.02", "flat_amount": 500},
                    ],
                },
                "storage_gb": {"included": 0, "model": "per_unit", "unit_amount": "12.5"},
                "exports": {
                    "included": 10,
                    "model": "package",
                    "package_size": 100,
                    "package_amount": 200,
                },
                "seats": {
                    "included": 0,
                    "model": "volume",
                    "aggregation": "max",
                    "tiers": [
                        {"up_to": 10, "unit_amount": "800"},
                        {"up_to": None, "unit_amount": "600"},
                    ],
                },
                # Priced per dimension filter: needs the meters the demo applies (llm_tokens by
                # model and type, active_users as a unique_count of user_id).
                "llm_tokens": {
                    "included": 1000,
                    "model": "per_unit",
                    "unit_amount": "0.002",
                    "filters": [
                        {
                            "match": {"model": "large", "type": "input"},
                            "model": "per_unit",
                            "unit_amount": "0.01",
                            "included": 5000,
                        },
                        {"match": {"model": "large"}, "model": "per_unit", "unit_amount": "0.03"},
                    ],
                },
                "active_users": {"included": 5, "model": "per_unit", "unit_amount": "50"},
            },
        },
    },
]

SAMPLE_ORGANIZATIONS = [
    ("Acme Analytics", "acme", "pro", BillingInterval.MONTH),
    ("Globex Labs", "globex", "starter", BillingInterval.YEAR),
]


@dataclass(frozen=True)
class SeededKey:
    organization: str
    project: str | None
    prefix: str
    plaintext: str


@dataclass(frozen=True)
class SeedResult:
    plans: list[str]
    organizations: list[str]
    keys: list[SeededKey]
    already_seeded: bool


def upsert_plans(session: Session, plans: list[dict[str, Any]]) -> list[Plan]:
    result = []
    for spec in plans:
        plan = session.scalar(sa.select(Plan).where(Plan.key == spec["key"]))
        if plan is None:
            plan = Plan(key=spec["key"])
            session.add(plan)
        for field in ("name", "description", "price_monthly", "price_yearly", "currency"):
            setattr(plan, field, spec[field])
        plan.features = spec["features"]
        plan.active = True
        result.append(plan)
    session.flush()
    return result


def seed(
    session: Session, *, pepper: bytes, now: datetime, environment: str = "live"
) -> SeedResult:
    """Create the sample data once; a second call creates nothing and says so."""
    plans = {plan.key: plan for plan in upsert_plans(session, SAMPLE_PLANS)}
    slugs = [slug for _, slug, _, _ in SAMPLE_ORGANIZATIONS]
    existing = session.scalars(sa.select(Organization.slug).where(Organization.slug.in_(slugs)))
    if list(existing):
        return SeedResult(list(plans), slugs, [], already_seeded=True)

    keys: list[SeededKey] = []
    for name, slug, plan_key, interval in SAMPLE_ORGANIZATIONS:
        owner = create_user(session, email=f"owner@{slug}.example", name=f"{name} Owner")
        organization = create_organization(session, name=name, slug=slug, owner_id=owner.id)
        admin = create_user(session, email=f"admin@{slug}.example", name=f"{name} Admin")
        add_member(session, organization.id, actor_id=owner.id, user_id=admin.id, role=Role.ADMIN)
        billing = create_user(session, email=f"billing@{slug}.example", name=f"{name} Billing")
        add_member(
            session, organization.id, actor_id=owner.id, user_id=billing.id, role=Role.BILLING
        )
        web = create_project(session, organization.id, actor_id=owner.id, name="Web", slug="web")
        mobile = create_project(
            session, organization.id, actor_id=owner.id, name="Mobile", slug="mobile"
        )
        create_subscription(
            session,
            organization_id=organization.id,
            plan_id=plans[plan_key].id,
            interval=interval,
            now=now.replace(day=1, hour=0, minute=0, second=0, microsecond=0),
        )
        for project in (None, web, mobile):
            created = create_api_key(
                session,
                organization_id=organization.id,
                actor_id=owner.id,
                name=f"{project.slug if project else 'org'} key",
                pepper=pepper,
                project_id=project.id if project else None,
                environment=environment,
            )
            keys.append(
                SeededKey(
                    slug, project.slug if project else None, created.key.prefix, created.plaintext
                )
            )
    return SeedResult(list(plans), slugs, keys, already_seeded=False)
