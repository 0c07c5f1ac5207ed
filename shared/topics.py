"""The pipeline's Kafka topics: the events topic and its dead-letter topic, created when absent
with the retention, replication factor and `min.insync.replicas` the settings ask for, and
checked when they exist (a topic that keeps less than the lateness horizon breaks replay).

Ingest creates them before it publishes, the aggregator before it subscribes (Faust does not
declare a source topic, and a group that starts before its topic exists is assigned nothing).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta

from shared.kafka import create_admin
from shared.settings import Settings

RETENTION_SETTING = "retention.ms"


# A dead letter about a whole record carries it in base64: room for any record the events topic
# takes (1 MB by default), and more.
DLQ_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def topic_configs(settings: Settings, topic: str) -> dict[str, str]:
    """The topic-level configuration of a topic Meterline creates."""
    configs = {
        # Keyed by organization: compaction would keep one record per organization.
        "cleanup.policy": "delete",
        RETENTION_SETTING: str(int(settings.topic_retention.total_seconds() * 1000)),
    }
    if settings.topic_min_insync_replicas is not None:
        configs["min.insync.replicas"] = str(settings.topic_min_insync_replicas)
    if topic == settings.dlq_topic:
        configs["max.message.bytes"] = str(DLQ_MAX_MESSAGE_BYTES)
    return configs


def ensure_topics(settings: Settings) -> list[str]:
    """Create the events and dead-letter topics if they are absent; returns those created."""
    from kafka.errors import TopicAlreadyExistsError

    admin = create_admin(settings)
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in (settings.events_topic, settings.dlq_topic) if t not in existing]
        if not wanted:
            return []
        with contextlib.suppress(TopicAlreadyExistsError):  # another worker won the race
            admin.create_topics(
                {
                    topic: {
                        "num_partitions": settings.topic_partitions,
                        # -1: the broker's default.replication.factor.
                        "replication_factor": settings.topic_replication_factor or -1,
                        "configs": topic_configs(settings, topic),
                    }
                    for topic in wanted
                },
                wait_for_metadata=True,
            )
        return wanted
    finally:
        admin.close()


@dataclass(frozen=True, slots=True)
class TopicRetention:
    """How long a topic keeps records: retention.ms (-1: forever) and cleanup.policy."""

    retention_ms: int
    cleanup_policy: str

    def problem(self, horizon: timedelta) -> str | None:
        """Why this topic cannot hold `horizon` of records, or None."""
        if "compact" in self.cleanup_policy.split(","):
            return (
                f"is compacted (cleanup.policy={self.cleanup_policy}), so it keeps one record "
                "per key"
            )
        if 0 <= self.retention_ms < horizon.total_seconds() * 1000:
            hours = self.retention_ms / 3_600_000
            return f"keeps records for {hours:g} hours ({RETENTION_SETTING}={self.retention_ms})"
        return None


def describe_retention(settings: Settings, topics: list[str]) -> dict[str, TopicRetention]:
    """The effective retention of each topic of `topics` that exists."""
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = create_admin(settings)
    try:
        present = set(admin.list_topics())
        resources = [
            ConfigResource(
                ConfigResourceType.TOPIC,
                topic,
                configs={RETENTION_SETTING: None, "cleanup.policy": None},
            )
            for topic in topics
            if topic in present
        ]
        if not resources:
            return {}
        described = admin.describe_configs(resources, config_filter="all")
    finally:
        admin.close()
    return {
        topic: TopicRetention(
            int(configs[RETENTION_SETTING]["value"]), str(configs["cleanup.policy"]["value"])
        )
        for topic, configs in described.get("topic", {}).items()
    }


def retention_message(settings: Settings, topic: str, problem: str) -> str:
    """One line for an operator: what is wrong with the topic and the setting that fixes it."""
    needed_ms = int(settings.topic_retention.total_seconds() * 1000)
    return (
        f"topic {topic} {problem}, less than the {settings.lateness_horizon_days}-day lateness "
        "horizon (METERLINE_LATENESS_HORIZON_DAYS) that replay and the ledger rely on; set the "
        f"topic's {RETENTION_SETTING} to at least {needed_ms} (kafka-configs --alter "
        f"--entity-type topics --entity-name {topic} --add-config {RETENTION_SETTING}={needed_ms})"
    )


def retention_shortfalls(settings: Settings, topics: list[str]) -> list[str]:
    """A message for each existing topic of `topics` that keeps less than the lateness
    horizon or compacts its records."""
    found = []
    for topic, retention in sorted(describe_retention(settings, topics).items()):
        problem = retention.problem(settings.lateness_horizon)
        if problem:
            found.append(retention_message(settings, topic, problem))
    return found
