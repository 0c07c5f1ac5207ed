"""SQL of reconciliation mismatches as people handle them, and of the billing runs' history:
pages of findings with their organization, one finding (locked to resolve it), pages of runs.

Every function takes the caller's Session; none commits.
"""

from __future__ import annotations

import uuid
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.models import BillingRun, Organization, ReconciliationMismatch, Subscription

MismatchState = Literal["open", "resolved", "all"]
#: A finding with its organization's id and slug.
MismatchRow = tuple[ReconciliationMismatch, uuid.UUID, str]


def _with_organization() -> sa.Select[ReconciliationMismatch, uuid.UUID, str]:
    return (
        sa.select(ReconciliationMismatch, Organization.id, Organization.slug)
        .join(Subscription, Subscription.id == ReconciliationMismatch.subscription_id)
        .join(Organization, Organization.id == Subscription.organization_id)
    )


def mismatch_rows(
    session: Session,
    *,
    state: MismatchState,
    organization_id: uuid.UUID | None,
    limit: int,
    offset: int,
) -> tuple[list[MismatchRow], int]:
    """A page of findings, newest first, and how many match in all."""
    query = _with_organization()
    if state == "open":
        query = query.where(ReconciliationMismatch.resolved.is_(False))
    elif state == "resolved":
        query = query.where(ReconciliationMismatch.resolved.is_(True))
    if organization_id is not None:
        query = query.where(Organization.id == organization_id)
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    rows = session.execute(
        query.order_by(ReconciliationMismatch.updated_at.desc(), ReconciliationMismatch.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return [(row[0], row[1], row[2]) for row in rows], int(total)


def mismatch_row(session: Session, mismatch_id: uuid.UUID) -> MismatchRow | None:
    row = session.execute(
        _with_organization().where(ReconciliationMismatch.id == mismatch_id)
    ).one_or_none()
    return None if row is None else (row[0], row[1], row[2])


def lock_mismatch(session: Session, mismatch_id: uuid.UUID) -> ReconciliationMismatch | None:
    return session.get(ReconciliationMismatch, mismatch_id, with_for_update=True)


def save(session: Session) -> None:
    """Write the changed findings (inside the caller's transaction)."""
    session.flush()


def billing_runs(session: Session, *, limit: int, offset: int) -> tuple[list[BillingRun], int]:
    """A page of billing runs, newest first, and how many there are in all."""
    total = session.scalar(sa.select(sa.func.count()).select_from(BillingRun)) or 0
    runs = session.scalars(
        sa.select(BillingRun)
        .order_by(BillingRun.created_at.desc(), BillingRun.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(runs), int(total)
