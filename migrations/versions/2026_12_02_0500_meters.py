"""meters: a metric's aggregation and dimensions, and the usage kept per dimension values

Revision ID: 0021_meters
Revises: 0020_platform_keys
Create Date: 2026-12-02 05:00:00+00:00

Three new tables, nothing existing changes: `meters` (one row per metered metric),
`meter_windows` (per window and dimension values: sum, count, max, min, latest) and
`meter_values` (the distinct values of a unique_count meter's property per window).
Old code still runs while this migrates: it neither reads nor writes them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0021_meters"
down_revision: str | None = "0020_platform_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Led by what reads and replay range over, so that one unique index serves them and the upserts.
_KEY = [
    "organization_id",
    "metric",
    "window_start",
    "window_seconds",
    "project_id",
    "api_key_id",
    "dimensions",
]


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column(name, sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False)
        for name in ("created_at", "updated_at")
    ]


def _window_columns(table: str) -> list[sa.Column | sa.ForeignKeyConstraint]:
    return [
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=True),
        sa.Column("api_key_id", sa.Uuid(), nullable=True),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("dimensions", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_seconds", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f(f"fk_{table}_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f(f"fk_{table}_project_id_projects")
        ),
        sa.ForeignKeyConstraint(
            ["api_key_id"], ["api_keys.id"], name=op.f(f"fk_{table}_api_key_id_api_keys")
        ),
    ]


def upgrade() -> None:
    op.create_table(
        "meters",
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("aggregation", sa.String(length=16), nullable=False),
        sa.Column(
            "dimensions",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("property", sa.String(length=64), nullable=True),
        sa.Column("value_property", sa.String(length=64), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_meters")),
        sa.UniqueConstraint("metric", name=op.f("uq_meters_metric")),
    )
    op.create_table(
        "meter_windows",
        *_window_columns("meter_windows"),
        sa.Column("quantity", sa.Numeric(), nullable=False),
        sa.Column("event_count", sa.BigInteger(), nullable=False),
        sa.Column("max_quantity", sa.Numeric(), nullable=False),
        sa.Column("min_quantity", sa.Numeric(), nullable=False),
        sa.Column("latest_quantity", sa.Numeric(), nullable=False),
        sa.Column("latest_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("latest_event_id", sa.String(length=128), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_meter_windows")),
    )
    op.create_index(
        "uq_meter_windows_window",
        "meter_windows",
        _KEY,
        unique=True,
        postgresql_nulls_not_distinct=True,
    )
    op.create_table(
        "meter_values",
        *_window_columns("meter_values"),
        sa.Column("value", sa.String(length=256), nullable=False),
    )
    op.create_index(
        "uq_meter_values_value",
        "meter_values",
        [*_KEY, "value"],
        unique=True,
        postgresql_nulls_not_distinct=True,
    )


def downgrade() -> None:
    op.drop_table("meter_values")
    op.drop_table("meter_windows")
    op.drop_table("meters")
