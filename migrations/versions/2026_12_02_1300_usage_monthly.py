"""usage_monthly: an exact monthly rollup of usage_daily, kept by statement triggers

Revision ID: 0023_usage_monthly
Revises: 0022_meter_pieces
Create Date: 2026-12-02 13:00:00+00:00

The console's usage overview sums a range of days over every organization. Read from usage_daily
that is a row per organization, metric and day (155,000 rows for 30 days of 1,000 organizations
and 5 metrics); usage_monthly holds one per organization, metric and UTC month, with how many
usage_daily rows it sums, so a range is its whole months plus or minus a few days.

usage_monthly is kept from usage_daily as usage_daily is kept from usage_records: every statement
that writes usage_daily (its recompute, its rebuild, a cascade) fires a statement trigger that
recomputes the months it touched from usage_daily itself, under the organizations' locks, so it
stays exact whatever wrote. usage_daily is locked against writers while the table is created and
filled, so a write either committed before (and is in the fill) or fires the new triggers.
Old code still runs while this migrates: it never reads usage_monthly.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0023_usage_monthly"
down_revision: str | None = "0022_meter_pieces"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A month is the UTC calendar month of a rollup day; daily_rows counts the usage_daily rows it
# sums, so that a range read as months minus days knows whether any row was inside it.
_MONTHS = """
    SELECT d.organization_id, d.metric, CAST(date_trunc('month', d.day) AS date) AS month,
           sum(d.quantity), CAST(sum(d.event_count) AS bigint), CAST(count(*) AS integer)
"""
# By position: in the recompute, "month" would name the touched keys' column, not the day's.
_GROUPED = "GROUP BY 1, 2, 3"
_COLUMNS = "usage_monthly (organization_id, metric, month, quantity, event_count, daily_rows)"

# Rebuilds the whole rollup: after this migration, and after a bulk load with the triggers off.
_REBUILD = f"""
CREATE FUNCTION usage_monthly_rebuild() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM usage_monthly;
    INSERT INTO {_COLUMNS}
    {_MONTHS} FROM usage_daily AS d {_GROUPED};
END;
$$
"""  # noqa: S608 - built from the constant fragments above

# Recomputes the given (organization, metric, month) keys from usage_daily, under the same
# organization locks as usage_daily_recompute (migration 0007), which already holds them when its
# writes fire these triggers (the locks are re-entrant).
_RECOMPUTE = f"""
CREATE FUNCTION usage_monthly_recompute(orgs uuid[], metrics text[], months date[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    lock_key integer;
BEGIN
    FOR lock_key IN
        SELECT DISTINCT hashtext(CAST(o AS text)) AS h FROM unnest(orgs) AS o ORDER BY h
    LOOP
        PERFORM pg_advisory_xact_lock(19789, lock_key);
    END LOOP;

    -- Months left without usage go; the others are recomputed in place (created_at is kept).
    DELETE FROM usage_monthly AS m
    USING unnest(orgs, metrics, months) AS t(organization_id, metric, month)
    WHERE m.organization_id = t.organization_id AND m.metric = t.metric AND m.month = t.month
      AND NOT EXISTS (
          SELECT 1 FROM usage_daily AS d
          WHERE d.organization_id = t.organization_id AND d.metric = t.metric
            AND d.day >= t.month AND d.day < CAST(t.month + interval '1 month' AS date));

    INSERT INTO {_COLUMNS}
    {_MONTHS}
    FROM (SELECT DISTINCT * FROM unnest(orgs, metrics, months)
              AS t(organization_id, metric, month)) AS t
    JOIN usage_daily AS d
      ON d.organization_id = t.organization_id AND d.metric = t.metric
     AND d.day >= t.month AND d.day < CAST(t.month + interval '1 month' AS date)
    {_GROUPED}
    ON CONFLICT (organization_id, metric, month) DO UPDATE
    SET quantity = excluded.quantity, event_count = excluded.event_count,
        daily_rows = excluded.daily_rows, updated_at = now();
END;
$$
"""  # noqa: S608 - built from the constant fragments above

_SYNC = """
CREATE FUNCTION usage_monthly_sync() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    orgs uuid[];
    metrics text[];
    months date[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(organization_id), array_agg(metric), array_agg(month)
        INTO orgs, metrics, months
        FROM (SELECT DISTINCT organization_id, metric,
                     CAST(date_trunc('month', day) AS date) AS month FROM new_rows) AS touched;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT array_agg(organization_id), array_agg(metric), array_agg(month)
        INTO orgs, metrics, months
        FROM (SELECT organization_id, metric, CAST(date_trunc('month', day) AS date) AS month
              FROM new_rows
              UNION
              SELECT organization_id, metric, CAST(date_trunc('month', day) AS date) AS month
              FROM old_rows) AS touched;
    ELSE
        SELECT array_agg(organization_id), array_agg(metric), array_agg(month)
        INTO orgs, metrics, months
        FROM (SELECT DISTINCT organization_id, metric,
                     CAST(date_trunc('month', day) AS date) AS month FROM old_rows) AS touched;
    END IF;
    IF orgs IS NOT NULL THEN
        PERFORM usage_monthly_recompute(orgs, metrics, months);
    END IF;
    RETURN NULL;
END;
$$
"""

_TRIGGERS = (
    "CREATE TRIGGER usage_monthly_after_insert AFTER INSERT ON usage_daily"
    " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_monthly_sync()",
    "CREATE TRIGGER usage_monthly_after_update AFTER UPDATE ON usage_daily"
    " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION usage_monthly_sync()",
    "CREATE TRIGGER usage_monthly_after_delete AFTER DELETE ON usage_daily"
    " REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_monthly_sync()",
)


def upgrade() -> None:
    # SHARE ROW EXCLUSIVE on both: usage_records' writers (whose triggers write usage_daily)
    # wait until this commits, readers do not.
    op.execute("LOCK TABLE usage_records, usage_daily IN SHARE ROW EXCLUSIVE MODE")
    op.create_table(
        "usage_monthly",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("quantity", sa.Numeric(), nullable=False),
        sa.Column("event_count", sa.BigInteger(), nullable=False),
        sa.Column("daily_rows", sa.Integer(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_usage_monthly_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "organization_id", "metric", "month", name=op.f("pk_usage_monthly")
        ),
    )
    op.create_index(
        "ix_usage_monthly_month_totals",
        "usage_monthly",
        ["month"],
        postgresql_include=["organization_id", "metric", "quantity", "event_count", "daily_rows"],
    )
    op.execute(_REBUILD)
    op.execute(_RECOMPUTE)
    op.execute(_SYNC)
    for trigger in _TRIGGERS:
        op.execute(trigger)
    op.execute("SELECT usage_monthly_rebuild()")


def downgrade() -> None:
    op.execute("DROP TRIGGER usage_monthly_after_delete ON usage_daily")
    op.execute("DROP TRIGGER usage_monthly_after_update ON usage_daily")
    op.execute("DROP TRIGGER usage_monthly_after_insert ON usage_daily")
    op.execute("DROP FUNCTION usage_monthly_sync()")
    op.execute("DROP FUNCTION usage_monthly_recompute(uuid[], text[], date[])")
    op.execute("DROP FUNCTION usage_monthly_rebuild()")
    op.drop_table("usage_monthly")
