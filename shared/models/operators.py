"""Operators of the console and admin API, their browser sessions, and the audit log of changes.

Like API keys, only a public prefix and a keyed hash of an operator token are stored; a browser
session is a random token stored the same way.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Enum, ForeignKey, Index, LargeBinary, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, IdMixin, TimestampMixin


class OperatorRole(enum.StrEnum):
    ADMIN = "admin"  # reads and changes everything the console offers
    VIEWER = "viewer"  # reads only


class Operator(IdMixin, TimestampMixin, Base):
    __tablename__ = "operators"

    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[OperatorRole] = mapped_column(
        Enum(OperatorRole, name="operator_role", values_callable=lambda e: [m.value for m in e])
    )
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class OperatorSession(IdMixin, TimestampMixin, Base):
    """A browser session: the cookie holds the token, the table its keyed hash."""

    __tablename__ = "operator_sessions"

    operator_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("operators.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class AuditEntry(IdMixin, TimestampMixin, Base):
    """One change made through the console, the admin API or an operator command: who, what,
    when."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_created_at", "created_at"),)

    operator_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("operators.id", ondelete="SET NULL"), index=True
    )
    # The operator's name when the change was made (kept if the operator is later removed), or
    # "cli" for a change made at the command line.
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(40))
    target_id: Mapped[str | None] = mapped_column(String(100))
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)


class PipelineSample(IdMixin, TimestampMixin, Base):
    """What the console's sampler read of the pipeline at one moment: the points of its charts."""

    __tablename__ = "pipeline_samples"
    __table_args__ = (Index("ix_pipeline_samples_sampled_at", "sampled_at"),)

    sampled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # meterline_aggregator_events_total summed over the aggregators that answered (None: none did).
    events_total: Mapped[int | None] = mapped_column(BigInteger)
    lag: Mapped[int | None] = mapped_column(BigInteger)
    # [{"partition", "committed", "end"}] of the aggregator's group on the events topic.
    partitions: Mapped[list[dict[str, int | None]]] = mapped_column(JSONB, default=list)
    dlq_messages: Mapped[int | None] = mapped_column(BigInteger)  # retained in the DLQ topic
    dlq_pending: Mapped[int | None] = mapped_column(BigInteger)  # not yet seen by `replay dlq`
