"""Role rules, the one-owner rule and the cascades of DESIGN.md section 2, on real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from shared.errors import Conflict, Forbidden
from shared.meter_usage import MeterTotal, MeterUsage, insert_meter_values, record_meter_usage
from shared.models import (
    Account,
    ApiKey,
    OrganizationMember,
    Project,
    Role,
    Subscription,
    UsageRecord,
    meter_values,
)
from shared.models import (
    Session as UserSession,
)
from shared.organizations import (
    add_member,
    archive_project,
    change_role,
    create_organization,
    create_project,
    create_user,
    delete_organization,
    remove_member,
)
from shared.usage import UsageDelta, record_usage
from tests import factories

NOW = datetime(2026, 11, 24, 10, tzinfo=UTC)


def _count(db: Session, model: type, **where: object) -> int:
    query = sa.select(sa.func.count()).select_from(model)
    for column, value in where.items():
        query = query.where(getattr(model, column) == value)
    return int(db.scalar(query) or 0)


def test_member_cannot_manage_members(db: Session) -> None:
    organization = factories.make_organization(db)
    member = factories.add_member(db, organization, Role.MEMBER)
    newcomer = factories.make_user(db)
    with pytest.raises(Forbidden):
        add_member(db, organization.id, actor_id=member.id, user_id=newcomer.id, role=Role.MEMBER)


def test_billing_role_cannot_create_keys(db: Session) -> None:
    from shared.apikeys import create_api_key

    organization = factories.make_organization(db)
    billing = factories.add_member(db, organization, Role.BILLING)
    with pytest.raises(Forbidden):
        create_api_key(
            db,
            organization_id=organization.id,
            actor_id=billing.id,
            name="k",
            pepper=factories.PEPPER,
        )


def test_admin_manages_members_but_not_owners(db: Session) -> None:
    organization = factories.make_organization(db)
    admin = factories.add_member(db, organization, Role.ADMIN)
    newcomer = factories.make_user(db)
    add_member(db, organization.id, actor_id=admin.id, user_id=newcomer.id, role=Role.MEMBER)
    with pytest.raises(Forbidden):
        change_role(db, organization.id, actor_id=admin.id, user_id=newcomer.id, role=Role.OWNER)


def test_last_owner_cannot_be_demoted(db: Session) -> None:
    owner = factories.make_user(db)
    organization = factories.make_organization(db, owner=owner)
    with pytest.raises(Conflict, match="one owner"):
        change_role(db, organization.id, actor_id=owner.id, user_id=owner.id, role=Role.ADMIN)


def test_last_owner_cannot_leave(db: Session) -> None:
    owner = factories.make_user(db)
    organization = factories.make_organization(db, owner=owner)
    with pytest.raises(Conflict, match="one owner"):
        remove_member(db, organization.id, actor_id=owner.id, user_id=owner.id)


def test_owner_can_leave_when_another_owner_remains(db: Session) -> None:
    owner = factories.make_user(db)
    organization = factories.make_organization(db, owner=owner)
    second = factories.add_member(db, organization, Role.OWNER)
    remove_member(db, organization.id, actor_id=owner.id, user_id=owner.id)
    assert _count(db, OrganizationMember, organization_id=organization.id, role=Role.OWNER) == 1
    assert _count(db, OrganizationMember, user_id=second.id) == 1


def test_removing_member_revokes_their_user_scoped_keys(db: Session) -> None:
    organization = factories.make_organization(db)
    member = factories.add_member(db, organization, Role.MEMBER)
    created = factories.make_api_key(db, organization, user=member)
    unscoped = factories.make_api_key(db, organization)
    remove_member(db, organization.id, actor_id=None, user_id=member.id)
    db.expire_all()
    assert db.get(ApiKey, created.key.id).revoked_at is not None  # type: ignore[union-attr]
    assert db.get(ApiKey, unscoped.key.id).revoked_at is None  # type: ignore[union-attr]


def test_deleting_organization_cascades_to_everything_it_owns(db: Session) -> None:
    organization = factories.make_organization(db)
    factories.add_member(db, organization, Role.ADMIN)
    project = factories.make_project(db, organization)
    created = factories.make_api_key(db, organization, project=project)
    factories.make_subscription(db, organization, factories.make_plan(db))
    record_usage(
        db,
        [
            UsageDelta(
                organization.id, project.id, created.key.id, "api_calls", NOW, 3600, Decimal(5), 5
            )
        ],
    )
    delete_organization(db, organization.id, actor_id=None)
    for model in (OrganizationMember, Project, ApiKey, Subscription, UsageRecord):
        assert _count(db, model, organization_id=organization.id) == 0, model.__name__


def test_deleting_organization_removes_its_meter_values_and_no_others(db: Session) -> None:
    # meter_values has no foreign key (its rows are many): a trigger does the cascade.
    deleted, kept = factories.make_organization(db), factories.make_organization(db)
    for organization in (deleted, kept):
        window = (organization.id, None, None, "active_users", '{"region":"eu"}', NOW)
        record_meter_usage(
            db.connection(),
            MeterUsage(
                {window: MeterTotal.of(Decimal(1), NOW, "e-1")},
                {(*window, "user-1"), (*window, "user-2")},
            ),
            3600,
        )
    delete_organization(db, deleted.id, actor_id=None)

    def values_of(organization_id: object) -> int:
        return db.execute(
            sa.select(sa.func.count())
            .select_from(meter_values)
            .where(meter_values.c.organization_id == organization_id)
        ).scalar_one()

    assert values_of(deleted.id) == 0
    assert values_of(kept.id) == 2
    # A writer of values alone (replay repairing them) that comes after the delete writes none.
    window = (deleted.id, None, None, "active_users", '{"region":"eu"}', NOW)
    insert_meter_values(db.connection(), [(*window, "user-3")], 3600)
    assert values_of(deleted.id) == 0


def test_only_an_owner_deletes_an_organization(db: Session) -> None:
    organization = factories.make_organization(db)
    admin = factories.add_member(db, organization, Role.ADMIN)
    with pytest.raises(Forbidden):
        delete_organization(db, organization.id, actor_id=admin.id)


def test_deleting_user_cascades_to_accounts_sessions_memberships(db: Session) -> None:
    organization = factories.make_organization(db)
    user = factories.add_member(db, organization, Role.MEMBER)
    db.add(Account(user_id=user.id, type="oauth", provider="github", provider_account_id="1"))
    db.add(UserSession(user_id=user.id, session_token="tok-" + str(user.id), expires=NOW))
    db.flush()
    db.delete(user)
    db.flush()
    for model in (Account, UserSession, OrganizationMember):
        assert _count(db, model, user_id=user.id) == 0, model.__name__


def test_project_with_usage_cannot_be_deleted_only_archived(db: Session) -> None:
    organization = factories.make_organization(db)
    project = factories.make_project(db, organization)
    key = factories.make_api_key(db, organization, project=project)
    record_usage(db, [UsageDelta(organization.id, project.id, None, "m", NOW, 3600, Decimal(1), 1)])
    with pytest.raises(sa_exc.IntegrityError), db.begin_nested():
        db.execute(sa.delete(Project).where(Project.id == project.id))
    archive_project(db, project.id, actor_id=None, now=NOW)
    db.expire_all()
    assert db.get(Project, project.id).archived_at == NOW  # type: ignore[union-attr]
    assert db.get(ApiKey, key.key.id).revoked_at == NOW  # type: ignore[union-attr]


def test_key_with_usage_cannot_be_deleted(db: Session) -> None:
    organization = factories.make_organization(db)
    created = factories.make_api_key(db, organization)
    record_usage(
        db, [UsageDelta(organization.id, None, created.key.id, "m", NOW, 3600, Decimal(1), 1)]
    )
    with pytest.raises(sa_exc.IntegrityError), db.begin_nested():
        db.execute(sa.delete(ApiKey).where(ApiKey.id == created.key.id))


def test_slugs_and_emails_are_unique(db: Session) -> None:
    user = create_user(db, email="Mixed.Case@Example.com")
    with pytest.raises(Conflict):
        create_user(db, email="mixed.case@example.com")
    create_organization(db, name="A", slug="unique-slug-test", owner_id=user.id)
    with pytest.raises(Conflict):
        create_organization(db, name="B", slug="unique-slug-test", owner_id=user.id)
    organization = factories.make_organization(db)
    create_project(db, organization.id, actor_id=None, name="W", slug="web")
    with pytest.raises(Conflict):
        create_project(db, organization.id, actor_id=None, name="W", slug="web")


def test_external_id_may_not_be_another_organizations_id(db: Session) -> None:
    owner = factories.make_user(db)
    other = factories.make_organization(db)
    for spelling in (str(other.id), str(other.id).upper()):
        with pytest.raises(Conflict, match="another organization's id"):
            create_organization(
                db, name="Shadow", slug="shadow", owner_id=owner.id, external_id=spelling
            )
