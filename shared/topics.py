"""The pipeline's Kafka topics: the events topic and its dead-letter topic, created when absent.

Ingest creates them before it publishes, the aggregator before it subscribes (Faust does not
declare a source topic, and a group that starts before its topic exists is assigned nothing).
"""

from __future__ import annotations

import contextlib

from shared.settings import Settings


def ensure_topics(settings: Settings) -> list[str]:
    """Create the events and dead-letter topics if they are absent; returns those created."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers.split(","),
        client_id="meterline-admin",
        request_timeout_ms=10_000,
    )
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in (settings.events_topic, settings.dlq_topic) if t not in existing]
        if not wanted:
            return []
        with contextlib.suppress(TopicAlreadyExistsError):  # another worker won the race
            admin.create_topics(
                {
                    topic: {"num_partitions": settings.topic_partitions, "replication_factor": -1}
                    for topic in wanted
                },
                wait_for_metadata=True,
            )
        return wanted
    finally:
        admin.close()
