"""api_key_deletions: a tombstone per deleted key; a key whose user is deleted is revoked

Revision ID: 0009_api_key_tombstones
Revises: 0008_usage_daily_repair
Create Date: 2026-11-25 19:30:00+00:00

Ingest learns of revoked and changed keys by polling api_keys; a deleted key (alone, or with its
organization or project) leaves no row to poll. A statement trigger writes the keyed hash of every
deleted key, cascades included, to api_key_deletions, which the poll reads too; rows older than a
day (the poll's margin is 30 seconds) are pruned by the same trigger.

Deleting a user sets api_keys.user_id to NULL, which would turn that member's user-scoped key
into an organization-wide one: the membership trigger that revokes it may run after the SET NULL
has cleared the column it matches on. A row trigger on api_keys revokes any key whose user_id is
cleared, whatever cleared it.

Old code still runs while this migrates: it neither reads nor writes api_key_deletions, and its
deletes gain the trigger.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_api_key_tombstones"
down_revision: str | None = "0008_usage_daily_repair"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TOMBSTONE = """
CREATE FUNCTION api_keys_tombstone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO api_key_deletions (key_hash, deleted_at)
    SELECT key_hash, now() FROM deleted_keys
    ON CONFLICT (key_hash) DO UPDATE SET deleted_at = excluded.deleted_at;
    DELETE FROM api_key_deletions WHERE deleted_at < now() - interval '1 day';
    RETURN NULL;
END;
$$
"""

_REVOKE_WITHOUT_USER = """
CREATE FUNCTION api_keys_revoke_without_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.user_id IS NOT NULL AND NEW.user_id IS NULL THEN
        NEW.revoked_at := coalesce(NEW.revoked_at, now());
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END;
$$
"""


def upgrade() -> None:
    op.create_table(
        "api_key_deletions",
        sa.Column("key_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column(
            "deleted_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("key_hash", name=op.f("pk_api_key_deletions")),
    )
    op.create_index(
        op.f("ix_api_key_deletions_deleted_at"), "api_key_deletions", ["deleted_at"], unique=False
    )
    op.execute(_TOMBSTONE)
    op.execute(
        "CREATE TRIGGER api_keys_after_delete AFTER DELETE ON api_keys"
        " REFERENCING OLD TABLE AS deleted_keys"
        " FOR EACH STATEMENT EXECUTE FUNCTION api_keys_tombstone()"
    )
    op.execute(_REVOKE_WITHOUT_USER)
    op.execute(
        "CREATE TRIGGER api_keys_revoke_without_user BEFORE UPDATE OF user_id ON api_keys"
        " FOR EACH ROW EXECUTE FUNCTION api_keys_revoke_without_user()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER api_keys_revoke_without_user ON api_keys")
    op.execute("DROP FUNCTION api_keys_revoke_without_user()")
    op.execute("DROP TRIGGER api_keys_after_delete ON api_keys")
    op.execute("DROP FUNCTION api_keys_tombstone()")
    op.drop_index(op.f("ix_api_key_deletions_deleted_at"), table_name="api_key_deletions")
    op.drop_table("api_key_deletions")
