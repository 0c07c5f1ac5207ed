"""usage_daily: an exact daily rollup of usage_records, kept by statement triggers

Revision ID: 0007_usage_daily_rollup
Revises: 0006_invoice_plan_snapshot
Create Date: 2026-11-25 19:10:00+00:00

Old code still runs while this migrates: it never reads usage_daily, and its writes to
usage_records only gain the triggers. usage_records is locked against writers first (readers go
on), then the triggers are created and the table filled from the usage stored, all in one
transaction: a write either committed before the lock (and is in the fill) or waits for the
commit (and fires the triggers). Databases migrated by the first version of this revision, which
filled the table before the triggers existed and without the lock, are repaired by 0008.

Every writer of usage_records (the aggregator's upsert, replay's replace and delete, cascades,
a person's UPDATE) fires a statement-level trigger that recomputes the days it touched from
usage_records itself: a recompute, not a delta, so the rollup stays exact whatever wrote.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_usage_daily_rollup"
down_revision: str | None = "0006_invoice_plan_snapshot"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A day is the UTC calendar day of a window's start. A window's quantity for "max" is summed over
# the organization's projects and keys first (DESIGN.md section 5), then the day keeps the largest.
_DAYS_OF_WINDOWS = """
    SELECT w.organization_id, w.metric, w.window_seconds,
           CAST(w.window_start AT TIME ZONE 'UTC' AS date) AS day,
           sum(w.quantity), max(w.quantity), CAST(sum(w.event_count) AS bigint)
    FROM windows AS w
    GROUP BY w.organization_id, w.metric, w.window_seconds, day
"""
_COLUMNS = (
    "usage_daily (organization_id, metric, window_seconds, day, quantity, max_window_quantity,"
    " event_count)"
)

# Rebuilds the whole rollup: after this migration, and after a bulk load with the triggers off.
_REBUILD = f"""
CREATE FUNCTION usage_daily_rebuild() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM usage_daily;
    INSERT INTO {_COLUMNS}
    WITH windows AS (
        SELECT organization_id, metric, window_seconds, window_start,
               sum(quantity) AS quantity, sum(event_count) AS event_count
        FROM usage_records
        GROUP BY organization_id, metric, window_seconds, window_start)
    {_DAYS_OF_WINDOWS};
