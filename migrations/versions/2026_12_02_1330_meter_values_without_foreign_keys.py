"""meter_values without foreign keys: its organization's deletion removes its rows by trigger

Revision ID: 0024_meter_values_unkeyed
Revises: 0023_usage_monthly
Create Date: 2026-12-02 13:30:00+00:00

One `meter_values` row is written per distinct value and window, and each row's three foreign
key checks were a third of the time PostgreSQL spent on a batch's meter statement. Nothing is
lost by dropping them: every row is written in the same statement as its `meter_windows` row
(whose keys still check the organization, project and api key, and still refuse deleting a
project or key that has usage), and replay deletes a window's values with it. What the
organization's key did besides, ON DELETE CASCADE, a statement trigger on organizations does.
Old code still runs while this migrates: it writes the same rows.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0024_meter_values_unkeyed"
down_revision: str | None = "0023_usage_monthly"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEYS = (
    (
        "fk_meter_values_organization_id_organizations",
        "organization_id",
        "organizations",
        "CASCADE",
    ),
    ("fk_meter_values_project_id_projects", "project_id", "projects", None),
    ("fk_meter_values_api_key_id_api_keys", "api_key_id", "api_keys", None),
)


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION delete_organizations_meter_values() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM meter_values WHERE organization_id IN (SELECT id FROM deleted);
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER organizations_delete_meter_values
        AFTER DELETE ON organizations REFERENCING OLD TABLE AS deleted
        FOR EACH STATEMENT EXECUTE FUNCTION delete_organizations_meter_values()
        """
    )
    for name, _column, _table, _ondelete in _KEYS:
        op.drop_constraint(name, "meter_values", type_="foreignkey")


def downgrade() -> None:
    for name, column, table, ondelete in _KEYS:
        op.create_foreign_key(name, "meter_values", table, [column], ["id"], ondelete=ondelete)
    op.execute("DROP TRIGGER IF EXISTS organizations_delete_meter_values ON organizations")
    op.execute("DROP FUNCTION IF EXISTS delete_organizations_meter_values()")
