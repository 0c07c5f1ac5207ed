"""The real aggregator process on real Kafka and PostgreSQL: totals equal the distinct events."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
from sqlalchemy.engine import Engine

from tests.aggregator_support import (
    AggregatorProcess,
    Producer,
    create_topics,
    dead_letters,
    envelope_bytes,
    event,
    make_tenant,
    totals,
    wait_for,
)


def test_stream_with_repeats_late_events_and_poison_counts_each_distinct_event_once(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    bootstrap = service_env["KAFKA_BOOTSTRAP_SERVERS"]
    events_topic, dlq_topic = f"{topic_prefix}.usage.events", f"{topic_prefix}.usage.events.dlq"
    create_topics(bootstrap, [events_topic, dlq_topic], partitions=4)
    tenants = [make_tenant(engine, projects=2, keys=2) for _ in range(3)]
    now = datetime.now(UTC)
    rng = random.Random(7)
    expected: dict[object, tuple[Decimal, int]] = {}
    producer = Producer(bootstrap)
    sent_batches = []
    for tenant in tenants:
        org = tenant.organization_id
        distinct = []
        for i in range(300):
            late = i % 10 == 0
            distinct.append(
                event(
                    f"e{i}",
                    quantity=rng.choice(["1", "2", "0.25", "10"]),
                    timestamp=now
                    - (timedelta(days=rng.randint(1, 30)) if late else timedelta(seconds=i)),
                    project_id=rng.choice([None, *tenant.project_ids]),
                    metric=rng.choice(["api_calls", "storage_gb"]),
                )
            )
        expected[org] = (sum((e.quantity for e in distinct), Decimal(0)), len(distinct))
        for start in range(0, len(distinct), 25):
            chunk = distinct[start : start + 25]
            # Each chunk once, some twice (a client retry), plus one id repeated inside it.
            value = envelope_bytes(
                org, [*chunk, chunk[0]], api_key_id=rng.choice(tenant.key_ids), received_at=now
            )
            sent_batches.append((org, value))
            if start % 50 == 0:
                sent_batches.append((org, value))
    sent_batches.insert(40, (tenants[0].organization_id, b"{not an envelope"))
    for org, value in sent_batches:
        producer.send(events_topic, org, value)
    producer.flush()
    env = {**service_env, "METERLINE_TOPIC_PREFIX": topic_prefix}
    aggregator = AggregatorProcess(env, tmp_path / "aggregator.log").start()
    try:
        wait_for(
            lambda: all(
                totals(engine, t.organization_id)[1] >= expected[t.organization_id][1]
                for t in tenants
            ),
            timeout=90,
            what="every distinct event counted",
        )
        # Replay the whole stream into the same group's topic once more: still counted once.
        for org, value in sent_batches[:30]:
            producer.send(events_topic, org, value)
        producer.flush()
        wait_for(lambda: len(dead_letters(bootstrap, dlq_topic)) >= 1, timeout=30, what="the DLQ")
        health = aggregator.health()
        exposition = httpx.get(f"http://127.0.0.1:{aggregator.port}/metrics", timeout=5).text
    finally:
        aggregator.stop()
        producer.close()

    for tenant in tenants:
        assert totals(engine, tenant.organization_id) == expected[tenant.organization_id]
    assert health is not None and health["status"] == "ok"
    assert sorted(health["assigned_partitions"]) == [0, 1, 2, 3]
    counted = sum(n for _, n in expected.values())
    assert f"meterline_aggregator_events_total {float(counted)}" in exposition
    assert 'meterline_aggregator_dlq_total{code="malformed"} 1.0' in exposition
    letters = dead_letters(bootstrap, dlq_topic)
    assert [letter["code"] for letter in letters] == ["malformed"]
    assert letters[0]["reason"].startswith("malformed envelope")


def test_prune_ledger_reports_partitions_as_json(service_env: dict[str, str]) -> None:
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [str(Path(sys.executable).parent / "meterline"), "aggregate", "prune-ledger", "--json"],
        env=service_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert set(document) == {
        "cutoff",
        "oldest_unprocessed",
        "forced",
        "created",
        "dropped",
        "dry_run",
    }
    assert document["dropped"] == []


def test_caught_up_aggregator_is_not_taken_for_stalled(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    bootstrap = service_env["KAFKA_BOOTSTRAP_SERVERS"]
    events_topic = f"{topic_prefix}.usage.events"
    create_topics(bootstrap, [events_topic, f"{topic_prefix}.usage.events.dlq"], partitions=2)
    tenant = make_tenant(engine)
    org = tenant.organization_id
    producer = Producer(bootstrap)
    for i in range(20):
        producer.send(
            events_topic, org, envelope_bytes(org, [event(f"w{i}", timestamp=datetime.now(UTC))])
        )
    producer.flush()
    producer.close()
    aggregator = AggregatorProcess(
        {**service_env, "METERLINE_TOPIC_PREFIX": topic_prefix},
        tmp_path / "aggregator.log",
        METERLINE_AGGREGATOR_STALL_SECONDS="2",
    ).start()
    try:
        wait_for(lambda: totals(engine, org) == (Decimal(20), 20), timeout=60, what="the events")
        # Idle for several stall windows with every offset committed: no lag, no stall.
        time.sleep(12)
        status = httpx.get(f"http://127.0.0.1:{aggregator.port}/healthz", timeout=5)
        alive = aggregator.process is not None and aggregator.process.poll() is None
    finally:
        aggregator.stop()

    assert alive, (tmp_path / "aggregator.log").read_text()[-2000:]
    assert status.status_code == 200 and status.json()["status"] == "ok"
