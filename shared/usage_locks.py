"""The locks every writer of an organization's usage takes: live batches, replay, the daily rollup's
triggers and the registration of usage cuts all serialise on them, in one order.

Advisory lock namespaces (the two-int4 lock space, apart from anyone's single-bigint locks).
Live batches hold REPLAY_LOCK shared; replay and ledger maintenance hold it exclusive, so neither
can interleave with a batch. ORG_LOCK serialises two writers of one organization (a rebalance, a
batch and a cut registration); migration 0007's usage_daily_recompute takes the same keys.

A replay rebuilds its range slice by slice, each slice under REPLAY_LOCK alone, so between two
slices the range is part rebuilt and part as it was. While it rebuilds it holds REBUILD_LOCK
shared on its session; billing takes it exclusive around the snapshot its totals are read from
and refuses to run while a replay holds it, so no invoice is priced from a half-rebuilt range.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from shared.errors import Conflict

LOCK_NAMESPACE = 0x4D4C  # "ML"
REPLAY_LOCK = (LOCK_NAMESPACE, 1)
REBUILD_LOCK = (LOCK_NAMESPACE, 2)
ORG_LOCK_NAMESPACE = 0x4D4D


def lock_shared_for_batch(connection: Connection, organization_ids: Iterable[uuid.UUID]) -> None:
    """Replay lock shared, then every organization of the batch exclusive, in one sorted order."""
    connection.execute(
        sa.text("SELECT pg_advisory_xact_lock_shared(:ns, :key)"),
        {"ns": REPLAY_LOCK[0], "key": REPLAY_LOCK[1]},
    )
    connection.exec_driver_sql(
        # Sorted in the subquery so two batches take overlapping locks in the same order; the
        # batch's organizations in the binary format, cheaper to send than as text.
        "SELECT count(pg_advisory_xact_lock(%(ns)s, h)) FROM ("
        "  SELECT DISTINCT hashtext(o::text) AS h FROM unnest(%(orgs)b::uuid[]) AS o"
        "  ORDER BY h) AS ordered",
        {"ns": ORG_LOCK_NAMESPACE, "orgs": list(set(organization_ids))},
    )


def lock_exclusive(connection: Connection) -> None:
    """Wait for running batches to finish and hold new ones off until this transaction ends."""
    connection.execute(
        sa.text("SELECT pg_advisory_xact_lock(:ns, :key)"),
        {"ns": REPLAY_LOCK[0], "key": REPLAY_LOCK[1]},
    )


def hold_for_rebuild(connection: Connection) -> None:
    """Hold REBUILD_LOCK exclusive on this session (past the transaction) until
    `release_rebuild` or the session ends; waits for billing runs reading their totals and for
    another replay's rebuild."""
    connection.execute(
        sa.text("SELECT pg_advisory_lock(:ns, :key)"),
        {"ns": REBUILD_LOCK[0], "key": REBUILD_LOCK[1]},
    )


def release_rebuild(connection: Connection) -> None:
    connection.execute(
        sa.text("SELECT pg_advisory_unlock(:ns, :key)"),
        {"ns": REBUILD_LOCK[0], "key": REBUILD_LOCK[1]},
    )


@contextmanager
def no_rebuild_running(engine: Engine) -> Iterator[None]:
    """Hold REBUILD_LOCK shared for the block, on a session of its own, so no replay starts
    rebuilding meanwhile; Conflict at once if a replay is rebuilding now or about to."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        held = connection.execute(
            sa.text("SELECT pg_try_advisory_lock_shared(:ns, :key)"),
            {"ns": REBUILD_LOCK[0], "key": REBUILD_LOCK[1]},
        ).scalar_one()
        if not held:
            raise Conflict(
                "a replay is rebuilding usage (part of its range is rebuilt, the rest is not "
                "yet): billing would price a mix of both; run it again when the replay finishes"
            )
        try:
            yield
        finally:
            connection.execute(
                sa.text("SELECT pg_advisory_unlock_shared(:ns, :key)"),
                {"ns": REBUILD_LOCK[0], "key": REBUILD_LOCK[1]},
            )
