"""subscription billing cycle anchor

Revision ID: 0004_subscription_anchor
Revises: 0003_billing
Create Date: 2026-11-25 18:15:00+00:00

Old code still runs while this migrates: add before you remove, and keep each step backward
compatible with the release that is running. The column is nullable and NULL means "anchored on
the current_period_start", so rows written by the release still running stay valid.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_subscription_anchor"
down_revision: str | None = "0003_billing"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "subscriptions",
        sa.Column("billing_cycle_anchor", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("subscriptions", "billing_cycle_anchor")
