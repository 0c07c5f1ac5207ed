"""event ledger and replay runs

Revision ID: 0002_event_ledger
Revises: 0001_initial
Create Date: 2026-11-25 18:00:00+00:00

Old code still runs while this migrates: add before you remove, and keep each step backward
compatible with the release that is running.

The ledger is range-partitioned by event time; its monthly partitions (usage_event_ledger_pYYYYMMDD)
are created and dropped at run time by the aggregator, so they are not declared here.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_event_ledger"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_event_ledger",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("event_id", sa.String(length=128), nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fingerprint", sa.LargeBinary(length=16), nullable=False),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint(
            "organization_id", "event_id", "event_time", name=op.f("pk_usage_event_ledger")
        ),
        postgresql_partition_by="RANGE (event_time)",
    )
    op.create_table(
        "replay_runs",
        sa.Column("range_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("range_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=True),
        sa.Column("metric", sa.String(length=64), nullable=True),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("events_read", sa.BigInteger(), nullable=False),
        sa.Column("windows_changed", sa.BigInteger(), nullable=False),
        sa.Column("changes", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_replay_runs_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replay_runs")),
    )
    op.create_index("ix_replay_runs_range", "replay_runs", ["range_start", "range_end"])


def downgrade() -> None:
    op.drop_index("ix_replay_runs_range", table_name="replay_runs")
    op.drop_table("replay_runs")
    # Dropping the partitioned parent drops every partition with it.
    op.drop_table("usage_event_ledger")
