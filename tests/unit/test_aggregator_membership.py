"""The aggregator's static group membership: one id per running instance, the same after a
restart, so a restarted instance takes its own partitions back without a rebalance."""

from __future__ import annotations

import socket

import pytest

from services.aggregator.app import group_instance_id
from shared.settings import load_settings


@pytest.mark.parametrize(
    ("instance_id", "port", "expected"),
    [
        ("auto", 6066, f"{socket.gethostname()}-6066"),
        ("auto", 0, None),
        ("none", 6066, None),
        ("agg-2", 6066, "agg-2"),
    ],
)
def test_static_group_id_is_stable_per_host_and_port_unless_told_otherwise(
    instance_id: str, port: int, expected: str | None
) -> None:
    configured = load_settings(aggregator_instance_id=instance_id, aggregator_web_port=port)

    assert group_instance_id(configured) == expected
