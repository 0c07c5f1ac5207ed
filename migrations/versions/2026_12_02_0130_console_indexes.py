"""console indexes: usage_daily's day index also carries the columns the usage overview sums

Revision ID: 0019_console_indexes
Revises: 0018_pipeline_samples
Create Date: 2026-12-02 01:30:00+00:00

The console's usage overview sums a range of days across every organization (the top
organizations by metric, and the totals per day). With organization, metric, quantity and event
count in the index beside the day, it reads the index alone (an index-only scan) instead of one
heap page per few rows. It replaces ix_usage_daily_day, which it covers.

Old code still runs while this migrates: it reads usage_daily through the same leading column.
usage_daily holds a row per organization, metric and day, so building the index is short; its
writers (the usage_records triggers) wait for it.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0019_console_indexes"
down_revision: str | None = "0018_pipeline_samples"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_usage_daily_day_totals",
        "usage_daily",
        ["day"],
        postgresql_include=["organization_id", "metric", "quantity", "event_count"],
    )
    op.drop_index("ix_usage_daily_day", table_name="usage_daily")


def downgrade() -> None:
    op.create_index("ix_usage_daily_day", "usage_daily", ["day"])
    op.drop_index("ix_usage_daily_day_totals", table_name="usage_daily")
