"""invoice plan snapshot, last applied Stripe event per subscription

Revision ID: 0006_invoice_plan_snapshot
Revises: 0005_api_key_change_indexes
Create Date: 2026-11-25 19:00:00+00:00

Old code still runs while this migrates: add before you remove, and keep each step backward
compatible with the release that is running. Both columns are nullable: an invoice without a
snapshot is priced with its subscription's current plan (what the running release does), and a
subscription without a Stripe event time accepts the next event, as before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006_invoice_plan_snapshot"
down_revision: str | None = "0005_api_key_change_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "invoices",
        sa.Column("plan_snapshot", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.add_column(
        "subscriptions",
        sa.Column("stripe_event_created", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("subscriptions", "stripe_event_created")
    op.drop_column("invoices", "plan_snapshot")
