"""platform keys and external ids: operator keys that name the organization of each event

Revision ID: 0020_platform_keys
Revises: 0012_stripe_invoices
Create Date: 2026-12-02 05:00:00+00:00

A platform key (api_keys.platform) belongs to no organization: it posts events for, and reads
the usage of, the organization each request names by its external_id or id. A check keeps the
two kinds apart: a platform key has no organization, project or user; every other key has an
organization. Organizations and subscriptions get an optional unique external_id, the id the
integrator's own system knows them by (Lago's external_subscription_id names a subscription).

Old code still runs while this migrates: it never writes platform keys, and its key reads
select the columns it knows, so a NULL organization_id only ever appears on rows it did not make.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020_platform_keys"
down_revision: str | None = "0012_stripe_invoices"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("organizations", sa.Column("external_id", sa.String(255), nullable=True))
    op.create_unique_constraint(
        op.f("uq_organizations_external_id"), "organizations", ["external_id"]
    )
    op.add_column("subscriptions", sa.Column("external_id", sa.String(255), nullable=True))
    op.create_unique_constraint(
        op.f("uq_subscriptions_external_id"), "subscriptions", ["external_id"]
    )
    op.add_column(
        "api_keys",
        sa.Column("platform", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.alter_column("api_keys", "organization_id", existing_type=sa.Uuid(), nullable=True)
    op.create_check_constraint(
        op.f("ck_api_keys_platform_scope"),
        "api_keys",
        "(platform AND organization_id IS NULL AND project_id IS NULL AND user_id IS NULL)"
        " OR (NOT platform AND organization_id IS NOT NULL)",
    )


def downgrade() -> None:
    op.execute("DELETE FROM api_keys WHERE platform")
    op.drop_constraint(op.f("ck_api_keys_platform_scope"), "api_keys", type_="check")
    op.alter_column("api_keys", "organization_id", existing_type=sa.Uuid(), nullable=False)
    op.drop_column("api_keys", "platform")
    op.drop_constraint(op.f("uq_subscriptions_external_id"), "subscriptions", type_="unique")
    op.drop_column("subscriptions", "external_id")
    op.drop_constraint(op.f("uq_organizations_external_id"), "organizations", type_="unique")
    op.drop_column("organizations", "external_id")
