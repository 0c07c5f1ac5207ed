"""The pipeline's own tables: the event ledger (exactly-once effect) and the record of replay runs.

The ledger is range-partitioned by event time, one partition per month, named
`usage_event_ledger_pYYYYMMDD`; partitions are created at run time by the aggregator and dropped
once no unprocessed event can need them (services/aggregator/ledger_partitions.py).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    PrimaryKeyConstraint,
    String,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, IdMixin, TimestampMixin

LEDGER_TABLE = "usage_event_ledger"


class UsageEventLedger(Base):
    """One row per distinct accepted event: (organization, event id) counted once, first wins."""

    __tablename__ = LEDGER_TABLE
    __table_args__ = (
        # event_time is in the key because a partitioned table's unique keys must hold the
        # partition column; uniqueness of (organization, event id) across times is kept by the
        # aggregator's per-organization lock plus its lookup over the horizon.
        PrimaryKeyConstraint("organization_id", "event_id", "event_time"),
        {"postgresql_partition_by": "RANGE (event_time)"},
    )

    # No foreign key on purpose: a per-row RI check on the hottest insert of the pipeline costs
    # more than it protects; rows of a deleted organization age out with their partition.
    organization_id: Mapped[uuid.UUID] = mapped_column()
    event_id: Mapped[str] = mapped_column(String(128))
    event_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # shared.events.fingerprint: metric, quantity, project and the timestamp the client sent
    # (16 bytes); event_time is the counted version's time, whoever set it.
    fingerprint: Mapped[bytes] = mapped_column(LargeBinary(16))
    recorded_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # What the event added, and to which window size: the part of a window after a usage cut is
    # computed from these (shared.usage_cuts). NULL on rows recorded before they were stored.
    metric: Mapped[str | None] = mapped_column(String(64))
    quantity: Mapped[Decimal | None] = mapped_column(Numeric)
    window_seconds: Mapped[int | None] = mapped_column(Integer)
    # For events of metered metrics, what a meter piece needs (shared.meter_pieces): the event's
    # values of its meter's dimensions and of its unique_count property. NULL for other metrics
    # and on rows recorded before they were stored (their windows are billed by their start).
    dimensions: Mapped[dict[str, str] | None] = mapped_column(JSONB)
    meter_value: Mapped[str | None] = mapped_column(String(256))


class ReplayRun(IdMixin, TimestampMixin, Base):
    """One `meterline replay` invocation: its range, filters, outcome and per-metric changes."""

    __tablename__ = "replay_runs"
    __table_args__ = (Index("ix_replay_runs_range", "range_start", "range_end"),)

    range_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    range_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    organization_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE")
    )
    metric: Mapped[str | None] = mapped_column(String(64))
    dry_run: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(20))
    events_read: Mapped[int] = mapped_column(BigInteger, default=0)
    windows_changed: Mapped[int] = mapped_column(BigInteger, default=0)
    changes: Mapped[list[dict[str, object]]] = mapped_column(JSONB, default=list)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
