"""Stripe invoices and typed lines: Stripe invoice of each final invoice, line segments and plans,
flat lines, meter report attempts and parking, billing states of reruns

Revision ID: 0012_stripe_invoices
Revises: 0011_subscription_terms
Create Date: 2026-12-01 22:20:00+00:00

Old code still runs while this migrates: every new column is nullable (or a new table), and the
line index only gains columns, so a line the running release writes stays unique as before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_stripe_invoices"
down_revision: str | None = "0011_subscription_terms"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("invoices", sa.Column("stripe_invoice_id", sa.String(length=255), nullable=True))
    op.add_column("invoices", sa.Column("stripe_status", sa.String(length=30), nullable=True))
    op.add_column("invoices", sa.Column("stripe_total", sa.BigInteger(), nullable=True))
    op.add_column(
        "invoices", sa.Column("stripe_synced_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_unique_constraint(
        op.f("uq_invoices_stripe_invoice_id"), "invoices", ["stripe_invoice_id"]
    )
    op.alter_column("invoice_lines", "metric", existing_type=sa.String(length=64), nullable=True)
    op.add_column(
        "invoice_lines", sa.Column("segment_start", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "invoice_lines", sa.Column("segment_end", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("invoice_lines", sa.Column("plan_id", sa.Uuid(), nullable=True))
    op.add_column("invoice_lines", sa.Column("description", sa.Text(), nullable=True))
    op.drop_index(
        "uq_invoice_lines_line", table_name="invoice_lines", postgresql_nulls_not_distinct=True
    )
    op.create_index(
        "uq_invoice_lines_line",
        "invoice_lines",
        ["invoice_id", "kind", "metric", "adjusts_period_start", "segment_start", "plan_id"],
        unique=True,
        postgresql_nulls_not_distinct=True,
    )
    op.add_column(
        "stripe_meter_reports",
        sa.Column("first_attempt_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column(
        "stripe_meter_reports", sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_table(
        "billing_states",
        sa.Column("subscription_id", sa.Uuid(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_billing_states_subscription_id_subscriptions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("subscription_id", name=op.f("pk_billing_states")),
    )


def downgrade() -> None:
    op.drop_table("billing_states")
    op.drop_column("stripe_meter_reports", "parked_at")
    op.drop_column("stripe_meter_reports", "first_attempt_at")
    op.drop_index(
        "uq_invoice_lines_line", table_name="invoice_lines", postgresql_nulls_not_distinct=True
    )
    op.execute("DELETE FROM invoice_lines WHERE metric IS NULL")
    op.create_index(
        "uq_invoice_lines_line",
        "invoice_lines",
        ["invoice_id", "metric", "kind", "adjusts_period_start"],
        unique=True,
        postgresql_nulls_not_distinct=True,
    )
    op.drop_column("invoice_lines", "description")
    op.drop_column("invoice_lines", "plan_id")
    op.drop_column("invoice_lines", "segment_end")
    op.drop_column("invoice_lines", "segment_start")
    op.alter_column("invoice_lines", "metric", existing_type=sa.String(length=64), nullable=False)
    op.drop_constraint(op.f("uq_invoices_stripe_invoice_id"), "invoices", type_="unique")
    op.drop_column("invoices", "stripe_synced_at")
    op.drop_column("invoices", "stripe_total")
    op.drop_column("invoices", "stripe_status")
    op.drop_column("invoices", "stripe_invoice_id")
