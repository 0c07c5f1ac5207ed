"""What billing did: its runs (as recorded by the runner), newest first."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from services.billing.mismatch_repository import billing_runs
from shared.models import BillingRun


@dataclass(frozen=True, slots=True)
class BillingRunPage:
    runs: list[BillingRun]
    total: int


def list_billing_runs(session: Session, *, limit: int = 50, offset: int = 0) -> BillingRunPage:
    runs, total = billing_runs(session, limit=limit, offset=offset)
    return BillingRunPage(runs, total)
