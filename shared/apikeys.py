"""API key management: create (plaintext returned once), verify, revoke, expire, list, usage.

Two kinds of key: an organization's (optionally scoped to a project or acting for a member), and
a platform key, an operator's secret that belongs to no organization and names the organization
of each event it posts and of each usage query (README "Platform keys")."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from shared.access import member_role, require_manager, require_organization
from shared.errors import Forbidden, InvalidInput, NotFound
from shared.keys import generate_key, hash_key, hashes_match, parse_prefix
from shared.models import ApiKey, Project


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    plaintext: str  # shown once to the caller; never stored, never logged


@dataclass(frozen=True, slots=True)
class VerifiedKey:
    """What a request may act as once its key is verified."""

    id: uuid.UUID
    organization_id: uuid.UUID | None  # None only for a platform key
    project_id: uuid.UUID | None
    user_id: uuid.UUID | None
    expires_at: datetime | None
    platform: bool = False


def create_api_key(
    session: Session,
    *,
    organization_id: uuid.UUID,
    actor_id: uuid.UUID | None,
    name: str,
    pepper: bytes,
    project_id: uuid.UUID | None = None,
    user_id: uuid.UUID | None = None,
    expires_at: datetime | None = None,
    environment: str = "live",
) -> CreatedKey:
    require_organization(session, organization_id)
    require_manager(session, organization_id, actor_id)
    if not name.strip():
        raise InvalidInput("key name must not be empty")
    if project_id is not None:
        project = session.get(Project, project_id)
        if project is None or project.organization_id != organization_id:
            raise NotFound(f"project {project_id} not found in organization {organization_id}")
        if project.archived_at is not None:
            raise InvalidInput(f"project {project_id} is archived")
    if user_id is not None and member_role(session, organization_id, user_id) is None:
        raise InvalidInput(f"user {user_id} is not a member of organization {organization_id}")
    return _store_key(
        session,
        environment,
        pepper,
        organization_id=organization_id,
        project_id=project_id,
        user_id=user_id,
        created_by_user_id=actor_id,
        name=name.strip(),
        expires_at=expires_at,
    )


def create_platform_key(
    session: Session,
    *,
    name: str,
    pepper: bytes,
    expires_at: datetime | None = None,
    environment: str = "live",
) -> CreatedKey:
    """An operator's key that may write and read any organization it names; stored like every
    key (prefix and keyed hash), the plaintext returned once."""
    if not name.strip():
        raise InvalidInput("key name must not be empty")
    return _store_key(
        session,
        environment,
        pepper,
        organization_id=None,
        platform=True,
        name=name.strip(),
        expires_at=expires_at,
    )


def _store_key(session: Session, environment: str, pepper: bytes, **fields: Any) -> CreatedKey:
    """Mint a key, store its prefix and keyed hash with `fields`, and return the plaintext once."""
    new = generate_key(environment)
    key = ApiKey(prefix=new.prefix, key_hash=hash_key(new.plaintext, pepper), **fields)
    session.add(key)
    session.flush()
    return CreatedKey(key=key, plaintext=new.plaintext)


def verify_api_key(
    session: Session, plaintext: str, *, pepper: bytes, now: datetime
) -> VerifiedKey | None:
    """The key's identity if it is well formed, known, not revoked and not expired; else None."""
    if parse_prefix(plaintext) is None:
        return None
    presented = hash_key(plaintext, pepper)
    key = find_unrevoked_keys(session, [presented]).get(presented)
    if key is None or (key.expires_at is not None and key.expires_at <= now):
        return None
    return key


# Core text on the hot path of a flood of made-up keys: a third of the ORM select's CPU.
_UNREVOKED_KEYS = sa.text(
    "SELECT id, organization_id, project_id, user_id, expires_at, platform, key_hash"
    "  FROM api_keys"
    " WHERE key_hash = ANY(CAST(:hashes AS bytea[])) AND revoked_at IS NULL"
)


