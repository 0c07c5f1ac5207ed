"""`meterline aggregate prune-ledger` reads the aggregator group's backlog before it drops."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.aggregator_support import create_topics, envelope_bytes, event

METERLINE = str(Path(sys.executable).parent / "meterline")


def prune(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METERLINE, "aggregate", "prune-ledger", "--dry-run", "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def stream_env(service_env: dict[str, str], topic_prefix: str) -> dict[str, str]:
    create_topics(
        service_env["KAFKA_BOOTSTRAP_SERVERS"],
        [f"{topic_prefix}.usage.events", f"{topic_prefix}.usage.events.dlq"],
        2,
    )
    return {**service_env, "METERLINE_TOPIC_PREFIX": topic_prefix}


def test_prune_refuses_while_the_group_lags_beyond_the_grace_unless_forced(
    service_env: dict[str, str], topic_prefix: str
) -> None:
    from kafka import KafkaProducer

    env = stream_env(service_env, topic_prefix)
    received = datetime.now(UTC) - timedelta(days=3)
    org = uuid.uuid4()
    producer = KafkaProducer(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"], acks="all")
    producer.send(
        f"{topic_prefix}.usage.events",
        key=str(org).encode(),
        value=envelope_bytes(org, [event("old", timestamp=received)], received_at=received),
        timestamp_ms=int(received.timestamp() * 1000),
    ).get(timeout=30)
    producer.close()

    refused = prune(env)
    forced = prune(env, "--force")

    assert refused.returncode == 1 and refused.stdout == ""
    error = json.loads(refused.stderr)["error"]
    assert error["code"] == "conflict" and "lags" in error["message"]
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["forced"] is True


def test_prune_without_a_backlog_prunes_by_the_clock(
    service_env: dict[str, str], topic_prefix: str
) -> None:
    env = stream_env(service_env, topic_prefix)

    done = prune(env)

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["oldest_unprocessed"] is None and report["forced"] is False
