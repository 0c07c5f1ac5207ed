"""Stripe invoices and invoice lines as documents: the Stripe invoice of each final invoice, the
lines of each invoice in one json column, meter report attempts and parking, billing states on
subscriptions

Revision ID: 0012_stripe_invoices
Revises: 0011_subscription_terms
Create Date: 2026-12-01 22:20:00+00:00

Old code still runs while this migrates: every new column is nullable (or a new table). The
running release keeps writing invoice_lines, which the new one reads for any invoice whose `lines`
are empty; invoice_lines itself goes in a later release.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

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
    # json, not jsonb: lines are written and read whole, never queried inside, and json stores
    # the text as given (a third cheaper to write than jsonb's binary form).
    op.add_column(
        "invoices", sa.Column("lines", postgresql.JSON(astext_type=sa.Text()), nullable=True)
    )
    # The lines the first release wrote, in the order the new one keeps: usage, then adjustments.
    op.execute(
        "UPDATE invoices AS i SET lines = l.lines FROM ("
        " SELECT invoice_id, json_agg(json_build_object("
        "   'kind', kind, 'metric', metric, 'quantity', CAST(quantity AS text),"
        "   'billable_quantity', CAST(billable_quantity AS text), 'amount', amount,"
        "   'adjusts_period_start', adjusts_period_start)"
        "   ORDER BY kind DESC, metric, adjusts_period_start) AS lines"
        " FROM invoice_lines GROUP BY invoice_id) AS l WHERE l.invoice_id = i.id"
    )
    op.add_column(
        "stripe_meter_reports",
        sa.Column("first_attempt_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column(
        "stripe_meter_reports", sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "subscriptions", sa.Column("billed_fingerprint", sa.String(length=64), nullable=True)
    )
    op.add_column(
        "subscriptions", sa.Column("billed_from", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "subscriptions", sa.Column("billed_until", sa.DateTime(timezone=True), nullable=True)
    )
    # Billing updates every subscription's period and billing state each period: free room on
    # each page keeps those updates in place (HOT), without new index entries. Existing pages
    # get the room as they are rewritten.
    op.execute("ALTER TABLE subscriptions SET (fillfactor = 80)")


def downgrade() -> None:
    op.execute("ALTER TABLE subscriptions RESET (fillfactor)")
    op.drop_column("subscriptions", "billed_until")
    op.drop_column("subscriptions", "billed_from")
    op.drop_column("subscriptions", "billed_fingerprint")
    op.drop_column("stripe_meter_reports", "parked_at")
    op.drop_column("stripe_meter_reports", "first_attempt_at")
    # The first release reads invoice_lines: give it the lines of invoices written since, per
    # metric (it knew neither segments nor flat lines; the flat fee is on the invoice).
    op.execute(
        "INSERT INTO invoice_lines (id, invoice_id, metric, kind, quantity, billable_quantity,"
        " amount, adjusts_period_start)"
        " SELECT gen_random_uuid(), i.id, l->>'metric', l->>'kind',"
        " sum(CAST(l->>'quantity' AS numeric)), sum(CAST(l->>'billable_quantity' AS numeric)),"
        " sum(CAST(l->>'amount' AS bigint)), CAST(l->>'adjusts_period_start' AS timestamptz)"
        " FROM invoices AS i CROSS JOIN json_array_elements(i.lines) AS l"
        " WHERE l->>'kind' IN ('usage', 'adjustment')"
        " AND NOT EXISTS (SELECT 1 FROM invoice_lines AS o WHERE o.invoice_id = i.id)"
        " GROUP BY i.id, l->>'metric', l->>'kind', l->>'adjusts_period_start'"
    )
    op.drop_column("invoices", "lines")
    op.drop_constraint(op.f("uq_invoices_stripe_invoice_id"), "invoices", type_="unique")
    op.drop_column("invoices", "stripe_synced_at")
    op.drop_column("invoices", "stripe_total")
    op.drop_column("invoices", "stripe_status")
    op.drop_column("invoices", "stripe_invoice_id")
