"""SQL of the plan catalogue: plans by key or id, all of them, and a new plan.

Every function takes the caller's Session; none commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.models import Plan


def plans_by_key(session: Session, keys: Iterable[str]) -> dict[str, Plan]:
    return {plan.key: plan for plan in session.scalars(sa.select(Plan).where(Plan.key.in_(keys)))}


def plan_by_key(session: Session, key: str) -> Plan | None:
    return session.scalar(sa.select(Plan).where(Plan.key == key))


def plan_by_id(session: Session, plan_id: uuid.UUID) -> Plan | None:
    return session.get(Plan, plan_id)


def all_plans(session: Session) -> list[Plan]:
    """Every plan, by key."""
    return list(session.scalars(sa.select(Plan).order_by(Plan.key)))


def add_plan(session: Session, plan: Plan) -> None:
    session.add(plan)


def save_plans(session: Session) -> None:
    """Write the added and changed plans (inside the caller's transaction)."""
    session.flush()