def find_unrevoked_keys(session: Session, key_hashes: list[bytes]) -> dict[bytes, VerifiedKey]:
    """The unrevoked keys among these keyed hashes, in one query (ingest reads the misses of
    many concurrent requests at once). Expiry is the caller's: it compares expires_at with the
    time of each request."""
    if not key_hashes:
        return {}
    rows = session.execute(_UNREVOKED_KEYS, {"hashes": key_hashes})
    presented = {key_hash: key_hash for key_hash in key_hashes}
    found = {}
    for row in rows:
        stored = bytes(row.key_hash)
        candidate = presented.get(stored)
        if candidate is None or not hashes_match(stored, candidate):
            continue
        found[stored] = VerifiedKey(
            id=row.id,
            organization_id=row.organization_id,
            project_id=row.project_id,
            user_id=row.user_id,
            expires_at=row.expires_at,
            platform=row.platform,
        )
    return found


def _managed_key(session: Session, key_id: uuid.UUID, actor_id: uuid.UUID | None) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"API key {key_id} not found")
    if key.organization_id is None:
        # A platform key is the operator's: no member of any organization manages it.
        if actor_id is not None:
            raise Forbidden("only an operator manages a platform key")
        return key
    require_manager(session, key.organization_id, actor_id)
    return key


def revoke_api_key(
    session: Session, key_id: uuid.UUID, *, actor_id: uuid.UUID | None, now: datetime
) -> ApiKey:
    key = _managed_key(session, key_id, actor_id)
    if key.revoked_at is None:
        key.revoked_at = now
    return key


def expire_api_key(
    session: Session,
    key_id: uuid.UUID,
    *,
    actor_id: uuid.UUID | None,
    expires_at: datetime,
) -> ApiKey:
    key = _managed_key(session, key_id, actor_id)
    key.expires_at = expires_at
    return key


def key_state(key: ApiKey, now: datetime) -> str:
    """active, revoked or expired, as lists show it."""
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def find_api_key(session: Session, reference: str) -> ApiKey:
    """A key by id or public prefix."""
    try:
        key = session.get(ApiKey, uuid.UUID(reference))
    except ValueError:
        key = session.scalar(sa.select(ApiKey).where(ApiKey.prefix == reference))
    if key is None:
        raise NotFound(f"API key {reference!r} not found")
    return key


def list_api_keys(
    session: Session,
    organization_id: uuid.UUID,
    *,
    actor_id: uuid.UUID | None,
    include_revoked: bool = True,
) -> list[ApiKey]:
    """Keys of an organization, newest first; the prefix identifies them, no hash leaves here."""
    require_organization(session, organization_id)
    if actor_id is not None and member_role(session, organization_id, actor_id) is None:
        raise Forbidden("only members may list an organization's keys")
    query = sa.select(ApiKey).where(ApiKey.organization_id == organization_id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query.order_by(ApiKey.created_at.desc(), ApiKey.id.desc())))


def list_platform_keys(session: Session) -> list[ApiKey]:
    """Every platform key, newest first."""
    query = sa.select(ApiKey).where(ApiKey.platform)
    return list(session.scalars(query.order_by(ApiKey.created_at.desc(), ApiKey.id.desc())))


def record_key_usage(session: Session, usage: dict[uuid.UUID, tuple[int, datetime]]) -> None:
    """Add request counts and move last_used_at forward for many keys in one statement.

    Ingest buffers per-key counts in memory and flushes them every few seconds, so a request
    never waits on a write.
    """
    if not usage:
        return
    ids = list(usage)
    counts = [usage[key_id][0] for key_id in ids]
    last_used = [usage[key_id][1] for key_id in ids]
    session.execute(
        sa.text(
            """
            UPDATE api_keys AS k
               SET usage_count = k.usage_count + u.n,
                   last_used_at = GREATEST(COALESCE(k.last_used_at, u.at), u.at)
              FROM unnest(CAST(:ids AS uuid[]), CAST(:counts AS bigint[]),
                          CAST(:at AS timestamptz[])) AS u(id, n, at)
             WHERE k.id = u.id
            """
        ),
        {"ids": ids, "counts": counts, "at": last_used},
    )
