"""The audit log: every change made through the console, the admin API or an operator command,
written in the same transaction as the change itself, so one is never kept without the other."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.models import AuditEntry

#: A change made at the command line (`meterline operators ...`): no operator token involved.
CLI_ACTOR = "cli"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change: an operator (id and name), or the command line (no id)."""

    name: str
    operator_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class AuditPage:
    entries: list[AuditEntry]
    total: int


def record_change(
    session: Session,
    actor: Actor,
    action: str,
    *,
    target_type: str,
    target_id: object | None,
    details: Mapping[str, object] | None = None,
) -> AuditEntry:
    """One audit entry, e.g. action "api_key.revoke", target ("api_key", its id). Details hold what
    a person needs to understand the change later; never a secret."""
    entry = AuditEntry(
        operator_id=actor.operator_id,
        actor=actor.name,
        action=action,
        target_type=target_type,
        target_id=str(target_id) if target_id is not None else None,
        details=dict(details or {}),
    )
    session.add(entry)
    session.flush()
    return entry


def list_audit(
    session: Session,
    *,
    limit: int = 50,
    offset: int = 0,
    action: str | None = None,
    since: datetime | None = None,
) -> AuditPage:
    """Newest first."""
    query = sa.select(AuditEntry)
    if action:
        query = query.where(AuditEntry.action == action)
    if since is not None:
        query = query.where(AuditEntry.created_at >= since)
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    entries = session.scalars(
        query.order_by(AuditEntry.created_at.desc(), AuditEntry.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return AuditPage(list(entries), int(total))
