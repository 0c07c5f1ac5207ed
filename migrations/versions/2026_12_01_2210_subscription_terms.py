"""subscription terms: one live subscription per organization, plan phases, plan price versions

Revision ID: 0011_subscription_terms
Revises: 0010_usage_cuts
Create Date: 2026-12-01 22:10:00+00:00

Old code still runs while this migrates: it never reads the new tables, and the unique index only
refuses what the running release already refused by an (unlocked) check. The index cannot be built
over data that already breaks the rule, so the migration stops first with the organizations to fix.
Every plan gets its current prices as its first version (effective since it was created).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011_subscription_terms"
down_revision: str | None = "0010_usage_cuts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIVE = "('trialing', 'active', 'past_due', 'unpaid', 'paused', 'incomplete')"
_DUPLICATES = (
    "SELECT organization_id FROM subscriptions WHERE status IN"  # noqa: S608 - constants only
    f" {_LIVE} GROUP BY organization_id HAVING count(*) > 1 ORDER BY 1"
)

# A version per insert and per change of a price, whoever writes the plan: `plans apply`, a
# person's UPDATE, a test. The transaction's start time is the version's: an edit committed later
# than a period's end still counts as made when it began.
_VERSION = """
CREATE FUNCTION plan_versions_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.price_monthly IS DISTINCT FROM OLD.price_monthly
       OR NEW.price_yearly IS DISTINCT FROM OLD.price_yearly
       OR NEW.currency IS DISTINCT FROM OLD.currency
       OR NEW.features IS DISTINCT FROM OLD.features THEN
        INSERT INTO plan_versions (id, plan_id, effective_at, price_monthly, price_yearly,
                                   currency, features)
        VALUES (gen_random_uuid(), NEW.id, now(), NEW.price_monthly, NEW.price_yearly,
                NEW.currency, NEW.features);
    END IF;
    RETURN NULL;
END;
$$
"""


def upgrade() -> None:
    duplicates = op.get_bind().execute(sa.text(_DUPLICATES)).scalars().all()
    if duplicates:
        listed = ", ".join(str(org) for org in duplicates[:20])
        raise RuntimeError(
            f"{len(duplicates)} organizations have more than one live subscription ({listed}): "
            "cancel all but one of each (meterline subscriptions cancel), then migrate again"
        )
    op.create_index(
        "uq_subscriptions_one_live_per_organization",
        "subscriptions",
        ["organization_id"],
        unique=True,
        postgresql_where=sa.text("status IN " + _LIVE),
    )
    op.create_table(
        "subscription_phases",
        sa.Column("subscription_id", sa.Uuid(), nullable=False),
        sa.Column("plan_id", sa.Uuid(), nullable=False),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["plan_id"], ["plans.id"], name=op.f("fk_subscription_phases_plan_id_plans")
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_subscription_phases_subscription_id_subscriptions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscription_phases")),
        sa.UniqueConstraint(
            "subscription_id",
            "starts_at",
            name=op.f("uq_subscription_phases_subscription_id_starts_at"),
        ),
    )
    op.create_table(
        "plan_versions",
        sa.Column("plan_id", sa.Uuid(), nullable=False),
        sa.Column("effective_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("price_monthly", sa.Integer(), nullable=False),
        sa.Column("price_yearly", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("features", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["plan_id"],
            ["plans.id"],
            name=op.f("fk_plan_versions_plan_id_plans"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plan_versions")),
    )
    op.create_index(
        "ix_plan_versions_plan_id_effective_at", "plan_versions", ["plan_id", "effective_at"]
    )
    op.execute(
        "INSERT INTO plan_versions (id, plan_id, effective_at, price_monthly, price_yearly,"
        " currency, features) SELECT gen_random_uuid(), id, created_at, price_monthly,"
        " price_yearly, currency, features FROM plans"
    )
    op.execute(_VERSION)
    op.execute(
        "CREATE TRIGGER plan_versions_after_write AFTER INSERT OR UPDATE ON plans"
        " FOR EACH ROW EXECUTE FUNCTION plan_versions_record()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER plan_versions_after_write ON plans")
    op.execute("DROP FUNCTION plan_versions_record()")
    op.drop_index("ix_plan_versions_plan_id_effective_at", table_name="plan_versions")
    op.drop_table("plan_versions")
    op.drop_table("subscription_phases")
    op.drop_index(
        "uq_subscriptions_one_live_per_organization",
        table_name="subscriptions",
        postgresql_where=sa.text("status IN " + _LIVE),
    )
