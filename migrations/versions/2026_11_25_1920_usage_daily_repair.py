"""usage_daily: rebuild the rollup under a lock on usage_records

Revision ID: 0008_usage_daily_repair
Revises: 0007_usage_daily_rollup
Create Date: 2026-11-25 19:20:00+00:00

The first version of 0007 filled usage_daily before its triggers existed and without a lock, so
usage committed while it ran is missing from the rollup billing reads. This recomputes the whole
rollup from usage_records once more, with writers of usage_records held off (readers go on) for
the length of one set-based rebuild; the triggers keep it exact from there.

Old code still runs while this migrates: its writes to usage_records wait for the lock (at most
the lock_timeout of migrations/env.py before this migration gives up and can be run again).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008_usage_daily_repair"
down_revision: str | None = "0007_usage_daily_rollup"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every writer that holds a row lock on usage_records finishes before the rebuild reads it,
    # and none starts until this commits: the rebuild sees a state no trigger is racing with.
    op.execute("LOCK TABLE usage_records IN SHARE ROW EXCLUSIVE MODE")
    op.execute("SELECT usage_daily_rebuild()")


def downgrade() -> None:
    # Nothing to undo: the rollup stays exact, and 0007's downgrade removes it.
    pass
