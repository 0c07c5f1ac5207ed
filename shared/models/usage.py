"""Usage records: one row per (organization, project, key, metric, window), the billing truth;
usage_daily, their exact daily rollup (kept by triggers on usage_records, read by billing); and
usage_monthly, usage_daily's exact monthly rollup (kept by triggers on usage_daily)."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    Numeric,
    String,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, IdMixin, TimestampMixin

USAGE_RECORD_KEY = (
    "organization_id",
    "project_id",
    "api_key_id",
    "metric",
    "window_start",
    "window_seconds",
)


class UsageRecord(IdMixin, TimestampMixin, Base):
    __tablename__ = "usage_records"
    __table_args__ = (
        # The upsert target. NULLS NOT DISTINCT: organization-level usage (no project, no key)
        # must still land in one row per window, not one row per insert.
        Index(
            "uq_usage_records_window",
            *USAGE_RECORD_KEY,
            unique=True,
            postgresql_nulls_not_distinct=True,
        ),
        Index("ix_usage_records_org_window", "organization_id", "window_start"),
        Index("ix_usage_records_project_window", "project_id", "window_start"),
        Index("ix_usage_records_key_window", "api_key_id", "window_start"),
        # Every batch updates the windows it adds to: room on each page keeps those updates in
        # place (HOT), without new entries in the four indexes (migration 0025).
        {"postgresql_with": {"fillfactor": "70"}},
    )

    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE")
    )
    # NO ACTION: a project or key with usage cannot be deleted on its own (see ApiKey).
    project_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("projects.id"))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"))
    metric: Mapped[str] = mapped_column(String(64))
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    window_seconds: Mapped[int] = mapped_column(Integer)
    quantity: Mapped[Decimal] = mapped_column(Numeric, default=Decimal(0))
    event_count: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageDaily(TimestampMixin, Base):
    """One UTC day (of window starts) of an organization's usage of a metric, per window size.

    Written only by the triggers on usage_records (migration 0007), which recompute every day a
    statement touched: never write it from code.
    """

    __tablename__ = "usage_daily"
    # The console's usage overview sums a range of days across every organization: from the
    # index alone (migration 0019).
    __table_args__ = (
        Index(
            "ix_usage_daily_day_totals",
            "day",
            postgresql_include=["organization_id", "metric", "quantity", "event_count"],
        ),
    )

    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    metric: Mapped[str] = mapped_column(String(64), primary_key=True)
    window_seconds: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    # The sum of the day's windows, and its largest window summed over projects and keys.
    quantity: Mapped[Decimal] = mapped_column(Numeric)
    max_window_quantity: Mapped[Decimal] = mapped_column(Numeric)
    event_count: Mapped[int] = mapped_column(BigInteger)


class UsageMonthly(TimestampMixin, Base):
    """One UTC month (of rollup days) of an organization's usage of a metric, all window sizes.

    Written only by the triggers on usage_daily (migration 0023), which recompute every month a
    statement touched: never write it from code. `daily_rows` counts the usage_daily rows it
    sums, so that a range read as whole months minus some days knows whether it held any usage.
    """

    __tablename__ = "usage_monthly"
    # The console's usage overview sums whole months across every organization: from the index
    # alone.
    __table_args__ = (
        Index(
            "ix_usage_monthly_month_totals",
            "month",
            postgresql_include=[
                "organization_id",
                "metric",
                "quantity",
                "event_count",
                "daily_rows",
            ],
        ),
    )

    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    metric: Mapped[str] = mapped_column(String(64), primary_key=True)
    month: Mapped[date] = mapped_column(Date, primary_key=True)
    quantity: Mapped[Decimal] = mapped_column(Numeric)
    event_count: Mapped[int] = mapped_column(BigInteger)
    daily_rows: Mapped[int] = mapped_column(Integer)


class UsageCut(Base):
    """An instant at which an organization's usage is split exactly: a subscription's start, end,
    cancellation or plan change. Registered by billing (shared.usage_cuts) before it bills
    across it; the aggregator and replay keep its totals (`UsageCutTotal`) from then on."""

    __tablename__ = "usage_cuts"

    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    cut_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )


class UsageCutTotal(Base):
    """The usage of the window that holds a cut, counted from the cut on (events at or after it):
    one row per metric and window size. The part before the cut is the window's total minus this."""

    __tablename__ = "usage_cut_totals"
    __table_args__ = (
        ForeignKeyConstraint(
            ["organization_id", "cut_at"],
            ["usage_cuts.organization_id", "usage_cuts.cut_at"],
            ondelete="CASCADE",
        ),
    )

    organization_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    cut_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    metric: Mapped[str] = mapped_column(String(64), primary_key=True)
    window_seconds: Mapped[int] = mapped_column(Integer, primary_key=True)
    quantity: Mapped[Decimal] = mapped_column(Numeric)
    event_count: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )


class UsageVersion(Base):
    """A number that changes whenever an organization's usage changes: bumped by a statement
    trigger on usage_records (every writer) and by the writers of cut totals. Billing compares it
    with the one it last billed with, so a rerun with nothing new reads no usage."""

    __tablename__ = "usage_versions"
    # Bumped by every batch of the organization: updated in place (migration 0025).
    __table_args__ = ({"postgresql_with": {"fillfactor": "70"}},)

    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(BigInteger)
