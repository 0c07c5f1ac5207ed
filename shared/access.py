"""Who may do what inside an organization: the role rules, checked before every managed change."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.errors import Forbidden, NotFound
from shared.models import MANAGER_ROLES, Organization, OrganizationMember, Role

#: `actor_id=SYSTEM` is the operator at the CLI or a background job: not bound by member roles.
SYSTEM: None = None


def member_role(session: Session, organization_id: uuid.UUID, user_id: uuid.UUID) -> Role | None:
    return session.scalar(
        sa.select(OrganizationMember.role).where(
            OrganizationMember.organization_id == organization_id,
            OrganizationMember.user_id == user_id,
        )
    )


def require_organization(session: Session, organization_id: uuid.UUID) -> Organization:
    organization = session.get(Organization, organization_id)
    if organization is None:
        raise NotFound(f"organization {organization_id} not found")
    return organization


def organizations_by_id(
    session: Session, organization_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, Organization]:
    """The organizations of these ids, in one query; NotFound if one is missing."""
    wanted = set(organization_ids)
    found = (
        {
            o.id: o
            for o in session.scalars(sa.select(Organization).where(Organization.id.in_(wanted)))
        }
        if wanted
        else {}
    )
    missing = wanted - set(found)
    if missing:
        raise NotFound(f"organization {min(missing)} not found")
    return found


def require_manager(
    session: Session, organization_id: uuid.UUID, actor_id: uuid.UUID | None
) -> Role | None:
    """The actor's role, if it may manage members and keys (owner or admin); else Forbidden."""
    if actor_id is SYSTEM:
        return None
    role = member_role(session, organization_id, actor_id)
    if role not in MANAGER_ROLES:
        raise Forbidden("only owners and admins manage members and API keys")
    return role
