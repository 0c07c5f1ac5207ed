"""API key management against real PostgreSQL: plaintext once, hash only, revoke, expire."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.apikeys import (
    expire_api_key,
    list_api_keys,
    record_key_usage,
    revoke_api_key,
    verify_api_key,
)
from shared.models import ApiKey
from tests import factories

NOW = datetime(2026, 11, 24, 10, tzinfo=UTC)


def test_created_key_verifies_and_is_stored_only_as_hash(db: Session) -> None:
    organization = factories.make_organization(db)
    created = factories.make_api_key(db, organization)
    verified = verify_api_key(db, created.plaintext, pepper=factories.PEPPER, now=NOW)
    assert verified is not None and verified.organization_id == organization.id
    row = db.execute(sa.select(ApiKey.__table__).where(ApiKey.id == created.key.id)).one()
    assert all(created.plaintext not in str(value) for value in row)
    assert created.key.prefix in created.plaintext


def test_wrong_pepper_or_tampered_key_does_not_verify(db: Session) -> None:
    organization = factories.make_organization(db)
    created = factories.make_api_key(db, organization)
    assert verify_api_key(db, created.plaintext, pepper=b"other" * 8, now=NOW) is None
    # Another last character than the key's own (a random key ends in "a" one time in 32).
    tampered = created.plaintext[:-1] + ("b" if created.plaintext.endswith("a") else "a")
    assert verify_api_key(db, tampered, pepper=factories.PEPPER, now=NOW) is None


def test_revoked_key_is_refused(db: Session) -> None:
    organization = factories.make_organization(db)
    created = factories.make_api_key(db, organization)
    revoke_api_key(db, created.key.id, actor_id=None, now=NOW)
    assert verify_api_key(db, created.plaintext, pepper=factories.PEPPER, now=NOW) is None


def test_expired_key_is_refused(db: Session) -> None:
    organization = factories.make_organization(db)
    created = factories.make_api_key(db, organization)
    expire_api_key(db, created.key.id, actor_id=None, expires_at=NOW)
    assert verify_api_key(
        db, created.plaintext, pepper=factories.PEPPER, now=NOW - timedelta(seconds=1)
    )
    assert verify_api_key(db, created.plaintext, pepper=factories.PEPPER, now=NOW) is None


def test_list_shows_keys_of_one_organization(db: Session) -> None:
    mine = factories.make_organization(db)
    other = factories.make_organization(db)
    a = factories.make_api_key(db, mine)
    factories.make_api_key(db, other)
    listed = list_api_keys(db, mine.id, actor_id=None)
    assert [k.id for k in listed] == [a.key.id]


def test_usage_is_recorded_in_bulk(db: Session) -> None:
    organization = factories.make_organization(db)
    a = factories.make_api_key(db, organization)
    b = factories.make_api_key(db, organization)
    record_key_usage(db, {a.key.id: (3, NOW), b.key.id: (1, NOW - timedelta(hours=1))})
    record_key_usage(db, {a.key.id: (2, NOW - timedelta(hours=2))})
    db.expire_all()
    key_a = db.get(ApiKey, a.key.id)
    key_b = db.get(ApiKey, b.key.id)
    assert key_a is not None and key_b is not None
    assert (key_a.usage_count, key_a.last_used_at) == (5, NOW)
    assert (key_b.usage_count, key_b.last_used_at) == (1, NOW - timedelta(hours=1))
