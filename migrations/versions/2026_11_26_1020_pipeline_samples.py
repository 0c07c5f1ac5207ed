"""pipeline_samples: the console's periodic readings of throughput, lag and dead letters; an
index of usage_daily by day for the console's usage overview

Revision ID: 0018_pipeline_samples
Revises: 0017_mismatch_resolution
Create Date: 2026-11-26 10:20:00+00:00

Old code still runs while this migrates: a new table nothing else reads, and an index.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0018_pipeline_samples"
down_revision: str | None = "0017_mismatch_resolution"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pipeline_samples",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("sampled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("events_total", sa.BigInteger(), nullable=True),
        sa.Column("lag", sa.BigInteger(), nullable=True),
        sa.Column("partitions", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("dlq_messages", sa.BigInteger(), nullable=True),
        sa.Column("dlq_pending", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="pk_pipeline_samples"),
    )
    op.create_index("ix_pipeline_samples_sampled_at", "pipeline_samples", ["sampled_at"])
    op.create_index("ix_usage_daily_day", "usage_daily", ["day"])


def downgrade() -> None:
    op.drop_index("ix_usage_daily_day", table_name="usage_daily")
    op.drop_table("pipeline_samples")
