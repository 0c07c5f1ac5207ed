"""index api_keys by updated_at and revoked_at for ingest's change poll

Revision ID: 0005_api_key_change_indexes
Revises: 0004_subscription_anchor
Create Date: 2026-11-25 18:30:00+00:00

Old code still runs while this migrates: add before you remove, and keep each step backward
compatible with the release that is running.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005_api_key_change_indexes"
down_revision: str | None = "0004_subscription_anchor"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_api_keys_updated_at", "api_keys", ["updated_at"], unique=False)
    op.create_index("ix_api_keys_revoked_at", "api_keys", ["revoked_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_api_keys_revoked_at", table_name="api_keys")
    op.drop_index("ix_api_keys_updated_at", table_name="api_keys")
