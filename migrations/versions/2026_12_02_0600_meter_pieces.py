"""meter pieces: the windows a usage cut splits, kept per piece for meter-priced lines

Revision ID: 0022_meter_pieces
Revises: 0021_meters
Create Date: 2026-12-02 06:00:00+00:00

The ledger gains two nullable columns (an event's meter dimension values and unique_count
property value); two new tables hold the pieces of cut meter windows and their distinct values.
Old code still runs while this migrates: it writes NULL to the new columns and never reads the
new tables, and billing reads a window without complete pieces by its start, as before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0022_meter_pieces"
down_revision: str | None = "0021_meters"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = ["organization_id", "metric", "window_start", "window_seconds", "dimensions", "piece_start"]


def _key_columns(table: str) -> list[sa.Column | sa.ForeignKeyConstraint]:
    return [
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_seconds", sa.Integer(), nullable=False),
        sa.Column("dimensions", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("piece_start", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f(f"fk_{table}_organization_id_organizations"),
            ondelete="CASCADE",
        ),
    ]


def upgrade() -> None:
    op.add_column(
        "usage_event_ledger",
        sa.Column("dimensions", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.add_column("usage_event_ledger", sa.Column("meter_value", sa.String(256), nullable=True))
    op.create_table(
        "meter_pieces",
        *_key_columns("meter_pieces"),
        sa.Column("quantity", sa.Numeric(), nullable=False),
        sa.Column("event_count", sa.BigInteger(), nullable=False),
        sa.Column("max_quantity", sa.Numeric(), nullable=False),
        sa.Column("min_quantity", sa.Numeric(), nullable=False),
        sa.Column("latest_quantity", sa.Numeric(), nullable=False),
        sa.Column("latest_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("latest_event_id", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint(*_KEY, name=op.f("pk_meter_pieces")),
    )
    op.create_table(
        "meter_piece_values",
        *_key_columns("meter_piece_values"),
        sa.Column("value", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint(*_KEY, "value", name=op.f("pk_meter_piece_values")),
    )


def downgrade() -> None:
    op.drop_table("meter_piece_values")
    op.drop_table("meter_pieces")
    op.drop_column("usage_event_ledger", "meter_value")
    op.drop_column("usage_event_ledger", "dimensions")
