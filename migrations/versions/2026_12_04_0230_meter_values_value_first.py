"""meter_values' unique index compares the value before the dimensions

Revision ID: 0026_meter_values_value_first
Revises: 0025_update_room
Create Date: 2026-12-04 02:30:00+00:00

Each distinct value a batch sees is an insert into meter_values, and each insert descends its
unique index. With the dimensions (JSONB) before the value, the rows of one window share every
column up to the dimensions, so most comparisons of a descent had to compare two JSONB values;
with the value first they are decided by a plain text comparison, and the dimensions are
compared only between rows of the same value. Same columns, same uniqueness (the statements
name no conflict target), same prefix (organization, metric, window) for the range reads.
Measured on a table of 127,500 values: inserting a batch's 25,500 new ones took 466 ms instead
of 606 (-23%); within a whole aggregator batch the gain is within the run-to-run noise.

The index is built CONCURRENTLY beside the old one (writes go on), then the old one is dropped
and the new one takes its name. A build interrupted midway leaves an invalid index under the
new name: running the migration again drops it and builds it again; a finished build is kept
(the old index may already be gone, and then it is the one enforcing uniqueness).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0026_meter_values_value_first"
down_revision: str | None = "0025_update_room"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = "uq_meter_values_value"
_BUILDING = "uq_meter_values_value_next"
_VALUE_FIRST = (
    "organization_id, metric, window_start, window_seconds, value, project_id, api_key_id,"
    " dimensions"
)
_DIMENSIONS_FIRST = (
    "organization_id, metric, window_start, window_seconds, project_id, api_key_id,"
    " dimensions, value"
)


def _rebuild(columns: str) -> None:
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        kept = {
            name: bind.execute(sa.text(f"SHOW {name}")).scalar_one()
            for name in ("lock_timeout", "statement_timeout")
        }
        # CONCURRENTLY blocks no writer but waits for every older transaction, and a table of
        # every distinct value of every window takes its time to index: no timeout here.
        bind.execute(sa.text("SET lock_timeout = 0"))
        bind.execute(sa.text("SET statement_timeout = 0"))
        # A rerun after an interruption: an invalid build is dropped and made again; a valid one
        # may be the only index left enforcing uniqueness (the old one dropped), so it is kept.
        valid = bind.execute(
            sa.text(
                "SELECT i.indisvalid FROM pg_index AS i"
                " JOIN pg_class AS c ON c.oid = i.indexrelid WHERE c.relname = :name"
            ),
            {"name": _BUILDING},
        ).scalar_one_or_none()
        if valid is False:
            op.execute(f"DROP INDEX CONCURRENTLY {_BUILDING}")
        if not valid:
            op.execute(
                f"CREATE UNIQUE INDEX CONCURRENTLY {_BUILDING} ON meter_values ({columns})"
                " NULLS NOT DISTINCT"
            )
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {_NAME}")
        op.execute(f"ALTER INDEX {_BUILDING} RENAME TO {_NAME}")
        for name, value in kept.items():
            bind.execute(
                sa.text("SELECT set_config(:name, :value, false)"), {"name": name, "value": value}
            )


def upgrade() -> None:
    _rebuild(_VALUE_FIRST)


def downgrade() -> None:
    _rebuild(_DIMENSIONS_FIRST)