END;
$$
"""  # noqa: S608 - built from the constant fragments above

# Recomputes the given (organization, metric, window_seconds, day) keys from usage_records.
# It first takes the aggregator's organization locks (services/aggregator/repository.py:
# ORG_LOCK_NAMESPACE 0x4D4D = 19789, keyed by hashtext of the id, in ascending order; re-entrant
# when a batch already holds them), so two writers of one organization are serialised and
# neither recomputes from a snapshot that misses the other's rows.
_RECOMPUTE = f"""
CREATE FUNCTION usage_daily_recompute(
    orgs uuid[], metrics text[], window_sizes integer[], days date[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    lock_key integer;
BEGIN
    FOR lock_key IN
        SELECT DISTINCT hashtext(CAST(o AS text)) AS h FROM unnest(orgs) AS o ORDER BY h
    LOOP
        PERFORM pg_advisory_xact_lock(19789, lock_key);
    END LOOP;

    -- Days left without usage go; the others are recomputed in place (created_at is kept).
    DELETE FROM usage_daily AS d
    USING unnest(orgs, metrics, window_sizes, days) AS t(organization_id, metric, window_seconds, day)
    WHERE d.organization_id = t.organization_id AND d.metric = t.metric
      AND d.window_seconds = t.window_seconds AND d.day = t.day
      AND NOT EXISTS (
          SELECT 1 FROM usage_records AS u
          WHERE u.organization_id = t.organization_id AND u.metric = t.metric
            AND u.window_seconds = t.window_seconds
            AND u.window_start >= CAST(t.day AS timestamp) AT TIME ZONE 'UTC'
            AND u.window_start < CAST(t.day + 1 AS timestamp) AT TIME ZONE 'UTC');

    INSERT INTO {_COLUMNS}
    WITH touched AS (
        SELECT DISTINCT * FROM unnest(orgs, metrics, window_sizes, days)
            AS t(organization_id, metric, window_seconds, day)),
    windows AS (
        SELECT u.organization_id, u.metric, u.window_seconds, u.window_start,
               sum(u.quantity) AS quantity, sum(u.event_count) AS event_count
        FROM touched AS t
        JOIN usage_records AS u
          ON u.organization_id = t.organization_id AND u.metric = t.metric
         AND u.window_seconds = t.window_seconds
         AND u.window_start >= CAST(t.day AS timestamp) AT TIME ZONE 'UTC'
         AND u.window_start < CAST(t.day + 1 AS timestamp) AT TIME ZONE 'UTC'
        GROUP BY u.organization_id, u.metric, u.window_seconds, u.window_start)
    {_DAYS_OF_WINDOWS}
    ON CONFLICT (organization_id, metric, window_seconds, day) DO UPDATE
    SET quantity = excluded.quantity, max_window_quantity = excluded.max_window_quantity,
        event_count = excluded.event_count, updated_at = now();
END;
$$
"""  # noqa: S608 - built from the constant fragments above

# One function for the three triggers: PostgreSQL allows a transition table only on a trigger
# of one event, and each trigger names only the tables its event has.
_SYNC = """
CREATE FUNCTION usage_daily_sync() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    orgs uuid[];
    metrics text[];
    window_sizes integer[];
    days date[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(organization_id), array_agg(metric), array_agg(window_seconds),
               array_agg(day)
        INTO orgs, metrics, window_sizes, days
        FROM (SELECT DISTINCT organization_id, metric, window_seconds,
                     CAST(window_start AT TIME ZONE 'UTC' AS date) AS day
              FROM new_rows) AS touched;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT array_agg(organization_id), array_agg(metric), array_agg(window_seconds),
               array_agg(day)
        INTO orgs, metrics, window_sizes, days
        FROM (SELECT organization_id, metric, window_seconds,
                     CAST(window_start AT TIME ZONE 'UTC' AS date) AS day FROM new_rows
              UNION
              SELECT organization_id, metric, window_seconds,
                     CAST(window_start AT TIME ZONE 'UTC' AS date) AS day FROM old_rows
             ) AS touched;
    ELSE
        SELECT array_agg(organization_id), array_agg(metric), array_agg(window_seconds),
               array_agg(day)
        INTO orgs, metrics, window_sizes, days
        FROM (SELECT DISTINCT organization_id, metric, window_seconds,
                     CAST(window_start AT TIME ZONE 'UTC' AS date) AS day
              FROM old_rows) AS touched;
    END IF;
    IF orgs IS NOT NULL THEN
        PERFORM usage_daily_recompute(orgs, metrics, window_sizes, days);
    END IF;
    RETURN NULL;
END;
$$
"""

_TRIGGERS = (
    "CREATE TRIGGER usage_daily_after_insert AFTER INSERT ON usage_records"
    " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_daily_sync()",
    "CREATE TRIGGER usage_daily_after_update AFTER UPDATE ON usage_records"
    " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
    " FOR EACH STATEMENT EXECUTE FUNCTION usage_daily_sync()",
    "CREATE TRIGGER usage_daily_after_delete AFTER DELETE ON usage_records"
    " REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_daily_sync()",
)


def upgrade() -> None:
    # SHARE ROW EXCLUSIVE: writers of usage_records wait until this commits, readers do not.
    op.execute("LOCK TABLE usage_records IN SHARE ROW EXCLUSIVE MODE")
    op.create_table(
        "usage_daily",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("window_seconds", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("quantity", sa.Numeric(), nullable=False),
        sa.Column("max_window_quantity", sa.Numeric(), nullable=False),
        sa.Column("event_count", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_usage_daily_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "organization_id", "metric", "window_seconds", "day", name=op.f("pk_usage_daily")
        ),
    )
    op.execute(_REBUILD)
    op.execute(_RECOMPUTE)
    op.execute(_SYNC)
    for trigger in _TRIGGERS:
        op.execute(trigger)
    op.execute("SELECT usage_daily_rebuild()")


def downgrade() -> None:
    op.execute("DROP TRIGGER usage_daily_after_delete ON usage_records")
    op.execute("DROP TRIGGER usage_daily_after_update ON usage_records")
    op.execute("DROP TRIGGER usage_daily_after_insert ON usage_records")
    op.execute("DROP FUNCTION usage_daily_sync()")
    op.execute("DROP FUNCTION usage_daily_recompute(uuid[], text[], integer[], date[])")
    op.execute("DROP FUNCTION usage_daily_rebuild()")
    op.drop_table("usage_daily")
