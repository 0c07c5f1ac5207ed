"""The stall watchdog's decision: lag and no batch for too long means stalled, nothing else does."""

from __future__ import annotations

import pytest

from services.aggregator.app import SESSION_TIMEOUT_SECONDS, is_stalled

STALL = 60.0


@pytest.mark.parametrize(
    ("idle", "lag", "assigned", "busy", "stalled"),
    [
        (STALL, 10, True, False, True),  # lag on our partitions, no batch for the whole window
        (STALL - 1, 10, True, False, False),  # not yet
        (STALL * 10, 0, True, False, False),  # idle because there is nothing to do
        (STALL * 10, 10, True, True, False),  # a batch is running (a database outage retries)
        (STALL, 10, False, False, False),  # unassigned: a rebalance may wait out a session
        (STALL + SESSION_TIMEOUT_SECONDS, 10, False, False, True),  # ...but not forever
    ],
)
def test_consumer_is_stalled_only_with_lag_and_no_batch_for_the_stall_window(
    idle: float, lag: int, assigned: bool, busy: bool, stalled: bool
) -> None:
    assert (
        is_stalled(idle_seconds=idle, lag=lag, assigned=assigned, busy=busy, stall_seconds=STALL)
        is stalled
    )
