"""Organization, member and project management, with the role rules of DESIGN.md section 2.

Only owners and admins manage members; only an owner grants, changes or removes the owner role;
an organization always keeps at least one owner.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.access import require_manager, require_organization
from shared.errors import Conflict, Forbidden, InvalidInput, NotFound
from shared.events import MAX_CUSTOMER, UUID_RE
from shared.models import ApiKey, Organization, OrganizationMember, Project, Role, User

SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,98}[a-z0-9])?$")


def _check_slug(slug: str) -> str:
    if not SLUG_RE.match(slug):
        raise InvalidInput(
            f"slug {slug!r} must be 1-100 lowercase letters, digits or '-', "
            "not starting or ending with '-'"
        )
    return slug


def create_user(session: Session, *, email: str, name: str | None = None) -> User:
    email = email.strip()
    if "@" not in email or len(email) > 320:
        raise InvalidInput(f"email {email!r} is not an email address")
    if find_user(session, email) is not None:
        raise Conflict(f"a user with email {email!r} already exists")
    user = User(email=email, name=name)
    session.add(user)
    session.flush()
    return user


def find_user(session: Session, email: str) -> User | None:
    return session.scalar(sa.select(User).where(sa.func.lower(User.email) == email.strip().lower()))


def require_user(session: Session, email: str) -> User:
    """The user with this email (whatever its case); NotFound otherwise."""
    user = find_user(session, email)
    if user is None:
        raise NotFound(f"no user with email {email!r}")
    return user


def create_organization(
    session: Session,
    *,
    name: str,
    slug: str,
    owner_id: uuid.UUID,
    external_id: str | None = None,
) -> Organization:
    """A new organization whose first member, `owner_id`, is its owner."""
    _check_slug(slug)
    if not name.strip():
        raise InvalidInput("organization name must not be empty")
    if session.get(User, owner_id) is None:
        raise NotFound(f"user {owner_id} not found")
    if session.scalar(sa.select(Organization.id).where(Organization.slug == slug)) is not None:
        raise Conflict(f"an organization with slug {slug!r} already exists")
    if external_id is not None:
        check_external_id(external_id)
        taken = sa.select(Organization.id).where(Organization.external_id == external_id)
        if session.scalar(taken) is not None:
            raise Conflict(f"an organization with external id {external_id!r} already exists")
        if UUID_RE.match(external_id) and session.get(Organization, uuid.UUID(external_id)):
            # A customer name is looked up as an external id first: this one would take every
            # event a platform key sends to that organization by its id.
            raise Conflict(f"external id {external_id!r} is another organization's id")
    organization = Organization(name=name.strip(), slug=slug, external_id=external_id)
    session.add(organization)
    session.flush()
    session.add(
        OrganizationMember(organization_id=organization.id, user_id=owner_id, role=Role.OWNER)
    )
    session.flush()
    return organization


def find_organization(session: Session, reference: str) -> Organization:
    """An organization by id or slug."""
    try:
        organization = session.get(Organization, uuid.UUID(reference))
    except ValueError:
        organization = session.scalar(sa.select(Organization).where(Organization.slug == reference))
    if organization is None:
        raise NotFound(f"organization {reference!r} not found")
    return organization


def check_external_id(external_id: str) -> None:
    """InvalidInput unless `external_id` can name a customer: 1-255 characters of printable
    text, without surrounding spaces (the id another system knows an organization or a
    subscription by)."""
    if not 1 <= len(external_id) <= MAX_CUSTOMER:
        raise InvalidInput(f"external id must be 1-{MAX_CUSTOMER} characters")
    if external_id != external_id.strip() or not external_id.isprintable():
        raise InvalidInput("external id must be printable, without surrounding spaces")


def list_organizations(session: Session) -> list[Organization]:
    return list(session.scalars(sa.select(Organization).order_by(Organization.slug)))


@dataclass(frozen=True, slots=True)
class OrganizationPage:
    organizations: list[Organization]
    total: int  # matching the search, over all pages


def search_organizations(
    session: Session, *, query: str | None = None, limit: int = 50, offset: int = 0
) -> OrganizationPage:
    """Organizations whose slug or name contains `query` (any case), or whose id or Stripe
    customer id is `query`; by slug."""
    statement = sa.select(Organization)
    text = (query or "").strip()
    if "\x00" in text or len(text) > 200:
        raise InvalidInput("search: at most 200 characters, and no NUL character")
    if text:
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        matches = [
            Organization.slug.ilike(pattern, escape="\\"),
            Organization.name.ilike(pattern, escape="\\"),
            Organization.stripe_customer_id == text,
        ]
        with contextlib.suppress(ValueError):
            matches.append(Organization.id == uuid.UUID(text))
        statement = statement.where(sa.or_(*matches))
    total = session.scalar(sa.select(sa.func.count()).select_from(statement.subquery())) or 0
    rows = session.scalars(statement.order_by(Organization.slug).limit(limit).offset(offset))
    return OrganizationPage(list(rows), int(total))


def delete_organization(
    session: Session, organization_id: uuid.UUID, *, actor_id: uuid.UUID | None
) -> None:
    """Delete an organization; members, projects, keys, subscriptions and usage go with it."""
    organization = require_organization(session, organization_id)
    if actor_id is not None and _role(session, organization_id, actor_id) != Role.OWNER:
        raise Forbidden("only an owner may delete the organization")
    session.delete(organization)
    session.flush()


def _role(session: Session, organization_id: uuid.UUID, user_id: uuid.UUID) -> Role | None:
    return session.scalar(
        sa.select(OrganizationMember.role).where(
            OrganizationMember.organization_id == organization_id,
            OrganizationMember.user_id == user_id,
        )
    )


def _membership(
    session: Session, organization_id: uuid.UUID, user_id: uuid.UUID
) -> OrganizationMember:
    member = session.scalar(
        sa.select(OrganizationMember).where(
            OrganizationMember.organization_id == organization_id,
            OrganizationMember.user_id == user_id,
        )
    )
    if member is None:
        raise NotFound(f"user {user_id} is not a member of organization {organization_id}")
    return member


def _lock_owners(session: Session, organization_id: uuid.UUID) -> list[uuid.UUID]:
    """The owners, locked, so that two concurrent demotions cannot leave none."""
    return list(
        session.scalars(
            sa.select(OrganizationMember.user_id)
            .where(
                OrganizationMember.organization_id == organization_id,
                OrganizationMember.role == Role.OWNER,
            )
            .with_for_update()
        )
    )


def add_member(
    session: Session,
    organization_id: uuid.UUID,
    *,
    actor_id: uuid.UUID | None,
    user_id: uuid.UUID,
    role: Role,
) -> OrganizationMember:
    require_organization(session, organization_id)
    actor_role = require_manager(session, organization_id, actor_id)
    if role == Role.OWNER and actor_id is not None and actor_role != Role.OWNER:
        raise Forbidden("only an owner may add another owner")
    if session.get(User, user_id) is None:
        raise NotFound(f"user {user_id} not found")
    if _role(session, organization_id, user_id) is not None:
        raise Conflict(f"user {user_id} is already a member")
    member = OrganizationMember(organization_id=organization_id, user_id=user_id, role=role)
    session.add(member)
    session.flush()
    return member


def change_role(
    session: Session,
    organization_id: uuid.UUID,
    *,
    actor_id: uuid.UUID | None,
    user_id: uuid.UUID,
    role: Role,
) -> OrganizationMember:
    actor_role = require_manager(session, organization_id, actor_id)
    owners = _lock_owners(session, organization_id)
    member = _membership(session, organization_id, user_id)
    touches_owner = Role.OWNER in (member.role, role)
    if touches_owner and actor_id is not None and actor_role != Role.OWNER:
        raise Forbidden("only an owner may grant or take away the owner role")
    if member.role == Role.OWNER and role != Role.OWNER and owners == [user_id]:
        raise Conflict("an organization must keep at least one owner")
    member.role = role
    session.flush()
    return member


def remove_member(
    session: Session, organization_id: uuid.UUID, *, actor_id: uuid.UUID | None, user_id: uuid.UUID
) -> None:
    """Remove a member (a member may also remove themselves). Their user-scoped keys are revoked
    by the database in the same statement."""
    if actor_id != user_id:
        actor_role = require_manager(session, organization_id, actor_id)
    else:
        actor_role = _role(session, organization_id, user_id)
    owners = _lock_owners(session, organization_id)
    member = _membership(session, organization_id, user_id)
    if member.role == Role.OWNER:
        if actor_id is not None and actor_role != Role.OWNER:
            raise Forbidden("only an owner may remove an owner")
        if owners == [user_id]:
            raise Conflict("an organization must keep at least one owner")
    session.delete(member)
    session.flush()


def list_members(session: Session, organization_id: uuid.UUID) -> list[tuple[User, Role]]:
    rows = session.execute(
        sa.select(User, OrganizationMember.role)
        .join(OrganizationMember, OrganizationMember.user_id == User.id)
        .where(OrganizationMember.organization_id == organization_id)
        .order_by(OrganizationMember.created_at)
    )
    return [(user, role) for user, role in rows]


def create_project(
    session: Session,
    organization_id: uuid.UUID,
    *,
    actor_id: uuid.UUID | None,
    name: str,
    slug: str,
) -> Project:
    require_organization(session, organization_id)
    require_manager(session, organization_id, actor_id)
    _check_slug(slug)
    exists = session.scalar(
        sa.select(Project.id).where(
            Project.organization_id == organization_id, Project.slug == slug
        )
    )
    if exists is not None:
        raise Conflict(f"project slug {slug!r} is taken in this organization")
    project = Project(organization_id=organization_id, name=name.strip() or slug, slug=slug)
    session.add(project)
    session.flush()
    return project


def archive_project(
    session: Session, project_id: uuid.UUID, *, actor_id: uuid.UUID | None, now: datetime
) -> Project:
    """Archive a project and revoke its keys: usage stays billable, nothing is deleted."""
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound(f"project {project_id} not found")
    require_manager(session, project.organization_id, actor_id)
    if project.archived_at is None:
        project.archived_at = now
        session.execute(
            sa.update(ApiKey)
            .where(ApiKey.project_id == project_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=now)
        )
    session.flush()
    return project


def find_project(session: Session, organization_id: uuid.UUID, reference: str) -> Project:
    """A project of the organization by slug or id; NotFound otherwise."""
    project = next(
        (p for p in list_projects(session, organization_id) if reference in (p.slug, str(p.id))),
        None,
    )
    if project is None:
        raise NotFound(f"no project {reference!r} in organization {organization_id}")
    return project


def list_projects(session: Session, organization_id: uuid.UUID) -> list[Project]:
    return list(
        session.scalars(
            sa.select(Project)
            .where(Project.organization_id == organization_id)
            .order_by(Project.slug)
        )
    )
