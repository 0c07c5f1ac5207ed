"""usage cuts: event content in the ledger, cut registry and totals, per-organization usage versions

Revision ID: 0010_usage_cuts
Revises: 0019_console_indexes
Create Date: 2026-12-01 22:00:00+00:00

Old code still runs while this migrates: the ledger gains nullable columns (the running release
leaves them NULL; such rows are billed by the window-start rule, see shared/usage_cuts.py), the new
tables are only read by the new release, and the version trigger only adds a row per touched
organization to each usage_records statement.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_usage_cuts"
down_revision: str | None = "0019_console_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One number per organization that changes whenever its usage does: a sequence value, not a time,
# so a writer that started before billing read the usage but committed after it still shows as a
# change (billing compares for equality). The rows are locked in the order of the organizations'
# advisory locks, which every writer of usage_records already holds.
_BUMP = """
CREATE FUNCTION usage_versions_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO usage_versions (organization_id, version)
        SELECT o, nextval('usage_version_seq') FROM (
            SELECT DISTINCT organization_id AS o FROM old_rows ORDER BY 1) AS touched
        WHERE EXISTS (SELECT 1 FROM organizations WHERE id = o)
        ON CONFLICT (organization_id) DO UPDATE SET version = excluded.version;
    ELSE
        INSERT INTO usage_versions (organization_id, version)
        SELECT o, nextval('usage_version_seq') FROM (
            SELECT DISTINCT organization_id AS o FROM new_rows ORDER BY 1) AS touched
        ON CONFLICT (organization_id) DO UPDATE SET version = excluded.version;
    END IF;
    RETURN NULL;
END;
$$
"""

_TRIGGERS = (
    "CREATE TRIGGER usage_versions_after_insert AFTER INSERT ON usage_records"
    " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_versions_bump()",
    "CREATE TRIGGER usage_versions_after_update AFTER UPDATE ON usage_records"
    " REFERENCING NEW TABLE AS new_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION usage_versions_bump()",
    "CREATE TRIGGER usage_versions_after_delete AFTER DELETE ON usage_records"
    " REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_versions_bump()",
)


def upgrade() -> None:
    op.add_column("usage_event_ledger", sa.Column("metric", sa.String(length=64), nullable=True))
    op.add_column("usage_event_ledger", sa.Column("quantity", sa.Numeric(), nullable=True))
    op.add_column("usage_event_ledger", sa.Column("window_seconds", sa.Integer(), nullable=True))
    op.create_table(
        "usage_cuts",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("cut_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_usage_cuts_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("organization_id", "cut_at", name=op.f("pk_usage_cuts")),
    )
    op.create_table(
        "usage_cut_totals",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("cut_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("window_seconds", sa.Integer(), nullable=False),
        sa.Column("quantity", sa.Numeric(), nullable=False),
        sa.Column("event_count", sa.BigInteger(), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["organization_id", "cut_at"],
            ["usage_cuts.organization_id", "usage_cuts.cut_at"],
            name=op.f("fk_usage_cut_totals_organization_id_usage_cuts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "organization_id",
            "cut_at",
            "metric",
            "window_seconds",
            name=op.f("pk_usage_cut_totals"),
        ),
    )
    op.create_table(
        "usage_versions",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_usage_versions_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("organization_id", name=op.f("pk_usage_versions")),
    )
    op.execute("CREATE SEQUENCE usage_version_seq")
    op.execute(_BUMP)
    for trigger in _TRIGGERS:
        op.execute(trigger)


def downgrade() -> None:
    for name in ("delete", "update", "insert"):
        op.execute(f"DROP TRIGGER usage_versions_after_{name} ON usage_records")
    op.execute("DROP FUNCTION usage_versions_bump()")
    op.execute("DROP SEQUENCE usage_version_seq")
    op.drop_table("usage_versions")
    op.drop_table("usage_cut_totals")
    op.drop_table("usage_cuts")
    op.drop_column("usage_event_ledger", "window_seconds")
    op.drop_column("usage_event_ledger", "quantity")
    op.drop_column("usage_event_ledger", "metric")
