"""The console's kept Kafka readers against a real broker: the dead-letter reader, one consumer
kept for many listings, answers what a fresh list_dead_letters answers, new letters and the
`replay dlq` offsets included; the lag reader sees each new commit of the group."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from services.aggregator.consumer_lag import PartitionLagReader
from services.aggregator.dead_letters import DeadLetterReader, list_dead_letters
from services.aggregator.dlq_replay import replay_dead_letters
from shared.kafka import create_consumer
from shared.settings import Settings
from shared.topics import ensure_topics
from tests.aggregator_support import Producer, envelope_bytes, event
from tests.console_support import produce_dead_letter


def _letter(settings: Settings, organization_id: uuid.UUID, code: str = "unknown_reference") -> str:
    payload = envelope_bytes(
        organization_id, [event(f"e-{uuid.uuid4()}", timestamp=datetime.now(UTC))]
    )
    partition, offset = produce_dead_letter(
        settings.kafka_bootstrap_servers, settings.dlq_topic, payload,
        organization_id=organization_id, code=code,
    )  # fmt: skip
    return f"{partition}:{offset}"


def test_a_kept_reader_lists_what_a_fresh_one_lists_as_letters_arrive_and_are_replayed(
    make_settings: Callable[..., Settings], topic_prefix: str
) -> None:
    settings = make_settings(topic_prefix=topic_prefix)
    ensure_topics(settings)
    reader = DeadLetterReader(settings)
    try:
        organization_id = uuid.uuid4()
        first = [_letter(settings, organization_id) for _ in range(3)]
        listed = reader.listing(limit=10)
        assert sorted(v.reference for v in listed.letters) == sorted(first)
        assert (listed.retained, listed.pending) == (3, 3)

        second = _letter(settings, organization_id, code="database_rejected")
        again = reader.listing(limit=10)
        fresh = list_dead_letters(settings, limit=10)
        assert [v.reference for v in again.letters] == [v.reference for v in fresh.letters]
        assert second in {v.reference for v in again.letters}
        assert again.by_code == {"unknown_reference": 3, "database_rejected": 1}

        replay_dead_letters(settings)  # commits its offsets: nothing is pending any more
        assert (reader.listing(limit=10).pending, reader.listing(limit=2).retained) == (0, 4)
        assert len(reader.listing(limit=2).letters) == 2
    finally:
        reader.close()


def test_a_kept_lag_reader_sees_each_new_commit_of_the_group(
    make_settings: Callable[..., Settings], topic_prefix: str
) -> None:
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    settings = make_settings(topic_prefix=topic_prefix)
    ensure_topics(settings)
    group = f"{topic_prefix}-aggregator"
    producer = Producer(settings.kafka_bootstrap_servers)
    organization_id = uuid.uuid4()
    for _ in range(3):
        producer.send(settings.events_topic, organization_id, b"{}")
    producer.flush()
    producer.close()
    reader = PartitionLagReader(settings, group, settings.events_topic)
    committer = create_consumer(settings, client_id="tests-committer", group_id=group)
    try:
        before = {p.partition: (p.committed, p.end) for p in reader.read()}
        [(partition, (committed, end))] = [(k, v) for k, v in before.items() if v[1]]
        assert (committed, end) == (None, 3)
        tp = TopicPartition(settings.events_topic, partition)
        committer.assign([tp])
        committer.commit({tp: OffsetAndMetadata(2, "", -1)})
        after = {p.partition: p for p in reader.read()}
        assert (after[partition].committed, after[partition].lag) == (2, 1)
    finally:
        committer.close()
        reader.close()
