"""Topics are created to hold the lateness horizon (plus the grace) with the replication the
settings ask for; an existing topic that keeps less is named with the setting that fixes it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

from kafka.admin import ConfigResource, ConfigResourceType

from shared.kafka import create_admin
from shared.settings import Settings
from shared.topics import TopicRetention, ensure_topics, retention_shortfalls
from tests.aggregator_support import create_topics


def topic_config(settings: Settings, topic: str) -> dict[str, str]:
    admin = create_admin(settings)
    try:
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all"
        )
    finally:
        admin.close()
    return {name: str(c["value"]) for name, c in described["topic"][topic].items()}


def test_topics_are_created_with_the_horizon_plus_grace_and_the_in_sync_minimum(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        topic_prefix=f"t{uuid.uuid4().hex[:8]}",
        lateness_horizon_days=10,
        ledger_grace_hours=12,
        topic_replication_factor=1,
        topic_min_insync_replicas=1,
    )

    created = ensure_topics(settings)

    assert created == [settings.events_topic, settings.dlq_topic]
    for topic in created:
        config = topic_config(settings, topic)
        assert config["retention.ms"] == str((10 * 24 + 12) * 3600 * 1000)
        assert config["cleanup.policy"] == "delete"
        assert config["min.insync.replicas"] == "1"
    # A dead letter about a whole record carries it in base64, so it is larger than the record.
    assert int(topic_config(settings, settings.dlq_topic)["max.message.bytes"]) >= 2 * 1024 * 1024
    assert ensure_topics(settings) == []
    assert retention_shortfalls(settings, created) == []


def test_existing_topic_that_keeps_less_than_the_horizon_is_named_with_its_setting(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(topic_prefix=f"t{uuid.uuid4().hex[:8]}")
    create_topics(settings.kafka_bootstrap_servers, [settings.events_topic], 1,
                  configs={"retention.ms": str(7 * 24 * 3600 * 1000)})  # fmt: skip
    create_topics(settings.kafka_bootstrap_servers, [settings.dlq_topic], 1,
                  configs={"cleanup.policy": "compact"})  # fmt: skip

    found = retention_shortfalls(settings, [settings.events_topic, settings.dlq_topic])

    assert len(found) == 2
    events, dlq = sorted(found, key=lambda m: settings.dlq_topic in m)
    assert "keeps records for 168 hours (retention.ms=604800000)" in events
    assert "METERLINE_LATENESS_HORIZON_DAYS" in events and "retention.ms to at least" in events
    assert "compacted" in dlq


def test_retention_of_forever_or_the_horizon_is_enough() -> None:
    horizon = timedelta(days=35)

    assert TopicRetention(-1, "delete").problem(horizon) is None
    assert TopicRetention(int(horizon.total_seconds() * 1000), "delete").problem(horizon) is None
    assert TopicRetention(int(horizon.total_seconds() * 1000) - 1, "delete").problem(horizon)
    assert TopicRetention(-1, "compact,delete").problem(horizon)
