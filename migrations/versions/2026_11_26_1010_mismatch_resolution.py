"""who resolved a reconciliation mismatch, when, and their note

Revision ID: 0017_mismatch_resolution
Revises: 0016_operators_audit_log
Create Date: 2026-11-26 10:10:00+00:00

Old code still runs while this migrates: the columns are nullable and the running release
neither reads nor writes them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017_mismatch_resolution"
down_revision: str | None = "0016_operators_audit_log"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "reconciliation_mismatches",
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column(
        "reconciliation_mismatches", sa.Column("resolved_by", sa.String(100), nullable=True)
    )
    op.add_column(
        "reconciliation_mismatches", sa.Column("resolution_note", sa.Text(), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("reconciliation_mismatches", "resolution_note")
    op.drop_column("reconciliation_mismatches", "resolved_by")
    op.drop_column("reconciliation_mismatches", "resolved_at")
