"""Billing tables: runs, invoices and their lines, the Stripe meter report ledger, processed Stripe
webhook events and reconciliation mismatches."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSON, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, IdMixin, TimestampMixin


class BillingRun(IdMixin, TimestampMixin, Base):
    __tablename__ = "billing_runs"

    as_of: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(20), default="running")
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    subscriptions: Mapped[int] = mapped_column(Integer, default=0)
    invoices_changed: Mapped[int] = mapped_column(Integer, default=0)
    reported: Mapped[int] = mapped_column(Integer, default=0)
    mismatches: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)


class Invoice(IdMixin, TimestampMixin, Base):
    """One per subscription and period: draft while the period is open, final once it closed."""

    __tablename__ = "invoices"
    __table_args__ = (UniqueConstraint("subscription_id", "period_start"),)

    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    subscription_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="CASCADE")
    )
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    period_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(10))
    flat_amount: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[int] = mapped_column(BigInteger)
    finalized_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The pricing the invoice was priced with: {"plan_id", "flat_amount", "metered"} (the plan's
    # features.metered section). Late usage of a final period is priced with it, never with the
    # subscription's current plan. NULL on invoices from before it was stored.
    plan_snapshot: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # The Stripe invoice that collects this one (final invoices only), and what Stripe said of it
    # when it was finalized and last reconciled.
    stripe_invoice_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    stripe_status: Mapped[str | None] = mapped_column(String(30))
    stripe_total: Mapped[int | None] = mapped_column(BigInteger)
    stripe_synced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The invoice's lines, in their order (services/billing/invoices.py: flat fees and
    # prorations, usage per segment, adjustments): written and read whole with the invoice, so
    # json (the text as written), not jsonb.
    lines: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)


class InvoiceLine(IdMixin, TimestampMixin, Base):
    """The lines of invoices written by the first release. Invoices now keep their lines in
    `invoices.lines`; this table is read for invoices that have none there, and no longer
    written (it goes in a later release, once no running release writes it)."""

    __tablename__ = "invoice_lines"
    __table_args__ = (
        Index(
            "uq_invoice_lines_line",
            "invoice_id",
            "metric",
            "kind",
            "adjusts_period_start",
            unique=True,
            postgresql_nulls_not_distinct=True,
        ),
    )

    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"))
    metric: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(12))
    quantity: Mapped[Decimal] = mapped_column(Numeric)
    billable_quantity: Mapped[Decimal] = mapped_column(Numeric)
    amount: Mapped[int] = mapped_column(BigInteger)
    adjusts_period_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StripeMeterReport(IdMixin, TimestampMixin, Base):
    """The ledger of meter events: the intent is written before Stripe is called and marked sent
    after, so a rerun resends unsent intents with the same identifier and never reports twice."""

    __tablename__ = "stripe_meter_reports"
    __table_args__ = (UniqueConstraint("subscription_id", "metric", "period_start", "sequence"),)

    subscription_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="CASCADE")
    )
    metric: Mapped[str] = mapped_column(String(64))
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sequence: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(12))
    event_name: Mapped[str] = mapped_column(String(100))
    stripe_customer_id: Mapped[str] = mapped_column(String(255))
    value: Mapped[int] = mapped_column(BigInteger)
    cumulative: Mapped[int] = mapped_column(BigInteger)
    identifier: Mapped[str] = mapped_column(String(100), unique=True)
    event_timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # When Stripe was first asked (it may have taken an event whose answer was lost: its
    # identifier protects a resend for 24 hours only), and when Stripe refused it for good.
    first_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    parked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StripeWebhookEvent(IdMixin, TimestampMixin, Base):
    """Stripe event ids already processed: each event changes our data at most once."""

    __tablename__ = "stripe_webhook_events"

    stripe_event_id: Mapped[str] = mapped_column(String(255), unique=True)
    type: Mapped[str] = mapped_column(String(100))
    subscription_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="SET NULL")
    )
    outcome: Mapped[str] = mapped_column(String(50))


class ReconciliationMismatch(IdMixin, TimestampMixin, Base):
    """A difference between our records and Stripe's, with what was done about it."""

    __tablename__ = "reconciliation_mismatches"
    __table_args__ = (
        Index(
            "uq_reconciliation_mismatches_finding",
            "subscription_id",
            "kind",
            "metric",
            "period_start",
            "ours",
            "theirs",
            unique=True,
            postgresql_nulls_not_distinct=True,
        ),
    )

    run_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("billing_runs.id", ondelete="SET NULL")
    )
    subscription_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(String(40))
    metric: Mapped[str | None] = mapped_column(String(64))
    period_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ours: Mapped[str] = mapped_column(String(255))
    theirs: Mapped[str] = mapped_column(String(255))
    amount: Mapped[Decimal | None] = mapped_column(Numeric)
    resolved: Mapped[bool] = mapped_column(Boolean, default=False)
    resolution: Mapped[str | None] = mapped_column(Text)
    # Set when a person marked it resolved (console or admin API), with their note; `resolution`
    # above is what a billing run itself did about it.
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resolved_by: Mapped[str | None] = mapped_column(String(100))
    resolution_note: Mapped[str | None] = mapped_column(Text)
