"""The aggregator checks the topics it reads at start: one that keeps less than the lateness
horizon is named in a warning, with the setting to raise, and counting still goes on."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from sqlalchemy.engine import Engine

from tests.aggregator_support import (
    AggregatorProcess,
    Producer,
    create_topics,
    envelope_bytes,
    event,
    make_tenant,
    totals,
    wait_for,
)


def test_aggregator_warns_about_a_topic_that_keeps_less_than_the_horizon(
    engine: Engine, service_env: dict[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    bootstrap = service_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic = f"{topic_prefix}.usage.events"
    week = str(7 * 24 * 3600 * 1000)
    create_topics(bootstrap, [topic, f"{topic}.dlq"], 2, configs={"retention.ms": week})
    tenant = make_tenant(engine)
    producer = Producer(bootstrap)
    producer.send(
        topic,
        tenant.organization_id,
        envelope_bytes(tenant.organization_id, [event("w1", timestamp=datetime.now(UTC))]),
    )
    producer.flush()
    producer.close()
    log = tmp_path / "aggregator.log"
    aggregator = AggregatorProcess(
        {**service_env, "METERLINE_TOPIC_PREFIX": topic_prefix}, log
    ).start()
    try:
        wait_for(lambda: totals(engine, tenant.organization_id)[1] == 1, timeout=90, what="w1")
    finally:
        aggregator.stop()

    warnings = [line for line in log.read_text().splitlines() if "topic_retention_short" in line]
    assert len(warnings) == 2
    assert all(f"retention.ms={week}" in line for line in warnings)
    assert all("METERLINE_LATENESS_HORIZON_DAYS" in line for line in warnings)
    assert totals(engine, tenant.organization_id) == (Decimal(1), 1)
