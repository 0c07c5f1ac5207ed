"""What billing did: its runs (as recorded by the runner), newest first."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.models import BillingRun


@dataclass(frozen=True, slots=True)
class BillingRunPage:
    runs: list[BillingRun]
    total: int


def list_billing_runs(session: Session, *, limit: int = 50, offset: int = 0) -> BillingRunPage:
    total = session.scalar(sa.select(sa.func.count()).select_from(BillingRun)) or 0
    runs = session.scalars(
        sa.select(BillingRun)
        .order_by(BillingRun.created_at.desc(), BillingRun.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return BillingRunPage(list(runs), int(total))
