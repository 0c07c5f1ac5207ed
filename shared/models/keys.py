"""API keys: only the public prefix and a keyed hash are stored, never the plaintext."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    false,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, IdMixin, TimestampMixin


class ApiKey(IdMixin, TimestampMixin, Base):
    __tablename__ = "api_keys"
    # Ingest polls for keys changed since its last poll (revocation bound): keep that a range scan.
    __table_args__ = (
        Index("ix_api_keys_updated_at", "updated_at"),
        Index("ix_api_keys_revoked_at", "revoked_at"),
        # A platform key acts for whichever organization a request names, so it has none of
        # its own (nor a project or user); every other key belongs to one organization.
        CheckConstraint(
            "(platform AND organization_id IS NULL AND project_id IS NULL AND user_id IS NULL)"
            " OR (NOT platform AND organization_id IS NOT NULL)",
            name="platform_scope",
        ),
    )

    organization_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    platform: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # NO ACTION (checked at statement end) rather than RESTRICT, so that an organization's
    # cascade may remove its projects, keys and usage together, while deleting one project
    # that still has keys or usage is refused.
    project_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("projects.id"), index=True)
    user_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    created_by_user_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    usage_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ApiKeyDeletion(Base):
    """A tombstone per deleted key (written by a trigger on api_keys, cascades included): a
    deleted row leaves nothing for ingest's change poll to see, its tombstone does. Kept a day."""

    __tablename__ = "api_key_deletions"

    key_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
