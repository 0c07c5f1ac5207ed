"""Reconciliation mismatches as people handle them: list the findings, mark one resolved with a
note. Billing runs record them (reconcile.py); a person closes those only a person can."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy.orm import Session

from services.billing import mismatch_repository as repository
from services.billing.mismatch_repository import MismatchState
from shared.errors import Conflict, InvalidInput, NotFound
from shared.models import ReconciliationMismatch

MAX_NOTE = 2000


@dataclass(frozen=True, slots=True)
class MismatchView:
    id: uuid.UUID
    run_id: uuid.UUID | None
    subscription_id: uuid.UUID
    organization_id: uuid.UUID
    organization_slug: str
    kind: str
    metric: str | None
    period_start: datetime | None
    ours: str
    theirs: str
    amount: Decimal | None
    resolved: bool
    resolution: str | None
    resolved_at: datetime | None
    resolved_by: str | None
    resolution_note: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class MismatchPage:
    mismatches: list[MismatchView]
    total: int


def parse_state(value: str | None) -> MismatchState:
    if value in (None, ""):
        return "open"
    if value not in ("open", "resolved", "all"):
        raise InvalidInput(f"state: must be open, resolved or all (not {value!r})")
    return value  # type: ignore[return-value]


def _view(row: ReconciliationMismatch, organization_id: uuid.UUID, slug: str) -> MismatchView:
    return MismatchView(
        id=row.id,
        run_id=row.run_id,
        subscription_id=row.subscription_id,
        organization_id=organization_id,
        organization_slug=slug,
        kind=row.kind,
        metric=row.metric,
        period_start=row.period_start,
        ours=row.ours,
        theirs=row.theirs,
        amount=row.amount,
        resolved=row.resolved,
        resolution=row.resolution,
        resolved_at=row.resolved_at,
        resolved_by=row.resolved_by,
        resolution_note=row.resolution_note,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def list_mismatches(
    session: Session,
    *,
    state: MismatchState = "open",
    organization_id: uuid.UUID | None = None,
    limit: int = 50,
    offset: int = 0,
) -> MismatchPage:
    """Findings, newest first: `open` (no run fixed it and no person resolved it), `resolved`,
    or `all`."""
    rows, total = repository.mismatch_rows(
        session, state=state, organization_id=organization_id, limit=limit, offset=offset
    )
    return MismatchPage([_view(*row) for row in rows], total)


def get_mismatch(session: Session, mismatch_id: uuid.UUID) -> MismatchView:
    found = repository.mismatch_row(session, mismatch_id)
    if found is None:
        raise NotFound(f"mismatch {mismatch_id} not found")
    return _view(*found)


def resolve_mismatch(
    session: Session, mismatch_id: uuid.UUID, *, note: str, resolved_by: str, now: datetime
) -> MismatchView:
    """Mark an open mismatch resolved by a person, with why; Conflict if it is resolved already."""
    note = note.strip()
    if not note:
        raise InvalidInput("note: say what was done or why no change is needed")
    if len(note) > MAX_NOTE or "\x00" in note:
        raise InvalidInput(f"note: at most {MAX_NOTE} characters, and no NUL character")
    row = repository.lock_mismatch(session, mismatch_id)
    if row is None:
        raise NotFound(f"mismatch {mismatch_id} not found")
    if row.resolved:
        raise Conflict(f"mismatch {mismatch_id} is already resolved")
    row.resolved = True
    row.resolved_at = now
    row.resolved_by = resolved_by
    row.resolution_note = note
    repository.save(session)
    return get_mismatch(session, mismatch_id)
