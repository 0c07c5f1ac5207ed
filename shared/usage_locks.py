"""The locks every writer of an organization's usage takes: live batches, replay, the daily rollup's
triggers and the registration of usage cuts all serialise on them, in one order.

Advisory lock namespaces (the two-int4 lock space, apart from anyone's single-bigint locks).
Live batches hold REPLAY_LOCK shared; replay and ledger maintenance hold it exclusive, so neither
can interleave with a batch. ORG_LOCK serialises two writers of one organization (a rebalance, a
batch and a cut registration); migration 0007's usage_daily_recompute takes the same keys.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

LOCK_NAMESPACE = 0x4D4C  # "ML"
REPLAY_LOCK = (LOCK_NAMESPACE, 1)
ORG_LOCK_NAMESPACE = 0x4D4D


def lock_shared_for_batch(connection: Connection, organization_ids: Iterable[uuid.UUID]) -> None:
    """Replay lock shared, then every organization of the batch exclusive, in one sorted order."""
    connection.execute(
        sa.text("SELECT pg_advisory_xact_lock_shared(:ns, :key)"),
        {"ns": REPLAY_LOCK[0], "key": REPLAY_LOCK[1]},
    )
    connection.execute(
        sa.text(
            # Sorted in the subquery so two batches take overlapping locks in the same order.
            "SELECT count(pg_advisory_xact_lock(:ns, h)) FROM ("
            "  SELECT DISTINCT hashtext(o::text) AS h FROM unnest(CAST(:orgs AS uuid[])) AS o"
            "  ORDER BY h) AS ordered"
        ),
        {"ns": ORG_LOCK_NAMESPACE, "orgs": sorted(set(organization_ids))},
    )


def lock_exclusive(connection: Connection) -> None:
    """Wait for running batches to finish and hold new ones off until this transaction ends."""
    connection.execute(
        sa.text("SELECT pg_advisory_xact_lock(:ns, :key)"),
        {"ns": REPLAY_LOCK[0], "key": REPLAY_LOCK[1]},
    )
