"""The database side of ingest, one function per question, each on an async engine.

Connection failures become DatabaseUnavailable (503): a request never waits on a dead database for
longer than the driver's connect timeout.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from services.ingest.keycache import CHANGE_MARGIN, KeyChanges, ProjectInfo
from shared.access import member_role
from shared.apikeys import VerifiedKey, find_unrevoked_keys, record_key_usage
from shared.errors import DatabaseUnavailable
from shared.events import UUID_RE
from shared.meters import MeterDefinition, meters_by_metric
from shared.models import ApiKey, ApiKeyDeletion, Organization, Project, Role, Subscription
from shared.usage import Granularity, UsageRow, UsageScope
from shared.usage_reads import read_usage

T = TypeVar("T")
# A dead or restarting database, or a pool with no connection free in time (TimeoutError).
_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, OSError)


class IngestQueries:
    def __init__(self, engine: AsyncEngine, *, pepper: bytes) -> None:
        self._engine = engine
        self._pepper = pepper

    async def _read(self, work: Callable[[Session], T]) -> T:
        try:
            async with self._engine.connect() as connection:
                return await connection.run_sync(lambda sync: work(Session(bind=sync)))
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"database unavailable ({type(exc).__name__})") from None

    async def _write(self, work: Callable[[Session], None]) -> None:
        try:
            async with self._engine.begin() as connection:
                await connection.run_sync(lambda sync: work(Session(bind=sync)))
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"database unavailable ({type(exc).__name__})") from None

    async def find_keys(self, key_hashes: list[bytes]) -> dict[bytes, VerifiedKey]:
        return await self._read(lambda session: find_unrevoked_keys(session, key_hashes))

    async def key_changes(self, since: datetime | None) -> KeyChanges:
        """Keys revoked, otherwise changed or deleted since `since` (default: the last
        CHANGE_MARGIN). Deleted keys leave no row to poll: their tombstones do.

        A key never changed since its creation (updated_at = created_at) is left out: nothing
        cached about it can be stale, and a freshly seeded key set is not re-read for nothing.
        The prefixes are those of the keys created or changed since `since` (a new key's
        updated_at is its created_at), or of every unrevoked key when there is no `since`.
        """

        def fetch(session: Session) -> KeyChanges:
            as_of = session.scalar(sa.select(sa.func.now()))
            assert as_of is not None
            lower = since or as_of - CHANGE_MARGIN
            changed = sa.select(ApiKey.key_hash).where(
                sa.or_(
                    sa.and_(ApiKey.updated_at >= lower, ApiKey.updated_at > ApiKey.created_at),
                    ApiKey.revoked_at >= lower,
                )
            )
            deleted = sa.select(ApiKeyDeletion.key_hash).where(ApiKeyDeletion.deleted_at >= lower)
            hashes = [bytes(h) for h in session.scalars(sa.union_all(changed, deleted))]
            prefixes = sa.select(ApiKey.prefix).where(
                ApiKey.revoked_at.is_(None) if since is None else ApiKey.updated_at >= lower
            )
            return KeyChanges(hashes, as_of, list(session.scalars(prefixes)))

        return await self._read(fetch)

    async def projects(self, project_ids: set[uuid.UUID]) -> dict[uuid.UUID, ProjectInfo]:
        def fetch(session: Session) -> dict[uuid.UUID, ProjectInfo]:
            rows = session.execute(
                sa.select(Project.id, Project.organization_id, Project.archived_at).where(
                    Project.id.in_(project_ids)
                )
            )
            return {
                row.id: ProjectInfo(row.organization_id, row.archived_at is not None)
                for row in rows
            }

        return await self._read(fetch)

    async def customers(self, names: set[str]) -> dict[str, uuid.UUID]:
        """The organization each name is the external id of, else the id of (customers.py)."""

        def fetch(session: Session) -> dict[str, uuid.UUID]:
            ids = [uuid.UUID(name) for name in names if UUID_RE.match(name)]
            rows = session.execute(
                sa.select(Organization.external_id, Organization.id).where(
                    sa.or_(Organization.external_id.in_(names), Organization.id.in_(ids))
                )
            ).all()
            by_id = {str(row.id): row.id for row in rows}
            by_external = {row.external_id: row.id for row in rows if row.external_id}
            found = {}
            for name in names:
                organization_id = by_external.get(name) or by_id.get(name.lower())
                if organization_id is not None:
                    found[name] = organization_id
            return found

        return await self._read(fetch)

    async def subscription_customers(self, names: set[str]) -> dict[str, uuid.UUID]:
        """The organization of the subscription each name is the external id of."""

        def fetch(session: Session) -> dict[str, uuid.UUID]:
            rows = session.execute(
                sa.select(Subscription.external_id, Subscription.organization_id).where(
                    Subscription.external_id.in_(names)
                )
            )
            return {row.external_id: row.organization_id for row in rows}

        return await self._read(fetch)

    async def record_key_usage(self, usage: dict[uuid.UUID, tuple[int, datetime]]) -> None:
        await self._write(lambda session: record_key_usage(session, usage))

    async def usage(
        self,
        scope: UsageScope,
        *,
        start: datetime,
        end: datetime,
        metric: str | None,
        group_by: Sequence[str],
        filters: Mapping[str, str],
        granularity: Granularity,
    ) -> list[UsageRow]:
        return await self._read(
            lambda session: read_usage(
                session,
                scope.organization_id,
                start=start,
                end=end,
                metric=metric,
                group_by=group_by,
                filters=filters,
                granularity=granularity,
                project_id=scope.project_id,
                keys_of_user=scope.keys_of_user,
            )
        )

    async def meters(self) -> dict[str, MeterDefinition]:
        return await self._read(meters_by_metric)

    async def member_role(self, organization_id: uuid.UUID, user_id: uuid.UUID) -> Role | None:
        return await self._read(lambda session: member_role(session, organization_id, user_id))

    async def ping(self) -> bool:
        try:
            await self._read(lambda session: session.execute(sa.text("SELECT 1")))
        except DatabaseUnavailable:
            return False
        return True
